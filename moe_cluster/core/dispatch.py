"""Dispatch and combine: group routed token rows by expert, and add the answers back (pure torch).

Shape legend: T tokens, D model dim, E experts, K top-k, N = T*K routed rows.

`make_plan` sorts the N (token, expert) pairs by expert with a stable argsort, so the rows
of expert e are contiguous (`offsets_E1[e]:offsets_E1[e+1]`) and, inside a group, in
token order. Every path (in-process, router) uses this plan; the combine adds the weighted
rows with one `index_add_` in plan order, so all paths sum in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["DispatchPlan", "ExpertChunk", "make_plan", "expert_chunks", "pack_calls", "gather_rows", "gather_chunks",
           "combine", "expert_counts"]


@dataclass(frozen=True)
class DispatchPlan:
    """Where each routed row comes from and goes to. All tensors live on one device."""

    num_tokens: int  # T
    token_ids_N: torch.Tensor  # int64: source token of each sorted row
    weights_N: torch.Tensor  # float32: routing weight of each sorted row
    counts_E: torch.Tensor  # int64: rows per expert
    offsets_E1: torch.Tensor  # int64: offsets_E1[e] = first row of expert e; offsets_E1[E] = N
    counts: tuple[int, ...]  # counts_E on the host, to plan calls without device syncs
    offsets: tuple[int, ...]  # offsets_E1 on the host


@dataclass(frozen=True)
class ExpertChunk:
    """One expert call: rows [start, stop) of the sorted rows, all for `expert`."""

    expert: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_plan(weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the T*K routed rows by expert (stable, so ties keep token order)."""
    T, K = expert_ids_TK.shape
    flat_ids_N = expert_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)
    counts_E = torch.bincount(flat_ids_N, minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=counts_E.device)
    torch.cumsum(counts_E, dim=0, out=offsets_E1[1:])
    counts = tuple(counts_E.tolist())
    offsets = tuple(offsets_E1.tolist())
    return DispatchPlan(
        num_tokens=T,
        token_ids_N=torch.div(order_N, K, rounding_mode="floor"),
        weights_N=weights_TK.reshape(-1)[order_N].float(),
        counts_E=counts_E,
        offsets_E1=offsets_E1,
        counts=counts,
        offsets=offsets,
    )


def expert_chunks(plan: DispatchPlan, max_rows: int | None = None) -> list[ExpertChunk]:
    """One chunk per expert that got rows, split into pieces of at most `max_rows` rows.

    Experts with no rows get no chunk (and so no call). Pieces of one expert are as even
    as possible, so that a hot expert's rows spread evenly over its replicas.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    chunks = []
    for expert, count in enumerate(plan.counts):
        if count == 0:
            continue
        start = plan.offsets[expert]
        pieces = 1 if max_rows is None else -(-count // max_rows)
        for i in range(pieces):
            chunks.append(ExpertChunk(expert, start + count * i // pieces, start + count * (i + 1) // pieces))
    return chunks


def pack_calls(chunks: list[ExpertChunk], owner_of: Callable[[int], str],
               max_rows: int | None = None) -> list[tuple[str, list[int]]]:
    """Group chunks into calls: one call per owner (deployment) of at most `max_rows` rows.

    owner_of(expert) names where the expert runs. Returns [(owner, chunk indices)], the indices
    in plan order inside a call and the calls in the order of their first chunk. A chunk is
    never split (expert_chunks already cut an expert's rows to at most max_rows), so every
    expert still computes exactly the rows it would compute alone.
    """
    calls: list[tuple[str, list[int]]] = []
    open_call: dict[str, tuple[int, int]] = {}  # owner -> (index in calls, rows so far)
    for index, chunk in enumerate(chunks):
        owner = owner_of(chunk.expert)
        current = open_call.get(owner)
        if current is None or (max_rows is not None and current[1] + chunk.size > max_rows):
            calls.append((owner, []))
            current = (len(calls) - 1, 0)
        calls[current[0]][1].append(index)
        open_call[owner] = (current[0], current[1] + chunk.size)
    return calls


def gather_rows(x_TD: torch.Tensor, plan: DispatchPlan, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """x_ND: the input row of routed rows [start, stop) of the plan (all by default), in plan order."""
    return x_TD.index_select(0, plan.token_ids_N[start:stop])


def gather_chunks(x_TD: torch.Tensor, plan: DispatchPlan, chunks: list[ExpertChunk]) -> torch.Tensor:
    """x_ND: the rows of `chunks`, one chunk after the other (one index_select, no intermediate copies)."""
    if len(chunks) == 1:
        return gather_rows(x_TD, plan, chunks[0].start, chunks[0].stop)
    return x_TD.index_select(0, torch.cat([plan.token_ids_N[c.start:c.stop] for c in chunks]))


def add_rows(y_TD: torch.Tensor, plan: DispatchPlan, start: int, out_ND: torch.Tensor) -> torch.Tensor:
    """y_TD[token] += weight * out for rows [start, start + N) of the plan; returns y_TD.

    Adding the chunks of a plan in plan order sums each token's rows in the same order as
    one `combine` over all rows, so the result does not depend on how the rows were chunked.
    Chunk by chunk, no [N, D] buffer is needed (a fresh 32 MiB buffer per call costs the
    page faults of its first touch: about as much as the arithmetic on a 2-core machine).
    """
    stop = start + out_ND.shape[0]
    weighted_ND = out_ND * plan.weights_N[start:stop].to(out_ND.dtype).unsqueeze(-1)
    return y_TD.index_add_(0, plan.token_ids_N[start:stop], weighted_ND)


def combine(plan: DispatchPlan, expert_out_ND: torch.Tensor) -> torch.Tensor:
    """y_TD[token] = sum over its rows of weight * expert_out, in expert_out's dtype (all rows at once)."""
    y_TD = torch.zeros(plan.num_tokens, expert_out_ND.shape[-1], dtype=expert_out_ND.dtype,
                       device=expert_out_ND.device)
    return add_rows(y_TD, plan, 0, expert_out_ND)


def expert_counts(plan: DispatchPlan, start: int = 0, stop: int | None = None) -> list[int]:
    """Rows per expert coming from tokens [start, stop) (all tokens by default)."""
    stop = plan.num_tokens if stop is None else stop
    if start == 0 and stop == plan.num_tokens:
        return list(plan.counts)
    expert_of_row_N = torch.repeat_interleave(torch.arange(len(plan.counts), device=plan.counts_E.device),
                                              plan.counts_E)
    in_range_N = (plan.token_ids_N >= start) & (plan.token_ids_N < stop)
    return torch.bincount(expert_of_row_N[in_range_N], minlength=len(plan.counts)).tolist()
