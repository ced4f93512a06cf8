"""Continuous batching of a Hugging Face model whose MoE blocks run elsewhere (no Ray).

    submit(request) ──► waiting ──(step boundary)──► active sequences ──► finished ones leave

    one STEP (the scheduler thread): one forward per member, each in a worker thread of its own
      - each sequence that just joined: its prefill, alone, in its exact shape [1, S] (keeping the
        logits of every position when the request asks for its prompt's logprobs: hf/logprobs.py)
      - every decoding sequence together: ONE batched forward [B, 1] of their last tokens, each
        with its own KV cache (left-padded to the longest for this forward: hf/batch_forward.py)
        └─ the MoE blocks of every member post their rows [T_i, D] for layer L to the step's
           StepGather; when every member still in the step is waiting there, the rows are
           concatenated and ONE moe_call(x_TD, L) is made for all of them; each gets its rows back
      then each sequence chooses its next token (hf/sampling.py: min_tokens, penalties, greedy or a
      draw), with its raw logprob when asked, and tells it to its request; hf/stopping.py says when
      it ends (EOS, stop ids, stop strings, max_new_tokens)

So each MoE layer costs one call per step whatever the number of sequences, and the dense
weights are read once per step for all decoding sequences. Greedy output equals transformers'
`model.generate` of that prompt alone, token for token (tested: padding is masked out, and a
row's result does not depend on the rows beside it beyond float rounding, as in the router's
merged MoE batches). Requests join and leave only at step boundaries; a prompt joins in one
piece (no chunked prefill).

What one request does stays with that request, and nothing waits forever:
  - a forward that fails leaves the gather (the others go on) and its requests end with the error;
  - choosing a token, decoding its text or emitting it (a sampler, tokenizer or callback that
    raises) ends that request alone with an error event; the step goes on for the others;
  - a failure of the step itself (a bug here) ends every request of the step with an error, is
    logged with its traceback, and the loop goes on with the next step (`stats["loop_failures"]`);
  - a cancelled request (its client went away: `SequenceHandle.cancel`, or leaving `events()`)
    leaves at the next step boundary and frees its KV cache (`stats["cancelled"]`);
  - `events()` never waits on a loop that cannot answer: when the scheduler thread is dead or a
    step has run longer than `step_timeout_s`, the request ends with an error, and `failure()`
    says why (the runner's /healthz then answers 503 and Serve replaces the replica).

Requests come from any thread (an asyncio event loop: `events()`, or `events_of()` for the
choices of one answer, which join the same step); what happens to a request is told through its
`emit` callback, called in the scheduler thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..protocol.openai_logprobs import TokenLogprob
from .batch_forward import KV, Forwards
from .logprobs import prompt_logprobs, token_logprob
from .runner import MOE_CALL_OVERRIDE, MoECall
from .sampling import Sampler, SamplingParams
from .step_gather import StepGather
from .stopping import Stopping, eos_token_ids
from .text import TextStream

__all__ = ["GenerationRequest", "Event", "StepGather", "DecodeLoop", "DecodeLoopFailure"]

logger = logging.getLogger("ray.serve")


class DecodeLoopFailure(RuntimeError):
    """The loop itself failed (not one request): every request of the step, or every waiting one, gets it."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int  # 0: the prefill only (for the prompt's logprobs), no token
    sampling: SamplingParams = SamplingParams()
    text: TextStream | None = None  # the answer's text (and stop strings); None: ids only
    logprobs: int | None = None  # each generated token's logprob and its k most likely; None: not asked
    prompt_logprobs: int | None = None  # the same of each prompt token, from the prefill (hf/logprobs.py)


@dataclass(frozen=True)
class Event:
    """A generated token (token_id, its new text), or the end: finish_reason or error set. The first event
    of a request that asked for prompt_logprobs carries them (also when it is the end, with no token)."""

    token_id: int | None
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, a stop id or a stop string) | "length"
    error: BaseException | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: TokenLogprob | None = None  # of token_id, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class _Sequence:
    request: GenerationRequest
    emit: Callable[[Event], None]
    sampler: Sampler
    stopping: Stopping
    kv: KV | None = None  # its KV cache, made by its prefill
    prompt_logprobs: list[TokenLogprob] | None = None  # made by its prefill (when asked), told once
    pending: list[int] = field(default_factory=list)  # ids to feed in the next forward
    generated: int = 0
    cancelled: bool = False
    done: bool = False


