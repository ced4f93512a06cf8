"""How many prompt tokens a step may carry beside the decoding sequences (no torch, no Ray).

    StepCost.add(tokens, seconds)          after each step: its tokens and how long its forward took
    StepCost.prefill_room(decoding, cap)   the prompt tokens the next step may take

A step's time is fitted online as fixed + per_token x tokens (least squares over the recent steps,
older ones weighing less): `fixed` is what every step pays whatever its size (reading the dense
weights, one MoE round trip per layer), `per_token` what each row adds (its MoE rows, its attention).
With D sequences decoding, a step of theirs alone is estimated at fixed + per_token x D; prompt
chunks may make it at most `slowdown` times that, so the streams' time per token stays within
`slowdown` of what it is without long prompts, on any machine and model. Without decoding
sequences nobody waits: a chunk is `cap` tokens. Until the fit is known (two step sizes seen), a
chunk is PROBE_TOKENS.
"""

from __future__ import annotations

__all__ = ["StepCost", "PROBE_TOKENS"]

PROBE_TOKENS = 32  # a chunk while the step cost is not known yet


class StepCost:
    def __init__(self, slowdown: float, decay: float = 0.95) -> None:
        if slowdown < 1.0:
            raise ValueError(f"prefill_slowdown must be >= 1 (e.g. 1.25: a step carrying prompt chunks takes "
                             f"at most 1.25x a step of the decoding sequences alone), got {slowdown}")
        self.slowdown, self.decay = slowdown, decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0  # weighted sums of 1, tokens, seconds, ...

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._n = d * self._n + 1
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None while the steps seen do not tell them apart."""
        spread = self._n * self._xx - self._x * self._x  # n^2 x the weighted variance of the token counts
        if self._n < 2 or spread < self._n * self._n:  # variance under one token^2: one step size seen
            return None
        per_token = (self._n * self._xy - self._x * self._y) / spread
        if per_token <= 0:
            return None
        fixed = max(0.0, (self._y - per_token * self._x) / self._n)
        return fixed, per_token

    def prefill_room(self, decoding: int, cap: int) -> int:
        """Prompt tokens for the next step (at least 1, at most `cap`) beside `decoding` sequences."""
        if decoding == 0:
            return cap
        fit = self.fit()
        if fit is None:
            return min(cap, PROBE_TOKENS)
        fixed, per_token = fit
        allowed_s = (self.slowdown - 1.0) * (fixed + per_token * decoding)
        return max(1, min(cap, int(allowed_s / per_token)))
