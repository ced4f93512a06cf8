"""The experts on the cluster: the `ExpertBackend` of the router (core/forward.py runs the loop).

Shape legend: N rows of one expert call, D model dim.

`start` sends one call per chunk to the deployment that hosts (layer, expert) (placement),
as an asyncio task, so the forward loop has every call in flight before it awaits the
first answer. A dead or unavailable replica is retried (Serve picks another replica, or the
one that replaced it) until the request's deadline; an expert that raised is not retried.
Every answer is checked ([rows sent, D], model dtype) before the loop may add it.

Rows travel as numpy arrays of the model dtype through Ray's object store (zero-copy for
numpy; a torch tensor would be pickled through torch.save), bf16 as its uint16 bit pattern.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from ..core.config import ModelConfig
from ..core.dispatch import ExpertChunk
from ..core.placement import Placement
from .errors import RETRYABLE, ExpertCallError, ExpertComputeError
from .metrics import RouterMetrics
from .tensors import from_wire, to_wire, wire_dtype

__all__ = ["RemoteExperts", "check_expert_answer"]


@dataclass(frozen=True)
class RemoteExperts:
    """Expert calls of one router replica; `for_deadline` binds the deadline of one request."""

    handles: dict[str, DeploymentHandle]  # expert deployment name -> handle
    placement: Placement
    config: ModelConfig
    metrics: RouterMetrics
    device: torch.device  # where the router computes: answers are moved there
    deadline: float = float("inf")  # time.monotonic() after which failed calls are not retried

    def __post_init__(self) -> None:
        missing = {g.name for g in self.placement.groups} - set(self.handles)
        if missing:
            raise ValueError(f"no handle for expert deployments {sorted(missing)}")

    @property
    def wire_dtype(self) -> np.dtype:
        """How an answer travels: numpy of the model dtype, bf16 as its uint16 bit pattern."""
        return wire_dtype(self.config.dtype)

    def for_deadline(self, deadline: float) -> "RemoteExperts":
        return dataclasses.replace(self, deadline=deadline)

    def start(self, layer: int, chunk: ExpertChunk, x_ND: torch.Tensor) -> asyncio.Task:
        return asyncio.ensure_future(self._call(layer, chunk.expert, to_wire(x_ND)))

    def cancel(self, calls: list[asyncio.Future]) -> None:
        """Cancel the calls still running; mark the failures of finished ones as seen (no asyncio log noise)."""
        for call in calls:
            if not call.done():
                call.cancel()
            elif not call.cancelled():
                call.exception()

    def where(self, layer: int, expert: int) -> str:
        return f"expert deployment '{self.placement.owner[(layer, expert)]}'"

    async def _call(self, layer: int, expert: int, x_ND: np.ndarray) -> torch.Tensor:
        """One expert call; a dead or unavailable replica is retried until the deadline."""
        group = self.placement.owner[(layer, expert)]
        started = time.perf_counter()
        backoff_s, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                array = await self.handles[group].forward.remote(layer, expert, x_ND)
                break
            except RETRYABLE as exc:
                if time.monotonic() + backoff_s >= self.deadline:
                    raise _call_error(group, layer, expert, started, attempts, exc) from exc
                self.metrics.record_retry(expert, group)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, 1.0)
            except Exception as exc:  # noqa: BLE001 - the expert itself failed: no retry
                raise ExpertComputeError(str(_call_error(group, layer, expert, started, attempts, exc))) from exc
        check_expert_answer(array, (x_ND.shape[0], self.config.d_model), self.wire_dtype, self.config.dtype,
                            f"expert deployment '{group}' answered (layer {layer}, expert {expert})")
        self.metrics.record_call(expert, group, (time.perf_counter() - started) * 1e3)
        return from_wire(array, self.config.dtype).to(self.device)


def _call_error(group: str, layer: int, expert: int, started: float, attempts: int,
                exc: BaseException) -> ExpertCallError:
    # An exception raised in the replica arrives wrapped in a RayTaskError whose first line is
    # only Ray's task header: name the replica's own exception (its `cause`) instead.
    error = exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc
    first_line = str(error).splitlines()[0] if str(error) else ""
    return ExpertCallError(f"expert deployment '{group}' failed on (layer {layer}, expert {expert}) after "
                           f"{attempts} attempt(s) in {time.perf_counter() - started:.1f}s: "
                           f"{type(error).__name__}: {first_line}")


def check_expert_answer(array: object, expected_shape: tuple[int, int], wire_dtype: np.dtype, model_dtype: str,
                        source: str) -> None:
    """ExpertComputeError (500, not retried) unless `array` is a numpy array of `expected_shape`
    ([rows sent, D]) and `wire_dtype` (the model dtype; bf16 as uint16): a short or wrong answer
    must fail the request, never be combined in part. `source` names the deployment and call."""
    if isinstance(array, np.ndarray) and array.shape == tuple(expected_shape) and array.dtype == wire_dtype:
        return
    got = (f"an array of shape {list(array.shape)} and dtype {array.dtype}" if isinstance(array, np.ndarray)
           else f"a {type(array).__name__}")
    raise ExpertComputeError(
        f"{source} with {got}; expected a numpy array of shape {list(expected_shape)} (the rows sent, d_model) "
        f"and dtype {wire_dtype} (model dtype {model_dtype}). The request failed and nothing was combined: "
        "check that this deployment runs the same model (checkpoint, preset, dtype) and code as the router")