class SequenceHandle:
    """What submit returns: `cancel()` makes the request leave at the next step boundary."""

    def __init__(self, sequence: _Sequence) -> None:
        self._sequence = sequence

    def cancel(self) -> None:
        self._sequence.cancelled = True


class DecodeLoop:
    """The scheduler thread of one model: steps over every active sequence (see the module doc)."""

    def __init__(self, model: nn.Module, moe_call: MoECall, max_num_seqs: int = 64,
                 eos_ids: frozenset[int] | None = None, step_timeout_s: float = 600.0,
                 max_prefill_tokens: int = 8192, on_load: Callable[[int, int], None] | None = None) -> None:
        if max_num_seqs < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_num_seqs and max_prefill_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_prefill_tokens}")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.moe_call, self.max_num_seqs = moe_call, max_num_seqs
        # Prompt tokens joining one step (a longer prompt joins alone): bounds a step's prefill time and, for
        # prompt logprobs, its logits of every position ([S, V] each; a batch of long prompts would be GBs)
        self.max_prefill_tokens = max_prefill_tokens
        self.on_load = on_load  # (sequences running, waiting) at each step boundary (Prometheus gauges)
        self.step_timeout_s = step_timeout_s  # a step running longer: the loop is stuck (see failure())
        self.eos_ids = eos_token_ids(model) if eos_ids is None else frozenset(eos_ids)
        self._forwards = Forwards(model)
        self.stats = {"steps": 0, "moe_calls": 0, "sequences": 0, "max_batch": 0, "cancelled": 0,
                      "request_failures": 0, "loop_failures": 0, "running": 0, "waiting": 0}
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._cv = threading.Condition()
        self._closed = False
        self._step_started: float | None = None  # time.monotonic() of the step in flight; None between steps
        self._died: BaseException | None = None  # what ended the scheduler thread, if not close()
        # Every member of a step must run at once (they meet in the gather): one thread each.
        self._pool = ThreadPoolExecutor(max_workers=max_num_seqs, thread_name_prefix="decode-seq")
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> SequenceHandle:
        """Queue a request (thread-safe); `emit` gets its events in the scheduler thread."""
        return self.submit_all([(request, emit)])[0]

    def submit_all(self, requests: list[tuple[GenerationRequest, Callable[[Event], None]]]) -> list[SequenceHandle]:
        """Queue several (request, emit) at once: they join the same step while there is room."""
        sequences = [self._sequence(request, emit) for request, emit in requests]
        with self._cv:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            if self._died is not None:
                raise DecodeLoopFailure(f"the decode loop has stopped ({self.failure()}); the replica must be "
                                        "replaced: its /healthz answers 503")
            self._waiting.extend(sequences)
            self._cv.notify()
        return [SequenceHandle(sequence) for sequence in sequences]

    def _sequence(self, request: GenerationRequest, emit: Callable[[Event], None]) -> _Sequence:
        if not request.prompt_ids or request.max_new_tokens < 0:
            raise ValueError("a request needs at least one prompt token and max_new_tokens >= 0 (0: its prefill "
                             "only, for its prompt logprobs)")
        params = request.sampling
        stop_ids = params.stop_token_ids | (frozenset() if params.ignore_eos else self.eos_ids)
        return _Sequence(request, emit, Sampler(params, request.prompt_ids, stop_ids),
                         Stopping(request.text, request.max_new_tokens, stop_ids), pending=list(request.prompt_ids))

    async def events(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The events of `request`, on the running event loop; leaving early cancels it."""
        async for _, event in self.events_of([request]):
            yield event

    async def events_of(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        """(position in `requests`, event) of several requests as their events come; leaving early cancels
        them all. Once the loop cannot answer any more, each open request ends with an error event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        open_ = set(range(len(requests)))
        handles = self.submit_all([(request, lambda event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event)))
                                   for i, request in enumerate(requests)])
        try:
            while open_:
                try:
                    i, event = await asyncio.wait_for(queue.get(), timeout=min(1.0, self.step_timeout_s))
                except asyncio.TimeoutError:
                    failure = self.failure()
                    if failure is None:
                        continue
                    for i in sorted(open_):
                        yield i, Event(None, error=DecodeLoopFailure(failure),
                                       prompt_tokens=len(requests[i].prompt_ids))
                    return
                yield i, event
                if event.last:
                    open_.discard(i)
        finally:
            for handle in handles:
                handle.cancel()

    def failure(self) -> str | None:
        """Why the loop cannot answer (its thread ended, or a step is stuck), or None while it works."""
        if self._died is not None:
            return f"the scheduler thread died: {type(self._died).__name__}: {self._died}"
        if not self._thread.is_alive() and not self._closed:
            return "the scheduler thread is not running"
        started = self._step_started
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            return (f"a decode step has run for {time.monotonic() - started:.0f}s, over step_timeout_s="
                    f"{self.step_timeout_s:g}s: a forward or MoE call is stuck")
        return None

    def close(self, wait: bool = True) -> None:
        """Stop after the current step; requests still waiting or active get an error event. `wait`: until
        the scheduler thread has ended (at most 60 s); False returns at once (the thread is a daemon)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if wait:  # the scheduler thread shuts its pool down when it ends (_run): a step may still need it
            self._thread.join(timeout=60)

    # --- the scheduler thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._admit():
                self._guarded_step()
            ending: BaseException = RuntimeError("the decode loop was closed")
        except BaseException as exc:  # noqa: BLE001 - a bug outside a step: nobody may wait on this loop
            logger.exception("the decode loop died; its requests fail and /healthz answers 503")
            self._died = ending = DecodeLoopFailure(f"the decode loop died: {type(exc).__name__}: {exc}")
        with self._cv:
            left, self._waiting = [*self._active, *self._waiting], deque()
        for sequence in left:
            if not sequence.done:
                self._end(sequence, error=ending)
        self._pool.shutdown(wait=False)

    def _guarded_step(self) -> None:
        """One step; if it fails as a whole (not one request: a bug), its requests fail and the loop goes on."""
        self._step_started = time.monotonic()
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - the loop must go on for the requests after these
            self.stats["loop_failures"] += 1
            logger.exception("a decode step failed; its %d request(s) fail, the loop goes on", len(self._active))
            failure = DecodeLoopFailure(f"the decode step failed: {type(exc).__name__}: {exc}")
            for sequence in self._active:
                if not sequence.done:
                    self._end(sequence, error=failure)
            self._active = []
        finally:
            self._step_started = None

    def _admit(self) -> bool:
        """Drop cancelled sequences (freeing their caches), let waiting ones join; False once closed."""
        with self._cv:
            while True:
                self._active = [s for s in self._active if not self._drop_if_cancelled(s)]
                self._join_waiting()
                self._tell_load()
                if self._closed or self._active:
                    return not self._closed
                self._cv.wait()

    def _join_waiting(self) -> None:
        """Waiting sequences join, in order, while there is room: max_num_seqs, max_prefill_tokens (caller locks)."""
        prefill = 0
        while self._waiting and len(self._active) < self.max_num_seqs:
            tokens = len(self._waiting[0].pending)
            if prefill and prefill + tokens > self.max_prefill_tokens:
                break  # it joins the next step
            sequence = self._waiting.popleft()
            if not self._drop_if_cancelled(sequence):
                self._active.append(sequence)
                prefill += tokens

    def _tell_load(self) -> None:
        self.stats["running"], self.stats["waiting"] = len(self._active), len(self._waiting)
        if self.on_load is None:
            return
        try:
            self.on_load(self.stats["running"], self.stats["waiting"])
        except Exception:  # noqa: BLE001 - a broken metrics sink must not stop the loop
            logger.exception("on_load failed; the decode loop goes on")

    def _drop_if_cancelled(self, sequence: _Sequence) -> bool:
        if not sequence.cancelled:
            return False
        sequence.kv, sequence.done = None, True
        self.stats["cancelled"] += 1
        return True

    def _step(self) -> None:
        """One forward per member of the step: each joining sequence's prefill, and the decoding
        sequences as one batch (one forward each where the model's cache cannot be batched)."""
        active = self._active
        joining = [s for s in active if s.kv is None]
        decoding = [s for s in active if s.kv is not None]
        groups = [[s] for s in joining]
        groups += ([decoding] if decoding else []) if self._forwards.batched else [[s] for s in decoding]
        gather = StepGather(self.moe_call, len(groups))
        futures = [self._pool.submit(self._forward, group, gather, i) for i, group in enumerate(groups)]
        results: list[torch.Tensor | BaseException] = []
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - these requests fail, the others go on
                results.append(exc)
        # Counted before any token of the step goes out: whoever got an answer sees its step counted.
        self.stats["steps"] += 1
        self.stats["moe_calls"] += gather.calls
        self.stats["max_batch"] = max(self.stats["max_batch"], len(active))
        for group, result in zip(groups, results):
            if isinstance(result, BaseException):
                self.stats["request_failures"] += len(group)
                for sequence in group:
                    self._end(sequence, error=result)
                continue
            for sequence, logits_V in zip(group, result):
                self._advance(sequence, logits_V)
        self._active = [s for s in active if not s.done]

    def _forward(self, group: list[_Sequence], gather: StepGather, member: int) -> torch.Tensor:
        """One forward (a worker thread): a prefill of one sequence or a decode of several; logits [B, V]."""
        token = MOE_CALL_OVERRIDE.set(functools.partial(gather.call, member))
        try:
            if group[0].kv is None:
                return self._prefill(group[0])
            logits_BV, caches = self._forwards.decode([s.pending[0] for s in group], [s.kv for s in group])
            for sequence, kv in zip(group, caches):
                sequence.kv = kv
            return logits_BV
        finally:
            MOE_CALL_OVERRIDE.reset(token)
            gather.leave(member)

    def _prefill(self, sequence: _Sequence) -> torch.Tensor:
        """The prompt's forward (its KV cache); the logits [1, V] of its last position. Asked for prompt
        logprobs, the same forward keeps the logits of every position and they are made here."""
        k = sequence.request.prompt_logprobs
        logits_SV, sequence.kv = self._forwards.prefill(sequence.pending, every_position=k is not None)
        if k is not None:
            sequence.prompt_logprobs = prompt_logprobs(logits_SV, sequence.pending, k)
        return logits_SV[-1:]

    def _advance(self, sequence: _Sequence, logits_V: torch.Tensor) -> None:
        """The sequence's next token: sampled, its text decoded, told. Whatever raises ends this request alone."""
        if sequence.cancelled:
            return  # leaves at the next step boundary (_admit), counted there
        try:
            self._choose(sequence, logits_V)
        except Exception as exc:  # noqa: BLE001 - a sampler, tokenizer or emit that raises: this request only
            if not sequence.done:
                self.stats["request_failures"] += 1
                self._end(sequence, error=exc)

    def _choose(self, sequence: _Sequence, logits_V: torch.Tensor) -> None:
        request = sequence.request
        if request.max_new_tokens == 0:  # the prompt's logprobs were all it asked for
            return self._end(sequence, finish="length")
        token_id = sequence.sampler(logits_V)
        logprob = token_logprob(logits_V, token_id, request.logprobs) if request.logprobs is not None else None
        sequence.generated += 1
        sequence.pending = [token_id]
        piece, finish = sequence.stopping.push(token_id, sequence.generated)
        if finish is None:
            prompt, sequence.prompt_logprobs = sequence.prompt_logprobs, None
            return sequence.emit(Event(token_id, piece, logprob=logprob, prompt_logprobs=prompt))
        self._end(sequence, token_id, piece, finish, logprob=logprob)

    def _end(self, sequence: _Sequence, token_id: int | None = None, piece: str = "", finish: str | None = None,
             error: BaseException | None = None, logprob: TokenLogprob | None = None) -> None:
        sequence.done = True
        sequence.kv = None
        self.stats["sequences"] += 1
        event = Event(token_id, piece, finish, error, len(sequence.request.prompt_ids), sequence.generated,
                      logprob, sequence.prompt_logprobs)
        try:
            sequence.emit(event)
        except Exception:  # noqa: BLE001 - its receiver is gone or broken: nobody else is concerned
            logger.exception("the last event of a request could not be told; the request is dropped")
