"""The router: the ingress deployment. Checks, deadlines, request merging; the MoE loop is core's.

Shape legend: T tokens, D model dim.

Entry points, from the outside in:
    forward(x, layer)          a DeploymentHandle call: validates, then serve_request
    __call__(request)          HTTP (serving/http/endpoints.py): decodes, then serve_request
    serve_request(x_TD, layer) a validated request: the deadline, merged with concurrent ones (coalesce.py)
    forward_batch(x_TD, layer) one (merged) batch: `ClusterMoE.forward` (gate here, one call per
                               expert deployment: serving/cluster_moe.py)
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ..core.dispatch import DispatchPlan, expert_counts
from ..core.layers import check_hidden_states
from ..protocol.limits import Limits
from .args import ResolvedApp
from .cluster_moe import ClusterMoE
from .coalesce import Coalescer
from .errors import DeadlineExceeded
from .http.auth import BearerAuth
from .http.endpoints import handle_http
from .metrics import RouterMetrics
from .runtime import pick_device, set_torch_threads
from .tensors import from_numpy, to_numpy

__all__ = ["MoERouter"]


@serve.deployment  # options: DEPLOYMENT_DEFAULTS["router"] and the config (serving/args.py)
class MoERouter:
    def __init__(self, app: ResolvedApp, handles: dict[str, DeploymentHandle]) -> None:
        self.args, self.config, self.placement = app.args, app.config, app.placement
        self.digests = app.digests  # of the weights this app serves, taken when it was built
        self._channel_secret = app.channel_secret  # a runner routing for this app presents it too
        set_torch_threads(self.args.router_torch_threads or self.args.torch_threads)
        self.device = pick_device()
        self.limits = Limits(self.config.d_model, self.args.max_tokens_per_request, self.args.allow_non_finite)
        # The bearer token of the HTTP endpoints (None: no auth); fails here if configured but missing.
        self.auth = BearerAuth.from_args(self.args.auth_token_env, self.args.auth_token_file)
        self.metrics = RouterMetrics(self.config.moe_layer_ids, self.config.num_experts)
        self.moe = ClusterMoE(app, handles, self.device, self.metrics)
        self.experts = self.moe.experts
        self.app_name = serve.get_replica_context().app_name
        self.coalescer = (Coalescer(self.forward_batch, self.config.torch_dtype, self.args.max_batch_tokens,
                                    self.args.batch_wait_ms / 1e3)
                          if self.args.max_batch_tokens else None)

    # --- Python API (DeploymentHandle) ----------------------------------------------------------

    async def forward(self, hidden_states: torch.Tensor | np.ndarray,
                      layer: int | None = None) -> torch.Tensor | np.ndarray:
        """y [T, D] for x [T, D] through MoE layer `layer`; same type and dtype as the input.

        `layer` may be left out only when the model has one MoE layer. Bad input (float64
        included) raises ValueError (wrapped by Ray in a RayTaskError that is also a ValueError).
        """
        as_numpy = isinstance(hidden_states, np.ndarray)
        x_TD = from_numpy(np.asarray(hidden_states)) if as_numpy else hidden_states  # bf16: ml_dtypes.bfloat16
        check_hidden_states(x_TD, self.config)
        self.limits.check_tokens(x_TD.shape[0])  # WireError 413, a ValueError
        layer = self.config.resolve_layer(layer)
        self.limits.check_values(to_numpy(x_TD))
        y_TD, _ = await self.serve_request(x_TD, layer)
        return to_numpy(y_TD) if as_numpy else y_TD

    async def serve_request(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[int]]:
        """(y_TD, rows per expert) for a validated request, merged with concurrent ones if enabled.

        Raises DeadlineExceeded after request_timeout_s, ExpertCallError when an expert
        deployment cannot answer (after retries): never a partially combined output.
        """
        try:
            return await asyncio.wait_for(self._merge_or_run(x_TD, layer), self.args.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request did not complete within {self.args.request_timeout_s:g}s "
                                   "(request_timeout_s); the cluster may be overloaded or an expert "
                                   "deployment is restarting: retry later") from None

    async def _merge_or_run(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[int]]:
        if self.coalescer is not None:
            return await self.coalescer.submit(x_TD, layer)
        y_TD, plan = await self.forward_batch(x_TD, layer)
        return y_TD.to(x_TD.dtype), expert_counts(plan)

    async def forward_batch(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, DispatchPlan]:
        """(y_TD on the CPU in the model dtype, plan): route on this replica's device, fan out, combine."""
        y_TD, plan, _ = await self.moe.forward(x_TD, layer, self.args.request_timeout_s)
        return y_TD.cpu(), plan  # the answer's wire (and the coalescer's split) are on the CPU

    # --- model, health, stats --------------------------------------------------------------

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

    async def moe_spec(self) -> dict:
        """What a runner needs to route this app's MoE layers itself (`RunnerArgs.moe_calls: direct`):
        the app's args (resolved there to the same config, gates and placement), the digests of its
        weights as they were when the app was built (a runner checks the gates it loads against them, not
        against the files as they are now), the Serve app that holds the expert deployments and the app's
        channel secret (a handle call, inside the cluster; never over HTTP)."""
        return {"args": self.args.model_dump(mode="json"), "digests": dict(self.digests), "app_name": self.app_name,
                "channel_secret": self._channel_secret}

    async def check_experts(self, timeout_s: float = 5.0) -> list[str]:
        """Names of expert deployments that did not answer a ping within `timeout_s`."""
        names = [g.name for g in self.placement.groups]
        pings = [asyncio.wait_for(_await(self.experts.handles[name].ping.remote()), timeout_s) for name in names]
        results = await asyncio.gather(*pings, return_exceptions=True)
        return [name for name, result in zip(names, results) if isinstance(result, BaseException)]

    async def stats(self) -> dict:
        """Per-expert load as seen by this router replica, plus replicas per expert deployment."""
        replicas = await asyncio.to_thread(self._running_replicas)
        self.metrics.record_replicas(replicas)
        snapshot = self.moe.stats()
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


async def _await(response):
    return await response
