"""scripts/soak.py parses its flags and counts every failure (the soak itself takes minutes:
run it by hand, see README; here its load runs against a fake router with broken replies)."""

import subprocess
import sys
from collections import Counter

from ..support.flaky_router import REPLIES, X_TD, Y_TD, FlakyRouter
from ..support.scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "soak.py"


def _soak_module():
    return load_script("soak")


def test_soak_help_names_its_flags():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--duration-s", "--clients", "--port", "--url", "--token-env", "--report"):
        assert flag in done.stdout


def test_soak_counts_every_broken_reply_by_kind_and_its_clients_go_on():
    soak_module = _soak_module()
    with FlakyRouter() as router:
        soak = soak_module.Soak(router.url, [(X_TD, 0, Y_TD)], clients=2, token=None)
        soak.run(duration_s=1.5, report_every_s=1.0)
    requests = sum(soak.counts.values())
    assert requests >= 3 * len(REPLIES), f"the clients stopped early: {dict(soak.counts)}"
    replies_of_kind = Counter(kind for _, _, kind in REPLIES)
    assert set(soak.counts) == set(replies_of_kind), dict(soak.counts)
    for kind, replies in replies_of_kind.items():  # the server cycles through REPLIES: each gets 1/7th
        assert abs(soak.counts[kind] - replies * requests / len(REPLIES)) <= replies, (kind, dict(soak.counts))
    result = soak_module.summary(soak, 1.5, {}, {}, [])
    assert result["errors"] == requests - soak.counts["ok"] and len(result["failures"]) == 5
    assert all(f.split(":")[0] in replies_of_kind and not f.startswith("ok") for f in result["failures"])
