"""Continuous batching of a Hugging Face model whose MoE blocks run elsewhere (no Ray).

    submit(request) ──► waiting ──(step boundary, KV budget)──► active sequences ──► finished ones leave

    admission: a request joins when max_num_seqs allows and its whole life fits the KV budget
      (prompt + max_new_tokens positions of `max_kv_tokens`, default: half the memory free at start);
      one that can never fit is refused at submit; its cache is made once, at that size (engine/kv_cache.py)
    one STEP (the scheduler thread): ONE packed forward of every active sequence (engine/forward.py)
      - each decoding sequence: its last token
      - prompts: chunks, oldest first, of at most max_prefill_tokens in all, and beside decoding
        sequences only as many as keep the step within prefill_slowdown x theirs alone
        (engine/step_cost.py): a long prompt enters over several steps instead of stalling the streams
      - overlap: the step in two micro-batches forwarded at once (one's MoE calls in flight while
        the other computes)
        └─ each MoE layer: ONE moe_call(x_TD, L) with the rows of every sequence (of the micro-batch)
      then each sequence whose prompt is all in chooses its next token (engine/sampling.py), with its raw
      logprob when asked, and tells it; engine/stopping.py says when it ends

A step's MoE calls and dense weights are shared by all its sequences; it copies nothing that grows
with the context. Greedy output equals transformers' `model.generate` of each prompt alone, token
for token (a row's result does not depend on the rows beside it beyond float rounding).

What one request does stays with that request, and nothing waits forever:
  - a request that can never run (a token id outside the embedding, over the KV budget): ValueError
    at submit; a forward that fails (a failed MoE call) ends the requests of its (micro-)batch;
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
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..protocol.openai_logprobs import TokenLogprob
from .forward import Member, PackedForward, halfway
from .kv_cache import SequenceKV, default_max_kv_tokens
from .logprobs import token_logprob
from ..hf.runner import MOE_CALL_OVERRIDE, MoECall
from .sampling import Sampler
from .sequence import DecodeLoopFailure, Event, GenerationRequest, Sequence, SequenceHandle
from .step_cost import StepCost, prompt_chunks
from .stopping import Stopping, eos_token_ids

__all__ = ["GenerationRequest", "Event", "DecodeLoop", "DecodeLoopFailure", "MAX_PREFILL_TOKENS", "PREFILL_SLOWDOWN"]

MAX_PREFILL_TOKENS = 512  # prompt tokens per step, in chunks, at most
PREFILL_SLOWDOWN = 1.25  # beside decoding sequences: a step at most 1.25x theirs alone (engine/step_cost.py)

logger = logging.getLogger("ray.serve")


class DecodeLoop:
    """The scheduler thread of one model: steps over every active sequence (see the module doc)."""

    def __init__(self, model: nn.Module, moe_call: MoECall, max_num_seqs: int = 64,
                 eos_ids: frozenset[int] | None = None, step_timeout_s: float = 600.0,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, on_load: Callable[[int, int], None] | None = None,
                 max_kv_tokens: int | None = None, overlap: bool = False,
                 prefill_slowdown: float | None = PREFILL_SLOWDOWN) -> None:
        if max_num_seqs < 1 or max_prefill_tokens < 1 or (max_kv_tokens is not None and max_kv_tokens < 1):
            raise ValueError(f"max_num_seqs, max_prefill_tokens and max_kv_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_prefill_tokens}, {max_kv_tokens}")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.moe_call, self.max_num_seqs = moe_call, max_num_seqs
        # Prompt tokens per step, in chunks (bounds a step's prefill time and prompt logprobs' [C, V] logits);
        # fewer beside decoding sequences: a step at most prefill_slowdown x theirs alone (None: no cut)
        self.max_prefill_tokens, self.prefill_slowdown = max_prefill_tokens, prefill_slowdown
        self._cost = None if prefill_slowdown is None else StepCost(prefill_slowdown)
        self.on_load = on_load  # (sequences running, waiting) at each step boundary (Prometheus gauges)
        self.step_timeout_s = step_timeout_s  # a step running longer: the loop is stuck (see failure())
        self.eos_ids = eos_token_ids(model) if eos_ids is None else frozenset(eos_ids)
        self._forward = PackedForward(model)
        self.kv_bytes_per_token = self._forward.kv_bytes_per_token()
        self.max_kv_tokens = default_max_kv_tokens(self.kv_bytes_per_token, self._forward.device) \
            if max_kv_tokens is None else max_kv_tokens
        self.overlap = overlap  # two micro-batches per step at once: one's MoE calls in flight, the other computes
        self._second = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-micro-batch")
        self.stats = {"steps": 0, "moe_calls": 0, "sequences": 0, "max_batch": 0, "cancelled": 0,
                      "request_failures": 0, "loop_failures": 0, "running": 0, "waiting": 0, "prefill_chunks": 0,
                      "kv_tokens_reserved": 0, "max_kv_tokens": self.max_kv_tokens,
                      "kv_bytes_per_token": self.kv_bytes_per_token}
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cv = threading.Condition()
        self._closed = False
        self._step_started: float | None = None  # time.monotonic() of the step in flight; None between steps
        self._died: BaseException | None = None  # what ended the scheduler thread, if not close()
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
                raise DecodeLoopFailure("the decode loop is closed (the replica is shutting down): retry")
            if self._died is not None:
                raise DecodeLoopFailure(f"the decode loop has stopped ({self.failure()}); the replica must be "
                                        "replaced: its /healthz answers 503")
            self._waiting.extend(sequences)
            self._cv.notify()
        return [SequenceHandle(sequence) for sequence in sequences]

    def _sequence(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Sequence:
        """A request made a sequence, or ValueError saying why it can never run here."""
        if not request.prompt_ids or request.max_new_tokens < 0:
            raise ValueError("a request needs at least one prompt token and max_new_tokens >= 0 (0: its prefill "
                             "only, for its prompt logprobs)")
        vocab = self._forward.vocab_size
        bad = next((t for t in request.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's embedding [0, {vocab})")
        params = request.sampling
        stop_ids = params.stop_token_ids | (frozenset() if params.ignore_eos else self.eos_ids)
        sequence = Sequence(request, emit, Sampler(params, request.prompt_ids, stop_ids),
                             Stopping(request.text, request.max_new_tokens, stop_ids))
        if sequence.capacity > self.max_kv_tokens:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                             f"the KV cache of this server (max_kv_tokens={self.max_kv_tokens}): send a shorter "
                             "prompt or ask fewer tokens")
        return sequence

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
            ending: BaseException = DecodeLoopFailure("the decode loop was closed (the replica is shutting down): "
                                                      "retry")
        except BaseException as exc:  # noqa: BLE001 - a bug outside a step: nobody may wait on this loop
            logger.exception("the decode loop died; its requests fail and /healthz answers 503")
            self._died = ending = DecodeLoopFailure(f"the decode loop died: {type(exc).__name__}: {exc}")
        with self._cv:
            left, self._waiting = [*self._active, *self._waiting], deque()
        for sequence in left:
            if not sequence.done:
                self._end(sequence, error=ending)
        self._second.shutdown(wait=False)

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
        """Waiting sequences join, in order, while max_num_seqs and the KV budget allow (caller locks)."""
        if any(s.cancelled for s in self._waiting):  # they leave wherever they are in the queue
            self._waiting = deque(s for s in self._waiting if not self._drop_if_cancelled(s))
        reserved = sum(s.capacity for s in self._active)  # the KV positions the running sequences may take
        while self._waiting and len(self._active) < self.max_num_seqs:
            sequence = self._waiting[0]
            if reserved + sequence.capacity > self.max_kv_tokens:
                break  # it waits for others to end (in order: no later request overtakes it)
            reserved += sequence.capacity
            self._waiting.popleft()
            sequence.kv = SequenceKV(sequence.capacity)
            self._active.append(sequence)
        self.stats["kv_tokens_reserved"] = reserved

    def _tell_load(self) -> None:
        self.stats["running"], self.stats["waiting"] = len(self._active), len(self._waiting)
        if self.on_load is None:
            return
        try:
            self.on_load(self.stats["running"], self.stats["waiting"])
        except Exception:  # noqa: BLE001 - a broken metrics sink must not stop the loop
            logger.exception("on_load failed; the decode loop goes on")

    def _drop_if_cancelled(self, sequence: Sequence) -> bool:
        if not sequence.cancelled:
            return False
        self._release(sequence)
        sequence.done = True
        self.stats["cancelled"] += 1
        return True

    @staticmethod
    def _release(sequence: Sequence) -> None:
        """Its KV cache freed (its reservation ends as it leaves the running sequences)."""
        sequence.kv = None

    def _step(self) -> None:
        """ONE packed forward of the step's members (each decoding sequence's token and prompt chunks), or
        two at once (`overlap`): the second micro-batch in the second thread."""
        active = self._active
        members, sequences = self._plan(active)
        decoding = any(s.next_token is not None for s in sequences)
        cuts = [0, halfway(members) if self.overlap else len(members), len(members)]
        halves = [(members[a:b], sequences[a:b]) for a, b in zip(cuts, cuts[1:]) if a < b]
        started = time.perf_counter()
        second = [self._second.submit(self._forward_counted, m) for m, _ in halves[1:]]
        results = [self._forward_counted(halves[0][0]), *(future.result() for future in second)]
        # The fit is of the steps the rule is for (decoding sequences in them), and a failure is no cost
        if self._cost is not None and decoding and not any(isinstance(logits, Exception) for logits, _ in results):
            self._cost.add(sum(len(m.ids) for m in members), time.perf_counter() - started)
        # Counted before any token of the step goes out: whoever got an answer sees its step counted.
        self.stats["steps"] += 1
        self.stats["moe_calls"] += sum(calls for _, calls in results)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(active))
        for (half_members, half_sequences), (logits, _) in zip(halves, results):
            if isinstance(logits, Exception):
                self.stats["request_failures"] += len(half_sequences)
                for sequence in half_sequences:
                    self._end(sequence, error=logits)
                continue
            for sequence, member, logits_CV in zip(half_sequences, half_members, logits):
                self._after_forward(sequence, member, logits_CV)
        self._active = [s for s in active if not s.done]

    def _forward_counted(self, members: list[Member]) -> tuple[list[torch.Tensor] | Exception, int]:
        """(the logits of the members' forward, or what it raised (a failed MoE call); its MoE calls)."""
        calls = [0]

        def counted(x_TD: torch.Tensor, layer: int) -> torch.Tensor:
            calls[0] += 1
            return self.moe_call(x_TD, layer)

        token = MOE_CALL_OVERRIDE.set(counted)
        try:
            return self._forward(members), calls[0]
        except Exception as exc:  # noqa: BLE001 - these requests fail, the others go on
            return exc, calls[0]
        finally:
            MOE_CALL_OVERRIDE.reset(token)

    def _plan(self, active: list[Sequence]) -> tuple[list[Member], list[Sequence]]:
        """(members of the step's forward, their sequences): every decoding sequence's next token, then
        prompt chunks, oldest first, of at most max_prefill_tokens tokens in all; of long prompts, beside
        decoding sequences, only what prefill_slowdown allows (engine/step_cost.py)."""
        decoding = [s for s in active if s.next_token is not None]
        prefilling = [s for s in active if s.next_token is None]
        room = self.max_prefill_tokens
        long_room = room if self._cost is None else self._cost.prefill_room(len(decoding), room)
        takes = prompt_chunks([len(s.request.prompt_ids) - s.kv.length for s in prefilling], room, long_room)
        members, sequences = [Member(s.kv, [s.next_token]) for s in decoding], list(decoding)
        for sequence, take in zip(prefilling, takes):
            if take:
                start = sequence.kv.length
                members.append(Member(sequence.kv, sequence.request.prompt_ids[start:start + take],
                                      every_position=sequence.request.prompt_logprobs is not None))
                sequences.append(sequence)
                self.stats["prefill_chunks"] += 1
        return members, sequences

    def _after_forward(self, sequence: Sequence, member: Member, logits_CV: torch.Tensor) -> None:
        """A prompt chunk's logprobs (when asked); once its prompt is all in, the sequence's next token."""
        if sequence.next_token is None and sequence.request.prompt_logprobs is not None:
            try:
                sequence.score_chunk(member.ids, logits_CV)
            except Exception as exc:  # noqa: BLE001 - NaN logits: this request only
                self.stats["request_failures"] += 1
                return self._end(sequence, error=exc)
        if member.kv.length >= len(sequence.request.prompt_ids):  # decoding, or its prompt's last chunk
            self._advance(sequence, logits_CV[-1])

    def _advance(self, sequence: Sequence, logits_V: torch.Tensor) -> None:
        """The sequence's next token: sampled, its text decoded, told. Whatever raises ends this request alone."""
        if sequence.cancelled:
            return  # leaves at the next step boundary (_admit), counted there
        try:
            self._choose(sequence, logits_V)
        except Exception as exc:  # noqa: BLE001 - a sampler, tokenizer or emit that raises: this request only
            if not sequence.done:
                self.stats["request_failures"] += 1
                self._end(sequence, error=exc)

    def _choose(self, sequence: Sequence, logits_V: torch.Tensor) -> None:
        request = sequence.request
        if request.max_new_tokens == 0:  # the prompt's logprobs were all it asked for
            return self._end(sequence, finish="length")
        token_id = sequence.sampler(logits_V)
        logprob = token_logprob(logits_V, token_id, request.logprobs) if request.logprobs is not None else None
        sequence.generated += 1
        sequence.next_token, sequence.carry_1V = token_id, None
        piece, finish = sequence.stopping.push(token_id, sequence.generated)
        if finish is None:
            prompt, sequence.prompt_logprobs = sequence.prompt_logprobs, None
            return sequence.emit(Event(token_id, piece, logprob=logprob, prompt_logprobs=prompt))
        self._end(sequence, token_id, piece, finish, logprob=logprob)

    def _end(self, sequence: Sequence, token_id: int | None = None, piece: str = "", finish: str | None = None,
             error: BaseException | None = None, logprob: TokenLogprob | None = None) -> None:
        sequence.done = True
        self._release(sequence)
        self.stats["sequences"] += 1
        event = Event(token_id, piece, finish, error, len(sequence.request.prompt_ids), sequence.generated,
                      logprob, sequence.prompt_logprobs)
        try:
            sequence.emit(event)
        except Exception:  # noqa: BLE001 - its receiver is gone or broken: nobody else is concerned
            logger.exception("the last event of a request could not be told; the request is dropped")
