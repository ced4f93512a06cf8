"""`moe-cluster bench --decode` smoke test (tiny preset, a tiny Mixtral for the decode part): the
results file's shape, and every mode's answers held to the oracle (`reference_forward`) for
every T and layer, the concurrent clients' answers too, and the decode modes' tokens to the
in-process runner's.

Timings are never asserted here: they belong to benchmark runs, not to CI.

Slow (about 2.5 minutes, the suite's largest setup): `pytest -m slow tests/cluster/test_bench.py`. The
paths it times are each held to the oracle by the default suite (test_serving, test_channel,
test_hf_cluster, test_openai); this module checks the bench's own bookkeeping on top.
"""

import json

import pytest

from moe_cluster.core.config import preset_config
from moe_cluster.tools.bench import ORACLE_ATOL, BenchSettings, run_bench

from .conftest import free_port

pytestmark = pytest.mark.slow

MODES = {"inprocess", "monolithic", "handle", "handle-auto", "http"}
CONCURRENT_MODES = {"monolithic", "handle", "http"}
TOKENS = (1, 7, 64)
DECODE_MODES = {"decode-inprocess", "decode-cluster", "decode-cluster-router"}
TINY_MIXTRAL = (("hidden_size", 32), ("intermediate_size", 48), ("num_hidden_layers", 2), ("num_attention_heads", 4),
                ("num_key_value_heads", 2), ("num_local_experts", 4), ("vocab_size", 128))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    settings = BenchSettings(preset="tiny", tokens=TOKENS, clients=4, client_tokens=16, min_reps=2,
                             min_seconds=0.1, client_requests=2, port=free_port(), decode=True,
                             decode_models=("16-layer",), decode_model=TINY_MIXTRAL)
    lines = []
    returned = run_bench(settings, out, log=lines.append)
    return {"out": out, "settings": settings, "lines": lines, "returned": returned,
            "results": json.loads((out / "results.json").read_text())}


def test_every_mode_equals_the_oracle_for_every_T_and_layer(bench):
    results = bench["results"]
    layers = {str(layer) for layer in preset_config("tiny").moe_layer_ids}
    assert len(layers) == 2  # tiny has two MoE layers: both are checked
    max_diff = results["max_abs_diff_vs_oracle"]
    assert set(max_diff) == MODES  # tiny is not Mixtral-shaped: no transformers mode
    for mode, per_t in max_diff.items():
        assert set(per_t) == {str(t) for t in TOKENS}, mode
        for t, per_layer in per_t.items():
            assert set(per_layer) == layers, (mode, t)
            for layer, diff in per_layer.items():
                assert 0 <= diff < ORACLE_ATOL, f"{mode} T={t} layer={layer}: {diff:.2e} from the oracle"
    assert results["oracle_atol"] == ORACLE_ATOL == 1e-5
    assert results["wrong_answers"] == []


def test_concurrent_clients_answers_were_checked(bench):
    settings = bench["settings"]
    concurrent = bench["results"]["concurrent_vs_oracle"]
    assert set(concurrent) == CONCURRENT_MODES
    for mode, check in concurrent.items():
        # every client's warm-up and timed answers, each against the oracle of its own input
        assert check["answers_checked"] == settings.clients * (settings.client_requests + 1), mode
        assert 0 <= check["max_abs_diff"] < ORACLE_ATOL, f"{mode}: {check['max_abs_diff']:.2e} from the oracle"


def test_results_file_shape(bench):
    results = bench["results"]
    assert results == json.loads(json.dumps(bench["returned"]))  # the file holds what run_bench returned
    assert results["preset"] == "tiny"
    assert results["matmul_peak_gflops"] > 0 and results["serve_floor_p50_ms"] > 0
    assert results["serve_fanout_floor_p50_ms"] > 0 and results["fanout_width"] == 2  # tiny is top-2
    for tokens in map(str, TOKENS):  # where the router's time went, per T
        assert set(results["router_phases_ms"][tokens]) == {"route_ms", "experts_ms", "combine_ms"}
        assert results["router_phases_ms"][tokens]["experts_ms"] > 0
    assert results["serve_default_fanout_floor_p50_ms"] > 0
    records = [r for r in results["records"] if "batch" not in r]
    assert {(r["mode"], r["tokens"]) for r in records if r["clients"] == 1} == {(m, t) for m in MODES for t in TOKENS}
    for r in records:  # the cluster's transport on the cluster's records only
        assert r["transport"] == ("auto" if r["mode"] in ("handle", "handle-auto", "http") else None), r
    assert {r["mode"] for r in records if r["clients"] == 4} == CONCURRENT_MODES
    for r in records:
        assert set(r) >= {"mode", "tokens", "clients", "tokens_per_s", "p50_ms", "p99_ms"}
        assert r["tokens_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert set(results["summary"]) >= {"handle_over_inprocess", "handle_T1_p50_over_floor",
                                       "handle_T1_p50_over_fanout_floor", "handle_auto_T1_p50_over_fanout_floor",
                                       "concurrent_handle_over_inprocess"}
    assert (bench["out"] / "results.png").stat().st_size > 1000
    assert any("serve floor" in line for line in bench["lines"])  # progress was reported
    assert not any("WRONG ANSWER" in line for line in bench["lines"])


def test_decode_modes_equal_the_in_process_runner_at_batch_1_and_8(bench):
    results = bench["results"]
    decode = [r for r in results["records"] if "batch" in r]
    assert {(r["mode"], r["decode_model"], r["batch"]) for r in decode} \
        == {(m, "16-layer", b) for m in DECODE_MODES for b in (1, 8)}
    for r in decode:
        assert r["ms_per_token"] == r["p50_ms"] > 0 and r["requests"] > 0, r
        assert r["moe_calls"] == {"decode-cluster": "direct", "decode-cluster-router": "router"}.get(r["mode"])
    assert list(results["decode_models"]) == ["16-layer"] and results["decode_models"]["16-layer"]["hidden_size"] == 32
    # a cluster mode whose tokens differ from the in-process runner's would be listed here
    assert not [w for w in results["wrong_answers"] if "decode" in w]
    assert {"decode-cluster-16-layer_over_inprocess_batch1", "decode-cluster-16-layer_over_inprocess_batch8",
            "decode-cluster-router-16-layer_over_inprocess_batch1"} <= set(results["summary"])
