"""Perplexity, the unigram baseline, and what the MoE's routing does on held-out text.

Shape legend: B windows, S window length (<= L, the context length), V vocabulary, E experts.

Perplexity = exp(mean token NLL) over a token sequence cut into non-overlapping windows of
L tokens (the last one shorter if the text does not fill it), each scored on its own: window w
predicts its tokens 1..len-1 from the ones before them in w. The same function scores our
trainable model, transformers' own model, and a model whose MoE blocks run on the cluster:
all it needs is `logits_of(ids_BS) -> logits_BSV`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .model import moe_blocks

__all__ = ["windows", "perplexity", "unigram_perplexity", "logits_fn", "expert_load", "masked_perplexities"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def windows(ids: list[int] | torch.Tensor, context_length: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `context_length` tokens; a last window of 1 token predicts nothing (dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    out = [ids[i:i + context_length] for i in range(0, ids.numel(), context_length)]
    return [w for w in out if w.numel() >= 2]


def perplexity(logits_of: LogitsFn, ids: list[int] | torch.Tensor, context_length: int,
               batch_size: int = 16) -> tuple[float, int]:
    """(exp(mean NLL), predicted tokens) of `ids`, window by window (full windows batched together)."""
    nll, count = 0.0, 0
    for batch in _batches(windows(ids, context_length), batch_size):
        ids_BS = torch.stack(batch)
        with torch.no_grad():
            logits_BSV = logits_of(ids_BS).float()
        logp_BSV = torch.log_softmax(logits_BSV[:, :-1], dim=-1)
        nll -= float(logp_BSV.gather(-1, ids_BS[:, 1:, None]).double().sum())
        count += ids_BS[:, 1:].numel()
    if count == 0:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    return math.exp(nll / count), count


def _batches(wins: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    """Windows of equal length in batches of at most batch_size (only the last window may be shorter)."""
    full = [w for w in wins if w.numel() == wins[0].numel()]
    rest = [[w] for w in wins[len(full):]]
    return [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + rest


def unigram_perplexity(train_ids: torch.Tensor, ids: list[int] | torch.Tensor, context_length: int,
                       vocab_size: int) -> float:
    """Perplexity of the training split's token frequencies (add-one smoothed) on the tokens `perplexity` scores."""
    counts_V = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp_V = torch.log(counts_V / counts_V.sum())
    scored = torch.cat([w[1:] for w in windows(ids, context_length)])
    return math.exp(float(-logp_V[scored].mean()))


def logits_fn(model: nn.Module) -> LogitsFn:
    """A transformers causal LM as `ids_BS -> logits_BSV` (eval mode)."""
    model.eval()
    return lambda ids_BS: model(input_ids=ids_BS).logits


def expert_load(model: nn.Module, ids: list[int] | torch.Tensor, context_length: int) -> list[list[int]]:
    """[layer][expert]: rows each expert of each MoE layer got while scoring `ids`."""
    blocks = moe_blocks(model)
    total_LE = torch.zeros(len(blocks), blocks[0].config.num_experts, dtype=torch.long)
    model.eval()
    for batch in _batches(windows(ids, context_length), 16):
        with torch.no_grad():
            model(input_ids=torch.stack(batch))
        total_LE += torch.stack([b.stats.counts_E for b in blocks])
    return total_LE.tolist()


def masked_perplexities(model: nn.Module, ids: list[int] | torch.Tensor, context_length: int) -> list[float]:
    """Perplexity with expert e never chosen (in every layer), for each e: how much the model relies on it."""
    blocks = moe_blocks(model)
    out = []
    for expert in range(blocks[0].config.num_experts):
        for block in blocks:
            block.mask_experts([expert])
        try:
            out.append(perplexity(logits_fn(model), ids, context_length)[0])
        finally:
            for block in blocks:
                block.mask_experts([])
    return out
