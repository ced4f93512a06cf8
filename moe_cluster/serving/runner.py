"""`ModelRunner`: a whole Hugging Face MoE model served with its experts on the cluster.

    client ──HTTP POST /v1/generate──┐                 (or handle.generate(input_ids, max_new_tokens))
                                     ▼
    ModelRunner (one deployment): embeddings, attention, norms, head of the HF model
        greedy model.generate in a worker thread; every MoE block of every step is either
        moe_calls: direct (default)  the runner routes it itself (gate + top-k here, ClusterMoE) and
                                     calls the expert deployments directly: one parallel hop per layer
        moe_calls: router            handle.forward.remote(x_TD, layer).result() ──► the MoE app's router

Two ways to wire it (`build_runner_app(args)`):
- `moe: {checkpoint: ..., ...}` (the `args:` of `build_app`): the runner app binds its own
  MoE router app, so one `serve.run` deploys runner, router and experts together.
- `moe_app: NAME`: the runner calls a MoE app already running under that name (one MoE
  cluster, several runners or other clients; the runner holds no expert).

Its device: the dense model runs on the GPU Ray gave the replica (`runner: {ray_actor_options:
{num_gpus: 1}}`), else on the CPU (runtime.pick_device, as the experts choose theirs), in `dtype`
(auto: bfloat16 on a GPU). Each MoE call takes and returns rows on that device: direct calls route
there (the gates are loaded on it); a call to the router sends the rows on the CPU (a CUDA tensor
would be unpickled as one in a router without a GPU) and moves the answer back.

Why a thread: transformers' forward is synchronous, and `.result()` on a response raises
on the replica's event loop. `generate` runs in `asyncio.to_thread`, where no event loop
runs, so `.result()` is allowed there and blocks only that thread; the replica's loop
stays free for other requests and health checks. A direct MoE call is a coroutine of the
replica's loop (its expert calls are asyncio tasks there); the thread waits for it.

    POST /v1/generate  {"input_ids": [[1, 2, 3]], "max_new_tokens": 8}
                       -> {"output_ids": [[1, 2, 3, ...8 new]], "timings": {...}}   (greedy only)
    POST /v1/completions, /v1/chat/completions, GET /v1/models
                       the OpenAI API: text in and out, streaming, concurrent requests batched step by
                       step (serving/http/openai_routes.py, hf/decode_loop.py)
    GET  /v1/info      the model, its MoE layers, the limits
    GET  /v1/stats     the decode loop's steps, MoE calls, sequences, largest batch; routing for itself,
                       also rows per expert, calls, latency and transport paths of its MoE calls
    GET  /healthz      200 once the MoE app's router and every expert deployment answer and the decode
                       loop works, else 503 (Serve's own health check replaces a replica whose loop is dead)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

import torch

from ..core.config import ModelConfig
from ..hf.runner import RUNNER_DTYPES, GenerateLimits, HFMoERunner, check_compatible
from ..protocol.bodies import decode_generate_request
from .app import ROUTER_NAME, build_app
from .args import DEPLOYMENT_DEFAULTS, DeploymentOptions, merge_options, resolve_app
from .cluster_moe import ClusterMoE
from .errors import MoEAppChanged
from .metrics import RouterMetrics
from .http.auth import BearerAuth
from .runtime import pick_device, set_torch_threads
from .http.common import dispatch, error_response, json_response, read_body, relative_path
from .http.openai_routes import OPENAI_PATHS, OpenAIFace, openai_dispatch

__all__ = ["RunnerArgs", "ModelRunner", "build_runner_app", "RUNNER_NAME"]

RUNNER_NAME = "runner"
logger = logging.getLogger("ray.serve")



class RunnerArgs(BaseModel):
    """The `args:` of `build_runner_app`. Exactly one of `moe` and `moe_app`."""

    model_config = ConfigDict(extra="forbid")

    hf_model: str = Field(description="Hugging Face model directory (config.json + safetensors); only its "
                                      "dense weights are loaded")
    moe: dict[str, Any] | None = Field(default=None, description="args of the MoE app (build_app) to deploy with "
                                                                 "the runner; its checkpoint is hf_model imported")
    moe_app: str | None = Field(default=None, description="or: name of a running MoE app to call")
    dtype: Literal[RUNNER_DTYPES] = Field(
        default="auto", description="dtype of the dense model (auto: bfloat16 on a GPU, config.json's on the CPU)")
    max_input_tokens: int = Field(default=4096, ge=1, description="batch x prompt length; more gets 413")
    max_new_tokens: int = Field(default=256, ge=1, description="larger max_new_tokens gets 413")
    moe_calls: Literal["direct", "router"] = Field(
        default="direct", description="direct: the runner routes each MoE layer itself (the MoE app's gates, "
                                      "loaded here) and calls the expert deployments directly, one parallel hop "
                                      "per layer; router: each MoE layer is a call to the MoE app's router")
    moe_timeout_s: float = Field(default=60.0, gt=0, description="deadline of one MoE call")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads of the runner replica")
    max_body_bytes: int = Field(default=2**20, ge=1024, description="larger HTTP bodies get 413")
    auth_token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                       description="bearer-token auth of the runner's HTTP endpoints, as in AppArgs: "
                                                   "the name of an environment variable holding the token")
    auth_token_file: str | None = Field(default=None, min_length=1,
                                        description="or a file (a mounted Kubernetes Secret) holding it")
    served_model_name: str | None = Field(default=None, min_length=1,
                                          description="the model's name in the OpenAI API (default: hf_model's "
                                                      "directory name)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory (default: hf_model); local files only")
    max_num_seqs: int = Field(default=64, ge=1, le=1024,
                              description="OpenAI API: sequences decoded together in one step; more wait")
    step_timeout_s: float = Field(default=600.0, gt=0,
                                  description="OpenAI API: a decode step running longer is stuck: its requests "
                                              "fail (500), /healthz answers 503 and Serve replaces the replica")
    runner: DeploymentOptions = DeploymentOptions()

    @model_validator(mode="after")
    def _one_moe_source(self) -> "RunnerArgs":
        if (self.moe is None) == (self.moe_app is None):
            raise ValueError("give exactly one of `moe` (args of the MoE app to deploy with the runner) and "
                             "`moe_app` (name of a running MoE app)")
        if self.moe is not None and not self.moe.get("checkpoint"):
            raise ValueError("moe.checkpoint is required: the MoE checkpoint that `moe-cluster import-hf "
                             f"{self.hf_model} DST` wrote")
        return self


def build_runner_app(args: dict[str, Any] | RunnerArgs) -> Application:
    """`runner` (ingress); with `moe`, also the MoE router app bound into this app."""
    runner_args = args if isinstance(args, RunnerArgs) else RunnerArgs.model_validate(args)
    moe = None
    if runner_args.moe is not None:
        moe_app = resolve_app(runner_args.moe)
        check_compatible(runner_args.hf_model, moe_app.config, moe_app.args.checkpoint)  # fail before deploying
        moe = build_app(moe_app)
    options = merge_options(DEPLOYMENT_DEFAULTS["runner"], runner_args.runner)
    return ModelRunner.options(name=RUNNER_NAME, **options).bind(runner_args.model_dump(mode="json"), moe)


@serve.deployment
class ModelRunner:
    async def __init__(self, args: dict, moe: DeploymentHandle | None) -> None:
        self.args = RunnerArgs.model_validate(args)
        set_torch_threads(self.args.torch_threads)
        # The bearer token of the HTTP endpoints (None: no auth); fails here if configured but missing.
        self.auth = BearerAuth.from_args(self.args.auth_token_env, self.args.auth_token_file)
        if moe is None:  # a lookup by name: ray.get inside, so off the event loop
            try:
                moe = await asyncio.to_thread(serve.get_app_handle, self.args.moe_app)
            except Exception as exc:  # noqa: BLE001 - RayServeException: no such app
                raise ValueError(f"moe_app {self.args.moe_app!r} is not running ({exc}): deploy the MoE app under "
                                 "that name first, or give `moe` to deploy one with the runner") from exc
        self.moe = moe
        info = await self.moe.info.remote()
        check_compatible(self.args.hf_model, ModelConfig.from_dict(info["model"]), info["source"].get("checkpoint"))
        self.device = pick_device()  # the GPU Ray gave this replica, else the CPU
        self.loop = asyncio.get_running_loop()  # where direct MoE calls run (their expert calls are its tasks)
        self.direct = await self._direct_moe() if self.args.moe_calls == "direct" else None
        self.reload_lock = asyncio.Lock()
        limits = GenerateLimits(self.args.max_input_tokens, self.args.max_new_tokens)
        self.runner = await asyncio.to_thread(HFMoERunner, self.args.hf_model, self._moe_call, self.args.dtype,
                                              limits, self.device)
        self.openai = await asyncio.to_thread(OpenAIFace, self.runner, self.args.served_model_name,
                                              self.args.tokenizer, self.args.max_num_seqs,
                                              self.args.step_timeout_s)  # the OpenAI API

    async def _direct_moe(self) -> ClusterMoE:
        """The MoE app's layers, routed here on the runner's device: the router tells which args and app
        (moe_spec), so the runner loads the same gates and placement and holds handles to the same expert
        deployments."""
        spec = await self.moe.moe_spec.remote()
        app = resolve_app(spec["args"], spec["digests"], spec.get("channel_secret"))
        handles = await asyncio.to_thread(
            lambda: {g.name: serve.get_deployment_handle(g.name, app_name=spec["app_name"])
                     for g in app.placement.groups})
        metrics = RouterMetrics(app.config.moe_layer_ids, app.config.num_experts)
        return await asyncio.to_thread(ClusterMoE, app, handles, self.device, metrics)

    def _moe_call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        """One MoE block on the cluster: rows [T, D] on the runner's device in, y [T, D] on it out. Runs in
        generate's worker thread, never on the event loop."""
        if self.direct is None:
            # The router may have no GPU: the rows travel on the CPU (a no-op there), the answer comes back.
            y_TD = self.moe.forward.remote(x_TD.cpu(), layer).result(timeout_s=self.args.moe_timeout_s)
            return y_TD.to(x_TD.device)
        call = asyncio.run_coroutine_threadsafe(self._direct_call(x_TD, layer), self.loop)
        try:
            return call.result(timeout=self.args.moe_timeout_s)
        except concurrent.futures.TimeoutError:
            call.cancel()
            raise TimeoutError(f"MoE layer {layer} did not answer within moe_timeout_s={self.args.moe_timeout_s:g}s: "
                               "an expert deployment may be restarting or overloaded") from None

    async def _direct_call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        """One MoE layer routed here (y on x's device and dtype). If the MoE app was redeployed with other weights or placement since
        its gates were loaded (the experts refuse the rows: MoEAppChanged), load them again, once, and resend."""
        direct = self.direct
        try:
            y_TD, _, _ = await direct.forward(x_TD, layer, self.args.moe_timeout_s)
        except MoEAppChanged:
            async with self.reload_lock:
                if self.direct is direct:  # the first caller to notice reloads; the others use its result
                    logger.warning("runner: the MoE app was redeployed with other weights or placement: reloading "
                                   "its gates and placement")
                    self.direct = await self._direct_moe()
            y_TD, _, _ = await self.direct.forward(x_TD, layer, self.args.moe_timeout_s)
        return y_TD.to(x_TD.device, x_TD.dtype)

    async def generate(self, input_ids: list[list[int]], max_new_tokens: int = 16) -> dict:
        """{"output_ids": [[prompt + new]], "timings": {...}}; bad input raises WireError (a ValueError)."""
        return await asyncio.to_thread(self.runner.generate, input_ids, max_new_tokens)

    async def info(self) -> dict:
        return {**self.runner.info(), **replica_devices(), "moe": self.args.moe_app or "bound",
                "moe_calls": self.args.moe_calls}

    async def stats(self) -> dict:
        """The decode loop's counters; routing for itself (moe_calls: direct), also what the router's
        /v1/stats says of its MoE calls: rows per expert, calls, latency, phases, transport paths."""
        out = {"decode_loop": dict(self.openai.loop.stats), "moe_calls": self.args.moe_calls}
        if self.direct is not None:
            out["moe"] = self.direct.stats()
        return out

    def __del__(self) -> None:
        close_decode_loop(self)

    def check_health(self) -> None:
        check_decode_loop(self)

    async def __call__(self, request: Request) -> Response:
        return await handle_runner_http(self, request)

    async def healthz(self) -> Response:
        """200 only when the runner really serves: its decode loop works, the MoE app's router answers and
        every expert deployment answers a ping (MoERouter.check_experts); else 503 naming what does not."""
        broken = decode_loop_unhealthy(self)
        if broken is not None:
            return broken
        try:
            # check_experts waits at most 5 s per ping (all in parallel); 10 s bounds a router that hangs.
            failed = await asyncio.wait_for(_await(self.moe.check_experts.remote()), 10.0)
        except Exception as exc:  # noqa: BLE001
            return error_response(503, f"the MoE app's router does not answer: {type(exc).__name__}: {exc}")
        if failed:
            return error_response(503, f"the MoE app's expert deployments {failed} do not answer a ping: "
                                       "generation would fail; see the MoE app's GET /healthz and the Serve logs")
        return json_response({"status": "ok"})


