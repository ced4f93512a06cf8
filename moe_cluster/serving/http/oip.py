"""Open Inference Protocol v2 endpoints of the router (the /v2 paths; protocol code in protocol/oip.py).

`handle_http` (endpoints.py) sends every path under /v2 here; `dispatch` (common.py) maps the WireError/ValueError
raised below to 4xx JSON errors, an expert failure to 503, anything else to 500. Health
answers follow the protocol: 200 with an empty body for true, 400 for false.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from ... import __version__
from ...protocol.errors import WireError
from ...protocol.oip import HEADER_LENGTH, encode_infer_response, parse_infer_request
from ...protocol.oip_routes import Route, check_model, model_metadata, parse_route, server_metadata
from ..tensors import from_numpy, to_numpy
from .common import error_response, json_response, read_body, relative_path

if TYPE_CHECKING:
    from ..router import MoERouter

__all__ = ["handle_oip"]

_ENDPOINTS_HELP = ("GET /v2, GET /v2/health/live, GET /v2/health/ready, GET /v2/models/{name}[/ready] "
                   "and POST /v2/models/{name}/infer (each also under /v2/models/{name}/versions/{v}/...)")


async def handle_oip(router: "MoERouter", request: Request) -> Response:
    """Answer one /v2 request. Raises WireError for unknown paths, models and methods."""
    path = relative_path(request)
    route = parse_route(path)
    if route is None:
        raise WireError(404, f"no endpoint {path}; the Open Inference Protocol endpoints are {_ENDPOINTS_HELP}")
    allowed = "POST" if route.endpoint == "infer" else "GET"
    if request.method != allowed:
        raise WireError(405, f"{path} takes {allowed}, not {request.method}")
    if route.model is not None:
        check_model(route, router.args.oip_model_name)
    return await _HANDLERS[route.endpoint](router, request, route)


async def _server_metadata(router: "MoERouter", request: Request, route: Route) -> Response:
    return json_response(server_metadata(__version__))


async def _live(router: "MoERouter", request: Request, route: Route) -> Response:
    return Response(status_code=200)  # this replica answers: the server is live


async def _ready(router: "MoERouter", request: Request, route: Route) -> Response:
    """Ready once every expert deployment answers a ping (the same check as GET /healthz)."""
    failed = await router.check_experts()
    if failed:
        return error_response(400, f"not ready: expert deployments {failed} do not answer; "
                                   "see GET /healthz and the Serve logs")
    return Response(status_code=200)


async def _model_metadata(router: "MoERouter", request: Request, route: Route) -> Response:
    return json_response(model_metadata(router.args.oip_model_name, router.config.d_model))


async def _infer(router: "MoERouter", request: Request, route: Route) -> Response:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise WireError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    body = await read_body(request, router.args.max_body_bytes)
    infer = parse_infer_request(body, request.headers.get(HEADER_LENGTH), router.limits)
    # ValueError -> 400 for an unknown layer, or a missing one when the model has several.
    layer = router.config.resolve_layer(infer.layer)
    y_TD, _ = await router.serve_request(from_numpy(infer.hidden_states), layer)
    content, headers = encode_infer_response(to_numpy(y_TD), router.args.oip_model_name, infer.request_id,
                                             infer.binary_output)
    return Response(content, headers=headers)


_HANDLERS: dict[str, Callable[["MoERouter", Request, Route], Awaitable[Response]]] = {
    "server": _server_metadata, "live": _live, "ready": _ready,
    "model": _model_metadata, "model_ready": _ready, "infer": _infer,
}
