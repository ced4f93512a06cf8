"""A request of the decode loop and what it tells (no Ray): GenerationRequest in, Events out.

    GenerationRequest   prompt ids, max_new_tokens, sampling, text stream, logprobs asked
    Event               a token (and its text, logprob) or the end (finish_reason or error)
    Sequence            the loop's state of one request: its KV cache, sampler, stopping rule,
                        prompt logprobs made chunk by chunk (engine/scheduler.py steps over these)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..protocol.openai_logprobs import TokenLogprob
from .kv_cache import SequenceKV
from .logprobs import prompt_logprobs
from .sampling import Sampler, SamplingParams
from .stopping import Stopping
from .text import TextStream

__all__ = ["DecodeLoopFailure", "GenerationRequest", "Event", "Sequence", "SequenceHandle"]


class DecodeLoopFailure(RuntimeError):
    """The loop itself failed (not one request): every request of the step, or every waiting one, gets it."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int  # 0: the prefill only (for the prompt's logprobs), no token
    sampling: SamplingParams = SamplingParams()
    text: TextStream | None = None  # the answer's text (and stop strings); None: ids only
    logprobs: int | None = None  # each generated token's logprob and its k most likely; None: not asked
    prompt_logprobs: int | None = None  # the same of each prompt token, from the prefill (engine/logprobs.py)


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
class Sequence:
    request: GenerationRequest
    emit: Callable[[Event], None]
    sampler: Sampler
    stopping: Stopping
    kv: SequenceKV | None = None  # made when it joins (its KV budget taken), dropped when it ends
    prompt_logprobs: list[TokenLogprob] | None = None  # made chunk by chunk (when asked), told once
    carry_1V: torch.Tensor | None = None  # the logits of the last prompt position so far (prompt logprobs)
    next_token: int | None = None  # the token to feed in the next step, once the prompt is in
    generated: int = 0
    cancelled: bool = False
    done: bool = False

    @property
    def capacity(self) -> int:
        """The KV positions it may take in its whole life: what admission reserves."""
        return len(self.request.prompt_ids) + self.request.max_new_tokens

    def score_chunk(self, chunk: list[int], logits_CV: torch.Tensor) -> None:
        """The logprobs of a prompt chunk just forwarded (its kv.length advanced past it): token i from the
        logits of position i - 1 (the prompt's first token has none; a later chunk's first token is scored
        by the previous chunk's last position)."""
        ids, k = self.request.prompt_ids, self.request.prompt_logprobs
        end = self.kv.length
        start = end - len(chunk)
        if start == 0:
            self.prompt_logprobs = prompt_logprobs(logits_CV, ids[:end], k)
        else:
            rows = torch.cat([self.carry_1V, logits_CV])
            self.prompt_logprobs += prompt_logprobs(rows, ids[start - 1:end], k)[1:]
        self.carry_1V = logits_CV[-1:].clone()  # not a view: the step's logits can go



class SequenceHandle:
    """What submit returns: `cancel()` makes the request leave at the next step boundary."""

    def __init__(self, sequence: Sequence) -> None:
        self._sequence = sequence

    def cancel(self) -> None:
        self._sequence.cancelled = True
