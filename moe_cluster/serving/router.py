"""The router: the ingress deployment. Gate + top-k, one call per (expert, chunk), combine.

Shape legend: T tokens, D model dim, N = T*K routed rows.

Python callers use `forward(x_TD, layer)` through a DeploymentHandle; HTTP callers reach
`__call__` (see `serving/http.py` for the endpoints). Both go through `moe_forward`,
which is `MoEModel.forward` with the expert loop replaced by a concurrent fan-out over
the expert deployments' handles.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ..checkpoint import load_router_layers
from ..protocol.v1 import Limits, check_values, from_numpy, to_numpy
from ..core.dispatch import DispatchPlan, add_rows, expert_chunks, expert_counts, gather_rows
from ..core.layers import GateAndShared, check_hidden_states, add_shared_experts, route_and_plan
from ..core.init import random_gate_and_shared
from ..core.placement import Placement
from .args import AppArgs
from .http.auth import BearerAuth
from .coalesce import Coalescer
from .expert import pick_device, set_torch_threads
from .http.endpoints import handle_http
from .metrics import RouterMetrics

__all__ = ["MoERouter", "ExpertCallError", "ExpertComputeError", "DeadlineExceeded", "RETRYABLE",
           "check_expert_answer"]



class ExpertCallError(RuntimeError):
    """An expert deployment failed to answer: the request fails with 503, never a partial output."""


class ExpertComputeError(RuntimeError):
    """An expert replica raised, or answered with the wrong shape or dtype (a bug or a bad deployment,
    not a dead replica): 500, not retried."""


class DeadlineExceeded(TimeoutError):
    """The request did not complete within request_timeout_s: 504."""


# Failures of a replica or of Serve's routing to it, not of the expert's computation: the
# call is sent again (Serve picks another replica, or the one that replaced the dead one).
RETRYABLE = (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError,
             ReplicaUnavailableError)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class MoERouter:
    def __init__(self, args: dict, handles: dict[str, DeploymentHandle]) -> None:
        self.args = AppArgs.model_validate(args)
        set_torch_threads(self.args.router_torch_threads or self.args.torch_threads)
        self.config = self.args.load_model_config()
        self.placement: Placement = self.args.resolve_placement(self.config)
        self.handles = handles
        missing = {g.name for g in self.placement.groups} - set(handles)
        if missing:
            raise ValueError(f"no handle for expert deployments {sorted(missing)}")
        self.device = pick_device()
        self.layers = {layer_id: router.to(self.device)
                       for layer_id, router in zip(self.config.moe_layer_ids, self._load_router_layers())}
        self.limits = Limits(self.config.d_model, self.args.max_tokens_per_request, self.args.allow_non_finite)
        # The bearer token of the HTTP endpoints (None: no auth); fails here if configured but missing.
        self.auth = BearerAuth.from_args(self.args.auth_token_env, self.args.auth_token_file)
        self.metrics = RouterMetrics(self.config.moe_layer_ids, self.config.num_experts)
        self.app_name = serve.get_replica_context().app_name
        # How an expert's answer travels: numpy of the model dtype, bf16 as its uint16 bit pattern.
        self.wire_dtype = to_numpy(torch.empty(0, dtype=self.config.torch_dtype))[0].dtype
        self.coalescer = (Coalescer(self.moe_forward, self.config.torch_dtype, self.args.max_batch_tokens,
                                    self.args.batch_wait_ms / 1e3)
                          if self.args.max_batch_tokens else None)

    def _load_router_layers(self) -> list[GateAndShared]:
        if self.args.checkpoint:
            return load_router_layers(self.args.checkpoint, self.config)
        return [random_gate_and_shared(self.config, self.args.seed, layer) for layer in self.config.moe_layer_ids]

    # --- Python API (DeploymentHandle) ----------------------------------------------------------

    async def forward(self, hidden_states: torch.Tensor | np.ndarray,
                      layer: int | None = None) -> torch.Tensor | np.ndarray:
        """y [T, D] for x [T, D] through MoE layer `layer`; same type and dtype as the input.

        `layer` may be left out only when the model has one MoE layer. Bad input (float64
        included) raises ValueError (wrapped by Ray in a RayTaskError that is also a ValueError).
        """
        as_numpy = isinstance(hidden_states, np.ndarray)
        x_TD = torch.from_numpy(np.asarray(hidden_states)) if as_numpy else hidden_states
        check_hidden_states(x_TD, self.config)
        if x_TD.shape[0] > self.limits.max_tokens:
            raise ValueError(f"{x_TD.shape[0]} tokens exceed the limit of {self.limits.max_tokens} per request")
        layer = self.config.resolve_layer(layer)
        check_values(x_TD, self.limits)
        y_TD, _ = await self.run(x_TD, layer)
        return y_TD.numpy() if as_numpy else y_TD

    async def run(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[int]]:
        """(y_TD, rows per expert) for a validated request, merged with concurrent ones if enabled.

        Raises DeadlineExceeded after request_timeout_s, ExpertCallError when an expert
        deployment cannot answer (after retries): never a partially combined output.
        """
        try:
            return await asyncio.wait_for(self._run(x_TD, layer), self.args.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request did not complete within {self.args.request_timeout_s:g}s "
                                   "(request_timeout_s); the cluster may be overloaded or an expert "
                                   "deployment is restarting: retry later") from None

    async def _run(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[int]]:
        if self.coalescer is not None:
            return await self.coalescer.submit(x_TD, layer)
        y_TD, plan = await self.moe_forward(x_TD, layer)
        return y_TD, expert_counts(plan)

    async def info(self) -> dict:
        config = self.config
        return {
            "d_model": config.d_model, "d_ff": config.d_ff, "num_experts": config.num_experts,
            "top_k": config.top_k, "num_layers": config.num_layers, "layers": list(config.moe_layer_ids),
            "dtype": config.dtype, "expert_kind": config.expert_kind, "model": config.to_dict(),
            "placement": self.placement.describe(), "router_device": str(self.device),
            "max_tokens_per_request": self.limits.max_tokens, "max_tokens_per_call": self.args.max_tokens_per_call,
            "source": {"checkpoint": self.args.checkpoint} if self.args.checkpoint
            else {"preset": self.args.preset, "seed": self.args.seed},
        }

    async def check_experts(self, timeout_s: float = 5.0) -> list[str]:
        """Names of expert deployments that did not answer a ping within `timeout_s`."""
        names = [g.name for g in self.placement.groups]
        pings = [asyncio.wait_for(_await(self.handles[name].ping.remote()), timeout_s) for name in names]
        results = await asyncio.gather(*pings, return_exceptions=True)
        return [name for name, result in zip(names, results) if isinstance(result, BaseException)]

    async def stats(self) -> dict:
        """Per-expert load as seen by this router replica, plus replicas per expert deployment."""
        replicas = await asyncio.to_thread(self._running_replicas)
        self.metrics.record_replicas(replicas)
        deployments_of_expert: dict[int, list[str]] = {}
        for (_, expert), group in sorted(self.placement.owner.items()):
            names = deployments_of_expert.setdefault(expert, [])
            if group not in names:
                names.append(group)
        snapshot = self.metrics.snapshot(deployments_of_expert)
        snapshot["replicas"] = replicas
        if self.coalescer is not None:
            snapshot["coalescing"] = {"requests": self.coalescer.requests, "batches": self.coalescer.batches,
                                      "recent_batch_sizes": list(self.coalescer.recent_sizes)}
        return snapshot

    def _running_replicas(self) -> dict[str, int]:
        """Running replicas per deployment of this app (router included), from Serve's status."""
        app = serve.status().applications.get(self.app_name)
        if app is None:
            return {}
        return {name: int(sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING")))
                for name, d in app.deployments.items()}

    # --- HTTP ------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        return await handle_http(self, request)

    # --- the distributed MoE ------------------------------------------------------------------

    async def moe_forward(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, DispatchPlan]:
        """Route on this replica's device, fan the chunks out, combine. Returns (y_TD, plan).

        Every call is sent before the first answer is awaited; answers are added in plan order
        as they come (a token's rows are summed in the same order as in-process, so the result
        does not depend on which expert answered first), overlapping the combine with the
        experts' work. Any failure cancels the calls still in flight: never a partial output.
        """
        router = self.layers[layer]
        t0 = time.perf_counter()
        with torch.no_grad():
            x_model_TD, plan = route_and_plan(x_TD.to(self.device), router, self.config)
            chunks = expert_chunks(plan, self.args.max_tokens_per_call)
            self.metrics.record_plan(layer, plan.counts, self.placement.owner)
            deadline = time.monotonic() + self.args.request_timeout_s
            calls = [asyncio.ensure_future(self._call_expert(
                layer, chunk.expert, gather_rows(x_model_TD, plan, chunk.start, chunk.stop).cpu(), deadline))
                for chunk in chunks]
        t1 = time.perf_counter()
        combine_s = 0.0
        try:
            routed_TD = torch.zeros_like(x_model_TD)
            for chunk, call in zip(chunks, calls):
                out_ND = await call
                started = time.perf_counter()
                with torch.no_grad():
                    add_rows(routed_TD, plan, chunk.start, out_ND.to(self.device))
                combine_s += time.perf_counter() - started
        except BaseException:
            _cancel(calls)
            raise
        t2 = time.perf_counter()
        with torch.no_grad():
            y_TD = add_shared_experts(x_model_TD, routed_TD, router).to(x_TD.dtype).cpu()
        combine_s += time.perf_counter() - t2
        self.metrics.record_phases(route_ms=(t1 - t0) * 1e3, experts_ms=(t2 - t1 - combine_s) * 1e3,
                                   combine_ms=combine_s * 1e3)
        return y_TD, plan

    async def _call_expert(self, layer: int, expert: int, x_ND: torch.Tensor, deadline: float) -> torch.Tensor:
        """One expert call; a dead or unavailable replica is retried until the deadline."""
        group = self.placement.owner[(layer, expert)]
        x_array = to_numpy(x_ND)[0]
        started = time.perf_counter()
        backoff_s, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                array = await self.handles[group].forward.remote(layer, expert, x_array)
                break
            except RETRYABLE as exc:
                if time.monotonic() + backoff_s >= deadline:
                    raise self._call_error(group, layer, expert, started, attempts, exc) from exc
                self.metrics.record_retry(expert, group)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, 1.0)
            except Exception as exc:  # noqa: BLE001 - the expert itself failed: no retry
                raise ExpertComputeError(str(self._call_error(group, layer, expert, started, attempts, exc))) from exc
        check_expert_answer(array, (x_ND.shape[0], self.config.d_model), self.wire_dtype, self.config.dtype,
                            f"expert deployment '{group}' answered (layer {layer}, expert {expert})")
        self.metrics.record_call(expert, group, (time.perf_counter() - started) * 1e3)
        return from_numpy(array, self.config.dtype)

    @staticmethod
    def _call_error(group: str, layer: int, expert: int, started: float, attempts: int,
                    exc: BaseException) -> ExpertCallError:
        # An exception raised in the replica arrives wrapped in a RayTaskError whose first line is
        # only Ray's task header: name the replica's own exception (its `cause`) instead.
        error = exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc
        first_line = str(error).splitlines()[0] if str(error) else ""
        return ExpertCallError(f"expert deployment '{group}' failed on (layer {layer}, expert {expert}) after "
                               f"{attempts} attempt(s) in {time.perf_counter() - started:.1f}s: "
                               f"{type(error).__name__}: {first_line}")


