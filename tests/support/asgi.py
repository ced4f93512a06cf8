"""Starlette requests as Serve's proxy hands them to a deployment's `__call__`, for HTTP tests without Ray."""

from __future__ import annotations

import json

from starlette.requests import Request


def json_request(method: str, path: str, payload=None, token: str | None = None) -> Request:
    """A request for `path` (below the app's route prefix) with `payload` as its JSON body (None: no body) and,
    given `token`, `Authorization: Bearer <token>`."""
    body = b"" if payload is None else json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json")] + ([(b"authorization", f"Bearer {token}".encode())]
                                                           if token else [])
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers, "query_string": b""}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    return Request(scope, receive)
