"""The decode loop under bad luck (no Ray): what one request does stays with that request, a step that
fails as a whole fails only its requests, a stuck or dead loop is reported instead of waited on, and a
request that is cancelled leaves. After each fault, the next requests are answered right."""

import asyncio
import threading

import pytest
import torch

from moe_cluster.engine.scheduler import DecodeLoop, DecodeLoopFailure, GenerationRequest
from moe_cluster.engine.sampling import SamplingParams
from moe_cluster.engine.text import TextStream

from .test_decode_loop import VOCAB, Collector, hf_greedy, tiny  # noqa: F401 - `tiny` is a fixture

PROMPT = [1, 5, 9, 17, 33]


def moe_of(runner):
    return runner.model.model.layers[0].mlp.moe_call


def run_events(loop, request):
    """Every event of `request` through `loop.events` (the OpenAI face's way), on a fresh event loop."""
    async def collect():
        return [event async for event in loop.events(request)]
    return asyncio.run(collect())


def tokens_of(events):
    return [e.token_id for e in events if e.token_id is not None]


def assert_answered_right(loop, hf_model, prompt=PROMPT, new=6):
    events = run_events(loop, GenerationRequest(prompt, new))
    assert events[-1].error is None and tokens_of(events) == hf_greedy(hf_model, prompt, new)


@pytest.fixture
def loop(tiny):  # noqa: F811
    loop = DecodeLoop(tiny[1].model, moe_of(tiny[1]), max_num_seqs=8)
    yield loop
    loop.close()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-39), SamplingParams(temperature=1e-6, seed=1),
                                    SamplingParams(temperature=1.0, top_p=1e-30, seed=2),
                                    SamplingParams(temperature=1e-30, top_p=1e-30, top_k=1)])
def test_degenerate_sampling_parameters_are_answered_as_greedy(tiny, loop, params):  # noqa: F811
    """Temperatures below 1e-5 are greedy; a top_p that keeps no token keeps the most likely one."""
    hf_model = tiny[0]
    events = run_events(loop, GenerationRequest(PROMPT, 8, params))
    assert events[-1].error is None and tokens_of(events) == hf_greedy(hf_model, PROMPT, 8)
    assert_answered_right(loop, hf_model)


class RaisingTokenizer:
    """A tokenizer whose decode raises from its `fail_at`-th call on (a broken or hostile tokenizer)."""

    def __init__(self, tokenizer, fail_at):
        self.tokenizer, self.fail_at, self.calls = tokenizer, fail_at, 0

    def decode(self, ids, **kwargs):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("tokenizer exploded")
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_tokenizer_or_emit_that_raises_fails_its_own_request_only(tiny, loop):  # noqa: F811
    hf_model, _, tokenizer = tiny
    got = Collector(2)
    told = []  # what the broken callback was handed

    def emit_that_raises(event):
        told.append(event)
        raise ValueError("the client's callback is broken")

    loop.submit(GenerationRequest(PROMPT, 10), got.emit("good"))
    loop.submit(GenerationRequest([2, 127], 10, text=TextStream(RaisingTokenizer(tokenizer, 3))), got.emit("tok"))
    loop.submit(GenerationRequest([7], 10), emit_that_raises)
    assert got.all_done.wait(60)
    assert got.ends["good"].error is None and got.tokens["good"] == hf_greedy(hf_model, PROMPT, 10)
    assert "tokenizer exploded" in str(got.ends["tok"].error)
    # its first token raised: the request ended there (its end event raised too, and was only logged)
    assert len(told) == 2 and isinstance(told[-1].error, ValueError)
    assert loop.stats["request_failures"] == 2 and loop.stats["loop_failures"] == 0
    assert_answered_right(loop, hf_model)
    assert loop.failure() is None and not loop._active


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_forward_fails_its_steps_requests_and_the_loop_goes_on(tiny, overlap):  # noqa: F811
    """A MoE call that fails (an expert down) in a step: the requests of that step end with the error (of
    either micro-batch, overlapping), their KV budget is given back, and the next requests are answered right."""
    hf_model, runner = tiny[0], tiny[1]
    moe_call, failing = moe_of(runner), []

    def flaky(x_TD, layer):
        if failing:
            raise RuntimeError("expert down")
        return moe_call(x_TD, layer)

    loop = DecodeLoop(runner.model, flaky, overlap=overlap)
    try:
        got = Collector(2)
        loop.submit(GenerationRequest(PROMPT, 12), got.emit("a"))
        while loop.stats["steps"] < 2:  # "a" is decoding when "b" joins
            threading.Event().wait(0.001)
        failing.append(True)
        loop.submit(GenerationRequest([3, 4], 4), got.emit("b"))
        assert got.all_done.wait(60)
        failing.clear()
        assert all("expert down" in str(got.ends[k].error) for k in "ab")
        assert loop.stats["request_failures"] == 2 and loop.stats["loop_failures"] == 0
        while loop.stats["running"]:  # the failed step's sequences leave at its end
            threading.Event().wait(0.001)
        assert loop.stats["kv_tokens_reserved"] == 0
        assert_answered_right(loop, hf_model)
    finally:
        loop.close()


