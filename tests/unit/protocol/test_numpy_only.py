"""The wire formats and the client are numpy only: importing them loads no torch (and no Ray)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_protocol_and_client_import_without_torch():
    code = ("import sys\n"
            "import moe_cluster.protocol.v1, moe_cluster.protocol.oip, moe_cluster.protocol.oip_routes\n"
            "import moe_cluster.client, moe_cluster.dtypes\n"
            "print(sorted(m for m in ('torch', 'ray', 'starlette') if m in sys.modules))\n"
            "import moe_cluster\n"
            "moe_cluster.MoEModel  # the package's torch exports load on first use\n"
            "print('torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    imported, torch_after = result.stdout.splitlines()
    assert imported == "[]", f"importing the protocol and the client imported {imported}"
    assert torch_after == "True"