def check_expert_answer(array: object, expected_shape: tuple[int, int], wire_dtype: np.dtype, model_dtype: str,
                        source: str) -> None:
    """ExpertComputeError (500, not retried) unless `array` is a numpy array of `expected_shape`
    ([rows sent, D]) and `wire_dtype` (the model dtype; bf16 as uint16): a short or wrong answer
    must fail the request, never be combined in part. `source` names the deployment and call."""
    if isinstance(array, np.ndarray) and array.shape == tuple(expected_shape) and array.dtype == wire_dtype:
        return
    got = (f"an array of shape {list(array.shape)} and dtype {array.dtype}" if isinstance(array, np.ndarray)
           else f"a {type(array).__name__}")
    raise ExpertComputeError(
        f"{source} with {got}; expected a numpy array of shape {list(expected_shape)} (the rows sent, d_model) "
        f"and dtype {wire_dtype} (model dtype {model_dtype}). The request failed and nothing was combined: "
        "check that this deployment runs the same model (checkpoint, preset, dtype) and code as the router")


def _cancel(calls: list[asyncio.Future]) -> None:
    """Cancel the calls still running; mark the failures of finished ones as seen (no asyncio log noise)."""
    for call in calls:
        if not call.done():
            call.cancel()
        elif not call.cancelled():
            call.exception()


async def _await(response):
    return await response

