"""The prompt tokens a step may carry beside decoding sequences (engine/step_cost.py): a fit of step time
as fixed + per_token x tokens, and the room it leaves under the slowdown."""

import pytest

from moe_cluster.engine.step_cost import MIN_TOKENS, PROBE_TOKENS, SHORT_PROMPT_TOKENS, StepCost, prompt_chunks


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
    fast = StepCost(1.25)  # no fixed cost: 1.25 x 8 decoding rows leaves 2 tokens; a prompt still gets 16
    for tokens in [8, 40, 8, 100]:
        fast.add(tokens, 0.003 * tokens)
    assert fast.prefill_room(decoding=8, cap=512) == MIN_TOKENS == 16
    with pytest.raises(ValueError, match="prefill_slowdown must be >= 1"):
        StepCost(0.9)


def test_short_prompts_go_in_whole_and_first_and_long_ones_share_the_throttled_room():
    """A short prompt (<= 64 tokens left) takes all of its tokens, before any long one, while max_prefill_tokens
    lasts; long ones, oldest first, share what the slowdown allows; nothing over max_prefill_tokens in all."""
    assert SHORT_PROMPT_TOKENS == 64
    assert prompt_chunks([2000, 32, 500, 64], room=512, long_room=40) == [40, 32, 0, 64]
    assert prompt_chunks([2000, 32, 64], room=512, long_room=512) == [416, 32, 64]  # nobody decodes: the rest
    assert prompt_chunks([30, 30, 30], room=50, long_room=0) == [30, 20, 0]  # the step's cap holds for all
    assert prompt_chunks([2000, 2000], room=512, long_room=512) == [512, 0]  # unthrottled: the cap
