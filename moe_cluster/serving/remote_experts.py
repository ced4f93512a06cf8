"""The experts on the cluster: the `ExpertBackend` of the router (core/forward.py runs the loop).

Shape legend: N rows of one expert call, D model dim.

`start` sends ONE call per expert deployment and layer (placement), carrying the rows of
every chosen expert it hosts one after the other with their (expert, rows) spans, split
into calls of at most max_tokens_per_call rows so that a hot deployment's rows spread over
its replicas. Each call is an asyncio task, so the forward loop has every call in flight
before it awaits the first answer; each chunk's answer is its slice of its call's answer. A dead or unavailable replica is retried (Serve picks another replica, or the
one that replaced it) until the request's deadline; an expert that raised is not retried.
Every answer is checked ([rows sent, D], model dtype) before the loop may add it.

Rows travel as numpy arrays of the model dtype (a torch tensor would be pickled through
torch.save), bf16 as its uint16 bit pattern: by value through Serve's gRPC path for small
calls, through Ray's object store (zero-copy for numpy) for large ones; or as torch tensors
through Ray's direct transport (NIXL, CUDA IPC) when configured (serving/transport.py).
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
from ..core.dispatch import ExpertChunk, pack_calls
from ..core.forward import GatherRows
from ..core.placement import Placement
from .args import ResolvedApp, uses_channel
from .channel import ChannelClient, ChannelLost
from .errors import RETRYABLE, ExpertCallError, ExpertComputeError, MoEAppChanged
from .metrics import RouterMetrics
from .tensors import from_wire, wire_dtype
from .transport import AnswerLost, DirectRows, DirectTransportError, Transport

__all__ = ["RemoteExperts", "check_expert_answer"]


@dataclass(frozen=True)
class RemoteExperts:
    """Expert calls of one router replica; `for_deadline` binds the deadline of one request."""

    handles: dict[str, DeploymentHandle]  # expert deployment name -> handle (by reference: the object store)
    placement: Placement
    config: ModelConfig
    metrics: RouterMetrics
    device: torch.device  # where the router computes: answers are moved there
    max_rows_per_call: int | None  # chunks and calls carry at most this many rows (max_tokens_per_call)
    transport: Transport
    wire_dtype: np.dtype  # how rows and answers travel: numpy of the model dtype, bf16 as uint16
    fingerprint: str  # ResolvedApp.fingerprint of the app the rows are routed for; experts check it
    deadline: float = float("inf")  # time.monotonic() after which failed calls are not retried

    @classmethod
    def create(cls, handles: dict[str, DeploymentHandle], app: ResolvedApp, metrics: RouterMetrics,
               device: torch.device) -> "RemoteExperts":
        """Checked once, when the router starts: every deployment of the placement has a handle."""
        missing = {g.name for g in app.placement.groups} - set(handles)
        if missing:
            raise ValueError(f"no handle for expert deployments {sorted(missing)}")
        transport = Transport(app.args.transport, app.args.by_value_max_bytes, device)
        if uses_channel(app.args.transport, app.args.channel_max_bytes):
            transport.channel = ChannelClient(app.channel_secret)
            transport.channel_max_bytes = app.args.channel_max_bytes
            transport.channel.watch(handles)
        return cls(handles, app.placement, app.config, metrics, device, app.args.max_tokens_per_call, transport,
                   wire_dtype(app.config.dtype), app.fingerprint)

    def for_deadline(self, deadline: float) -> "RemoteExperts":
        return dataclasses.replace(self, deadline=deadline)

    def start(self, layer: int, chunks: list[ExpertChunk], gather: GatherRows) -> list["_Piece"]:
        """One call per deployment (split at max_rows_per_call rows): it carries the rows of every
        chunk of the experts that deployment hosts, and each chunk's answer is its slice of the call's."""
        pieces: list[_Piece | None] = [None] * len(chunks)
        owner_of = lambda expert: self.placement.owner[(layer, expert)]  # noqa: E731
        for group, indices in pack_calls(chunks, owner_of, self.max_rows_per_call):
            call_chunks = [chunks[i] for i in indices]
            spans = [(chunk.expert, chunk.size) for chunk in call_chunks]
            task = asyncio.ensure_future(self._call(layer, group, spans, gather(call_chunks)))
            offset = 0
            for i, chunk in zip(indices, call_chunks):
                pieces[i] = _Piece(task, offset, offset + chunk.size)
                offset += chunk.size
        return pieces

    def cancel(self, pieces: list["_Piece"]) -> None:
        """Cancel the calls still running; mark the failures of finished ones as seen (no asyncio log noise)."""
        for task in {id(piece.task): piece.task for piece in pieces}.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()

    async def _call(self, layer: int, group: str, spans: list[tuple[int, int]], rows_ND: torch.Tensor) -> torch.Tensor:
        """One call to deployment `group`: rows_ND of (expert, rows) `spans`, one after the other.
        A dead or unavailable replica is retried until the deadline; an expert that raised is not.
        Rows an expert could not fetch through a direct transport are sent again through the object store."""
        experts = [expert for expert, _ in spans]
        started = time.perf_counter()
        backoff_s, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                payload = self.transport.pack(rows_ND)
                if not isinstance(payload, DirectRows) and self.transport.use_channel(payload.nbytes):
                    answer = await self.transport.channel.call(
                        group, self.handles[group], layer, spans, payload, self.config.dtype, self.fingerprint,
                        self.deadline, lambda: [self.metrics.record_retry(e, group) for e in experts])
                    if answer is not None:
                        break  # else no replica could be reached on the channel: Serve's handle path
                handle = self.transport.handle(self.handles, group, payload)
                answer = await handle.forward.remote(layer, spans, payload, self.fingerprint)
                if isinstance(payload, DirectRows) and isinstance(answer, DirectRows):
                    # The answer stays with the replica until fetched: a replica that died since is retried.
                    answer = await answer.get(retryable=True)
                break
            except (*RETRYABLE, AnswerLost, ChannelLost) as exc:
                if time.monotonic() + backoff_s >= self.deadline:
                    raise _call_error(group, layer, experts, started, attempts, exc) from exc
                for expert in experts:
                    self.metrics.record_retry(expert, group)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, 1.0)
            except Exception as exc:  # noqa: BLE001 - the expert itself failed: no retry
                if _raised(exc, DirectTransportError):
                    self.transport.give_up_direct(str(_raised(exc, DirectTransportError)))
                    continue
                changed = _raised(exc, MoEAppChanged)
                if changed is not None:
                    raise MoEAppChanged(str(changed).splitlines()[0]) from exc
                raise ExpertComputeError(str(_call_error(group, layer, experts, started, attempts, exc))) from exc
        check_expert_answer(answer, (rows_ND.shape[0], self.config.d_model), self.wire_dtype, self.config.dtype,
                            f"expert deployment '{group}' answered (layer {layer}, experts {experts})",
                            isinstance(payload, DirectRows))
        latency_ms = (time.perf_counter() - started) * 1e3
        for expert in experts:
            self.metrics.record_call(expert, group, latency_ms)
        out_ND = answer if isinstance(answer, torch.Tensor) else from_wire(answer, self.config.dtype)
        return out_ND.to(self.device)


def _raised(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The replica's exception of type `kind` behind `exc`, if that is what it raised. By reference it
    comes wrapped (RayTaskError.cause); by value, as itself."""
    return next((e for e in (exc, getattr(exc, "cause", None)) if isinstance(e, kind)), None)


