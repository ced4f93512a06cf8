"""`moe-cluster bench` smoke test (tiny preset): the results file's shape and correct outputs.

Timings are never asserted here: they belong to benchmark runs, not to CI.
"""

import json

from moe_cluster.tools.bench import BenchSettings, run_bench

from .conftest import free_port

MODES = {"inprocess", "monolithic", "handle", "http"}


def test_bench_tiny_writes_results(tmp_path):
    settings = BenchSettings(preset="tiny", tokens=(1, 64), clients=4, client_tokens=16, min_reps=2,
                             min_seconds=0.1, client_requests=2, port=free_port())
    lines = []
    run_bench(settings, tmp_path, log=lines.append)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["preset"] == "tiny"
    assert results["matmul_peak_gflops"] > 0 and results["serve_floor_p50_ms"] > 0
    assert results["serve_fanout_floor_p50_ms"] > 0 and results["fanout_width"] == 2  # tiny is top-2
    for tokens in ("1", "64"):  # where the router's time went, per T
        assert set(results["router_phases_ms"][tokens]) == {"route_ms", "experts_ms", "combine_ms"}
        assert results["router_phases_ms"][tokens]["experts_ms"] > 0
    assert set(results["max_abs_diff_vs_inprocess"]) == MODES
    assert max(results["max_abs_diff_vs_inprocess"].values()) < 1e-5  # every path computes the same MoE
    records = results["records"]
    assert {(r["mode"], r["tokens"]) for r in records if r["clients"] == 1} == {(m, t) for m in MODES for t in (1, 64)}
    assert {r["mode"] for r in records if r["clients"] == 4} == {"monolithic", "handle", "http"}
    for r in records:
        assert set(r) >= {"mode", "tokens", "clients", "tokens_per_s", "p50_ms", "p99_ms"}
        assert r["tokens_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert set(results["summary"]) >= {"handle_over_inprocess", "handle_T1_p50_over_floor",
                                       "handle_T1_p50_over_fanout_floor"}
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert any("serve floor" in line for line in lines)  # progress was reported