def test_a_step_that_fails_as_a_whole_fails_its_requests_and_the_loop_goes_on(tiny, loop):  # noqa: F811
    hf_model = tiny[0]
    real_step, failed = loop._step, []

    def step_with_a_bug():
        if not failed:
            failed.append(True)
            raise KeyError("a bug in the scheduler")
        real_step()

    loop._step = step_with_a_bug
    events = run_events(loop, GenerationRequest(PROMPT, 4))
    assert isinstance(events[-1].error, DecodeLoopFailure) and "a bug in the scheduler" in str(events[-1].error)
    assert loop.stats["loop_failures"] == 1 and loop.failure() is None
    assert_answered_right(loop, hf_model)


def test_a_stuck_step_ends_its_requests_and_is_reported(tiny):  # noqa: F811
    hf_model, runner, _ = tiny
    held = threading.Event()

    def stuck(x_TD, layer):
        held.wait(60)
        return moe_of(runner)(x_TD, layer)

    loop = DecodeLoop(runner.model, stuck, step_timeout_s=0.5)
    try:
        events = run_events(loop, GenerationRequest(PROMPT, 4))
        assert isinstance(events[-1].error, DecodeLoopFailure) and "stuck" in str(events[-1].error)
        assert "step_timeout_s" in loop.failure()
        held.set()  # the step ends after all: the loop works again, the abandoned request leaves it
        while loop.failure() is not None or loop._active:
            threading.Event().wait(0.01)
        assert_answered_right(loop, hf_model)
        assert loop.stats["cancelled"] == 1
    finally:
        held.set()
        loop.close()


def test_a_dead_scheduler_thread_fails_every_request_and_refuses_new_ones(tiny):  # noqa: F811
    runner = tiny[1]
    loop = DecodeLoop(runner.model, moe_of(runner))
    real_admit, calls = loop._admit, []

    def admit_then_die():
        calls.append(True)
        if len(calls) > 1:
            raise MemoryError("out of memory in the scheduler")
        return real_admit()

    loop._admit = admit_then_die
    events = run_events(loop, GenerationRequest(PROMPT, 3))
    assert isinstance(events[-1].error, DecodeLoopFailure) and "out of memory" in str(events[-1].error)
    loop._thread.join(10)
    assert "died" in loop.failure()
    with pytest.raises(DecodeLoopFailure, match="healthz"):
        loop.submit(GenerationRequest(PROMPT, 3), lambda event: None)


def test_a_cancelled_request_leaves_at_the_next_step(tiny, loop):  # noqa: F811
    hf_model = tiny[0]
    got = Collector(2)
    abandoned = Collector(1)
    handles, submitted = [], threading.Event()

    def cancel_at_first_token(event):  # the client goes away as its first token arrives (the loop's thread)
        abandoned.emit("gone")(event)
        submitted.wait(10)
        handles[0].cancel()

    loop.submit(GenerationRequest(PROMPT, 30), got.emit("a"))
    handles.append(loop.submit(GenerationRequest([2, 127], 200), cancel_at_first_token))
    submitted.set()
    loop.submit(GenerationRequest([7], 30), got.emit("b"))
    assert got.all_done.wait(60)
    assert len(abandoned.tokens["gone"]) == 1  # nothing told after the cancel, not 200 tokens later
    assert not abandoned.ends and loop.stats["cancelled"] == 1
    assert got.tokens["a"] == hf_greedy(hf_model, PROMPT, 30) and got.tokens["b"] == hf_greedy(hf_model, [7], 30)


def test_nan_logits_raise_a_sampling_error_greedy_or_sampled():
    """Logits with NaN (a model that computed garbage for one sequence) raise SamplingError, which the loop
    turns into that request's own error (the raising-tokenizer test shows the per-request path)."""
    from moe_cluster.engine.sampling import Sampler, SamplingError

    with pytest.raises(SamplingError, match="NaN"):
        Sampler(SamplingParams())(torch.tensor([0.0, float("nan")]))
    with pytest.raises(SamplingError, match="NaN"):
        Sampler(SamplingParams(temperature=1.0, seed=0))(torch.tensor([0.0, float("nan")]))


class StopAtTheEnd:
    """A text stream whose stop string is completed only by what it held back (a WordPiece cleanup holds
    a trailing "v" back, since " 've" may follow): push tells nothing, finish finds the stop."""

    stopped = False

    def push(self, token_id):
        return ""

    def finish(self):
        self.stopped = True
        return ""


def test_a_stop_string_found_in_the_held_back_end_is_a_stop_not_length(tiny, loop):  # noqa: F811
    events = run_events(loop, GenerationRequest(PROMPT, 1, text=StopAtTheEnd()))
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 1
    events = run_events(loop, GenerationRequest(PROMPT, 1))
    assert events[-1].finish_reason == "length"
