"""The decode loop (continuous batching, no Ray): prompts of different lengths joining and leaving
share each step's MoE calls, and each greedy output equals transformers' generate of that prompt alone."""

import asyncio
import threading
import time

import pytest
import torch

from moe_cluster.engine.scheduler import DecodeLoop, GenerationRequest
from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.hf.runner import HFMoERunner
from moe_cluster.engine.sampling import Sampler, SamplingParams
from moe_cluster.engine.text import TextStream

from ...support.hf_models import FAMILIES, build_hf
from ...support.tokenizer import save_tokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, runner with in-process MoE, tokenizer) of a tiny Mixtral with a real tokenizer."""
    root = tmp_path_factory.mktemp("decode")
    hf_model, runner = in_process(root, "mixtral", vocab_size=VOCAB)
    return hf_model, runner, save_tokenizer(root / "hf", VOCAB)


def counting(moe_call, log, delay_s=0.0):
    def call(x_TD, layer):
        log.append((x_TD.shape[0], layer))
        threading.Event().wait(delay_s)  # a slow "cluster": steps long enough for others to join meanwhile
        return moe_call(x_TD, layer)
    return call


def hf_greedy(hf_model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)[0, len(prompt):].tolist()


class Collector:
    """Events of several requests, from the scheduler thread."""

    def __init__(self, count):
        self.tokens, self.ends, self.texts = {}, {}, {}
        self.all_done = threading.Event()
        self.count = count

    def emit(self, key):
        def on(event):
            if event.token_id is not None:
                self.tokens.setdefault(key, []).append(event.token_id)
            self.texts[key] = self.texts.get(key, "") + event.text
            if event.last:
                self.ends[key] = event
                if len(self.ends) == self.count:
                    self.all_done.set()
        return on

def in_process(root, model_type, **overrides):
    """(the tiny HF model of the family, a runner of it with its MoE blocks imported and computed here)."""
    hf_model = build_hf(model_type, **overrides)
    hf_model.save_pretrained(root / "hf")
    import_hf_checkpoint(root / "hf", root / "moe", log=lambda _: None)
    return hf_model, HFMoERunner.in_process(root / "hf", root / "moe")


def answers(loop, prompts, new_tokens):
    """The greedy tokens of every prompt, submitted together to `loop` (closed after)."""
    got = Collector(len(prompts))
    try:
        loop.submit_all([(GenerationRequest(p, new_tokens), got.emit(i)) for i, p in enumerate(prompts)])
        assert got.all_done.wait(60)
    finally:
        loop.close()
    return [got.tokens[i] for i in range(len(prompts))]



def test_joining_and_leaving_prompts_generate_what_each_alone_would(tiny):
    hf_model, runner, _ = tiny
    calls = []
    loop = DecodeLoop(runner.model, counting(runner.model.model.layers[0].mlp.moe_call, calls, 0.01),
                      max_num_seqs=8, prefill_slowdown=None)  # prompts in one piece (see the chunk tests)
    prompts = {"a": ([1, 5, 9, 17, 33], 9), "b": ([2, 127], 8), "c": (list(range(3, 20)), 6), "d": ([7], 12)}
    got = Collector(len(prompts))
    try:
        loop.submit(GenerationRequest(*prompts["a"]), got.emit("a"))
        loop.submit(GenerationRequest(*prompts["b"]), got.emit("b"))
        while loop.stats["steps"] < 2:  # c and d join while a and b decode
            threading.Event().wait(0.001)
        loop.submit(GenerationRequest(*prompts["c"]), got.emit("c"))
        loop.submit(GenerationRequest(*prompts["d"]), got.emit("d"))
        assert got.all_done.wait(60)
    finally:
        loop.close()
    for key, (prompt, new) in prompts.items():
        assert got.tokens[key] == hf_greedy(hf_model, prompt, new), key
        assert (got.ends[key].finish_reason, got.ends[key].completion_tokens) == ("length", new)
        assert got.ends[key].prompt_tokens == len(prompt)
    # every step made exactly one call per MoE layer (2 layers), carrying the rows of all its sequences
    assert loop.stats["moe_calls"] == 2 * loop.stats["steps"] == len(calls)
    assert loop.stats["max_batch"] == 4
    assert max(rows for rows, _ in calls) >= len(prompts["c"][0]) + 2  # a prefill beside decoding sequences


def test_stop_strings_eos_streamed_text_and_sampling(tiny):
    hf_model, runner, tokenizer = tiny
    prompt = tokenizer("Hello, how are you?")["input_ids"]
    greedy = hf_greedy(hf_model, prompt, 12)
    full = tokenizer.decode(greedy, skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    loop = DecodeLoop(runner.model, runner.model.model.layers[0].mlp.moe_call, eos_ids={greedy[7]})

    async def run(request):
        events = [e async for e in loop.events(request)]
        return "".join(e.text for e in events), events[-1]

    try:
        text, end = asyncio.run(run(GenerationRequest(prompt, 12, text=TextStream(tokenizer))))
        first_eos = greedy.index(greedy[7])
        assert (end.finish_reason, end.completion_tokens) == ("stop", first_eos + 1)
        # the EOS token counts (usage) but its text is not told (vLLM's rule for stop tokens)
        assert text == tokenizer.decode(greedy[:first_eos], skip_special_tokens=True)
        loop.eos_ids = frozenset()
        text, end = asyncio.run(run(GenerationRequest(prompt, 12, text=TextStream(tokenizer, [stop]))))
        assert end.finish_reason == "stop" and text == full[:full.index(stop)]
        seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3)
        a = asyncio.run(run(GenerationRequest(prompt, 8, seeded, TextStream(tokenizer))))[0]
        b = asyncio.run(run(GenerationRequest(prompt, 8, seeded, TextStream(tokenizer))))[0]
        assert a == b
    finally:
        loop.close()


def test_sampler_cuts():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert Sampler(SamplingParams())(logits) == 0
    cut = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0)).cut(logits)
    assert torch.isinf(cut[2:]).all() and torch.isfinite(cut[:2]).all()
    cut = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0)).cut(logits)
    assert torch.isfinite(cut).tolist() == [True, True, False, False]  # p = .64, .24, ...: two reach 0.7
    draws = {Sampler(SamplingParams(temperature=1.0, top_k=1, seed=s))(logits) for s in range(20)}
    assert draws == {0}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_text_stream_holds_back_what_may_change(tiny):
    tokenizer = tiny[2]
    ids = tokenizer("naïve 日本 fox jumps")["input_ids"]
    stream = TextStream(tokenizer, stop=["jum"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped and "".join(pieces) == "naïve 日本 fox "
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_decodes_in_one_batch_exactly(tmp_path, model_type):
    """Five prompts of different lengths decoded together (one packed forward per step, each against its
    own cache; prompts in chunks of 4) give what generate gives each alone, for every supported family."""
    hf_model, runner = in_process(tmp_path, model_type, **({"num_key_value_heads": 4}
                                                           if model_type == "deepseek_v3" else {}))
    loop = DecodeLoop(runner.model, runner.moe_call, max_prefill_tokens=4)
    prompts = [[1, 5, 9, 17, 33], [2, 127], list(range(3, 20)), [7], [100, 3, 4, 90, 1, 2, 3]]
    assert answers(loop, prompts, 10) == [hf_greedy(hf_model, p, 10) for p in prompts]


@pytest.mark.parametrize("model_type, window", [
    ("mixtral", {"sliding_window": 4}),  # the window an argument of the attention
    ("qwen2_moe", {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 2}),  # of layer 0 only
])
def test_sliding_windows_decode_exactly(tmp_path, model_type, window):
    """Prompts longer than a sliding window, prefilled in chunks and decoded past it: what generate gives
    (each family says its window its own way; the packed attention finds it in both)."""
    hf_model, runner = in_process(tmp_path, model_type, **window)
    loop = DecodeLoop(runner.model, runner.moe_call, max_prefill_tokens=3)
    prompts = [list(range(3, 14)), [9, 8, 7, 6, 5, 4]]
    assert answers(loop, prompts, 8) == [hf_greedy(hf_model, p, 8) for p in prompts]


def test_a_step_is_counted_before_its_tokens_go_out_and_close_need_not_wait(tiny):
    _, runner, _ = tiny
    gate = threading.Event()  # holds the MoE call of a step, as a cluster call in flight would
    slow_call = runner.model.model.layers[0].mlp.moe_call

    def held(x_TD, layer):
        gate.wait(30)
        return slow_call(x_TD, layer)

    loop = DecodeLoop(runner.model, held)
    seen = []
    got = Collector(2)
    loop.submit(GenerationRequest([1, 5, 9], 1), lambda event: (seen.append(dict(loop.stats)), got.emit("a")(event)))
    gate.set()
    while not seen:
        threading.Event().wait(0.001)
    assert seen[0]["steps"] == 1 and seen[0]["moe_calls"] == 2  # whoever has the answer sees its step counted
    gate.clear()
    loop.submit(GenerationRequest([2, 7], 4), got.emit("b"))
    while loop.stats["steps"] < 1 or not loop._active:  # b's step is in flight, held at the gate
        threading.Event().wait(0.001)
    loop.close(wait=False)  # returns at once, though a step is in flight
    assert not got.ends.get("b")
    gate.set()  # the step ends; then b ends with an error event, and nothing more is taken
    assert got.all_done.wait(30)
    assert "closed" in str(got.ends["b"].error)
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit(GenerationRequest([3], 1), got.emit("c"))


def test_prompts_are_prefilled_in_chunks_within_the_step_token_budget(tiny):
    """At most max_prefill_tokens prompt tokens go into one step, in chunks, oldest prompt first, beside
    the decoding sequences; each answer is still what generate gives that prompt alone."""
    hf_model, runner, _ = tiny
    calls = []
    loop = DecodeLoop(runner.model, counting(runner.model.model.layers[0].mlp.moe_call, calls), max_prefill_tokens=10,
                      prefill_slowdown=None)
    prompts = [[1, 5, 9, 17, 33], list(range(40, 60)), [7, 300], [2, 4, 6, 8]]
    assert answers(loop, prompts, 3) == [hf_greedy(hf_model, p, 3) for p in prompts]
    rows_per_step = [rows for rows, layer in calls if layer == 0]
    # step 1: the 5-token prompt and the first 5 of the 20; 2: 1 decoding row, 10 more of the 20;
    # 3: 1 decoding row, the last 5 of the 20, the 2-token prompt and 3 of the 4-token one;
    # 4: 2 decoding rows (the first prompt has its 3 tokens) and the last token of the 4-token prompt
    assert rows_per_step[:4] == [5 + 5, 1 + 10, 1 + 5 + 2 + 3, 2 + 1]
    assert loop.stats["prefill_chunks"] == 7


def test_the_kv_budget_queues_what_does_not_fit_now_and_refuses_what_never_fits(tiny):
    """Admission reserves prompt + max_new_tokens positions: a request that does not fit beside the running
    ones waits for them to end (then runs, exactly); one larger than the whole budget is refused at submit."""
    hf_model, runner, _ = tiny
    loop = DecodeLoop(runner.model, runner.moe_call, max_kv_tokens=30)
    assert loop.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4  # layers x (K, V) x KV heads x head size x float32
    prompts = [list(range(1, 15)), list(range(20, 30))]  # 14 + 8 and 10 + 8: 40 > 30 positions together
    got = Collector(2)
    try:
        with pytest.raises(ValueError, match="max_kv_tokens=30"):
            loop.submit(GenerationRequest(list(range(1, 25)), 8), got.emit("never"))
        with pytest.raises(ValueError, match="outside the model's embedding"):
            loop.submit(GenerationRequest([VOCAB + 5], 4), got.emit("bad id"))
        loop.submit_all([(GenerationRequest(p, 8), got.emit(i)) for i, p in enumerate(prompts)])
        assert got.all_done.wait(60)
    finally:
        loop.close()
    assert [got.tokens[i] for i in range(2)] == [hf_greedy(hf_model, p, 8) for p in prompts]
    assert loop.stats["max_batch"] == 1 and loop.stats["kv_tokens_reserved"] == 0  # one after the other


def test_a_decode_step_writes_each_cache_in_place(tiny):
    """Each sequence's cache is allocated once, at its whole life's size, and a step writes only its new
    positions: the tensors are the same objects from the first step to the last."""
    _, runner, _ = tiny
    loop = DecodeLoop(runner.model, runner.moe_call)
    seen = []
    got = Collector(1)

    def emit(event):
        kv = loop._active[0].kv if loop._active else None
        if kv is not None:
            seen.append((kv.capacity, kv.length, [t.data_ptr() for t in kv.keys.values()]))
        got.emit("a")(event)

    try:
        loop.submit(GenerationRequest([1, 5, 9], 6), emit)
        assert got.all_done.wait(60)
    finally:
        loop.close()
    assert [length for _, length, _ in seen] == [3, 4, 5, 6, 7]  # after each step but the last
    assert {capacity for capacity, _, _ in seen} == {3 + 6} and len({tuple(p) for _, _, p in seen}) == 1


def test_a_prompts_logprobs_are_the_same_whatever_its_chunks(tiny):
    """Prompt logprobs made chunk by chunk (chunks of 4: each chunk's first token is scored by the previous
    chunk's last position) equal log_softmax of transformers' logits of the whole prompt."""
    hf_model, runner, _ = tiny
    prompt = list(range(3, 20))
    loop = DecodeLoop(runner.model, runner.moe_call, max_prefill_tokens=4)
    got = Collector(1)
    firsts = []
    try:
        loop.submit(GenerationRequest(prompt, 2, prompt_logprobs=2),
                    lambda event: (firsts.append(event.prompt_logprobs), got.emit("a")(event)))
        assert got.all_done.wait(60)
    finally:
        loop.close()
    told = firsts[0]
    with torch.no_grad():
        expected_SV = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert [p.token_id for p in told] == prompt and told[0].logprob is None
    for i in range(1, len(prompt)):
        assert told[i].logprob == pytest.approx(expected_SV[i - 1, prompt[i]].item(), abs=1e-4), i
        assert [t for t, _ in told[i].top] == expected_SV[i - 1].topk(2).indices.tolist(), i
    assert got.tokens["a"] == hf_greedy(hf_model, prompt, 2) and loop.stats["prefill_chunks"] == 5


def test_two_micro_batches_overlap_their_moe_calls_and_answer_exactly(tiny):
    """overlap: a step's members in two micro-batches forwarded at once, so one's MoE call is in flight while
    the other computes (here: the calls of the two overlap in time); answers still what generate gives."""
    hf_model, runner, _ = tiny
    moe_call, spans = runner.model.model.layers[0].mlp.moe_call, []

    def slow(x_TD, layer):  # a cluster call: 20 ms of waiting
        started = time.monotonic()
        threading.Event().wait(0.02)
        y_TD = moe_call(x_TD, layer)
        spans.append((threading.current_thread().name, x_TD.shape[0], started, time.monotonic()))
        return y_TD

    loop = DecodeLoop(runner.model, slow, overlap=True)
    prompts = [[1, 5, 9, 17, 33], [2, 127], list(range(3, 20)), [7]]
    assert answers(loop, prompts, 6) == [hf_greedy(hf_model, p, 6) for p in prompts]
    assert loop.stats["moe_calls"] == len(spans) > 2 * loop.stats["steps"]  # two calls a layer in some steps
    threads = {name for name, *_ in spans}
    assert len(threads) == 2 and "decode-loop" in threads
    first, second = ([s for s in spans if s[0] == name] for name in sorted(threads))
    assert any(a[2] < b[3] and b[2] < a[3] for a in first for b in second)  # in flight at the same time


def test_beside_decoding_sequences_a_long_prompt_takes_what_keeps_their_steps_within_the_slowdown(tiny):
    """A "cluster" whose MoE call costs 40 ms + 1 ms a row: beside one decoding sequence, a step alone is
    ~82 ms (2 MoE layers), so prefill_slowdown 1.5 leaves ~41 ms, ~20 prompt tokens; after the probe chunk
    the 120-token prompt enters in chunks of about that, not in max_prefill_tokens; both answers exact."""
    hf_model, runner, _ = tiny
    moe_call, calls = runner.model.model.layers[0].mlp.moe_call, []

    def costly(x_TD, layer):
        calls.append((x_TD.shape[0], layer))
        threading.Event().wait(0.040 + 0.001 * x_TD.shape[0])
        return moe_call(x_TD, layer)

    loop = DecodeLoop(runner.model, costly, max_prefill_tokens=120, prefill_slowdown=1.5)
    long_prompt = [(7 * i) % 300 + 1 for i in range(120)]
    got = Collector(2)
    try:
        loop.submit(GenerationRequest([1, 5, 9], 24), got.emit("stream"))
        while loop.stats["steps"] < 3:  # the stream decodes: steps of one row
            threading.Event().wait(0.001)
        loop.submit(GenerationRequest(long_prompt, 1), got.emit("long"))  # no decoding row of its own
        assert got.all_done.wait(120)
    finally:
        loop.close()
    assert got.tokens["long"] == hf_greedy(hf_model, long_prompt, 1)
    assert got.tokens["stream"] == hf_greedy(hf_model, [1, 5, 9], 24)
    steps = [rows for rows, layer in calls if layer == 0][1:]  # after the stream's own prefill
    chunks = [rows - 1 for rows in steps if rows > 1]  # beside the stream's row
    assert sum(chunks) == 120 and chunks[0] <= 32  # the probe (or what the fit already allows)
    assert all(16 <= c <= 30 for c in chunks[1:-1]) and len(chunks) >= 4, chunks  # not 120 at once


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                  {"rope_type": "longrope", "rope_theta": 10000.0}])
def test_a_rotary_scaling_that_depends_on_the_longest_position_is_refused(rope):
    """Dynamic NTK and longrope pick frequencies from the longest position of a forward: packed with others,
    a sequence would be rotated differently than alone. Refused by name; the default rotary is not."""
    from types import SimpleNamespace

    from moe_cluster.engine.forward import refuse_position_dependent_rope

    with pytest.raises(ValueError, match=rope["rope_type"]):
        refuse_position_dependent_rope(SimpleNamespace(rope_parameters=rope))
    refuse_position_dependent_rope(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="dynamic"):  # per layer type, as some families nest them
        refuse_position_dependent_rope(SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "dynamic"}}))
