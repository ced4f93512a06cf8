"""The fault tests' load generator (tests/support/loadgen.py) counts every failure, of any kind,
and its client threads go on after one (no cluster: a fake router with broken replies)."""

import time

from tests.support.loadgen import CLEAR_ERRORS, Load, summarize

from ..support.flaky_router import REPLIES, X_TD, Y_TD, FlakyRouter


def test_every_broken_reply_is_recorded_with_its_kind_and_the_client_goes_on():
    cycles = 3
    with FlakyRouter() as router, Load(router.url, [(X_TD, 0, Y_TD)], clients=1) as load:
        deadline = time.monotonic() + 60
        while len(load.outcomes) < cycles * len(REPLIES) and time.monotonic() < deadline:
            time.sleep(0.05)
    outcomes = load.outcomes[:cycles * len(REPLIES)]
    assert [o.kind for o in outcomes] == [kind for _, kind, _ in REPLIES] * cycles, outcomes
    truncated = outcomes[[r[0] for r in REPLIES].index("truncated body")]
    assert truncated.message.startswith("IncompleteRead: "), truncated

    summary = summarize(outcomes)
    assert summary["ok"] == cycles and summary["wrong_answers"] == 2 * cycles
    assert summary["clear_errors"] == cycles and CLEAR_ERRORS[503] == "ExpertCallError: "  # the 503 is clear
    assert summary["unclear_count"] == len(outcomes) - 2 * cycles  # everything but the right and the 503
    assert summary["by_kind"]["KeyError"] == cycles and summary["by_kind"]["FormatError"] == cycles
