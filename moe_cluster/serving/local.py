"""`moe-cluster serve`: an embedded local Ray cluster running the app until SIGINT/SIGTERM.

Everything that can be checked without Ray is checked first (`plan_serve`: the config, the app's
args, the token, the port, the runner app): a mistake is a ValueError before Ray starts. SIGINT or
SIGTERM while the cluster starts stops it at once (exit status 130 / 143); once the app is ready,
either one stops it cleanly (exit status 0).
"""

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

from .args import ResolvedApp, resolve_app
from .http.auth import BearerAuth
from .runtime import PortBusyError, check_port_free, start_local_serve, stop_local_serve

__all__ = ["ServeFileApp", "WholeModel", "ServePlan", "read_serve_config", "default_config_path", "plan_serve",
           "serve_local", "handle_hint"]

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
    tokenizer: Path | None = None  # the tokenizer's directory (None: the hf_model directory's)

    def build(self, moe_args: dict[str, Any]):
        """(the runner app, a description of what runs) for the MoE app's args `moe_args`."""
        from .runner import build_in_process_runner_app, build_runner_app

        args = {"hf_model": str(self.hf_model), "moe": moe_args, "served_model_name": self.model_name,
                "tokenizer": str(self.tokenizer) if self.tokenizer else None,
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
    """The first application in `path` whose import_path is ours (ValueError if it has none, or is not
    a Serve config at all)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a Serve config file (a mapping with `applications:`)")
    for app in data.get("applications") or []:
        if app.get("import_path") == IMPORT_PATH:
            return ServeFileApp(app.get("name", "moe"), app.get("route_prefix", "/"), app.get("args") or {},
                                data.get("http_options") or {})
    raise ValueError(f"{path}: no application with import_path {IMPORT_PATH!r}")



@dataclass(frozen=True)
class ServePlan:
    """What `serve` will deploy, all of it checked before Ray starts."""

    file_app: ServeFileApp
    app: ResolvedApp  # the MoE app (also the runner's MoE part with --hf-model)
    application: Any  # the Serve application to run (built, not yet deployed)
    what: str  # what runs, for the banner
    runner: bool  # the app's ingress is a runner (method `generate`), else the MoE router (`forward`)
    host: str
    port: int
    auth: bool  # every request needs a bearer token


def plan_serve(config_path: Path | None, checkpoint: str | Path | None, host: str | None, port: int | None,
               whole: WholeModel | None = None) -> ServePlan:
    """Read the config, validate the app's args, the token and the port, and build the application:
    every mistake raises here (a ValueError), before Ray starts."""
    from .app import build_app

    file_app = read_serve_config(config_path) if config_path else ServeFileApp("moe", "/", {}, {})
    args_dict = dict(file_app.args)
    args_dict.setdefault("channel_host", "127.0.0.1")  # an embedded cluster is this machine: channels on loopback
    if checkpoint:
        args_dict.update(checkpoint=str(Path(checkpoint).resolve()))
    try:
        app = resolve_app(args_dict)
    except ValueError as exc:  # pydantic's ValidationError included: say which file holds the args
        if hasattr(exc, "errors") and config_path:
            raise ValueError(f"the args of app {file_app.name!r} in {config_path}: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
        raise
    # The replicas inherit this process's environment: a missing token fails here, not in a replica.
    auth = BearerAuth.from_args(app.args.auth_token_env, app.args.auth_token_file)
    host = host or file_app.http_options.get("host", "127.0.0.1")
    if port is None and "port" in file_app.http_options:
        port = int(file_app.http_options["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"http_options.port {port} in {config_path} is not a TCP port: put one in 1..65535 "
                             "there, or pass --port")
    port = port or 8000
    try:  # now, not in the proxy 30 s after Ray started
        check_port_free(host, port)
    except PortBusyError as exc:
        raise ValueError(f"{exc}; pass --port with a free port (or stop what listens there)") from exc
    if whole is None:
        application, what = build_app(app), f"router + {len(app.placement.groups)} expert deployments"
    else:
        application, what = whole.build(args_dict)  # checks the checkpoint against the HF model
    return ServePlan(file_app, app, application, what, whole is not None, host, port, bool(auth))


class StartupInterrupted(BaseException):
    """SIGINT or SIGTERM while the cluster starts (raised by our own code, never by the handler).
    A BaseException, like KeyboardInterrupt: it is not an error to report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM of `serve`: the first one is noted (`signum`) and sets `stop`; later ones
    are ignored (the shutdown under way finishes).

    The handler only notes: raising from it would unwind whatever the main thread runs, Ray's
    Cython code included, which then fails with a SystemError (seen: "returned a result with an
    exception set") instead of stopping. Our own loops watch `stop`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stop = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            self.stop.set()

    def check(self) -> None:
        """StartupInterrupted if a signal came (called during start-up, at points that are safe)."""
        if self.signum is not None:
            raise StartupInterrupted(self.signum)


def serve_local(config_path: Path | None, checkpoint: str | Path | None, host: str | None, port: int | None,
                num_cpus: int | None = None, num_gpus: int | None = None, whole: WholeModel | None = None) -> int:
    """Check everything, start Ray and the app, print where it listens, serve until a signal, shut down.

    Returns 0 when stopped once ready, 128 + the signal's number (130 SIGINT, 143 SIGTERM) when
    stopped during start-up. Mistakes raise before Ray starts (plan_serve)."""
    plan = plan_serve(config_path, checkpoint, host, port, whole)
    signals = StopSignals()
    signals.install()  # before ray.init: a Ctrl-C while Ray starts is acted on as soon as it returns
    interrupted = None
    try:
        _start_and_serve(plan, signals, num_cpus, num_gpus)
    except StartupInterrupted as exc:
        interrupted = exc.signum
        print(f"moe-cluster: {exc} during start-up: stopping the local Ray cluster", file=sys.stderr, flush=True)
    finally:
        # Interrupted, Serve may be half deployed: ray.shutdown alone ends every process of this
        # cluster (the replicas with their raylet) in ~1 s, where Serve's graceful shutdown waits.
        stop_local_serve(graceful=interrupted is None)
    print("moe-cluster: stopped", flush=True)
    return 0 if interrupted is None else 128 + interrupted


def _start_and_serve(plan: ServePlan, signals: StopSignals, num_cpus: int | None, num_gpus: int | None) -> None:
    """Start Ray and Serve, deploy, print the banner, wait for a signal."""
    import ray
    from ray import serve

    started = time.perf_counter()
    try:
        start_local_serve((plan.host, plan.port), num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True)
    except SystemExit:  # while ray.init runs, Ray's own SIGTERM handler is in place: it exits this way
        raise StartupInterrupted(signal.SIGTERM) from None
    signals.install()  # again: ray.init replaced our SIGTERM handler with its own
    signals.check()
    source = plan.app.args.checkpoint or f"preset {plan.app.args.preset} (seed {plan.app.args.seed})"
    print(f"moe-cluster: started a local Ray cluster for {source}", flush=True)
    config = plan.app.config
    print(f"moe-cluster: deploying {plan.what} (D={config.d_model}, E={config.num_experts}, top-{config.top_k})",
          flush=True)
    _deploy(plan, signals)
    base = f"http://{plan.host}:{plan.port}{plan.file_app.route_prefix.rstrip('/')}"
    endpoints = (f"POST {base}/v1/completions, POST {base}/v1/chat/completions, GET {base}/v1/models, "
                 f"POST {base}/tokenize, POST {base}/v1/generate, GET {base}/healthz" if plan.runner else
                 f"GET {base}/healthz, GET {base}/v1/info, POST {base}/v1/forward")
    print(f"moe-cluster: ready in {time.perf_counter() - started:.0f}s, listening on {base}/ ({endpoints})"
          f"{'; every request needs Authorization: Bearer <token>' if plan.auth else ''}; Ctrl-C to stop", flush=True)
    print(_metrics_hint(plan.runner), flush=True)
    token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # ray.init sets it when it turns auth on
    print(handle_hint(ray.get_runtime_context().gcs_address, plan.file_app.name, plan.runner, token_auth), flush=True)
    while not signals.stop.wait(0.5):
        pass
    print("moe-cluster: stopping", flush=True)


def _metrics_hint(runner: bool) -> str:
    """Where Prometheus scrapes this cluster's metrics: Ray's metrics export of this (one) node."""
    import ray

    port = next((node.get("MetricsExportPort") for node in ray.nodes() if node.get("Alive")), None)
    if not port:
        return "moe-cluster: Ray's metrics export is not running: no Prometheus metrics (docs/observability.md)"
    what = "the runner's OpenAI API, the router's and the experts' figures" if runner else \
        "the router's and the experts' figures"
    return f"moe-cluster: Prometheus metrics ({what}) at http://127.0.0.1:{port}/metrics"


def _deploy(plan: ServePlan, signals: StopSignals, poll_s: float = 0.25) -> None:
    """Deploy without waiting (serve.run blocks until every replica is up, ~15 s or more, and a
    signal must not wait for it), then poll the app's status here, checking for a signal between
    polls. Only this thread touches Ray, so an interrupt can shut it down at once."""
    from ray import serve

    serve.run_many([serve.RunTarget(plan.application, plan.file_app.name, plan.file_app.route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    while True:
        signals.check()
        app = serve.status().applications.get(plan.file_app.name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying app {plan.file_app.name!r} failed: {app.message}")
        signals.stop.wait(poll_s)


def handle_hint(ray_address: str, app_name: str, runner: bool, token_auth: bool) -> str:
    """The banner line that says how another Python process on this machine gets a handle, and which
    method the app's ingress has: the MoE router's `forward`, or a runner's `generate`.

    A plain ray.init() there starts a second, empty Ray instance ("There is no Serve instance
    running on this Ray cluster"), and address="auto" picks any cluster running on this machine:
    the hint gives this cluster's own address. With it, Ray turns token auth on only with
    RAY_AUTH_MODE=token (ray/_private/worker.py), which the hint then says.
    """
    init = f'ray.init(address="{ray_address}")' + (" with RAY_AUTH_MODE=token set" if token_auth else "")
    call = ("generate.remote([[1, 5, 9]], 8).result()  # token ids in, {\"output_ids\", \"timings\"} out"
            if runner else "forward.remote(x, layer=L).result()  # x: a [T, D] float32 tensor or array")
    return (f"moe-cluster: Ray cluster at {ray_address}; a handle from Python on this machine: {init}, then "
            f'serve.get_app_handle("{app_name}").{call}')
