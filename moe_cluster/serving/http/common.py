"""The one HTTP dispatch of every deployment (the router's and the runner's), and what its faces share.

    dispatch(owner, request, faces, hint)
        the face that has the path (its error format; the first face's for an unknown path)
        -> auth (401 before the path, the method or the body is looked at: check_auth)
        -> the route's method (404/405) -> the handler -> its response, or the error it raised
           answered by `error_answer` (serving/errors.py: the client's 4xx, 503/504 inside, else 500)
        -> one access log line: method, real path, status, time

A `Face` is a group of routes that answer errors in one format: {"error": "..."} for the router's and
the runner's own routes and the Open Inference Protocol (`plain_error_body`), OpenAI's error object for
the OpenAI routes (protocol/openai.py `error_body`). A failure inside is logged with its traceback; its
answer names the exception, never the traceback. Serve's own access log is off for these deployments
(DEPLOYMENT_DEFAULTS): it names the route prefix, not the path, for a plain `__call__` deployment.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from starlette.requests import Request
from starlette.responses import Response

from ...protocol.bodies import JSON
from ...protocol.errors import WireError, encode_error
from ..errors import client_error, failure_text, http_status, internal

__all__ = ["dispatch", "Face", "Handler", "ErrorBody", "plain_error_body", "error_answer", "Unauthorized",
           "relative_path", "read_body", "error_response", "json_response", "check_auth", "client_text"]

logger = logging.getLogger("ray.serve")

Handler = Callable[[Any, Request], Awaitable[Response]]
# (status, message, param, code) -> the body of an error answer in a face's format
ErrorBody = Callable[[int, str, "str | None", "str | None"], bytes]


def plain_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """{"error": message}: the router's, the runner's own routes' and the Open Inference Protocol's."""
    return encode_error(message)


@dataclass(frozen=True)
class Face:
    """Routes that answer their errors in one format.

    routes: exact path -> (method, handler); prefixes: path prefix -> handler that checks its own paths
    and methods (e.g. "/v2" for the Open Inference Protocol)."""

    routes: dict[str, tuple[str, Handler]] = field(default_factory=dict)
    prefixes: dict[str, Handler] = field(default_factory=dict)
    error_body: ErrorBody = plain_error_body

    def route(self, path: str) -> tuple[str | None, Handler] | None:
        """(the method it takes, None: the handler checks; the handler) of `path`, or None if not here."""
        handler = next((h for prefix, h in self.prefixes.items() if path == prefix or path.startswith(prefix + "/")),
                       None)
        return (None, handler) if handler is not None else self.routes.get(path)


class Unauthorized(WireError):
    """401 with the WWW-Authenticate challenge (RFC 6750) its answer carries."""

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(401, message, code="invalid_api_key")
        self.challenge = challenge

    def __reduce__(self):
        return (Unauthorized, (self.message, self.challenge))


async def dispatch(owner: Any, request: Request, faces: list[Face], hint: str) -> Response:
    """Answer one request to `owner` (a deployment with an `auth` attribute) through the face that has its
    path. `hint` ends the 404 message."""
    started = time.perf_counter()
    path, method = relative_path(request), request.method
    face, route = next(((f, r) for f in faces if (r := f.route(path)) is not None), (faces[0], None))
    try:
        check_auth(owner, request)
        if route is None:
            raise WireError(404, f"no endpoint {path}; {hint}")
        allowed, handler = route
        if allowed is not None and method != allowed:
            raise WireError(405, f"{path} takes {allowed}, not {method}")
        response = await handler(owner, request)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear status, never a partial output
        response = error_answer(exc, path, face.error_body)
    logger.info("%s %r %d %.1fms", method, path, response.status_code, (time.perf_counter() - started) * 1e3)
    return response


def error_answer(exc: BaseException, path: str, error_body: ErrorBody = plain_error_body) -> Response:
    """The answer to a request to `path` that raised `exc` (serving/errors.py's table), in `error_body`'s format."""
    client = client_error(exc)
    if client is not None:
        status, message, param, code = client.status, client.message, client.param, client.code
    else:
        failure = internal(exc, path)  # another deployment's failure unwrapped: Ray's traceback only in the log
        status, message, param, code = http_status(failure), failure_text(failure), None, None
        logger.error("request to %s failed", path, exc_info=exc)
    headers = {"WWW-Authenticate": exc.challenge} if isinstance(exc, Unauthorized) else None
    return Response(error_body(status, message, param, code), status_code=status, media_type=JSON, headers=headers)


def relative_path(request: Request) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


def check_auth(owner: Any, request: Request) -> None:
    """Unauthorized (401) if `owner` requires a bearer token and the request lacks a valid one."""
    auth = getattr(owner, "auth", None)  # None: no authentication configured
    failure = auth.check(request.headers.get("authorization")) if auth is not None else None
    if failure is not None:
        _, message, challenge = failure
        raise Unauthorized(message, challenge)


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

