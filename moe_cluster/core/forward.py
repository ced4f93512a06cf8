"""The MoE forward loop, written once: route -> plan -> chunks -> experts -> combine -> shared experts.

Shape legend: T tokens, D model dim, N rows of one expert call.

Where the experts run is the only thing that changes between the in-process model and the
router deployment, so it is a parameter: an `ExpertBackend`.
- `LocalExperts` (here): the experts are modules of this process; `MoEModel.forward` drives the
  loop with `run_sync`, since a local answer is ready as soon as it is asked for.
- `RemoteExperts` (serving/remote_experts.py): one call per expert deployment (carrying the chunks
  of every chosen expert it hosts), all sent before the first answer is awaited; the router
  awaits the loop on its event loop.

Answers are added in plan order as they come, so a token's rows are summed in the same
order on every path (the result does not depend on which expert answered first). A
backend checks each answer before handing it over ([rows sent, D], model dtype, the
caller's device); any failure cancels the calls still in flight: never a partial output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Protocol, TypeVar

import torch
from torch import nn

from .config import ModelConfig
from .dispatch import DispatchPlan, ExpertChunk, add_rows, expert_chunks, gather_chunks
from .layers import GateAndShared, add_shared_experts, route_and_plan

__all__ = ["ExpertBackend", "GatherRows", "LocalExperts", "ForwardTimings", "moe_forward", "run_sync"]

T = TypeVar("T")


GatherRows = Callable[[list[ExpertChunk]], torch.Tensor]  # chunks -> their rows x_ND, one after the other


class ExpertBackend(Protocol):
    """Where the routed experts of a model run."""

    max_rows_per_call: int | None  # the loop cuts each expert's rows into chunks of at most this many

    def start(self, layer: int, chunks: list[ExpertChunk], gather: GatherRows) -> list[Awaitable[torch.Tensor]]:
        """Start Expert_{layer, c.expert}(rows of c) for every chunk c; one awaitable per chunk, in order,
        giving out_ND [c.size, D] in the model dtype on the rows' device, or raising. The backend
        decides how chunks travel (several chunks of one deployment may share one call)."""

    def cancel(self, calls: list[Awaitable[torch.Tensor]]) -> None:
        """Stop the calls that are still running (a failure elsewhere made their answers useless)."""


@dataclass
class ForwardTimings:
    """Where one forward's time went, in seconds (the router reports them as its phases)."""

    route_s: float = 0.0  # gate, top-k, plan, gathering the rows of every call
    experts_s: float = 0.0  # waiting for the experts' answers
    combine_s: float = 0.0  # adding the answers and the shared experts


async def moe_forward(x_TD: torch.Tensor, layer: int, parts: GateAndShared, config: ModelConfig,
                      experts: ExpertBackend, timings: ForwardTimings | None = None) -> tuple[torch.Tensor, DispatchPlan]:
    """(y_TD in the model dtype, plan) for x_TD [T, D] through MoE layer `layer`, on x_TD's device."""
    timings = ForwardTimings() if timings is None else timings
    started = time.perf_counter()
    with torch.no_grad():
        x_model_TD, plan = route_and_plan(x_TD, parts, config)
        chunks = expert_chunks(plan, experts.max_rows_per_call)
        calls = experts.start(layer, chunks, lambda some: gather_chunks(x_model_TD, plan, some))
        routed_TD = torch.zeros_like(x_model_TD)
    timings.route_s += time.perf_counter() - started
    try:
        for chunk, call in zip(chunks, calls):
            waited = time.perf_counter()
            out_ND = await call
            added = time.perf_counter()
            timings.experts_s += added - waited
            with torch.no_grad():
                add_rows(routed_TD, plan, chunk.start, out_ND)
            timings.combine_s += time.perf_counter() - added
    except BaseException:
        experts.cancel(calls)
        raise
    finished = time.perf_counter()
    with torch.no_grad():
        y_TD = add_shared_experts(x_model_TD, routed_TD, parts)
    timings.combine_s += time.perf_counter() - finished
    return y_TD, plan


class LocalExperts:
    """The experts are modules of this process: `modules[layer][expert]`."""

    def __init__(self, modules: dict[int, list[nn.Module]], max_rows_per_call: int | None = None) -> None:
        self.modules = modules
        self.max_rows_per_call = max_rows_per_call  # None: one chunk per expert, as a plain loop

    def start(self, layer: int, chunks: list[ExpertChunk], gather: GatherRows
              ) -> list[Coroutine[Any, Any, torch.Tensor]]:
        # Computed when awaited, one chunk at a time (as a plain loop would): no answer waits in memory.
        return [_compute(self.modules[layer][chunk.expert], gather, chunk) for chunk in chunks]

    def cancel(self, calls: list[Coroutine[Any, Any, torch.Tensor]]) -> None:
        for call in calls:
            call.close()  # never awaited: close it, so Python does not warn


async def _compute(module: nn.Module, gather: GatherRows, chunk: ExpertChunk) -> torch.Tensor:
    with torch.no_grad():
        return module(gather([chunk]))


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (every awaitable it awaits is ready), with no event loop.

    `moe_forward` over LocalExperts awaits only `_compute` coroutines, which return without
    suspending, so the loop runs to its end on the first step, in this thread.
    """
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("the forward loop suspended: run_sync drives only backends whose answers are ready "
                       "when awaited (LocalExperts); await moe_forward on an event loop instead")
