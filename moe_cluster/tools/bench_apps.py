"""The Serve apps `moe-cluster bench` compares the cluster with: the whole MoE in one deployment,
and the no-op floors (what the hops alone cost)."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from ..core.config import preset_config
from ..core.model import MoEModel

__all__ = ["MonolithicMoE", "NoopExpert", "NoopRouter", "floor_app"]


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