class _Piece:
    """One chunk's answer: rows [start, stop) of the answer of a call that several chunks may share."""

    def __init__(self, task: asyncio.Task, start: int, stop: int) -> None:
        self.task, self.start, self.stop = task, start, stop

    def __await__(self):
        out_ND = yield from self.task.__await__()
        return out_ND[self.start:self.stop]


def _call_error(group: str, layer: int, experts: list[int], started: float, attempts: int,
                exc: BaseException) -> ExpertCallError:
    # An exception raised in the replica arrives wrapped in a RayTaskError whose first line is
    # only Ray's task header: name the replica's own exception (its `cause`) instead.
    error = exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc
    first_line = str(error).splitlines()[0] if str(error) else ""
    return ExpertCallError(f"expert deployment '{group}' failed on (layer {layer}, experts {experts}) after "
                           f"{attempts} attempt(s) in {time.perf_counter() - started:.1f}s: "
                           f"{type(error).__name__}: {first_line}")


def check_expert_answer(answer: object, expected_shape: tuple[int, int], wire_dtype: np.dtype, model_dtype: str,
                        source: str, direct: bool = False) -> None:
    """ExpertComputeError (500, not retried) unless `answer` has `expected_shape` ([rows sent, D]) and is
    a numpy array of `wire_dtype` (the model dtype; bf16 as uint16) or, for a call sent through a direct
    transport (`direct`), a torch tensor of the model dtype: a short or wrong answer must fail the
    request, never be combined in part. `source` names the deployment and call."""
    if not direct and isinstance(answer, np.ndarray) and answer.shape == tuple(expected_shape) \
            and answer.dtype == wire_dtype:
        return
    if direct and isinstance(answer, torch.Tensor) and tuple(answer.shape) == tuple(expected_shape) \
            and answer.dtype == getattr(torch, model_dtype):
        return
    kind = {np.ndarray: "an array", torch.Tensor: "a torch tensor"}.get(type(answer))
    got = f"{kind} of shape {list(answer.shape)} and dtype {answer.dtype}" if kind else f"a {type(answer).__name__}"
    raise ExpertComputeError(
        f"{source} with {got}; expected " + (f"a torch tensor of shape {list(expected_shape)} (the rows sent, "
                                              f"d_model) and dtype {model_dtype}" if direct else
                                              f"a numpy array of shape {list(expected_shape)} (the rows sent, "
                                              f"d_model) and dtype {wire_dtype} (model dtype {model_dtype})") +
        ". The request failed and nothing was combined: "
        "check that this deployment runs the same model (checkpoint, preset, dtype) and code as the router")
