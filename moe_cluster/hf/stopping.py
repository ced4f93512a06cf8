"""When a sequence ends, and the text it tells on the way (no Ray), as vLLM decides:

    a stop token: EOS (unless ignore_eos) or one of stop_token_ids   "stop"; the token counts (usage,
                                                                     logprobs), its text is not told
    a stop string in the text (from token min_tokens + 1 on)         "stop"; the text ends before it
    max_new_tokens tokens                                            "length"

EOS and the stop ids cannot be drawn before min_tokens tokens (the sampler masks them,
hf/sampling.py); stop strings are looked for only in the text of the tokens after those
(`text_stream`). Whatever ends a sequence, what the text held back is told with its last token.
"""

from __future__ import annotations

from torch import nn

from .text import StopStrings, TextStream

__all__ = ["Stopping", "StopStringsAfter", "text_stream", "eos_token_ids"]


def eos_token_ids(model: nn.Module) -> frozenset[int]:
    """The ids that end a generation, as transformers' generate reads them (generation_config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


class StopStringsAfter:
    """A TextStream's text whose stop strings count only from token `after` + 1 on (vLLM's min_tokens)."""

    def __init__(self, tokenizer, stop: list[str], after: int) -> None:
        self.stream = TextStream(tokenizer)  # no stop strings of its own
        self.stops = StopStrings(stop)
        self.after, self.pushed = after, 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pushed += 1
        text = self.stream.push(token_id)
        return text if self.pushed <= self.after else self.stops.push(text)

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self.stream.finish()
        return self.stops.push(text) + self.stops.finish()


def text_stream(tokenizer, stop: list[str], min_tokens: int = 0) -> TextStream | StopStringsAfter:
    """The text of a request's tokens, ended before its first stop string (counted after min_tokens)."""
    if min_tokens and stop:
        return StopStringsAfter(tokenizer, stop, min_tokens)
    return TextStream(tokenizer, stop)


class Stopping:
    """The end of one sequence: `push(token_id, generated)` -> (its new text, "stop" | "length" | None)."""

    def __init__(self, text: TextStream | StopStringsAfter | None, max_new_tokens: int,
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
