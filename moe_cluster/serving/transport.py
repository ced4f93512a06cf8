"""How the rows of an expert call travel, and their answer (AppArgs.transport), chosen per call.

Shape legend: N rows of one expert call, D model dim.

    object_store  numpy arrays of the model dtype (bf16 as uint16) through Ray's object store:
                  zero-copy for numpy; the large-call path on CPU
    by_value      the same arrays through Serve's own gRPC path (`handle.options(_by_reference=False)`),
                  no object store: 2.3x faster than the object store at T=1 for 64 small experts;
                  at most RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH (4 MiB) a message
    auto          on the channel up to channel_max_bytes (4 MiB), else by value up to by_value_max_bytes
                  (1 MiB: so none with the defaults), else the object store (the default)
    nixl          torch tensors through Ray's direct transport (`ray.put(t, _tensor_transport="nixl")`):
                  GPU memory to GPU memory, across nodes; needs `pip install 'moe-cluster[nixl]'`
    cuda_ipc      the same with CUDA IPC: router and experts on one node and one GPU
    channel       the same numpy arrays on a ZeroMQ socket of each expert replica (serving/channel.py):
                  no Serve request path per call; the Serve handle path when no replica is reachable

A direct transport (nixl, cuda_ipc) that cannot be used falls back to the object store with
one log line, never a failed request: NIXL not installed, the router not on a GPU (cuda_ipc),
or an expert that could not fetch the rows (DirectTransportError: the call is sent again
through the object store, and so are all later calls). An answer the router cannot fetch (its
replica died after answering: AnswerLost) is retried like a call to a dead replica. No direct
transport is the default until it has been measured on a GPU (README: Benchmarks, On a GPU).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.serve.handle import DeploymentHandle

from .args import CHANNEL_MODES
from .tensors import to_wire

__all__ = ["Transport", "DirectRows", "DirectTransportError", "AnswerLost", "by_value_limit", "word_checksum",
           "TRANSPORTS"]

logger = logging.getLogger("ray.serve")

TRANSPORTS = ("auto", "object_store", "by_value", "nixl", "cuda_ipc", "channel")
DIRECT = ("nixl", "cuda_ipc")


class DirectTransportError(RuntimeError):
    """An expert replica could not fetch rows sent through a direct transport: the router resends them
    through the object store and stops using the direct transport."""


class AnswerLost(RuntimeError):
    """The router could not fetch an expert's answer from a direct transport (the replica that holds it
    died after answering, or the transfer failed): the call is sent again, as for a dead replica."""


@dataclass(frozen=True)
class DirectRows:
    """Rows [N, D] (or an answer) as a torch tensor held in Ray's direct transport. The ref travels
    nested in this object, so Ray hands it over unresolved; `get` fetches the tensor from its owner.

    `checksum` (of the bytes, `word_checksum`) travels by value beside the ref and is checked on arrival:
    a 15-minute soak with NIXL on CPU (Ray 2.60, nixl 1.5.1) got 171 of 8304 answers wrong (garbage
    rows) while NIXL logged failed transfers and deregistrations, so a transfer is not trusted blindly.
    A mismatch raises DirectTransportError: the call goes again through the object store, and so do
    all later ones."""

    refs: list  # [ObjectRef]
    transport: str
    checksum: int

    @classmethod
    def put(cls, t_ND: torch.Tensor, transport: str) -> "DirectRows":
        t_ND = t_ND.contiguous()
        return cls([ray.put(t_ND, _tensor_transport=transport)], transport, word_checksum(t_ND))

    async def get(self, retryable: bool = False) -> torch.Tensor:
        """The tensor (on the device of this process's transport); ray.get blocks, so in a thread. A failed
        fetch raises AnswerLost if `retryable` (the router fetching an answer: the replica holding it may
        have died), else DirectTransportError; bytes that differ from the sender's, DirectTransportError."""
        what = "an answer" if retryable else "rows"
        try:
            t, checksum = await asyncio.to_thread(self._fetch)
        except Exception as exc:  # noqa: BLE001 - any failure of the transport itself
            error = AnswerLost if retryable else DirectTransportError
            raise error(f"could not fetch {what} through {self.transport}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if checksum != self.checksum:
            raise DirectTransportError(f"{what} fetched through {self.transport} differ from what was sent "
                                       f"(checksum {checksum} != {self.checksum})")
        return t

    def _fetch(self) -> tuple[torch.Tensor, int]:
        t = ray.get(self.refs[0])
        return t, word_checksum(t)


def word_checksum(t: torch.Tensor) -> int:
    """The sum of a contiguous tensor's 32-bit words (16-bit, or bytes, when its size does not divide) as int64,
    wrapping: integer sums do not depend on order, so sender and receiver agree exactly on any device."""
    data = t.contiguous().reshape(-1).view(torch.uint8)
    for word in (torch.int32, torch.int16):
        if data.numel() % (torch.iinfo(word).bits // 8) == 0:
            return int(data.view(word).sum(dtype=torch.int64))
    return int(data.sum(dtype=torch.int64))


class Transport:
    """The transport of one router (or runner) replica: which path each call takes, and calls per path."""

    def __init__(self, mode: str, by_value_max_bytes: int = 2**20, device: torch.device | None = None) -> None:
        if mode not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {mode!r}")
        self.mode = mode
        self.by_value_max_bytes = min(by_value_max_bytes, by_value_limit()) if mode == "auto" else by_value_limit()
        self.direct: str | None = None
        if mode in DIRECT:
            reason = direct_unavailable(mode, device or torch.device("cpu"))
            if reason is None:
                self.direct = mode
            else:
                logger.warning("transport %s cannot be used (%s): expert calls go through the object store", mode,
                               reason)
        self._by_value: dict[str, DeploymentHandle] = {}
        self._by_reference: dict[str, DeploymentHandle] = {}
        self._warned = False
        self.calls: collections.Counter[str] = collections.Counter()  # calls sent per path (router /v1/stats)
        self.channel: Any = None  # a ChannelClient (serving/channel.py) when uses_channel, set by its owner
        self.channel_max_bytes = 0  # auto: calls of at most this many bytes go on the channel (set with it)

    def by_value(self, nbytes: int) -> bool:
        """Whether a call of `nbytes` bytes of rows goes by value."""
        if self.mode in ("object_store", *DIRECT):
            return False
        if nbytes <= self.by_value_max_bytes:
            return True
        if self.mode == "by_value" and not self._warned:
            self._warned = True
            logger.warning("transport by_value: a call of %d bytes is over Serve's gRPC message limit (%d): "
                           "calls this large go through the object store", nbytes, self.by_value_max_bytes)
        return False

    def use_channel(self, nbytes: int) -> bool:
        """Whether a call of `nbytes` bytes of rows goes on the channel (counted when it does)."""
        if self.channel is None or (self.mode not in CHANNEL_MODES and nbytes > self.channel_max_bytes):
            return False
        self.calls["channel"] += 1
        return True

    def pack(self, rows_ND: torch.Tensor) -> Any:
        """What a call carries: DirectRows on a direct transport, else numpy of the model dtype."""
        return DirectRows.put(rows_ND, self.direct) if self.direct else to_wire(rows_ND)

    def handle(self, handles: dict[str, DeploymentHandle], group: str, payload: Any) -> DeploymentHandle:
        """The handle to send `payload` (from pack) with, counting the path it takes."""
        if isinstance(payload, DirectRows):  # the ref travels nested in an object-store call
            self.calls[payload.transport] += 1
            return self._options(handles[group], group, by_value=False)
        return self.handle_for_size(handles[group], group, payload.nbytes)

    def handle_for_size(self, handle: DeploymentHandle, key: str, nbytes: int) -> DeploymentHandle:
        """`handle` set to send a call of `nbytes` by value or by reference (`by_value`), counting the path."""
        by_value = self.by_value(nbytes)
        self.calls["by_value" if by_value else "object_store"] += 1
        return self._options(handle, key, by_value)

    def _options(self, handle: DeploymentHandle, key: str, by_value: bool) -> DeploymentHandle:
        """One options() handle per key and path, made on first use. Both paths are set explicitly:
        Serve's default is by value under RAY_SERVE_THROUGHPUT_OPTIMIZED=1."""
        made = self._by_value if by_value else self._by_reference
        if key not in made:
            made[key] = handle.options(_by_reference=not by_value)
        return made[key]

    def give_up_direct(self, reason: str) -> None:
        """An expert could not fetch direct rows: the object store from now on (logged once)."""
        if self.direct is not None:
            logger.warning("transport %s failed (%s): expert calls go through the object store from now on",
                           self.direct, reason)
            self.direct = None

    def paths(self) -> dict[str, int]:
        """Calls sent per path, every path this transport may take (for /v1/stats)."""
        extra = (self.mode,) if self.mode in DIRECT else ("channel",) if self.channel is not None else ()
        return {path: self.calls[path] for path in ("by_value", "object_store", *extra)}


def direct_unavailable(mode: str, device: torch.device) -> str | None:
    """Why direct transport `mode` cannot be used from a process computing on `device`; None if it can."""
    if mode == "cuda_ipc" and device.type != "cuda":
        return f"the router computes on {device}, and CUDA IPC moves GPU memory only"
    if mode == "nixl":
        try:
            import nixl._api  # noqa: F401 - what Ray's NIXL transport imports
        except ImportError as exc:
            return f"NIXL is not installed ({exc}); pip install 'moe-cluster[nixl]'"
    return None


def by_value_limit() -> int:
    """The largest call sent by value: Serve's replica gRPC message limit, less room for the answer's framing."""
    from ray.serve._private.constants import RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH

    return max(0, RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH - 64 * 1024)
