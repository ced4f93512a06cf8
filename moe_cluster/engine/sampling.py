"""Choosing the next token from the logits of one sequence (no Ray): greedy or sampled, as vLLM does.

    raw logits [V] ─► min_tokens: EOS / stop ids at -inf until min_tokens tokens were generated
                   ─► penalties (repetition, presence, frequency: engine/penalties.py)
                   ─► temperature < 1e-5: argmax (transformers' greedy `generate`, ties to the lowest id;
                      below that, logits / t overflows to inf and softmax gives NaN: vLLM's rule too)
                      temperature t: logits / t -> min_p cut -> top-k cut -> top-p (nucleus) cut
                      -> softmax -> one draw

Each request has its own `torch.Generator`, seeded by its `seed`, so a seeded request draws the
same tokens whatever else runs beside it; without a seed, the generator starts from fresh OS
entropy. The cuts follow transformers' MinP/TopK/TopPLogitsWarper (the most likely token always
survives, so a top_p that would keep no token keeps that one). Logits that are not finite where
a token survives (a model that computed NaN) raise `SamplingError`: that request fails alone, the
others of the step go on (engine/scheduler.py). Defaults a request does not set come from the
model's generation_config.json (`generation_defaults`), as vLLM takes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .penalties import Penalties

__all__ = ["SamplingParams", "Sampler", "SamplingError", "GREEDY_BELOW", "GENERATION_DEFAULTS",
           "generation_defaults"]

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by them overflows
# What a generation_config.json may set for sampling (vLLM reads these; max_new_tokens only on demand)
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class SamplingError(RuntimeError):
    """The logits of one sequence cannot be sampled from (NaN or all -inf)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # 0 (or -1): no top-k cut
    min_p: float = 0.0  # tokens less likely than min_p x the most likely one are cut; 0: off
    seed: int | None = None  # None: a random seed
    repetition_penalty: float = 1.0  # engine/penalties.py; 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # tokens generated before EOS or a stop id may be
    stop_token_ids: frozenset[int] = frozenset()  # ids that end the sequence, as EOS does
    ignore_eos: bool = False  # EOS does not end the sequence (max_tokens does)

    def __post_init__(self) -> None:
        if (self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < -1 or not 0 <= self.min_p <= 1
                or self.repetition_penalty <= 0 or self.min_tokens < 0):
            raise ValueError(f"bad sampling parameters {self}: temperature >= 0, 0 < top_p <= 1, top_k >= -1, "
                             "0 <= min_p <= 1, repetition_penalty > 0, min_tokens >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def generation_defaults(model: nn.Module) -> dict[str, float | int]:
    """The sampling values the model's generation config sets ({} without generation_config.json)."""
    config = getattr(model, "generation_config", None)
    values = config.to_diff_dict() if config is not None else {}
    return {name: values[name] for name in GENERATION_DEFAULTS if values.get(name) is not None}


class Sampler:
    """The token chooser of one request; it counts its tokens (min_tokens, penalties)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] = (), stop_ids: frozenset[int] = frozenset()):
        self.params = params
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)  # masked until min_tokens tokens
        self.penalties = Penalties(params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
                                   list(prompt_ids))
        self.generated = 0
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits_V: torch.Tensor) -> int:
        """The next token id for the logits [V] of the last position (left as they are)."""
        token_id = self.choose(self.processed(logits_V))
        self.generated += 1
        self.penalties.record(token_id)
        return token_id

    def processed(self, logits_V: torch.Tensor) -> torch.Tensor:
        """min_tokens' mask and the penalties: what greedy or sampling chooses from (float32 [V])."""
        logits_V = logits_V.float()
        if torch.isnan(logits_V).any():
            raise SamplingError("the model's logits contain NaN: no token can be chosen")
        if self.generated < self.params.min_tokens and self.stop_ids.numel():
            logits_V = logits_V.index_fill(0, self.stop_ids, float("-inf"))
        return self.penalties.apply(logits_V) if self.penalties.active else logits_V

    def choose(self, logits_V: torch.Tensor) -> int:
        if self.params.greedy:
            return int(torch.argmax(logits_V))
        probs_V = torch.softmax(self.cut(logits_V), dim=-1)
        if not torch.isfinite(probs_V).all() or not probs_V.sum() > 0:
            raise SamplingError(f"no token can be drawn with {self.params}: the probabilities are not finite")
        return int(torch.multinomial(probs_V, 1, generator=self.generator))

    def cut(self, logits_V: torch.Tensor) -> torch.Tensor:
        """Temperature, then min-p, top-k, top-p: the logits of the tokens cut are -inf."""
        p = self.params
        logits_V = logits_V / p.temperature
        if p.min_p > 0:
            probs_V = torch.softmax(logits_V, dim=-1)
            logits_V = logits_V.masked_fill(probs_V < p.min_p * probs_V.max(), float("-inf"))
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
