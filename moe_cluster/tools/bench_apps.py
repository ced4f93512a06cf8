"""The Serve apps of `moe-cluster bench`: the cluster under test (its args), the whole MoE in one
deployment, and the no-op floors (what the hops alone cost)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np
import torch
from ray import serve

from ..core.config import preset_config
from ..core.model import MoEModel
from ..serving.args import AppArgs

if TYPE_CHECKING:
    from .bench import BenchSettings

__all__ = ["MonolithicMoE", "NoopExpert", "NoopRouter", "cluster_args", "experts_per_deployment",
           "floor_app"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class MonolithicMoE:
    """The whole MoE (every layer, every expert) in one replica."""

    def __init__(self, preset: str, seed: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = MoEModel.random(preset_config(preset), seed)

    async def forward(self, x_TD: np.ndarray, layer: int = 0) -> np.ndarray:
        """numpy in, numpy out, like the router's fast path (see make_callers in bench.py)."""
        with torch.no_grad():
            return self.model.forward(torch.from_numpy(np.asarray(x_TD)), layer).numpy()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class NoopExpert:
    async def forward(self, x: np.ndarray) -> np.ndarray:
        return x


@serve.deployment(ray_actor_options={"num_cpus": 0})
class NoopRouter:
    """Calls every one of its no-op experts at once (as the router fans a token out to top_k)."""

    def __init__(self, *experts) -> None:
        self.experts = experts

    async def forward(self, x: np.ndarray) -> np.ndarray:
        outputs = await asyncio.gather(*(expert.forward.remote(x) for expert in self.experts))
        return outputs[0]


def floor_app(width: int):
    """A no-op router over `width` no-op expert deployments."""
    return NoopRouter.bind(*(NoopExpert.options(name=f"NoopExpert{i}").bind() for i in range(width)))


def experts_per_deployment(settings: BenchSettings, num_experts: int) -> int:
    """How many experts the bench's cluster packs into one deployment: fine-grained models (64+
    experts) 8, as one would deploy them (64 deployments of one small expert each would spend the
    machine on hops); else one expert per deployment, the default placement."""
    if settings.experts_per_deployment is not None:
        return settings.experts_per_deployment
    return 8 if num_experts >= 64 else 1


def cluster_args(settings: BenchSettings) -> AppArgs:
    """The cluster under test: default options (DEPLOYMENT_DEFAULTS: no CPU reservations), the
    packing of experts_per_deployment, one torch thread per replica
    (router included: its gather and combine overlap the experts' work, and a second thread
    only spun against them: combine at T=4096 took 135 ms with 2 threads, 26 ms with 1)."""
    num_experts = preset_config(settings.preset).num_experts
    per = experts_per_deployment(settings, num_experts)
    placement = [] if per == 1 else [
        {"name": f"experts-{first}-{min(first + per, num_experts) - 1}",
         "experts": list(range(first, min(first + per, num_experts)))} for first in range(0, num_experts, per)]
    return AppArgs.model_validate({
        "preset": settings.preset, "seed": settings.seed, "torch_threads": 1, "router_torch_threads": 1,
        "max_tokens_per_request": max(settings.tokens) * 2, "placement": placement,
        "router": {"num_replicas": 1, "max_ongoing_requests": 256},
        "experts": {"num_replicas": 1, "max_ongoing_requests": 256},
        "transport": settings.transport, "channel_host": "127.0.0.1",  # the bench's cluster is this machine
    })
