"""Choosing the next token from the logits of one sequence (no Ray): greedy or sampled.

    temperature < 1e-5   argmax (what transformers' greedy `generate` does, ties to the lowest id);
                         below that, logits / t overflows to inf and softmax gives NaN (vLLM's rule too)
    temperature t        logits / t -> top-k cut -> top-p (nucleus) cut -> softmax -> one draw

Each request has its own `torch.Generator`, seeded by its `seed`, so a seeded request draws the
same tokens whatever else runs beside it; without a seed, the generator starts from fresh OS
entropy. The cuts follow transformers' TopKLogitsWarper / TopPLogitsWarper (the most likely
token always survives, so a top_p that would keep no token keeps that one). Logits that are not
finite where a token survives (a model that computed NaN) raise `SamplingError`: that request
fails alone, the others of the step go on (hf/decode_loop.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "Sampler", "SamplingError", "GREEDY_BELOW"]

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by them overflows


class SamplingError(RuntimeError):
    """The logits of one sequence cannot be sampled from (NaN or all -inf)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: a random seed

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling parameters {self}: temperature >= 0, 0 < top_p <= 1, top_k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """The token chooser of one request."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits_V: torch.Tensor) -> int:
        """The next token id for the logits [V] of the last position."""
        logits_V = logits_V.float()
        if torch.isnan(logits_V).any():
            raise SamplingError("the model's logits contain NaN: no token can be chosen")
        if self.params.greedy:
            return int(torch.argmax(logits_V))
        probs_V = torch.softmax(self.cut(logits_V), dim=-1)
        if not torch.isfinite(probs_V).all() or not probs_V.sum() > 0:
            raise SamplingError(f"no token can be drawn with {self.params}: the probabilities are not finite")
        return int(torch.multinomial(probs_V, 1, generator=self.generator))

    def cut(self, logits_V: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p: the logits of the tokens cut are -inf."""
        p = self.params
        logits_V = logits_V / p.temperature
        if 0 < p.top_k < logits_V.numel():
            kth = torch.topk(logits_V, p.top_k).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_V, order_V = torch.sort(logits_V, descending=False)
            cumulative_V = torch.softmax(sorted_V, dim=-1).cumsum(dim=-1)
            drop_V = cumulative_V <= 1 - p.top_p
            drop_V[-1] = False  # the most likely token always stays
            logits_V = logits_V.masked_fill(drop_V.scatter(0, order_V, drop_V), float("-inf"))
        return logits_V
