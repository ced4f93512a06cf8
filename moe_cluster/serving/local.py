"""`moe-cluster serve`: an embedded local Ray cluster running the app until SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .args import resolve_app
from .http.auth import BearerAuth
from .runtime import PortBusyError, start_local_serve, stop_local_serve

__all__ = ["ServeFileApp", "WholeModel", "read_serve_config", "default_config_path", "serve_local"]

IMPORT_PATH = "moe_cluster.serving.app:build_app"


@dataclass(frozen=True)
class ServeFileApp:
    """Our application's entry in a Serve config file (serveConfigV2 format)."""

    name: str
    route_prefix: str
    args: dict[str, Any]
    http_options: dict[str, Any]


@dataclass(frozen=True)
class WholeModel:
    """`serve --hf-model`: a whole HF model (runner app with the OpenAI API) instead of the MoE app alone."""

    hf_model: Path
    in_process: bool = False  # the runner computes the MoE blocks itself (no router, no experts)
    model_name: str | None = None

    def build(self, moe_args: dict[str, Any]):
        """(the runner app, a description of what runs) for the MoE app's args `moe_args`."""
        from .runner import build_runner_app
        from .runner_in_process import build_in_process_runner_app

        args = {"hf_model": str(self.hf_model), "moe": moe_args, "served_model_name": self.model_name,
                "torch_threads": moe_args.get("torch_threads"),  # the runner's share of the config's cores
                **{k: moe_args[k] for k in ("auth_token_env", "auth_token_file") if moe_args.get(k)}}
        if self.in_process:
            return build_in_process_runner_app(args), "runner (MoE blocks in process)"
        return build_runner_app(args), "runner + router + experts"


def default_config_path() -> Path | None:
    """deployments/default.yaml of a source checkout, if this package runs from one."""
    path = Path(__file__).resolve().parents[2] / "deployments" / "default.yaml"
    return path if path.is_file() else None


def read_serve_config(path: Path) -> ServeFileApp:
    """The first application in `path` whose import_path is ours."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for app in data.get("applications", []):
        if app.get("import_path") == IMPORT_PATH:
            return ServeFileApp(app.get("name", "moe"), app.get("route_prefix", "/"), app.get("args") or {},
                                data.get("http_options") or {})
    raise ValueError(f"{path}: no application with import_path {IMPORT_PATH!r}")


def serve_local(config_path: Path | None, checkpoint: str | None, host: str | None, port: int | None,
                num_cpus: int | None = None, num_gpus: int | None = None, whole: WholeModel | None = None) -> int:
    """Start Ray and the app, print where it listens, serve until a signal, shut down."""
    file_app = read_serve_config(config_path) if config_path else ServeFileApp("moe", "/", {}, {})
    args_dict = dict(file_app.args)
    if checkpoint:
        args_dict.update(checkpoint=str(Path(checkpoint).resolve()))
    app = resolve_app(args_dict)  # fail fast, before Ray starts; the same resolved app is deployed
    app_args, model_config = app.args, app.config
    try:  # the replicas inherit this process's environment: a missing token fails here, not in a replica
        auth = BearerAuth.from_args(app_args.auth_token_env, app_args.auth_token_file)
    except ValueError as exc:
        print(f"moe-cluster: {exc}", file=sys.stderr, flush=True)
        return 2
    host = host or file_app.http_options.get("host", "127.0.0.1")
    port = port or int(file_app.http_options.get("port", 8000))
    import ray
    from ray import serve

    from .app import build_app

    started = time.perf_counter()
    source = app_args.checkpoint or f"preset {app_args.preset} (seed {app_args.seed})"
    try:  # the port is checked before Ray starts: one line now, not a traceback from the proxy 30 s later
        start_local_serve((host, port), num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True)
    except PortBusyError as exc:
        print(f"moe-cluster: {exc}; pass --port with a free port (or stop what listens there)",
              file=sys.stderr, flush=True)
        return 2
    print(f"moe-cluster: started a local Ray cluster for {source}", flush=True)
    # After ray.init, which installs handlers of its own: we want a clean shutdown.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        groups = app.placement.groups
        what = f"router + {len(groups)} expert deployments"
        if whole is not None:
            application, what = whole.build(args_dict)
        print(f"moe-cluster: deploying {what} "
              f"(D={model_config.d_model}, E={model_config.num_experts}, top-{model_config.top_k})", flush=True)
        serve.run(build_app(app) if whole is None else application, name=file_app.name,
                  route_prefix=file_app.route_prefix)
        base = f"http://{host}:{port}{file_app.route_prefix.rstrip('/')}"
        endpoints = (f"GET {base}/healthz, GET {base}/v1/info, POST {base}/v1/forward" if whole is None else
                     f"POST {base}/v1/completions, POST {base}/v1/chat/completions, GET {base}/v1/models, "
                     f"POST {base}/v1/generate, GET {base}/healthz")
        print(f"moe-cluster: ready in {time.perf_counter() - started:.0f}s, listening on {base}/ "
              f"({endpoints})"
              f"{'; every request needs Authorization: Bearer <token>' if auth else ''}; Ctrl-C to stop", flush=True)
        token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # ray.init sets it when it turns auth on
        print(handle_hint(ray.get_runtime_context().gcs_address, file_app.name, token_auth), flush=True)
        while not stop.wait(0.5):
            pass
        print("moe-cluster: stopping", flush=True)
    finally:
        stop_local_serve()
    print("moe-cluster: stopped", flush=True)
    return 0


def handle_hint(ray_address: str, app_name: str, token_auth: bool) -> str:
    """The banner line that says how another Python process on this machine gets a handle.

    A plain ray.init() there starts a second, empty Ray instance ("There is no Serve instance
    running on this Ray cluster"). address="auto" finds this cluster (any one, if several run
    here) and takes the token from ~/.ray/auth_token; an explicit address is exact, but Ray
    turns token auth on for it only with RAY_AUTH_MODE=token (ray/_private/worker.py).
    """
    explicit = f'ray.init(address="{ray_address}")' + (" with RAY_AUTH_MODE=token" if token_auth else "")
    return (f"moe-cluster: Ray cluster at {ray_address}; a handle from Python on this machine: "
            f'ray.init(address="auto") (or {explicit}), then serve.get_app_handle("{app_name}")')
