"""How many prompt tokens a step may carry beside the decoding sequences (no torch, no Ray).

    StepCost.add(tokens, seconds)          after each step: its tokens and how long its forward took
    StepCost.prefill_room(decoding, cap)   the prompt tokens the next step may take

A step's time is fitted online as fixed + per_token x tokens (least squares over the recent steps
with decoding sequences in them, the regime the rule is for; older ones weighing less; a step of a
few tokens costs more per token than a big prefill's): `fixed` is what every step pays (reading the dense
weights, one MoE round trip per layer), `per_token` what each row adds (its MoE rows, its attention).
With D sequences decoding, a step of theirs alone is estimated at fixed + per_token x D; prompt
chunks may make it at most `slowdown` times that, so the streams' time per token stays within
`slowdown` of what it is without long prompts, on any machine and model. Without decoding
sequences nobody waits: a chunk is `cap` tokens. Until the fit is known (two step sizes seen), a
chunk is PROBE_TOKENS; and never less than MIN_TOKENS, so that a long prompt's first token comes in
a bounded number of steps even where each step's fixed cost is small.
"""

from __future__ import annotations

__all__ = ["StepCost", "PROBE_TOKENS", "MIN_TOKENS", "SHORT_PROMPT_TOKENS", "prompt_chunks"]

PROBE_TOKENS = 32  # a chunk while the step cost is not known yet
MIN_TOKENS = 16  # the least a step carries of a waiting prompt (a 2,000-token prompt: at most 125 steps)
# A prompt (or the rest of one) this short goes in whole, unthrottled: it adds little to a step, and holding
# it back would only keep its sequence from decoding (vLLM's long_prefill_token_threshold, the same idea)
SHORT_PROMPT_TOKENS = 64


def prompt_chunks(left: list[int], room: int, long_room: int) -> list[int]:
    """The tokens each waiting prompt gets in the next step (`left`: the tokens each has left, oldest first):
    the short ones first, all of their tokens, then the long ones, oldest first, what is left of `long_room`
    (StepCost.prefill_room); all together at most `room` (max_prefill_tokens). Short first: a long prompt
    arriving with them would otherwise hold their first tokens for the steps of its whole prefill."""
    takes = [0] * len(left)
    for long in (False, True):
        for i, tokens in enumerate(left):
            if (tokens > SHORT_PROMPT_TOKENS) == long:
                takes[i] = max(0, min(tokens, room, long_room if long else room))
                room -= takes[i]
                long_room -= takes[i] if long else 0
    return takes


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
        """Prompt tokens for the next step (at least MIN_TOKENS, at most `cap`) beside `decoding` sequences."""
        if decoding == 0:
            return cap
        fit = self.fit()
        if fit is None:
            return min(cap, PROBE_TOKENS)
        fixed, per_token = fit
        allowed_s = (self.slowdown - 1.0) * (fixed + per_token * decoding)
        return min(cap, max(MIN_TOKENS, int(allowed_s / per_token)))
