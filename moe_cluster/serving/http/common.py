"""What every HTTP face of the project shares (the router's and the runner's): one request dispatch.

    dispatch(owner, request, routes, prefixes, hint)
        auth (401 before the path or the body is looked at) -> the route's method (404/405)
        -> the handler -> its response, or the error mapped to a status (serving/errors.py)
        -> one access log line with the real path, method, status and time

Errors are JSON {"error": "..."} with the status; a failure inside the cluster is logged with
its traceback. Serve's own access log is off for these deployments (DEPLOYMENT_DEFAULTS): it
names the route prefix, not the path, for a plain `__call__` deployment.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

from starlette.requests import Request
from starlette.responses import Response

from ...protocol.bodies import JSON
from ...protocol.errors import WireError, encode_error
from ..errors import http_status

__all__ = ["dispatch", "Handler", "relative_path", "read_body", "error_response", "json_response", "check_auth"]

logger = logging.getLogger("ray.serve")

Handler = Callable[[Any, Request], Awaitable[Response]]


async def dispatch(owner: Any, request: Request, routes: dict[str, tuple[str, Handler]],
                   prefixes: dict[str, Handler], hint: str, value_errors_are_4xx: bool = True) -> Response:
    """Answer one request to `owner` (a deployment with an `auth` attribute).

    routes: exact path -> (method, handler); prefixes: path prefix -> handler that checks its own
    paths and methods (e.g. "/v2" for the Open Inference Protocol). `hint` ends the 404 message.
    value_errors_are_4xx: a ValueError is the client's fault (400), e.g. an unknown layer.
    """
    started = time.perf_counter()
    path, method = relative_path(request), request.method
    response = check_auth(owner, request)
    if response is None:
        response = await _route(owner, request, path, method, routes, prefixes, hint, value_errors_are_4xx)
    logger.info("%s %s %d %.1fms", method, path, response.status_code, (time.perf_counter() - started) * 1e3)
    return response


async def _route(owner: Any, request: Request, path: str, method: str, routes: dict[str, tuple[str, Handler]],
                 prefixes: dict[str, Handler], hint: str, value_errors_are_4xx: bool) -> Response:
    handler = next((h for prefix, h in prefixes.items() if path == prefix or path.startswith(prefix + "/")), None)
    if handler is None:
        if path not in routes:
            return error_response(404, f"no endpoint {path}; {hint}")
        allowed, handler = routes[path]
        if method != allowed:
            return error_response(405, f"{path} takes {allowed}, not {method}")
    try:
        return await handler(owner, request)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear status, never a partial output
        status = http_status(exc) if value_errors_are_4xx or isinstance(exc, WireError) else 500
        if status >= 500:
            logger.exception("request to %s failed", path)
        message = exc.message if isinstance(exc, WireError) else str(exc)
        return error_response(status, message if status < 500 else f"{type(exc).__name__}: {exc}")


def relative_path(request: Request) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


def check_auth(owner: Any, request: Request) -> Response | None:
    """A 401 response if `owner` requires a bearer token and the request lacks a valid one."""
    auth = getattr(owner, "auth", None)  # None: no authentication configured
    if auth is None:
        return None
    failure = auth.check(request.headers.get("authorization"))
    if failure is None:
        return None
    status, message, challenge = failure
    return Response(encode_error(message), status_code=status, media_type=JSON,
                    headers={"WWW-Authenticate": challenge})


def error_response(status: int, message: str) -> Response:
    return Response(encode_error(message), status_code=status, media_type=JSON)


def json_response(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status, media_type=JSON)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing (413) anything larger than max_bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise WireError(413, f"body of {declared} bytes exceeds the limit of {max_bytes}; send fewer tokens")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise WireError(413, f"body exceeds the limit of {max_bytes} bytes; send fewer tokens")
        chunks.append(chunk)
    return b"".join(chunks)


def check_token_ids(ids: list[int], vocab_size: int, param: str, what: str = "token id") -> None:
    """A 400 naming `param` for the first id outside the model's vocabulary [0, vocab_size): such an id would
    reach the embedding (an IndexError here, a broken device on a GPU)."""
    bad = next(((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise WireError(400, f"{what} {bad[1]} ({param}[{bad[0]}]) is outside the model's vocabulary "
                             f"[0, {vocab_size})", param=param, code="invalid_value")


try:  # chat templates are jinja2 (transformers'): a template may refuse the messages (raise_exception)
    from jinja2 import TemplateError
except ImportError:  # no jinja2, no chat templates to refuse anything
    TemplateError = ValueError


@contextmanager
def client_text(param: str, chat: bool) -> Iterator[None]:
    """Text a client sent, tokenized (and, for a chat, put through the model's template) inside: a lone UTF-16
    surrogate (which JSON allows) or, for a chat, a template that refuses the messages is a 400 naming `param`."""
    try:
        yield
    except WireError:  # a ValueError too: it already names its field
        raise
    except (TypeError, UnicodeError) as exc:
        raise WireError(400, f"the {param} text is not valid Unicode ({type(exc).__name__}): a lone surrogate or "
                             "similar; send UTF-8 text", param=param, code="invalid_value") from None
    except (ValueError, TemplateError) as exc:
        if not chat:
            raise
        raise WireError(400, f"the model's chat template refused the messages: {exc}", param=param,
                        code="invalid_value") from None

