"""The OpenAI answers of a runner (serving/http/openai_routes.py) on a tiny Mixtral in process (no Ray):
completions as vLLM answers them (lists of prompts, echo, logprobs, n, penalties, stop ids, min_tokens,
ignore_eos, the model's generation defaults) and chat logprobs, held to transformers' own model: every
logprob is log_softmax of transformers' logits for the same ids (1e-4), every greedy token its argmax."""

import asyncio
import json
import time

import pytest
import torch

from moe_cluster.engine.scheduler import GenerationRequest
from moe_cluster.protocol import openai as oai
from moe_cluster.serving.http.openai_routes import OpenAIFace

from ..engine.test_decode_loop import tiny  # noqa: F401 - a fixture

MODEL = "hf"  # the served name: the model directory's


@pytest.fixture(scope="module")
def face(tiny):  # noqa: F811
    face = OpenAIFace(tiny[1])
    yield face
    face.close()


def parse(payload, kind=oai.CompletionRequest):
    return oai.parse_request(json.dumps({"model": MODEL, **payload}).encode(), "application/json", kind)


async def answer(face, payload, kind=oai.CompletionRequest):
    """The JSON answer of a request, or the list of JSON chunks of a streamed one."""
    response = await face.answer(parse(payload, kind))
    if not payload.get("stream"):
        return json.loads(response.body)
    events = [chunk async for chunk in response.body_iterator]
    assert events[-1] == oai.SSE_DONE
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]


def run(face, payload, kind=oai.CompletionRequest):
    return asyncio.run(answer(face, payload, kind))


def hf_logprobs(hf_model, ids) -> torch.Tensor:
    """log_softmax of transformers' own logits [S, V] for `ids`: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_position(face, entry_logprob, entry_top, row_V, token_id, k):
    """A position of the legacy format: the token's logprob, and {text: logprob} of it and the k most likely."""
    assert entry_logprob == pytest.approx(float(row_V[token_id]), abs=1e-4)
    top = torch.topk(row_V, k)
    expected = {face.token_text(token_id): float(row_V[token_id])}
    expected.update({face.token_text(t): float(lp) for t, lp in zip(top.indices.tolist(), top.values.tolist())})
    assert entry_top.keys() == expected.keys()
    assert list(entry_top.values()) == pytest.approx(list(expected.values()), abs=1e-4)


PROMPTS = [[1, 5, 9, 17, 33], list(range(40, 60)), [7, 300]]  # different lengths, batched in one request


def test_the_harness_request_scores_batched_prompts_beside_another_request(tiny, face):  # noqa: F811
    """lm-evaluation-harness's loglikelihood request: [[ids], ...], echo, logprobs 1, max_tokens 1. Each
    choice: the prompt's tokens first (the first with no logprob), then the greedy token; every logprob and
    top-k as transformers' own, while another request decodes beside them in the same steps."""
    hf_model = tiny[0]
    k = 5

    async def beside():
        face.loop.stats["max_batch"] = 0
        steps = face.loop.stats["steps"]
        other = asyncio.create_task(answer(face, {"prompt": "Hello", "max_tokens": 40, "temperature": 0}))
        while face.loop.stats["steps"] < steps + 2:  # the other request is decoding
            await asyncio.sleep(0.001)
        scored = await answer(face, {"prompt": PROMPTS, "temperature": 0, "max_tokens": 1, "logprobs": k,
                                     "echo": True, "seed": 1234})
        return scored, await other

    body, other = asyncio.run(beside())
    assert other["usage"]["completion_tokens"] == 40 and face.loop.stats["max_batch"] == 1 + len(PROMPTS)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, ids in zip(body["choices"], PROMPTS):
        rows = hf_logprobs(hf_model, ids)
        greedy = int(torch.argmax(rows[-1]))
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1 and choice["finish_reason"] == "length"
        assert logprobs["tokens"] == [face.token_text(t) for t in ids + [greedy]]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for i, token_id in enumerate(ids[1:] + [greedy], start=1):
            assert_position(face, logprobs["token_logprobs"][i], logprobs["top_logprobs"][i], rows[i - 1], token_id, k)
        # what the harness computes: the continuation's logprob and whether it was greedy
        last = logprobs["token_logprobs"][-1]
        assert last == max(logprobs["top_logprobs"][-1].values())
        lengths = [len(t) for t in logprobs["tokens"]]
        assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
        assert choice["text"] == face.tokenizer.decode(ids) + face.tokenizer.decode([greedy])
    assert body["usage"] == {"prompt_tokens": sum(map(len, PROMPTS)), "completion_tokens": 3,
                             "total_tokens": sum(map(len, PROMPTS)) + 3}


