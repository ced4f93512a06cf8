"""Perplexity with the MoE blocks on the cluster: the whole model's forward, each MoE block a call to
the router deployment (the path `moe-cluster generate` and the OpenAI endpoints take).

The dense parts (embeddings, attention, norms, head) run in this process (`HFMoERunner`, its MoE
blocks proxied); `router.forward.remote(x_TD, layer)` computes each MoE block on the experts'
deployments. Only this module and distributed.py of moe_cluster/train import Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_config
from ..hf.runner import HFMoERunner, check_compatible
from .evaluate import logits_fn, perplexity

__all__ = ["deploy_scorer", "perplexity_on_local_cluster"]

APP_NAME = "perplexity"


def deploy_scorer(hf_dir: str | Path, checkpoint: str | Path,
                  timeout_s: float = 120.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deploy the MoE app of `checkpoint` on the running Serve instance; returns ids_BS -> logits_BSV."""
    from ray import serve

    from ..serving.app import build_app

    check_compatible(hf_dir, load_config(checkpoint), checkpoint)  # fail before anything is deployed
    router = serve.run(build_app({"checkpoint": str(checkpoint)}), name=APP_NAME, route_prefix=None)
    runner = HFMoERunner(hf_dir, lambda x_TD, layer: router.forward.remote(x_TD, layer).result(timeout_s=timeout_s))
    return logits_fn(runner.model)


def perplexity_on_local_cluster(hf_dir: str | Path, checkpoint: str | Path, ids: list[int], context_length: int,
                                num_cpus: int | None = None, log: Callable[[str], None] = print) -> tuple[float, int]:
    """Start a local Ray cluster, score `ids` with the MoE blocks on it, shut the cluster down."""
    from ..serving.runtime import start_local_serve, stop_local_serve

    log(f"moe-cluster: starting a local Ray cluster for the MoE blocks of {checkpoint}")
    start_local_serve(None, num_cpus=num_cpus)
    try:
        return perplexity(deploy_scorer(hf_dir, checkpoint), ids, context_length)
    finally:
        stop_local_serve()
