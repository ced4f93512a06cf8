"""What one request may carry, checked in one place for every path.

    Limits(d_model, max_tokens, allow_non_finite)           hidden states (v1, OIP v2, the router's handle)
        check_tokens(T)      WireError 413 above max_tokens tokens
        check_values(x_TD)   WireError 422 if a numpy array holds NaN or Inf (unless allowed)

    TextLimits(max_input_tokens, max_new_tokens, context, max_kv_tokens)
                                                             token ids (the runner's /v1/generate and the
                                                             OpenAI routes alike: one fault, one answer)
        new_tokens(prompt, asked)   the new tokens a prompt may have, or WireError 400:
                                    prompt over max_input_tokens, prompt + new over the model's context
                                    or the decode loop's KV cache: code context_length_exceeded;
                                    new tokens over max_new_tokens: code invalid_value
    check_token_ids(ids, vocab_size, param)   WireError 400 for an id outside [0, vocab_size)

The decoders check the declared shape (and so the token count) before anything is allocated;
the values once the array is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import WireError

__all__ = ["Limits", "TextLimits", "check_token_ids"]


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    d_model: int
    max_tokens: int  # 413 above this many tokens
    allow_non_finite: bool = False  # NaN/Inf in hidden_states: 422 unless allowed

    def check_tokens(self, tokens: int) -> None:
        if tokens > self.max_tokens:
            raise WireError(413, f"{tokens} tokens exceed the limit of {self.max_tokens} per request; "
                                 "split the batch")

    def check_values(self, x_TD: np.ndarray) -> None:
        """422 if x_TD (float32, float16 or ml_dtypes.bfloat16) holds NaN or Inf, unless allowed."""
        if not self.allow_non_finite and x_TD.size and not bool(np.isfinite(x_TD).all()):
            raise WireError(422, "hidden_states contains NaN or Inf; send finite values")


@dataclass(frozen=True)
class TextLimits:
    """The token limits of a text request: 400 for each fault, as OpenAI and vLLM answer them."""

    max_input_tokens: int  # prompt tokens of one request (batch x length for /v1/generate)
    max_new_tokens: int  # new tokens of one sequence
    context: int | None = None  # the model's max_position_embeddings (None: the model sets no limit)
    max_kv_tokens: int | None = None  # the decode loop's KV cache in tokens: no sequence (prompt + new) fits
                                      # in more (None: no such cap, e.g. /v1/generate's HF generate)

    @property
    def max_model_len(self) -> int:
        """The most tokens (prompt + new) one sequence may have here."""
        caps = [c for c in (self.context, self.max_kv_tokens) if c]
        return min([self.max_input_tokens + self.max_new_tokens, *caps])

    def new_tokens(self, prompt_tokens: int, asked: int | None, batch: int = 1, prompt_param: str = "prompt",
                   new_param: str = "max_tokens") -> int:
        """The new tokens of a prompt of `prompt_tokens` (x `batch` sequences) that asked for `asked` (None:
        as many as fit, up to max_new_tokens), or WireError 400 naming the field at fault."""
        total = batch * prompt_tokens
        shape = f"{batch}x{prompt_tokens} = {total}" if batch > 1 else f"{total}"
        if total > self.max_input_tokens:
            raise WireError(400, f"the prompt has {shape} tokens, over this server's limit of {self.max_input_tokens} "
                                 "(max_input_tokens); send fewer or shorter prompts", param=prompt_param,
                            code="context_length_exceeded")
        caps = [(cap, what) for cap, what in ((self.context, "the model's context"),
                                              (self.max_kv_tokens, "the KV cache (max_kv_tokens)")) if cap]
        if asked is None:
            asked = min([self.max_new_tokens, *(cap - prompt_tokens for cap, _ in caps)])
            if asked < 1:  # the prompt fills a cap: no room for a token
                cap, what = min(caps)
                raise WireError(400, f"the prompt's {prompt_tokens} tokens leave no room for a new token in {what} "
                                     f"of {cap} tokens", param=prompt_param, code="context_length_exceeded")
        if asked > self.max_new_tokens:
            raise WireError(400, f"{new_param} {asked} is over this server's limit of {self.max_new_tokens} "
                                 "(max_new_tokens)", param=new_param, code="invalid_value")
        for cap, what in caps:
            if prompt_tokens + asked > cap:
                raise WireError(400, f"the prompt's {prompt_tokens} tokens + {new_param} {asked} = "
                                     f"{prompt_tokens + asked} exceed {what} of {cap} tokens",
                                param=prompt_param if prompt_tokens > cap else new_param,
                                code="context_length_exceeded")
        return asked


def check_token_ids(ids: list[int], vocab_size: int, param: str, what: str = "token id") -> None:
    """A 400 naming `param` for the first id outside the model's vocabulary [0, vocab_size): such an id would
    reach the embedding (an IndexError there, a broken device on a GPU)."""
    bad = next(((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise WireError(400, f"{what} {bad[1]} ({param}[{bad[0]}]) is outside the model's vocabulary "
                             f"[0, {vocab_size})", param=param, code="invalid_value")
