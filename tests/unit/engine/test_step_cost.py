"""The prompt tokens a step may carry beside decoding sequences (engine/step_cost.py): a fit of step time
as fixed + per_token x tokens, and the room it leaves under the slowdown."""

import pytest

from moe_cluster.engine.step_cost import PROBE_TOKENS, StepCost


def test_the_fit_finds_fixed_and_per_token_costs_and_forgets_old_steps():
    cost = StepCost(1.5)
    assert cost.fit() is None and cost.prefill_room(decoding=8, cap=512) == PROBE_TOKENS
    for tokens in [8, 8, 40, 8, 100, 8]:
        cost.add(tokens, 0.2 + 0.003 * tokens)
    fixed, per_token = cost.fit()
    assert fixed == pytest.approx(0.2) and per_token == pytest.approx(0.003)
    # 8 decoding: a step alone 0.224 s; 1.5x leaves 0.112 s: 37 tokens at 3 ms
    assert cost.prefill_room(decoding=8, cap=512) == 37
    assert cost.prefill_room(decoding=8, cap=20) == 20 and cost.prefill_room(decoding=0, cap=512) == 512
    for _ in range(200):  # the machine became twice as slow per token: the old steps fade out
        cost.add(8, 0.2 + 0.006 * 8)
        cost.add(60, 0.2 + 0.006 * 60)
    assert cost.fit()[1] == pytest.approx(0.006, rel=1e-3)


def test_steps_of_one_size_tell_nothing_and_a_slowdown_under_one_is_refused():
    cost = StepCost(1.25)
    for _ in range(10):
        cost.add(8, 0.1)
    assert cost.fit() is None and cost.prefill_room(decoding=8, cap=512) == PROBE_TOKENS
    cost.add(9, 0.05)  # noise: a larger step that took less time; no negative slope is believed
    assert cost.fit() is None
    with pytest.raises(ValueError, match="prefill_slowdown must be >= 1"):
        StepCost(0.9)
