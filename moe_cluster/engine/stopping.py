"""When a sequence ends, and the text it tells on the way (no Ray), as vLLM decides:

    a stop token: EOS (unless ignore_eos) or one of stop_token_ids   "stop"; the token counts (usage,
                                                                     logprobs), its text is not told
    a stop string in the text (from token min_tokens + 1 on)         "stop"; the text ends before it
    max_new_tokens tokens                                            "length"

EOS and the stop ids cannot be drawn before min_tokens tokens (the sampler masks them,
engine/sampling.py); stop strings are looked for only in the text of the tokens after those
(`TextStream(..., after=min_tokens)`). Whatever ends a sequence, what the text held back is told with its last token.
"""

from __future__ import annotations

from torch import nn

from .text import TextStream

__all__ = ["Stopping", "eos_token_ids"]


def eos_token_ids(model: nn.Module) -> frozenset[int]:
    """The ids that end a generation, as transformers' generate reads them (generation_config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


class Stopping:
    """The end of one sequence: `push(token_id, generated)` -> (its new text, "stop" | "length" | None)."""

    def __init__(self, text: TextStream | None, max_new_tokens: int,
                 stop_ids: frozenset[int]) -> None:
        self.text, self.max_new_tokens, self.stop_ids = text, max_new_tokens, stop_ids

    def push(self, token_id: int, generated: int) -> tuple[str, str | None]:
        """After the `generated`-th token, `token_id`: the text it completes and why the sequence ends."""
        if token_id in self.stop_ids:
            return self._rest(), "stop"
        piece = self.text.push(token_id) if self.text is not None else ""
        if self._stopped():
            return piece, "stop"
        if generated < self.max_new_tokens:
            return piece, None
        piece += self._rest()  # the held-back end may complete a stop string
        return piece, "stop" if self._stopped() else "length"

    def _stopped(self) -> bool:
        return self.text is not None and self.text.stopped

    def _rest(self) -> str:
        return self.text.finish() if self.text is not None else ""
