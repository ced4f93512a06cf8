"""What one request may carry, checked in one place for every path (v1, OIP v2, the handle).

    Limits(d_model, max_tokens, allow_non_finite)
        check_tokens(T)      WireError 413 above max_tokens tokens
        check_values(x_TD)   WireError 422 if a numpy array holds NaN or Inf (unless allowed)

The decoders check the declared shape (and so the token count) before anything is allocated;
the values once the array is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import WireError

__all__ = ["Limits"]


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
