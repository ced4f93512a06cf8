"""The one client-error type: `WireError(status, message)`, and the JSON error body.

Every check of what a client sent (the wire decoders, the limits, the generate endpoint's
request, the HTTP layer's body size) raises WireError with the HTTP status to answer
with; the endpoints answer `{"error": message}` with that status. It is a ValueError, so
a handle caller can catch it as one.
"""

from __future__ import annotations

import json

__all__ = ["WireError", "encode_error"]


class WireError(ValueError):
    """A client error: HTTP `status` and a message for the JSON error body; `param` (the request
    field at fault) and `code` are optional details that OpenAI's error object carries."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):
        # Ray pickles exceptions raised in a replica back to the caller of a handle.
        return (WireError, (self.status, self.message, self.param, self.code))


def encode_error(message: str) -> bytes:
    """The JSON body of an error answer: {"error": message}."""
    return json.dumps({"error": message}).encode()
