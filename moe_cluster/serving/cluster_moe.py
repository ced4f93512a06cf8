"""`ClusterMoE`: the MoE layers of a model with their routed experts on the cluster.

Shape legend: T tokens, D model dim.

The gates and shared experts live in the process that holds a `ClusterMoE`; each layer's
routed experts are called on their deployments (`RemoteExperts`: one call per deployment).
Two processes hold one:
- the router deployment (serving/router.py), for every client of the MoE app;
- the runner of a whole model (serving/runner.py, `moe_calls: direct`): it routes each MoE
  layer itself (the gate is a [D, E] matmul) and calls the expert deployments directly, so a
  decoding step costs one parallel hop per layer (runner -> experts) instead of two
  (runner -> router -> experts). Both build it from the same resolved app args, so they
  load the same gates and see the same placement.
"""

from __future__ import annotations

import time

import torch
from ray.serve.handle import DeploymentHandle

from ..checkpoint import load_router_layers
from ..core.dispatch import DispatchPlan
from ..core.forward import ForwardTimings, moe_forward
from ..core.init import random_gate_and_shared
from ..core.layers import GateAndShared
from .args import ResolvedApp
from .metrics import RouterMetrics
from .remote_experts import RemoteExperts

__all__ = ["ClusterMoE", "load_gates_and_shared"]


class ClusterMoE:
    """The MoE layers of `app`: gates and shared experts on `device`, experts behind `handles`."""

    def __init__(self, app: ResolvedApp, handles: dict[str, DeploymentHandle], device: torch.device,
                 metrics: RouterMetrics) -> None:
        self.config, self.placement, self.metrics = app.config, app.placement, metrics
        self.layers = {layer_id: parts.to(device)
                       for layer_id, parts in zip(app.config.moe_layer_ids, load_gates_and_shared(app))}
        self.device = device
        self.experts = RemoteExperts.create(handles, app, metrics, device)

    async def forward(self, x_TD: torch.Tensor, layer: int, timeout_s: float
                      ) -> tuple[torch.Tensor, DispatchPlan, ForwardTimings]:
        """(y_TD on this device in the model dtype, plan, timings) for validated rows x_TD [T, D] of MoE layer
        `layer`: route here, one call per expert deployment, combine. Failed calls are retried until
        `timeout_s` from now; the caller bounds the whole call (asyncio.wait_for)."""
        timings = ForwardTimings()
        experts = self.experts.for_deadline(time.monotonic() + timeout_s)
        y_TD, plan = await moe_forward(x_TD.to(self.device), layer, self.layers[layer], self.config, experts,
                                       timings)
        self.metrics.record_plan(layer, plan.counts, self.placement.owner)
        self.metrics.record_phases(route_ms=timings.route_s * 1e3, experts_ms=timings.experts_s * 1e3,
                                   combine_ms=timings.combine_s * 1e3)
        return y_TD, plan, timings

    def stats(self) -> dict:
        """Per-layer rows per expert, per-expert calls, retries and latency, phases of the last and mean
        batch (RouterMetrics.snapshot), and the calls sent per transport path."""
        deployments_of_expert: dict[int, list[str]] = {}
        for (_, expert), group in sorted(self.placement.owner.items()):
            names = deployments_of_expert.setdefault(expert, [])
            if group not in names:
                names.append(group)
        snapshot = self.metrics.snapshot(deployments_of_expert)
        snapshot["transport"] = {"mode": self.experts.transport.mode, "calls": self.experts.transport.paths()}
        if self.experts.transport.channel is not None:
            snapshot["transport"]["channel"] = self.experts.transport.channel.stats()
        return snapshot

    def close(self) -> None:
        """Close the expert channels this routing holds (on the event loop they run on)."""
        if self.experts.transport.channel is not None:
            self.experts.transport.channel.close()


def load_gates_and_shared(app: ResolvedApp) -> list[GateAndShared]:
    """The gate (and shared experts) of every MoE layer: the checkpoint's, or the preset's seeded ones.
    CheckpointChanged if the router file is not the one the app was built with (rewritten since)."""
    if app.args.checkpoint:
        return load_router_layers(app.args.checkpoint, app.config, dict(app.digests))
    return [random_gate_and_shared(app.config, app.args.seed, layer) for layer in app.config.moe_layer_ids]
