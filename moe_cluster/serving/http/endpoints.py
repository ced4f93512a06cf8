"""HTTP endpoints of the router (Starlette request in, response out; the one dispatch in common.py).

    GET  /healthz      200 once every expert deployment answers a ping, else 503
    GET  /v1/info      model description and placement (JSON)
    GET  /v1/stats     per-expert load, calls, retries, replicas, request merging
    POST /v1/forward   JSON or msgpack body (protocol/v1.py); the response uses the request's format
    /v2/...            the Open Inference Protocol v2 (KServe / Triton REST), see oip.py

With `auth_token_env`/`auth_token_file` set, every endpoint first needs `Authorization:
Bearer <token>` (401 otherwise, see auth.py). Client errors are 4xx with a JSON body
{"error": "..."}; a failed expert deployment is a 503, a request past its deadline a 504
and any other failure inside the cluster a 500, never a partial output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from ...protocol.v1 import decode_forward_request, encode_forward_response
from ..tensors import from_numpy, to_numpy
from .common import Face, dispatch, error_response, json_response, read_body
from .oip import handle_oip

if TYPE_CHECKING:
    from ..router import MoERouter

__all__ = ["handle_http", "ROUTES", "ROUTER_FACES"]

_HINT = "try GET /healthz, GET /v1/info, POST /v1/forward or the Open Inference Protocol under /v2"


async def handle_http(router: "MoERouter", request: Request) -> Response:
    return await dispatch(router, request, ROUTER_FACES, _HINT)


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
    y_TD, counts = await router.serve_request(from_numpy(forward_request.hidden_states), layer)
    counts = counts if forward_request.return_expert_counts else None
    content = encode_forward_response(to_numpy(y_TD), forward_request.wire_format, counts)
    return Response(content, media_type=forward_request.wire_format)


ROUTES = {
    "/healthz": ("GET", _healthz),
    "/v1/info": ("GET", _info),
    "/v1/forward": ("POST", _forward),
    "/v1/stats": ("GET", _stats),
}
# Every error answer of the router is {"error": "..."}, the Open Inference Protocol's included.
ROUTER_FACES = [Face(ROUTES, {"/v2": handle_oip})]
