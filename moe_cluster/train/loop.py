"""The training loop: several models (the MoE, the dense baseline, ablation variants) on the same batches.

Shape legend: B windows per step (the global batch), L context length, V vocabulary, E experts.

Every step draws one global batch of B windows of L + 1 tokens from the training stream
(offsets from a generator seeded with (seed, step): the same batches for every model and for
any number of workers). A worker of a data-parallel run (distributed.py) takes its B / W
rows; `Comm` averages the gradients and sums the expert loads over workers, so W workers
follow the curve of one (up to the order of floating-point sums, and the Switch loss, whose
f_i and P_i are per worker). Progress goes to stderr on rank 0.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .balance import loss_free_update, max_violation, router_z_loss, switch_aux_loss
from .model import TrainConfig, build_dense_model, build_moe_model, moe_blocks

__all__ = ["Comm", "TorchDistributedComm", "History", "Trainee", "make_trainee", "build_trainees", "batch_windows", "train_models"]


class Comm:
    """One process: nothing to share."""

    rank, world = 0, 1

    def average_gradients(self, model: nn.Module) -> None:
        pass

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


class TorchDistributedComm(Comm):
    """Workers of one torch.distributed process group (gloo on CPU; Ray Train sets it up)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def average_gradients(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:  # an expert that got no row on this worker
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce(p.grad)
                p.grad /= self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t)
        return t


@dataclass
class History:
    """Per step: the language-model loss (global mean), and per MoE layer the rows per expert."""

    loss: list[float] = field(default_factory=list)
    tokens_per_expert: list[list[list[int]]] = field(default_factory=list)  # [step][layer][E]
    max_violation: list[list[float]] = field(default_factory=list)  # [step][layer]
    seconds: float = 0.0  # time spent in this model's steps (forward, backward, update)
    tokens: int = 0  # tokens seen (global)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "tokens_per_expert": self.tokens_per_expert, "max_violation": self.max_violation,
                "seconds": self.seconds, "tokens": self.tokens}


@dataclass
class Trainee:
    name: str
    model: nn.Module
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    history: History = field(default_factory=History)


def make_trainee(name: str, model: nn.Module, cfg: TrainConfig) -> Trainee:
    """AdamW with linear warmup and cosine decay to 10% of the peak learning rate."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return Trainee(name, model, cfg, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))


def build_trainees(variants: dict[str, TrainConfig]) -> list[Trainee]:
    """A trainee per variant: "dense" is the dense baseline, every other name an MoE (same seed for all)."""
    return [make_trainee(name, build_dense_model(c) if name == "dense" else build_moe_model(c), c)
            for name, c in variants.items()]


def batch_windows(stream: torch.Tensor, cfg: TrainConfig, step: int, comm: Comm = Comm()) -> torch.Tensor:
    """This worker's rows of the global batch of `step`: [B / W, L + 1] token ids."""
    if cfg.batch_size % comm.world:
        raise ValueError(f"the batch of {cfg.batch_size} windows does not split over {comm.world} workers")
    L = cfg.context_length
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts_B = torch.randint(0, stream.numel() - L - 1, (cfg.batch_size,), generator=generator)
    per = cfg.batch_size // comm.world
    mine = starts_B[comm.rank * per:(comm.rank + 1) * per]
    return torch.stack([stream[s:s + L + 1] for s in mine.tolist()])


def _balancing_loss(model: nn.Module, cfg: TrainConfig) -> torch.Tensor | float:
    extra: torch.Tensor | float = 0.0
    for block in moe_blocks(model):
        if cfg.balance == "aux":
            extra = extra + cfg.aux_alpha * switch_aux_loss(block.stats.probs_TE, block.stats.counts_E)
        if cfg.z_loss:
            extra = extra + cfg.z_loss * router_z_loss(block.stats.logits_TE)
    return extra


def train_step(trainee: Trainee, ids_BL1: torch.Tensor, comm: Comm) -> float:
    """One optimiser step on this worker's rows; returns the global mean language-model loss."""
    model, cfg = trainee.model, trainee.cfg
    started = time.perf_counter()
    model.train()
    logits_BLV = model(input_ids=ids_BL1[:, :-1]).logits
    lm = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), ids_BL1[:, 1:].reshape(-1))
    (lm + _balancing_loss(model, cfg)).backward()
    comm.average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    trainee.optimizer.step()
    trainee.schedule.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    blocks = moe_blocks(model)
    if blocks:
        counts_LE = comm.sum(torch.stack([b.stats.counts_E for b in blocks]))
        if cfg.balance == "loss_free":
            for block, counts_E in zip(blocks, counts_LE):
                loss_free_update(block.selection_bias_E, counts_E, cfg.bias_rate)
        trainee.history.tokens_per_expert.append(counts_LE.tolist())
        trainee.history.max_violation.append([max_violation(c) for c in counts_LE])
    loss = float(comm.sum(lm.detach()) / comm.world)
    trainee.history.loss.append(loss)
    trainee.history.seconds += time.perf_counter() - started
    trainee.history.tokens += cfg.batch_size * cfg.context_length
    return loss


def train_models(trainees: list[Trainee], stream: torch.Tensor, cfg: TrainConfig, comm: Comm = Comm(),
                 progress: Callable[[str], None] | None = None) -> None:
    """cfg.steps steps of every trainee on the same batches (cfg gives steps, batch and seed)."""
    show = progress if progress is not None else _stderr_progress
    started = time.perf_counter()
    for step in range(cfg.steps):
        ids_BL1 = batch_windows(stream, cfg, step, comm)
        losses = [train_step(t, ids_BL1, comm) for t in trainees]
        if comm.rank == 0 and (step % 5 == 4 or step == cfg.steps - 1):
            show(_progress_line(step + 1, cfg, trainees, losses, time.perf_counter() - started))
    if comm.rank == 0 and progress is None:
        print(file=sys.stderr)


def _progress_line(done: int, cfg: TrainConfig, trainees: list[Trainee], losses: list[float], elapsed: float) -> str:
    width = 24
    filled = width * done // cfg.steps
    eta = elapsed / done * (cfg.steps - done)
    parts = " ".join(f"{t.name} {loss:.3f} ({t.history.tokens / max(t.history.seconds, 1e-9) / 1e3:.1f}k tok/s)"
                     for t, loss in zip(trainees, losses))
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{cfg.steps} loss {parts} "
            f"elapsed {elapsed:.0f}s ETA {eta:.0f}s")


def _stderr_progress(line: str) -> None:
    print("\r" + line, end="", file=sys.stderr, flush=True)
