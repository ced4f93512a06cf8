"""Data-parallel training on Ray Train: `moe-cluster train --workers W`.

A `TorchTrainer` starts W workers (1 CPU each, gloo process group); each runs the same loop as
a one-process training (loop.py) on its B / W rows of every global batch, averaging gradients
and summing expert loads over the group (`TorchDistributedComm`). Every worker builds the models
from the same seed, so they start equal and stay equal. Rank 0 reports the trained weights,
selection biases and histories as a Ray Train checkpoint; the driver rebuilds the models from
it and evaluates them (pipeline.py). On a multi-node cluster, Ray Train needs a `storage_path`
that every node can reach (shared file system or cloud storage): pass `storage`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .loop import History, Trainee, TorchDistributedComm, build_trainees, train_models
from .model import TrainConfig, moe_blocks

__all__ = ["train_on_ray", "pack_trainees", "unpack_trainees"]

_FILE = "trained.pt"


def pack_trainees(trainees: list[Trainee]) -> dict:
    return {t.name: {"cfg": t.cfg.to_dict(), "state": t.model.state_dict(), "history": t.history.to_dict(),
                     "selection_bias": [b.selection_bias_E.clone() for b in moe_blocks(t.model)]} for t in trainees}


def unpack_trainees(packed: dict) -> list[Trainee]:
    trainees = build_trainees({name: TrainConfig(**p["cfg"]) for name, p in packed.items()})
    for trainee in trainees:
        saved = packed[trainee.name]
        trainee.model.load_state_dict(saved["state"], strict=True)
        for block, bias_E in zip(moe_blocks(trainee.model), saved["selection_bias"]):
            block.selection_bias_E.copy_(bias_E)
        trainee.history = History(**saved["history"])
    return trainees


def _worker(config: dict) -> None:
    import ray.train

    torch.set_num_threads(config["threads"])
    comm = TorchDistributedComm()
    trainees = build_trainees({name: TrainConfig(**c) for name, c in config["variants"].items()})
    train_models(trainees, torch.from_numpy(config["stream"]), TrainConfig(**config["cfg"]), comm)
    final = {f"{t.name}_loss": t.history.loss[-1] for t in trainees}
    if comm.rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            torch.save(pack_trainees(trainees), Path(directory) / _FILE)
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(final)


def train_on_ray(variants: dict[str, TrainConfig], stream: torch.Tensor, cfg: TrainConfig, workers: int,
                 storage: str | None = None, threads_per_worker: int = 1) -> list[Trainee]:
    """Train `variants` on W Ray Train workers; connects to a running Ray cluster, else starts a local one."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        from ..serving.runtime import keep_usage_stats_local

        keep_usage_stats_local()
        ray.init(include_dashboard=False)
    try:
        config = {"variants": {n: c.to_dict() for n, c in variants.items()}, "cfg": cfg.to_dict(),
                  "stream": stream.numpy(), "threads": threads_per_worker}
        trainer = TorchTrainer(
            _worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                         resources_per_worker={"CPU": threads_per_worker}),
            run_config=RunConfig(name="moe-cluster-train", storage_path=storage))
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            packed = torch.load(Path(directory) / _FILE, weights_only=False)
        return unpack_trainees(packed)
    finally:
        if started_here:
            ray.shutdown()
