"""The sampler follows its rule, not just its seed: draws have the distribution softmax(cut(logits / T)),
and the decode loop draws, token by token, what a Sampler of the same seed draws from transformers' own
logits of that sequence."""

import asyncio

import pytest
import torch

from moe_cluster.engine.scheduler import DecodeLoop, GenerationRequest
from moe_cluster.engine.sampling import Sampler, SamplingParams

from .test_decode_loop import tiny  # noqa: F401 - a fixture

LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
DRAWS = 6000


def frequencies(params: SamplingParams) -> torch.Tensor:
    sampler = Sampler(params)
    counts = torch.bincount(torch.tensor([sampler(LOGITS) for _ in range(DRAWS)]), minlength=LOGITS.numel())
    return counts.float() / DRAWS


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    got = frequencies(SamplingParams(temperature=temperature, seed=11))
    # 6000 draws: the standard error of a frequency is at most 0.0065; 0.025 is nearly 4 of them (seeded)
    torch.testing.assert_close(got, expected, atol=0.025, rtol=0)


def test_top_k_keeps_the_k_most_likely_in_their_proportions():
    got = frequencies(SamplingParams(temperature=1.0, top_k=2, seed=5))
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=-1)
    assert got[2:].sum() == 0
    torch.testing.assert_close(got[:2], expected, atol=0.025, rtol=0)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # probabilities .636 .234 .086 .032 .012: .636 < 0.8 <= .636 + .234, so two tokens stay
    got = frequencies(SamplingParams(temperature=1.0, top_p=0.8, seed=7))
    assert got[2:].sum() == 0
    torch.testing.assert_close(got[:2], torch.softmax(torch.tensor([3.0, 2.0]), dim=-1), atol=0.025, rtol=0)
    only_best = frequencies(SamplingParams(temperature=1.0, top_p=0.5, seed=7))
    assert only_best[0] == 1.0


def test_the_loop_draws_what_the_sampler_draws_from_the_models_own_logits(tiny):  # noqa: F811
    hf_model, runner, _ = tiny
    prompt, params = [1, 5, 9, 17, 33], SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=123)
    loop = DecodeLoop(runner.model, runner.model.model.layers[0].mlp.moe_call)

    async def sampled():
        return [e.token_id async for e in loop.events(GenerationRequest(prompt, 16, params)) if e.token_id is not None]

    try:
        got = asyncio.run(sampled())
    finally:
        loop.close()
    sampler, ids = Sampler(params), list(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids.append(sampler(hf_model(torch.tensor([ids])).logits[0, -1]))
    assert got == ids[len(prompt):]
    greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert got != greedy  # the draw really sampled (a sampler that ignored temperature would be greedy)
