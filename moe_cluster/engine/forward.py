"""The forward of one decode step (no Ray): every sequence's new tokens packed in ONE row.

    PackedForward(model)(members)     member: (its SequenceKV, its new token ids, every_position)
        ids [1, T]        each member's new tokens in turn: a prompt chunk, or its one decoding token
        positions [1, T]  each member's own positions (kv.length, kv.length + 1, ...)
        attention         each member's queries against its own cache, written in place (engine/kv_cache.py)
        -> per member: logits [1, V] of its last new position ([C, V] of each of its C new positions:
           every_position, for a prompt's logprobs), on the CPU; its kv.length advanced by C

One row for the whole step: every dense weight (attention projections, dense MLPs, the LM head) is
read once for all the step's tokens, and each MoE layer is ONE call with every sequence's rows,
whatever the mix of prompt chunks and decoding tokens. Nothing is padded; nothing cached is copied.
A row's result does not depend on the rows beside it beyond float rounding, so greedy output equals
transformers' `generate` of each prompt alone (tested for every family).

Device: the inputs are made on the model's device and the caches stay there; the logits come back
on the CPU, where the sampler, penalties and logprobs work (the chosen ids are needed on the CPU
anyway, and a seeded draw then gives the same tokens whatever device the model runs on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hf.runner import MOE_CALL_OVERRIDE
from .kv_cache import SequenceKV, packed_step, use_packed_attention

__all__ = ["Member", "PackedForward", "halfway", "refuse_position_dependent_rope"]


@dataclass(frozen=True)
class Member:
    """One sequence's part of a step's forward."""

    kv: SequenceKV
    ids: list[int]  # its new tokens: a prompt chunk, or the token it decodes
    every_position: bool = False  # logits of each new position (prompt logprobs), not only the last


class PackedForward:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        refuse_position_dependent_rope(model.config)
        use_packed_attention(model)

    def __call__(self, members: list[Member]) -> list[torch.Tensor]:
        """Logits per member (see the module doc), after ONE forward of all of them."""
        ids: list[int] = []
        positions: list[int] = []
        keep: list[int] = []
        for m in members:
            first = len(ids)
            ids += m.ids
            positions += range(m.kv.length, m.kv.length + len(m.ids))
            keep += range(first, len(ids)) if m.every_position else [len(ids) - 1]
        device = self.device
        with packed_step([(m.kv, len(m.ids)) for m in members]), torch.no_grad():
            logits_1KV = self.model(input_ids=torch.tensor([ids], device=device),
                                    position_ids=torch.tensor([positions], device=device), use_cache=False,
                                    logits_to_keep=torch.tensor(keep, device=device)).logits
        for m in members:  # only now: a forward that raised leaves every cache as it was
            m.kv.length += len(m.ids)
        return list(torch.split(logits_1KV[0].cpu(), [len(m.ids) if m.every_position else 1 for m in members]))

    def kv_bytes_per_token(self) -> int:
        """KV bytes of one position of this model (whatever heads, head sizes and layers its family has),
        measured: one token through it, its MoE blocks answering zeros (no call leaves the process)."""
        kv = SequenceKV(1)
        token = MOE_CALL_OVERRIDE.set(lambda x_TD, layer: torch.zeros_like(x_TD))
        try:
            self([Member(kv, [0])])
        finally:
            MOE_CALL_OVERRIDE.reset(token)
        return kv.nbytes()


def halfway(members: list[Member]) -> int:
    """Where to cut a step in two micro-batches of about half its tokens each (0 < cut < len, given two)."""
    total, tokens = sum(len(m.ids) for m in members), 0
    for cut, member in enumerate(members[:-1], start=1):
        tokens += len(member.ids)
        if tokens * 2 >= total:
            return cut
    return len(members)


def refuse_position_dependent_rope(config) -> None:
    """ValueError for rotary scalings whose frequencies depend on the longest position of the forward
    (dynamic NTK, longrope): in a packed row a sequence's neighbours would change its frequencies."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = [rope, *(v for v in rope.values() if isinstance(v, dict))] if isinstance(rope, dict) else []
    bad = {k.get("rope_type", k.get("type")) for k in kinds} & {"dynamic", "longrope"}
    if bad:
        raise ValueError(f"the model's rotary scaling {sorted(bad)[0]!r} depends on the longest position of a "
                         "forward, which the engine's packed steps share between sequences: not supported")
