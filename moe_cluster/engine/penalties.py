"""Repetition, presence and frequency penalties of one sequence (torch, no Ray), as vLLM applies them.

    repetition_penalty r   each token seen in the prompt or the output so far: logit > 0 -> logit / r,
                           else logit * r  (r > 1 discourages repeating; 1: off)
    frequency_penalty f    each token of the output so far: logit - f * (times it was generated)
    presence_penalty p     each token of the output so far: logit - p (once, however often)

Only the output counts for the frequency and presence penalties (OpenAI's definition); the
repetition penalty (transformers' and vLLM's) also counts the prompt. They apply to the logits
the sampler chooses from (greedy too), never to the logprobs told (those are the model's raw ones).
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["Penalties"]


class Penalties:
    """The penalties of one sequence: `record(token)` after each generated token, `apply(logits_V)` before."""

    def __init__(self, repetition: float, presence: float, frequency: float, prompt_ids: list[int]) -> None:
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        self.prompt_P = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
        self.output: Counter[int] = Counter()

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def record(self, token_id: int) -> None:
        self.output[token_id] += 1

    def apply(self, logits_V: torch.Tensor) -> torch.Tensor:
        """The penalised logits [V] (a new tensor; logits_V is left as it is)."""
        logits_V = logits_V.clone()
        out_O = torch.tensor(list(self.output), dtype=torch.long)
        if self.repetition != 1.0:
            seen = torch.cat([self.prompt_P, out_O]).unique()
            scale = torch.where(logits_V[seen] > 0, 1.0 / self.repetition, self.repetition)
            logits_V[seen] *= scale
        if out_O.numel() and (self.frequency or self.presence):
            counts_O = torch.tensor(list(self.output.values()), dtype=logits_V.dtype)
            logits_V[out_O] -= self.frequency * counts_O + self.presence
        return logits_V
