"""vLLM's sampling rules in the decode loop (no Ray), held to a plain loop over transformers' own logits:
repetition / presence / frequency penalties, min_tokens, stop_token_ids, ignore_eos, min_p; and the
logprobs the loop tells are the model's raw ones (before penalties), for prompts and generated tokens."""

import asyncio

import pytest
import torch

from moe_cluster.engine import logprobs as logprobs_module
from moe_cluster.engine.scheduler import DecodeLoop, GenerationRequest
from moe_cluster.engine.logprobs import prompt_logprobs
from moe_cluster.engine.sampling import Sampler, SamplingParams, generation_defaults
from moe_cluster.engine.text import TextStream

from .test_decode_loop import hf_greedy, tiny  # noqa: F401 - `tiny` is a fixture

PROMPT = [1, 5, 9, 17, 33, 5, 9]


@pytest.fixture(scope="module")
def loop(tiny):  # noqa: F811
    loop = DecodeLoop(tiny[1].model, tiny[1].moe_call, max_num_seqs=8)
    yield loop
    loop.close()


def events_of(loop, *requests):
    async def collect():
        got = [[] for _ in requests]
        async for i, event in loop.events_of(list(requests)):
            got[i].append(event)
        return got
    return asyncio.run(collect())


def tokens(events):
    return [e.token_id for e in events if e.token_id is not None]


def reference(hf_model, prompt, new, process):
    """Greedy over transformers' logits of the whole sequence, each step's logits through process(logits, out)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits_V = hf_model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(torch.argmax(process(logits_V, ids[len(prompt):]))))
    return ids[len(prompt):]


def penalized(logits_V, prompt, out, repetition=1.0, presence=0.0, frequency=0.0):
    """The penalties written out token by token (vLLM's definitions)."""
    logits_V = logits_V.clone()
    for t in set(prompt) | set(out):
        logits_V[t] = logits_V[t] / repetition if logits_V[t] > 0 else logits_V[t] * repetition
    for t in set(out):
        logits_V[t] -= frequency * out.count(t) + presence
    return logits_V


@pytest.mark.parametrize("penalties", [dict(repetition=1.8), dict(presence=1.5), dict(frequency=0.7),
                                       dict(repetition=1.2, presence=0.5, frequency=0.3)], ids=str)
def test_penalties_change_greedy_tokens_as_vllm_defines_them(tiny, loop, penalties):  # noqa: F811
    hf_model = tiny[0]
    params = SamplingParams(repetition_penalty=penalties.get("repetition", 1.0),
                            presence_penalty=penalties.get("presence", 0.0),
                            frequency_penalty=penalties.get("frequency", 0.0))
    (events,) = events_of(loop, GenerationRequest(PROMPT, 16, params, logprobs=0))
    expected = reference(hf_model, PROMPT, 16, lambda logits, out: penalized(logits, PROMPT, out, **penalties))
    assert tokens(events) == expected
    assert expected != hf_greedy(hf_model, PROMPT, 16)  # the penalty changed the answer: the test has teeth
    # the logprobs told are the model's own, not the penalised ones
    with torch.no_grad():
        raw = torch.log_softmax(hf_model(torch.tensor([PROMPT + expected])).logits[0].float(), dim=-1)
    told = [e.logprob.logprob for e in events]
    assert told == pytest.approx([float(raw[len(PROMPT) - 1 + i, t]) for i, t in enumerate(expected)], abs=1e-4)


def test_stop_ids_eos_ignore_eos_and_min_tokens(tiny, loop):  # noqa: F811
    hf_model, tokenizer = tiny[0], tiny[2]
    greedy = hf_greedy(hf_model, PROMPT, 12)
    stop = greedy[4]
    first = greedy.index(stop)

    def run(**params):
        text = TextStream(tokenizer, [])
        (events,) = events_of(loop, GenerationRequest(PROMPT, 12, SamplingParams(**params), text))
        return tokens(events), "".join(e.text for e in events), events[-1]

    got, text, end = run(stop_token_ids=frozenset({stop}))
    assert got == greedy[:first + 1] and (end.finish_reason, end.completion_tokens) == ("stop", first + 1)
    assert text == tokenizer.decode(greedy[:first], skip_special_tokens=True)  # a stop token's text is not told
    loop.eos_ids = frozenset({stop})
    try:
        assert run()[0] == greedy[:first + 1]
        got, text, end = run(ignore_eos=True)
        assert got == greedy and end.finish_reason == "length" and text == tokenizer.decode(greedy)
        got, _, end = run(min_tokens=first + 2)  # EOS cannot come before min_tokens tokens
        masked = reference(hf_model, PROMPT, 12, lambda logits, out: logits.index_fill(
            0, torch.tensor([stop]), float("-inf")) if len(out) < first + 2 else logits)
        assert stop not in got[:first + 2] and got == masked[:len(got)]
        assert end.finish_reason == ("stop" if stop in got else "length")
    finally:
        loop.eos_ids = frozenset()


def test_stop_strings_count_only_after_min_tokens(tiny):  # noqa: F811
    tokenizer = tiny[2]
    ids = tokenizer("one, two, three, four, five")["input_ids"]
    plain = TextStream(tokenizer, [","])
    assert "".join(plain.push(t) for t in ids) + plain.finish() == "one"
    later = TextStream(tokenizer, [","], after=3)  # "one", ",", " two": the first comma is not looked for
    told = ""
    for t in ids:
        told += later.push(t)
        if later.stopped:
            break
    assert later.stopped and told == "one, two"


def test_min_p_cuts_tokens_less_likely_than_p_times_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    cut = Sampler(SamplingParams(temperature=1.0, min_p=0.35, seed=0)).cut(logits)
    assert torch.isfinite(cut).tolist() == [True, True, False, False]  # 0.15 < 0.35 * 0.5


def test_prompt_logprobs_over_chunks_equal_one_log_softmax(monkeypatch):
    torch.manual_seed(0)
    logits_SV, ids = torch.randn(11, 30) * 3, torch.randint(0, 30, (11,)).tolist()
    whole = torch.log_softmax(logits_SV, dim=-1)
    monkeypatch.setattr(logprobs_module, "CHUNK", 4)  # 10 predicted positions in chunks of 4, 4, 2
    positions = prompt_logprobs(logits_SV, ids, 3)
    assert positions[0].token_id == ids[0] and positions[0].logprob is None
    assert [p.token_id for p in positions] == ids
    assert [p.logprob for p in positions[1:]] == pytest.approx([float(whole[i, t]) for i, t in enumerate(ids[1:])])
    top = torch.topk(whole, 3)
    assert [[t for t, _ in p.top] for p in positions[1:]] == top.indices[:-1].tolist()


def test_generation_defaults_are_what_the_generation_config_sets(tiny):  # noqa: F811
    from transformers import GenerationConfig

    model = tiny[1].model
    assert generation_defaults(model) == {}
    saved = model.generation_config
    model.generation_config = GenerationConfig(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05,
                                               max_new_tokens=99, do_sample=True)
    try:
        assert generation_defaults(model) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    finally:
        model.generation_config = saved
