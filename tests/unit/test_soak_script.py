"""scripts/soak.py parses its flags (the soak itself takes minutes: run it by hand, see README)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_soak_help_names_its_flags():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--duration-s", "--clients", "--port", "--url", "--token-env", "--report"):
        assert flag in done.stdout
