"""Where a runner's MoE blocks run: one small source per `RunnerArgs.moe_calls`, built by `open_moe`.

    in_process  InProcessMoE  `load_model(moe.checkpoint)` in the runner's replica, on its device (the
                              baseline the cluster is measured against: no router, no experts)
    router      RouterMoE     each MoE layer a call to the MoE app's router: handle.forward.remote(x_TD, layer),
                              the rows on the CPU (the router may have no GPU), the answer moved back
    direct      DirectMoE     the MoE app's gates loaded here (the router's `moe_spec`: the same args,
                              digests and placement), so each layer is routed here and sent to the expert
                              deployments directly (serving/cluster_moe.py): one parallel hop per layer

A source is called as `moe_call(x_TD, layer) -> y_TD` (rows [T, D] on the runner's device in, the same
device and dtype out) from generate's worker thread or the decode loop's, never on the event loop, where
`.result()` would raise; a direct call is a coroutine of the replica's loop that the thread waits for. A
ValueError from inside a call (another deployment refusing the rows) is no client's fault: it leaves as
InternalError (500, serving/errors.py). `unhealthy()` says why generation would fail (/healthz: 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..core.config import ModelConfig
from ..hf.runner import check_compatible, load_compatible_moe
from .args import resolve_app
from .cluster_moe import ClusterMoE
from .errors import DeadlineExceeded, MoEAppChanged, internal
from .metrics import RouterMetrics
from .runner_args import RunnerArgs

__all__ = ["MoESource", "InProcessMoE", "RouterMoE", "DirectMoE", "open_moe"]

logger = logging.getLogger("ray.serve")


class MoESource:
    """One MoE layer call; `name` is what the runner's /v1/info says of its MoE app."""

    name = "in_process"

    def __call__(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        try:
            return self.call(x_TD, layer)
        except Exception as exc:  # a ValueError (WireError included) is no client's: 500; Ray's wrapping removed
            raise internal(exc, f"MoE layer {layer}") from exc

    def call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        raise NotImplementedError

    async def unhealthy(self) -> str | None:
        """Why a MoE call would fail now, or None."""
        return None

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        """At replica shutdown (on the replica's event loop): what the source holds open."""


class InProcessMoE(MoESource):
    """The MoE checkpoint on the runner's device (the whole model on one device: the experts must fit too)."""

    def __init__(self, hf_model: str, checkpoint: str, device: torch.device) -> None:
        self.model = load_compatible_moe(hf_model, checkpoint, device)

    def call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        return self.model.forward(x_TD, layer)


class RouterMoE(MoESource):
    """Each MoE layer a call to the MoE app's router (`handle`, app `name` or "bound")."""

    def __init__(self, handle: DeploymentHandle, name: str, timeout_s: float) -> None:
        self.handle, self.name, self.timeout_s = handle, name, timeout_s

    def call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        response = self.handle.forward.remote(x_TD.cpu(), layer)
        try:
            y_TD = response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()  # the router drops the abandoned call
            raise _late(layer, self.timeout_s) from None
        return y_TD.to(x_TD.device)

    async def unhealthy(self) -> str | None:
        """None once the router and every expert deployment answer a ping (MoERouter.check_experts)."""
        try:
            # check_experts waits at most 5 s per ping (all in parallel); 10 s bounds a router that hangs.
            failed = await asyncio.wait_for(_await(self.handle.check_experts.remote()), 10.0)
        except Exception as exc:  # noqa: BLE001
            return f"the MoE app's router does not answer: {type(exc).__name__}: {exc}"
        if failed:
            return (f"the MoE app's expert deployments {failed} do not answer a ping: generation would fail; see "
                    "the MoE app's GET /healthz and the Serve logs")
        return None


class DirectMoE(RouterMoE):
    """Each MoE layer routed here (ClusterMoE on the runner's device) and sent to the expert deployments; the
    router's handle stays for the app's spec and health."""

    def __init__(self, handle: DeploymentHandle, name: str, timeout_s: float, device: torch.device) -> None:
        super().__init__(handle, name, timeout_s)
        self.device = device
        self.loop = asyncio.get_running_loop()  # where the calls run (their expert calls are its tasks)
        self.reload_lock = asyncio.Lock()
        self.moe: ClusterMoE | None = None

    async def load(self) -> "DirectMoE":
        """The MoE app's layers, routed here: the router tells which args and app (moe_spec), so the runner
        loads the same gates and placement and holds handles to the same expert deployments."""
        spec = await self.handle.moe_spec.remote()
        app = resolve_app(spec["args"], spec["digests"], spec.get("channel_secret"))
        handles = await asyncio.to_thread(
            lambda: {g.name: serve.get_deployment_handle(g.name, app_name=spec["app_name"])
                     for g in app.placement.groups})
        metrics = RouterMetrics(app.config.moe_layer_ids, app.config.num_experts)
        self.moe = await asyncio.to_thread(ClusterMoE, app, handles, self.device, metrics)
        return self

    def call(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        call = asyncio.run_coroutine_threadsafe(self._forward(x_TD, layer), self.loop)
        try:
            return call.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            call.cancel()
            raise _late(layer, self.timeout_s) from None

    async def _forward(self, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        """One MoE layer routed here (y on x's device and dtype). If the MoE app was redeployed with other
        weights or placement since its gates were loaded (the experts refuse the rows: MoEAppChanged), load
        them again, once, and resend."""
        moe = self.moe
        try:
            y_TD, _, _ = await moe.forward(x_TD, layer, self.timeout_s)
        except MoEAppChanged:
            async with self.reload_lock:
                if self.moe is moe:  # the first caller to notice reloads; the others use its result
                    logger.warning("runner: the MoE app was redeployed with other weights or placement: reloading "
                                   "its gates and placement")
                    await self.load()
            y_TD, _, _ = await self.moe.forward(x_TD, layer, self.timeout_s)
        return y_TD.to(x_TD.device, x_TD.dtype)

    def stats(self) -> dict:
        """Routing for itself: rows per expert, calls, latency, phases, transport paths."""
        return {"moe": self.moe.stats()}

    def close(self) -> None:
        if self.moe is not None:
            self.moe.close()


def _late(layer: int, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"MoE layer {layer} did not answer within moe_timeout_s={timeout_s:g}s: an expert "
                            "deployment may be restarting or overloaded")


async def open_moe(args: RunnerArgs, bound: DeploymentHandle | None, device: torch.device) -> MoESource:
    """The MoE source `args.moe_calls` names. `bound`: the router of the MoE app deployed with the runner
    (`args.moe`), else None (in_process, or `args.moe_app` looked up by name here)."""
    if args.moe_calls == "in_process":
        return await asyncio.to_thread(InProcessMoE, args.hf_model, args.moe["checkpoint"], device)
    handle = bound if bound is not None else await _running_app(args.moe_app)
    info = await handle.info.remote()
    await asyncio.to_thread(check_compatible, args.hf_model, ModelConfig.from_dict(info["model"]),
                            info["source"].get("checkpoint"))
    name = args.moe_app or "bound"
    if args.moe_calls == "router":
        return RouterMoE(handle, name, args.moe_timeout_s)
    return await DirectMoE(handle, name, args.moe_timeout_s, device).load()


async def _running_app(name: str) -> DeploymentHandle:
    """The handle of the running MoE app `name` (a lookup by name: ray.get inside, so off the event loop)."""
    try:
        return await asyncio.to_thread(serve.get_app_handle, name)
    except Exception as exc:  # noqa: BLE001 - RayServeException: no such app
        raise ValueError(f"moe_app {name!r} is not running ({exc}): deploy the MoE app under that name first, or "
                         "give `moe` to deploy one with the runner") from exc


async def _await(response):
    return await response
