"""`ModelRunner`: a whole Hugging Face MoE model served as one deployment: the dense model here, its MoE
blocks wherever `moe_calls` says (serving/runner_moe.py), the HTTP faces of serving/http/runner_routes.py.

    client ──HTTP──► Serve proxy ──► ModelRunner.__call__ ──► the one dispatch (http/common.py: auth, route,
                                                              errors -> statuses, access log)
        /v1/completions, /v1/chat/completions, /v1/models, /tokenize, ...   the OpenAI face (http/openai_routes.py):
            the request checked (protocol/openai.py, protocol/limits.py TextLimits), its choices joining the
            decode loop's steps (engine/scheduler.py: continuous batching)
        /v1/generate  (or handle.generate(input_ids, max_new_tokens))   the request checked (protocol/bodies.py
            check_generate_request: the same TextLimits), greedy `model.generate` in a worker thread
        /v1/info, /v1/stats, /healthz
                       │ every MoE block of every step
                       ▼
    moe_call(x_TD, layer)   in_process: the MoE checkpoint here | router: the MoE app's router |
                            direct (default): routed here, one parallel hop to the expert deployments

Two ways to wire a cluster runner (`build_runner_app(args)`, args: serving/runner_args.py RunnerArgs):
- `moe: {checkpoint: ..., ...}` (the `args:` of `build_app`): the runner app binds its own
  MoE router app, so one `serve.run` deploys runner, router and experts together.
- `moe_app: NAME`: the runner calls a MoE app already running under that name (one MoE
  cluster, several runners or other clients; the runner holds no expert).
With `moe_calls: in_process` (`build_in_process_runner_app`, `moe-cluster serve --in-process`), `moe:
{checkpoint: ...}` is computed in the runner's replica and nothing else is deployed.

Its device: the dense model runs on the GPU Ray gave the replica (`runner: {ray_actor_options:
{num_gpus: 1}}`), else on the CPU (runtime.pick_device, as the experts choose theirs), in `dtype`
(auto: bfloat16 on a GPU). Each MoE call takes and returns rows on that device.

Why a thread: transformers' forward is synchronous, and `.result()` on a response raises
on the replica's event loop. `generate` runs in `asyncio.to_thread`, where no event loop
runs, so `.result()` is allowed there and blocks only that thread; the replica's loop
stays free for other requests and health checks.

    POST /v1/generate  {"input_ids": [[1, 2, 3]], "max_new_tokens": 8}
                       -> {"output_ids": [[1, 2, 3, ...8 new]], "timings": {...}}   (greedy only)
    GET  /v1/info      the model, its MoE layers, the limits (the decode loop's resolved sizes included)
    GET  /v1/stats     the decode loop's steps, MoE calls, sequences, largest batch, sizes; routing for itself,
                       also rows per expert, calls, latency and transport paths of its MoE calls
    GET  /healthz      200 once the MoE app's router and every expert deployment answer (in process: nothing
                       to ask) and the decode loop works, else 503 (Serve's own health check replaces a
                       replica whose loop is dead)
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ..hf.runner import GenerateLimits, HFMoERunner, check_compatible
from ..protocol.errors import WireError
from .app import ROUTER_NAME, build_app
from .args import DEPLOYMENT_DEFAULTS, merge_options, resolve_app
from .errors import internal
from .http.auth import BearerAuth
from .http.common import error_response, json_response
from .http.openai_routes import OpenAIFace
from .http.runner_routes import handle_runner_http
from .runner_args import RunnerArgs
from .runner_moe import open_moe
from .runtime import pick_device, set_torch_threads

__all__ = ["RunnerArgs", "ModelRunner", "build_runner_app", "build_in_process_runner_app", "RUNNER_NAME"]

RUNNER_NAME = "runner"


def build_runner_app(args: dict[str, Any] | RunnerArgs) -> Application:
    """`runner` (ingress); with `moe` (and moe_calls direct or router), also the MoE router app bound into it."""
    runner_args = args if isinstance(args, RunnerArgs) else RunnerArgs.model_validate(args)
    moe = None
    if runner_args.moe is not None and runner_args.moe_calls != "in_process":
        moe_app = resolve_app(runner_args.moe)
        check_compatible(runner_args.hf_model, moe_app.config, moe_app.args.checkpoint)  # fail before deploying
        moe = build_app(moe_app)
    options = merge_options(DEPLOYMENT_DEFAULTS["runner"], runner_args.runner)
    return ModelRunner.options(name=RUNNER_NAME, **options).bind(runner_args.model_dump(mode="json"), moe)


def build_in_process_runner_app(args: dict[str, Any] | RunnerArgs) -> Application:
    """The same runner with `moe_calls: in_process`: its MoE blocks computed in its replica (no experts)."""
    plain = args.model_dump(mode="json") if isinstance(args, RunnerArgs) else dict(args)
    return build_runner_app({**plain, "moe_calls": "in_process"})


@serve.deployment
class ModelRunner:
    async def __init__(self, args: dict, moe: DeploymentHandle | None = None) -> None:
        self.args = RunnerArgs.model_validate(args)
        set_torch_threads(self.args.torch_threads)
        # The bearer token of the HTTP endpoints (None: no auth); fails here if configured but missing.
        self.auth = BearerAuth.from_args(self.args.auth_token_env, self.args.auth_token_file)
        self.device = pick_device()  # the GPU Ray gave this replica, else the CPU
        self.moe = await open_moe(self.args, moe, self.device)
        limits = GenerateLimits(self.args.max_input_tokens, self.args.max_new_tokens)
        self.runner = await asyncio.to_thread(HFMoERunner, self.args.hf_model, self.moe, self.args.dtype,
                                              limits, self.device)
        self.openai = await asyncio.to_thread(OpenAIFace, self.runner, self.args.served_model_name,
                                              self.args.tokenizer, self.args.engine_options())  # the OpenAI API

    async def generate(self, input_ids: list[list[int]], max_new_tokens: int = 16) -> dict:
        """{"output_ids": [[prompt + new]], "timings": {...}}; bad input raises WireError (a ValueError): the
        runner checks it with protocol/bodies.py check_generate_request (HF's generate holds its own KV cache,
        so no max_kv_tokens). A ValueError from inside transformers' generate is no client's: 500."""
        try:
            return await asyncio.to_thread(self.runner.generate, input_ids, max_new_tokens)
        except WireError:
            raise
        except ValueError as exc:
            raise internal(exc, "generate") from exc

    async def info(self) -> dict:
        return {**self.runner.info(), **replica_devices(), "moe": self.moe.name, "moe_calls": self.args.moe_calls,
                **self.decode_loop_sizes()}

    def decode_loop_sizes(self) -> dict:
        """The OpenAI API's decode loop as it runs: its sizes resolved (max_kv_tokens from free memory, ...)."""
        loop = self.openai.loop
        return {"max_num_seqs": loop.max_num_seqs, "max_kv_tokens": loop.max_kv_tokens,
                "max_prefill_tokens": loop.max_prefill_tokens, "overlap": loop.overlap,
                "prefill_slowdown": loop.prefill_slowdown}

    async def stats(self) -> dict:
        """The decode loop's counters and sizes; routing for itself (moe_calls: direct), also what the router's
        /v1/stats says of its MoE calls: rows per expert, calls, latency, phases, transport paths."""
        return {"decode_loop": {**self.openai.loop.stats, **self.decode_loop_sizes()},
                "moe_calls": self.args.moe_calls, **self.moe.stats()}

    def __del__(self) -> None:
        """At replica shutdown (Serve calls __del__, on the replica's event loop): tell the decode loop to stop
        after its step; requests still in it end with an error event instead of waiting for the process to die.
        Without waiting for it: a step in flight needs this event loop for its MoE calls and its events."""
        face = getattr(self, "openai", None)  # None: __init__ failed before the loop started
        if face is not None:
            face.close(wait=False)
        moe = getattr(self, "moe", None)
        if moe is not None:
            moe.close()  # the direct routing's expert channels

    def _decode_loop_failure(self) -> str | None:
        """Why the decode loop cannot answer (engine/scheduler.py `failure`), or None while it works."""
        failure = self.openai.loop.failure()
        return None if failure is None else f"the OpenAI API's decode loop cannot answer: {failure}"

    def check_health(self) -> None:
        """Serve's health check: raises while the decode loop cannot answer, so that Serve replaces the replica
        rather than leave every request to fail."""
        failure = self._decode_loop_failure()
        if failure is not None:
            raise RuntimeError(failure)

    async def healthz(self) -> Response:
        """200 only when the runner really serves: its decode loop works and its MoE calls would answer (the
        MoE app's router and every expert deployment answer a ping); else 503 naming what does not."""
        failure = self._decode_loop_failure()
        if failure is not None:
            return error_response(503, f"{failure}; Serve replaces this replica (its health check fails)")
        failure = await self.moe.unhealthy()
        return json_response({"status": "ok"}) if failure is None else error_response(503, failure)

    async def __call__(self, request: Request) -> Response:
        return await handle_runner_http(self, request)


def replica_devices() -> dict:
    """What Ray gave this runner replica: {"gpu_ids": [...]} (empty: no GPU; fake GPUs are listed too,
    while the model's own `device` says where it computes)."""
    import ray

    return {"gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}


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