def test_generated_tokens_logprobs_without_echo_streamed_or_not(tiny, face):  # noqa: F811
    hf_model, k = tiny[0], 3
    payload = {"prompt": PROMPTS, "temperature": 0, "max_tokens": 6, "logprobs": k}
    body = run(face, payload)
    for choice, ids in zip(body["choices"], PROMPTS):
        generated = tiny[0].generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        rows = hf_logprobs(hf_model, ids + generated)[len(ids) - 1:]
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [face.token_text(t) for t in generated]
        for i, token_id in enumerate(generated):
            assert_position(face, logprobs["token_logprobs"][i], logprobs["top_logprobs"][i], rows[i], token_id, k)
        assert logprobs["text_offset"][0] == 0
    chunks = run(face, {**payload, "stream": True})
    for choice in body["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        # equal up to float rounding: a decode step's batch (its rows' padding) may be made up differently
        assert sum((c["logprobs"]["token_logprobs"] for c in mine), []) == pytest.approx(
            choice["logprobs"]["token_logprobs"], abs=1e-5)
        tops = sum((c["logprobs"]["top_logprobs"] for c in mine), [])
        assert [list(t) for t in tops] == [list(t) for t in choice["logprobs"]["top_logprobs"]]
        assert mine[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in mine[:-1])


def test_echo_with_max_tokens_0_scores_without_generating_streamed_or_not(tiny, face):  # noqa: F811
    ids = PROMPTS[1]
    steps = face.loop.stats["steps"]
    body = run(face, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert face.loop.stats["steps"] == steps + 1  # the prefill: one forward
    choice = body["choices"][0]
    assert choice["text"] == face.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == len(ids)
    rows = hf_logprobs(tiny[0], ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(rows[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the token only
    chunks = run(face, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "stream": True,
                        "stream_options": {"include_usage": True}})
    first = chunks[0]["choices"][0]
    assert first["text"] == choice["text"] and first["logprobs"] == choice["logprobs"]
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    plain = run(face, {"prompt": "Hello there", "max_tokens": 0, "echo": True})  # the text as sent
    assert plain["choices"][0]["text"] == "Hello there" and plain["choices"][0]["logprobs"] is None


def test_n_choices_per_prompt_each_drawing_from_seed_plus_its_index(face):
    sampled = {"prompt": ["Hello", "The quick"], "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3}
    body = run(face, sampled)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for p, prompt in enumerate(sampled["prompt"]):
        for j in range(3):  # choice p * n + j draws what a request of seed 11 + j draws alone
            alone = run(face, {**sampled, "prompt": prompt, "n": 1, "seed": 11 + j})["choices"][0]["text"]
            assert body["choices"][p * 3 + j]["text"] == alone
    assert len({c["text"] for c in body["choices"][:3]}) > 1  # different draws, not one answer thrice
    prompt_tokens = sum(len(face.tokenizer(p)["input_ids"]) for p in sampled["prompt"])
    assert body["usage"]["prompt_tokens"] == prompt_tokens  # once per prompt, as vLLM counts
    assert body["usage"]["completion_tokens"] == 6 * 8
    streamed = run(face, {**sampled, "stream": True})
    for choice in body["choices"]:
        assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == choice["index"]) \
            == choice["text"]


def test_chat_logprobs_in_openais_chat_format(tiny, face):  # noqa: F811
    from moe_cluster.engine.text import chat_prompt

    messages = [{"role": "user", "content": "Hi!"}]
    payload = {"messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    body = run(face, payload, oai.ChatCompletionRequest)
    ids = chat_prompt(face.tokenizer, messages)
    generated = tiny[0].generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    rows = hf_logprobs(tiny[0], ids + generated)[len(ids) - 1:]
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [face.token_text(t) for t in generated]
    for entry, row, token_id in zip(content, rows, generated):
        assert entry["logprob"] == pytest.approx(float(row[token_id]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        top = torch.topk(row, 2)
        assert [t["token"] for t in entry["top_logprobs"]] == [face.token_text(t) for t in top.indices.tolist()]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    chunks = run(face, {**payload, "stream": True}, oai.ChatCompletionRequest)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks[1:]), [])
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-5)
    plain = run(face, {**payload, "logprobs": False, "top_logprobs": None}, oai.ChatCompletionRequest)
    assert plain["choices"][0]["logprobs"] is None


def test_the_models_generation_config_sets_what_a_request_leaves_out(tiny):  # noqa: F811
    from transformers import GenerationConfig

    model = tiny[1].model
    saved, model.generation_config = model.generation_config, GenerationConfig(temperature=0.0, repetition_penalty=1.8)
    try:
        with_defaults = OpenAIFace(tiny[1])
    finally:
        model.generation_config = saved
    try:
        told = run(with_defaults, {"prompt": PROMPTS[0], "max_tokens": 12})["choices"][0]["text"]
        explicit = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.8}
        assert told == run(with_defaults, explicit)["choices"][0]["text"]
        assert told != run(with_defaults, {**explicit, "repetition_penalty": 1.0})["choices"][0]["text"]
    finally:
        with_defaults.close()


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
    ({"prompt": [[1, 2], [5, 100000]]}, "prompt"),
    ({"prompt": ["fine", "word " * 5000]}, "prompt"),
    # echo + logprobs keeps every scored position until the answer: 600 tokens x n 128 > 65536 positions
    ({"prompt": [[5] * 600], "n": 128, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
])
def test_bad_values_only_the_model_knows_name_the_field(face, payload, param):
    from moe_cluster.protocol.errors import WireError

    with pytest.raises(WireError) as raised:
        face.choices(parse(payload))
    assert (raised.value.status, raised.value.param) == (400, param)


def test_text_whose_tokens_lie_past_the_embedding_is_refused(face, monkeypatch):
    """A tokenizer's added tokens may have ids past the model's vocabulary: a 400, never the embedding's
    IndexError (a 500 here, a broken device on a GPU)."""
    from moe_cluster.protocol.errors import WireError

    monkeypatch.setattr(face, "tokenizer", lambda text: {"input_ids": [1, face.vocab_size + 3]})
    with pytest.raises(WireError, match="outside the model's vocabulary") as raised:
        face.choices(parse({"prompt": "an added token"}))
    assert (raised.value.status, raised.value.param) == (400, "prompt")


def test_a_chat_template_that_refuses_the_messages_is_a_400(face, monkeypatch):
    from jinja2 import TemplateError

    from moe_cluster.protocol.errors import WireError
    from moe_cluster.serving.http import openai_routes

    def refuse(tokenizer, messages):
        raise TemplateError("System role not supported")

    monkeypatch.setattr(openai_routes, "chat_prompt", refuse)
    with pytest.raises(WireError, match="chat template refused the messages: System role") as raised:
        face.choices(parse({"messages": [{"role": "system", "content": "x"}]}, oai.ChatCompletionRequest))
    assert (raised.value.status, raised.value.param) == (400, "messages")


def test_more_top_logprobs_than_the_vocabulary_has_are_all_of_it():
    from moe_cluster.engine.logprobs import token_logprob

    told = token_logprob(torch.tensor([0.0, 1.0, 2.0]), 1, k=20)
    assert [t for t, _ in told.top] == [2, 1, 0]


class Recorded:
    """Stands in for a Ray metric: what was observed, set or added, with the tags."""

    def __init__(self):
        self.values = []

    def observe(self, value, tags=None):
        self.values.append((value, tags))

    set = observe

    def inc(self, value=1.0, tags=None):
        self.values.append((value, tags))

    def total(self, **tags):
        return sum(v for v, t in self.values if all((t or {}).get(k) == w for k, w in tags.items()))


def test_metrics_time_count_and_end_every_sequence(tiny, face):  # noqa: F811
    names = ("ttft", "tpot", "e2e", "running", "waiting", "prompt_tokens", "generation_tokens", "finished")
    recorded = {name: Recorded() for name in names}
    real = {name: getattr(face.metrics, name) for name in names}
    for name in names:
        setattr(face.metrics, name, recorded[name])

    async def abandoned_stream():  # a client that reads the first chunk and goes away
        response = await face.answer(parse({"prompt": "Hello", "max_tokens": 50, "stream": True}))
        chunks = response.body_iterator
        await chunks.__anext__()
        await chunks.aclose()

    try:
        started = time.monotonic()
        body = run(face, {"prompt": PROMPTS[:2], "max_tokens": 4, "temperature": 0})
        took = time.monotonic() - started
        first = tiny[0].generate(torch.tensor([PROMPTS[0]]), max_new_tokens=1, do_sample=False)[0, -1]
        stopped = run(face, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0,
                             "stop_token_ids": [int(first)]})  # ends at its first token
        asyncio.run(abandoned_stream())
        deadline = time.monotonic() + 30
        while face.loop.stats["running"] and time.monotonic() < deadline:  # it leaves at the next step boundary
            time.sleep(0.01)
    finally:
        for name in names:
            setattr(face.metrics, name, real[name])
    assert body["usage"]["completion_tokens"] == 8 and stopped["usage"]["completion_tokens"] == 1
    prompt = len(PROMPTS[0]) + len(PROMPTS[1]) + len(PROMPTS[0]) + len(face.tokenizer("Hello")["input_ids"])
    assert recorded["prompt_tokens"].total() == prompt
    assert recorded["generation_tokens"].total() >= 8 + 1 + 1  # the abandoned stream's first token at least
    finished = recorded["finished"]
    assert (finished.total(reason="length"), finished.total(reason="stop"), finished.total(reason="abort")) == (2, 1, 1)
    ttft, e2e = [v for v, _ in recorded["ttft"].values], [v for v, _ in recorded["e2e"].values]
    assert len(ttft) == 4 and len(e2e) == 3 and all(0 < t <= took for t in ttft[:2] + e2e[:2])
    assert len(recorded["tpot"].values) == 2 and all(0 < v < took for v, _ in recorded["tpot"].values)
    running = [v for v, _ in recorded["running"].values]
    assert max(running) == 2 and running[-1] == 0 and recorded["waiting"].values[-1][0] == 0
