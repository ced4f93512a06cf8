"""Logprobs on the wire (no torch): OpenAI's completions (legacy) and chat formats, as vLLM answers them.

A position's logprobs (`TokenLogprob`): the token there, its log-probability under the model's raw
distribution (before temperature, penalties and cuts), and the k most likely tokens there, most
likely first. The first prompt token has none: nothing predicts it (`logprob` None).

    completions  {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
                  "text_offset": [int]}
                 top_logprobs of a position: the token itself first, then the k most likely (k + 1 entries
                 at most, one per distinct text); text_offset: where each token's text starts, counted over
                 the token texts from `offset` (a stream's chunk: the characters told before it)
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
                 top_logprobs: the k most likely, most likely first

A token's text is the tokenizer's decode of that token alone (`token_text(id)`, vLLM's way); a
logprob below -9999 (-inf) is told as -9999.0, as OpenAI and vLLM do (JSON has no infinity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TokenLogprob", "MIN_LOGPROB", "MAX_LOGPROBS", "completion_logprobs", "chat_logprobs"]

MIN_LOGPROB = -9999.0
MAX_LOGPROBS = 20  # most likely tokens per position (OpenAI's limit: logprobs 0-5, top_logprobs 0-20)
TokenText = Callable[[int], str]


@dataclass(frozen=True)
class TokenLogprob:
    """One position: its token, that token's logprob (None: the first prompt token) and the k most
    likely tokens there as (token id, logprob), most likely first."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def _clamped(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(positions: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """The `logprobs` of a completion choice (or of one streamed chunk, `offset` characters in)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for position in positions:
        text = token_text(position.token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if position.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamped(position.logprob))
        top = {text: _clamped(position.logprob)}
        for token_id, logprob in position.top:  # two ids of one text: the later one's value (vLLM's dict)
            top[token_text(token_id)] = _clamped(logprob)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _chat_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": _clamped(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(positions: Sequence[TokenLogprob], token_text: TokenText, top: int) -> dict[str, Any]:
    """The `logprobs` of a chat choice (or chunk): each generated token and its `top` most likely."""
    return {"content": [{**_chat_entry(token_text(p.token_id), p.logprob),
                         "top_logprobs": [_chat_entry(token_text(t), lp) for t, lp in p.top[:top]]}
                        for p in positions]}
