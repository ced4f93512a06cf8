"""Optional bearer-token authentication of every HTTP endpoint of the router.

The token is never part of the configuration: `AppArgs` carries only where to find it,

    auth_token_env: MOE_API_TOKEN              # an environment variable of the replicas
    auth_token_file: /var/run/secrets/moe/token   # and/or a mounted secret file

and the router reads it when it starts (`BearerAuth.from_args`), failing with a clear
message if a configured source is missing or empty. When both are set, either token is
accepted (two sources let a token be rotated without downtime). A request must carry
`Authorization: Bearer <token>`; otherwise it gets 401 with a JSON error and a
`WWW-Authenticate: Bearer` header (RFC 6750), before its path or body is looked at.
Tokens are compared with `hmac.compare_digest`, never logged and never returned.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

__all__ = ["BearerAuth", "read_token_env", "read_token_file"]

REALM = "moe-cluster"


def read_token_env(name: str) -> str:
    """The token in environment variable `name` (surrounding whitespace removed)."""
    token = os.environ.get(name, "").strip()
    if not token:
        raise ValueError(f"auth_token_env is {name!r} but that environment variable is unset or empty in the "
                         "router's process; set it where Ray starts (the Ray nodes' environment, e.g. from a "
                         "Kubernetes Secret, or the shell that runs `moe-cluster serve`), or remove auth_token_env")
    return token


def read_token_file(path: str) -> str:
    """The token in file `path` (a trailing newline, as `kubectl create secret` files often have, removed)."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth_token_file {path!r} cannot be read ({type(exc).__name__}); mount the secret "
                         "there on every node that runs the router, or remove auth_token_file") from None
    if not token:
        raise ValueError(f"auth_token_file {path!r} is empty; put the token in it, or remove auth_token_file")
    return token


class BearerAuth:
    """Checks the Authorization header of a request against the configured token(s)."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    @classmethod
    def from_args(cls, auth_token_env: str | None, auth_token_file: str | None) -> "BearerAuth | None":
        """The check for these settings, or None when neither is set (no authentication)."""
        tokens = []
        if auth_token_env:
            tokens.append(read_token_env(auth_token_env))
        if auth_token_file:
            tokens.append(read_token_file(auth_token_file))
        return cls(tokens) if tokens else None

    def __repr__(self) -> str:  # never show the tokens, e.g. in a log of the router's attributes
        return f"BearerAuth({len(self._tokens)} token(s))"

    def check(self, authorization: str | None) -> tuple[int, str, str] | None:
        """None if the header carries a valid token, else (status, message, WWW-Authenticate value)."""
        if not authorization:
            return 401, "missing bearer token: send the header 'Authorization: Bearer <token>'", \
                f'Bearer realm="{REALM}"'
        scheme, _, presented = authorization.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return 401, "the Authorization header must be 'Bearer <token>'", \
                f'Bearer realm="{REALM}", error="invalid_request"'
        if not self._matches(presented.encode()):
            return 401, "invalid bearer token", f'Bearer realm="{REALM}", error="invalid_token"'
        return None

    def _matches(self, presented: bytes) -> bool:
        # Compare against every token, without stopping early: the time taken does not say
        # which token (or how much of one) matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched

