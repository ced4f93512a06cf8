"""Open Inference Protocol v2 (KServe / Triton REST): its paths, the served model's metadata. No Ray.

    GET  /v2                                       server metadata
    GET  /v2/health/live, /v2/health/ready         200 (empty body) when live / ready
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    200 (empty body) when ready
    POST /v2/models/{name}[/versions/{v}]/infer    inference (the request and response: oip.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import WireError

__all__ = ["MODEL_VERSION", "EXTENSIONS", "Route", "parse_route", "check_model", "server_metadata", "model_metadata"]

MODEL_VERSION = "1"  # the one version of the served model: /versions/1/... or no /versions at all
EXTENSIONS = ["binary_tensor_data"]

Endpoint = Literal["server", "live", "ready", "model", "model_ready", "infer"]


@dataclass(frozen=True)
class Route:
    """A /v2 path: which endpoint, and for model endpoints the model name and version (None: any)."""

    endpoint: Endpoint
    model: str | None = None
    version: str | None = None


_FIXED_ROUTES: dict[tuple[str, ...], Endpoint] = {
    ("v2",): "server", ("v2", "health", "live"): "live", ("v2", "health", "ready"): "ready"}
_MODEL_ROUTES: dict[tuple[str, ...], Endpoint] = {(): "model", ("ready",): "model_ready", ("infer",): "infer"}


def parse_route(path: str) -> Route | None:
    """The endpoint of a path below the app's prefix (e.g. "/v2/models/moe/versions/1/infer"), or None."""
    parts = tuple(path.strip("/").split("/"))
    if parts in _FIXED_ROUTES:
        return Route(_FIXED_ROUTES[parts])
    if len(parts) < 3 or parts[:2] != ("v2", "models") or not parts[2]:
        return None
    model, rest, version = parts[2], parts[3:], None
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    endpoint = _MODEL_ROUTES.get(rest)
    return None if endpoint is None else Route(endpoint, model, version)


def check_model(route: Route, model_name: str) -> None:
    """WireError 404 unless the route names the served model (and its version, if any)."""
    if route.model != model_name:
        raise WireError(404, f"unknown model {route.model!r}; this server serves {model_name!r} "
                             f"(see GET /v2/models/{model_name})")
    if route.version is not None and route.version != MODEL_VERSION:
        raise WireError(404, f"model {model_name!r} has no version {route.version!r}; its only version is "
                             f"{MODEL_VERSION!r} (or leave /versions/... out of the path)")


def server_metadata(version: str) -> dict:
    return {"name": "moe-cluster", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(model_name: str, d_model: int) -> dict:
    """Inputs and outputs of the served model. hidden_states may also be FP16 or BF16; layer INT32."""
    return {
        "name": model_name, "versions": [MODEL_VERSION], "platform": "moe-cluster",
        "inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [-1, d_model]},
                   {"name": "layer", "datatype": "INT64", "shape": [1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, d_model]}],
    }
