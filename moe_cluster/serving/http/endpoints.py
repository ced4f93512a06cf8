"""HTTP endpoints of the router (Starlette request in, response out).

    GET  /healthz      200 once every expert deployment answers a ping, else 503
    GET  /v1/info      model description and placement (JSON)
    POST /v1/forward   JSON or msgpack body (see codec.py); the response uses the request's format
    /v2/...            the Open Inference Protocol v2 (KServe / Triton REST), see oip_http.py

With `auth_token_env`/`auth_token_file` set, every endpoint first needs `Authorization:
Bearer <token>` (401 otherwise, see auth.py). Client errors are 4xx with a JSON body
{"error": "..."}; a failed expert deployment is a 503, a request past its deadline a 504
and any other failure inside the cluster a 500, never a partial output.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from ...protocol.v1 import JSON, WireError, decode_forward_request, encode_error, encode_forward_response

if TYPE_CHECKING:
    from ..router import MoERouter

__all__ = ["handle_http", "relative_path", "check_auth"]

logger = logging.getLogger("ray.serve")


def relative_path(request: Request) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


async def handle_http(router: "MoERouter", request: Request) -> Response:
    denied = check_auth(router, request)
    if denied is not None:  # before the path or the body is looked at
        return denied
    path, method = relative_path(request), request.method
    endpoints = {
        "/healthz": ("GET", _healthz),
        "/v1/info": ("GET", _info),
        "/v1/forward": ("POST", _forward),
        "/v1/stats": ("GET", _stats),
    }
    if path == "/v2" or path.startswith("/v2/"):
        from .oip import handle_oip  # imported here: oip_http uses this module's helpers
        endpoint = handle_oip  # checks its own paths and methods
    elif path not in endpoints:
        return error_response(404, f"no endpoint {path}; try GET /healthz, GET /v1/info, POST /v1/forward "
                                   "or the Open Inference Protocol under /v2")
    else:
        allowed, endpoint = endpoints[path]
        if method != allowed:
            return error_response(405, f"{path} takes {allowed}, not {method}")
    try:
        return await endpoint(router, request)
    except WireError as exc:
        return error_response(exc.status, exc.message)
    except ValueError as exc:  # e.g. an unknown layer, caught by the model's own checks
        return error_response(400, str(exc))
    except Exception as exc:  # noqa: BLE001 - a failure inside the cluster
        from ..router import DeadlineExceeded, ExpertCallError
        status = 503 if isinstance(exc, ExpertCallError) else 504 if isinstance(exc, DeadlineExceeded) else 500
        logger.exception("request to %s failed", path)
        return error_response(status, f"{type(exc).__name__}: {exc}")


def check_auth(router: "MoERouter", request: Request) -> Response | None:
    """A 401 response if the router requires a bearer token and the request lacks a valid one."""
    auth = getattr(router, "auth", None)  # None: no authentication configured
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


async def _healthz(router: "MoERouter", request: Request) -> Response:
    failed = await router.check_experts()
    if failed:
        return error_response(503, f"expert deployments not ready: {failed}")
    return json_response({"status": "ok", "expert_deployments": len(router.placement.groups)})


async def _info(router: "MoERouter", request: Request) -> Response:
    return json_response(await router.info())


async def _stats(router: "MoERouter", request: Request) -> Response:
    return json_response(await router.stats())


async def _forward(router: "MoERouter", request: Request) -> Response:
    body = await read_body(request, router.args.max_body_bytes)
    forward_request = decode_forward_request(body, request.headers.get("content-type"), router.limits)
    # ValueError -> 400 for an unknown layer, or a missing one when the model has several.
    layer = router.config.resolve_layer(forward_request.layer)
    y_TD, counts = await router.run(forward_request.hidden_states, layer)
    counts = counts if forward_request.return_expert_counts else None
    content = encode_forward_response(y_TD, forward_request.wire_format, counts)
    return Response(content, media_type=forward_request.wire_format)


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
