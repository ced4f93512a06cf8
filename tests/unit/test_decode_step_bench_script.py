"""scripts/decode_step_bench.py: its step clock from token arrivals, and a run on a tiny Mixtral (seconds)."""

import json
import subprocess
import sys

from ..support.scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "decode_step_bench.py"


def _bench_module():
    return load_script("decode_step_bench")


def test_step_times_are_the_steps_where_the_whole_batch_decodes():
    """Sequence 0 joins a step before sequence 1 and ends a step earlier; within a step their tokens are told
    a long while apart (as on a tiny model), a joining sequence's first (as the old loop told them). Steps
    1..5 start at 0, 10, 30, 60, 100 s: only the steps both decode (2->3, 3->4) count."""
    starts = [None, 0.0, 10.0, 30.0, 60.0, 100.0]
    told = [(0, starts[1], 1), (1, starts[2], 2), (0, starts[2] + 4, 2), (0, starts[3], 3), (1, starts[3] + 5, 3),
            (1, starts[4], 4), (0, starts[4] + 6, 4), (1, starts[5], 5)]
    assert _bench_module().step_times(told, batch=2) == [(16 + 25) / 2, (25 + 36) / 2]


def test_step_times_without_two_consecutive_steps_of_the_whole_batch_are_empty():
    told = [(0, 1.0, 1), (1, 1.1, 1), (0, 2.0, 2), (0, 3.0, 3), (1, 3.1, 3)]
    assert _bench_module().step_times(told, batch=2) == []


def test_the_bench_runs_through_the_decode_loop_and_transformers(tmp_path):
    from tests.support.hf_models import build_hf

    from moe_cluster.hf.importer import import_hf_checkpoint

    hf_dir, checkpoint = tmp_path / "hf", tmp_path / "moe"
    build_hf("mixtral").save_pretrained(hf_dir)
    import_hf_checkpoint(hf_dir, checkpoint, log=lambda _: None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--hf-model", str(hf_dir), "--checkpoint", str(checkpoint),
                           "--batch", "3", "--contexts", "4", "9", "--new-tokens", "5", "--hf-generate",
                           "--min-token-id", "0", "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["batch"] == 3 and report["threads"] == 1
    # the loop of the moe_cluster imported (engine/ or, in an older checkout, hf/), never a mix of checkouts
    assert report["decode_loop"] in ("moe_cluster.engine.scheduler", "moe_cluster.hf.decode_loop")
    assert [row["context"] for row in report["contexts"]] == [4, 9]
    for row in report["contexts"]:
        # 5 steps of the whole batch timed (6 such steps, then the requests are cancelled), however many steps
        # the prompts took to join; the loop drained before the next context
        assert row["steps"] == 5 and len(row["step_ms"]) == 5 and row["loop_steps"][0] >= 6, row
        assert 0 < row["median_ms"] <= row["p90_ms"] <= row["max_ms"]
        assert row["hf_generate"]["steps"] == 4 and row["hf_generate"]["median_ms"] > 0  # N tokens: N - 1 steps
        assert len(row["other_cores"]) == 1 and row["other_cores"][0] >= 0
    assert "median ms" in done.stdout and "HF generate" in done.stdout
