"""scripts/gpu_smoke.py: its core stage runs on the CPU here (the GPU run is by hand, see README)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.py"


def test_gpu_smoke_core_stage_passes_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--stages", "env,core", "--device", "cpu",
                           "--core-tokens", "1,8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert report["passed"] and not report["failed_checks"]
    core = [c for c in report["checks"] if c["name"].startswith("core.")]
    # both presets, fp32 and bf16, every T asked for
    assert {c["name"].split(".")[1] for c in core} == {"tiny", "mixtral-mini"}
    assert any(".bf16." in c["name"] for c in core) and any(c["name"].endswith(".T8") for c in core)


def test_gpu_smoke_runner_stage_passes_on_cpu(tmp_path):
    """The runner stage (the whole model on the device, greedy against transformers) runs on the CPU here."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--stages", "runner", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert {c["name"] for c in report["checks"] if c["passed"]} == {
        "runner.generate.fp32", "runner.decode_loop.fp32", "runner.auto_dtype"}
    assert report["runner"]["info"]["device"] == "cpu" and report["runner"]["auto.batch8.decode_ms_per_token"] > 0