async def _generate(runner: ModelRunner, request: Request) -> Response:
    input_ids, max_new_tokens = decode_generate_request(await read_body(request, runner.args.max_body_bytes),
                                                        request.headers.get("content-type"))
    return json_response(await runner.generate(input_ids, max_new_tokens))


async def _info(runner: ModelRunner, request: Request) -> Response:
    return json_response(await runner.info())


async def _stats(runner: ModelRunner, request: Request) -> Response:
    return json_response(await runner.stats())


async def _healthz(runner: ModelRunner, request: Request) -> Response:
    return await runner.healthz()


_ROUTES = {"/v1/generate": ("POST", _generate), "/v1/info": ("GET", _info), "/v1/stats": ("GET", _stats),
           "/healthz": ("GET", _healthz)}


def replica_devices() -> dict:
    """What Ray gave this runner replica: {"gpu_ids": [...]} (empty: no GPU; fake GPUs are listed too,
    while the model's own `device` says where it computes)."""
    import ray

    return {"gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}


def _decode_loop_failure(runner) -> str | None:
    """Why the runner's decode loop cannot answer (hf/decode_loop.py `failure`), or None while it works."""
    failure = runner.openai.loop.failure()
    return None if failure is None else f"the OpenAI API's decode loop cannot answer: {failure}"


def decode_loop_unhealthy(runner) -> Response | None:
    """/healthz's 503 while the decode loop cannot answer, or None."""
    failure = _decode_loop_failure(runner)
    return None if failure is None else error_response(
        503, f"{failure}; Serve replaces this replica (its health check fails)")


def check_decode_loop(runner) -> None:
    """Serve's health check of a runner replica: raises while its decode loop cannot answer, so that Serve
    replaces the replica rather than leave every request to fail."""
    failure = _decode_loop_failure(runner)
    if failure is not None:
        raise RuntimeError(failure)


def close_decode_loop(runner) -> None:
    """At replica shutdown (Serve calls __del__, on the replica's event loop): tell the OpenAI decode loop to
    stop after its step; requests still in it end with an error event instead of waiting for the process to
    die. Without waiting for it: a step in flight needs this event loop for its MoE calls and its events."""
    face = getattr(runner, "openai", None)  # None: __init__ failed before the loop started
    if face is not None:
        face.close(wait=False)


async def handle_runner_http(runner, request: Request) -> Response:
    """The HTTP face of a runner (ModelRunner, or InProcessRunner in runner_in_process.py): the OpenAI API,
    then /v1/generate, /v1/info, /v1/stats and /healthz. `runner` has `openai`, `generate`, `info`, `stats`,
    `healthz`, `auth`."""
    if relative_path(request) in OPENAI_PATHS:  # OpenAI's error objects, the decode loop
        return await openai_dispatch(runner, request, runner.openai)
    # A ValueError from inside (e.g. a failed MoE call) is not the client's fault here: only
    # the request checks raise the client's errors (WireError with a 4xx status).
    return await dispatch(runner, request, _ROUTES, {}, "try POST /v1/completions, POST /v1/chat/completions, "
                          "GET /v1/models, POST /v1/generate, GET /v1/info, GET /v1/stats or GET /healthz",
                          value_errors_are_4xx=False)


async def _await(response):
    return await response


def generate_on_local_cluster(runner_args: dict[str, Any], input_ids: list[list[int]], max_new_tokens: int,
                              warmup: int = 1, num_cpus: int | None = None,
                              log=print) -> dict:
    """`moe-cluster generate` without --in-process: start a local Ray cluster, deploy the runner
    app (runner + router + experts, one serve.run), generate `warmup` + 1 times, return the last
    result, shut the cluster down. No HTTP proxy is started (handles only)."""
    import time

    from .runtime import start_local_serve, stop_local_serve

    started = time.perf_counter()
    app = build_runner_app(runner_args)  # validates the args before Ray starts
    log(f"moe-cluster: starting a local Ray cluster for {runner_args['hf_model']}")
    start_local_serve(None, num_cpus=num_cpus)
    try:
        handle = serve.run(app, name="generate", route_prefix=None)
        log(f"moe-cluster: runner, router and experts ready in {time.perf_counter() - started:.0f}s")
        for _ in range(warmup):  # the first calls pay for lazy initialisation on every replica
            handle.generate.remote(input_ids, max_new_tokens).result()
        router = serve.get_deployment_handle(ROUTER_NAME, app_name="generate")
        before = router.stats.remote().result().get("router_phases", {})
        result = handle.generate.remote(input_ids, max_new_tokens).result()
        result["router_phases_ms"] = _phases_between(before, router.stats.remote().result().get("router_phases", {}))
        return result
    finally:
        stop_local_serve()


def _phases_between(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per MoE call of the router's phases (route, experts, combine) between two
    `router_phases` snapshots of /v1/stats, i.e. during one generate call; {} if unknown."""
    calls = after.get("batches", 0) - before.get("batches", 0)
    if calls <= 0:
        return {}
    total = {phase: ms * after["batches"] - before.get("mean_ms", {}).get(phase, 0.0) * before.get("batches", 0)
             for phase, ms in after.get("mean_ms", {}).items()}
    return {phase: round(ms / calls, 3) for phase, ms in total.items()}
