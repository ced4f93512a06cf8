"""The caller's end of the direct channels (`transport: channel`): the rows of an expert call on a
ZeroMQ socket of the chosen replica, not on Serve's request path.

Shape legend: N rows of one expert call, D model dim.

Serve stays the control plane: each expert replica binds a ROUTER socket and publishes its address
with `record_replica_metadata()` (serving/channel_server.py); a `ChannelClient` (one per router or
runner replica) reads the running replicas and their metadata from the request router of its Serve
handle (kept current by Serve's long poll), at most once a `refresh_s` per deployment, so replicas
that Serve adds are used within about a second and replicas that go away are dropped.

It keeps one DEALER socket per replica, sends each call to the replica with the fewest calls of its
own in flight, and awaits the answer by request id. A replica whose connection drops (the process
died: ZeroMQ's socket monitor says so at once), that does not answer within `silent_s`, or that is
busy, gets no more of this call: it is sent again to another replica, and when none is left `call`
returns None and the caller takes Serve's handle path, until the request's deadline. Each attempt has
its own request id, so a late answer of an abandoned attempt is dropped (counted as `late`): an answer
is never added twice, and never in part (the caller checks its shape and dtype).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq
import zmq.asyncio
from ray.serve.handle import DeploymentHandle
from zmq.utils.monitor import parse_monitor_message

from ..protocol.channel import Answer, CallHeader, ChannelMessageError, decode_answer, encode_call
from .errors import ExpertComputeError, MoEAppChanged

__all__ = ["ChannelClient", "ChannelLost", "running_replicas", "SILENT_S", "REFRESH_S"]

logger = logging.getLogger("ray.serve")

REFRESH_S = 1.0  # how often the running replicas of a deployment are read again
SILENT_S = 10.0  # a replica that has not answered a call by then gets no more of it (sent elsewhere)


class ChannelLost(RuntimeError):
    """The request's deadline passed while its call was on the channel (retried like a dead replica)."""


class _PeerLost(Exception):
    """The replica's connection dropped, or Serve no longer runs it, while a call waited on it."""


@dataclass(eq=False)
class _Peer:
    replica_id: str
    address: str
    socket: zmq.asyncio.Socket
    in_flight: int = 0
    dead: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)


def running_replicas(handle: DeploymentHandle) -> dict[str, dict] | None:
    """Replica id -> replica_metadata of the running replicas of `handle`'s deployment, as Serve's request
    router of this process knows them (updated by Serve's long poll; no call is made); None while the
    handle's router has not heard of any yet, or if this Ray has no such router (then: the handle path)."""
    if not handle.is_initialized:
        handle.options()  # initializes the handle's router, which subscribes to the running replicas
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    request_router = getattr(router, "_request_router", None)
    try:
        if request_router is not None:
            return {rid.unique_id: r.replica_metadata for rid, r in list(request_router.curr_replicas.items())}
        infos = getattr(router, "_running_replicas", None)
        return None if infos is None else {i.replica_id.unique_id: dict(i.replica_metadata) for i in infos}
    except (AttributeError, RuntimeError):  # another Ray's internals, or changed while read
        return None


class ChannelClient:
    """Connections to every running replica of each expert deployment, and the calls on them."""

    def __init__(self, secret: str, refresh_s: float = REFRESH_S, silent_s: float = SILENT_S) -> None:
        self.secret, self.refresh_s, self.silent_s = secret, refresh_s, silent_s
        self._ctx: zmq.asyncio.Context | None = None  # made on the event loop of the first call
        self._peers: dict[str, dict[str, _Peer]] = {}  # deployment -> replica id -> peer
        self._refreshed: dict[str, float] = {}
        self._pending: dict[int, tuple[asyncio.Future, _Peer]] = {}
        self._ids = itertools.count(secrets.randbelow(2**40) + 1)
        self.counts: collections.Counter[str] = collections.Counter()

    def stats(self) -> dict:
        """Calls, answers, resends (retries), late answers dropped, fallbacks to the handle path, replicas."""
        return {**{k: self.counts[k] for k in ("calls", "answers", "retries", "late", "busy", "fallback",
                                               "lost", "silent", "dropped")},
                "replicas": {g: sorted(p.address for p in peers.values() if not p.dead)
                             for g, peers in self._peers.items()}}

    async def call(self, group: str, handle: DeploymentHandle, layer: int, spans: list[tuple[int, int]],
                   rows_ND: np.ndarray, dtype: str, fingerprint: str, deadline: float,
                   on_retry: Callable[[], None] = lambda: None) -> np.ndarray | None:
        """The answer [N, D] (wire dtype) of `group`'s replicas to rows_ND, or None when no replica could be
        reached on the channel (the caller sends it through Serve's handle). A replica that died, fell silent
        or is busy is left for another (`on_retry` called each time); ExpertComputeError / MoEAppChanged
        when the expert refused or failed the call (not retried); ChannelLost after `deadline`."""
        self.counts["calls"] += 1
        tried: set[str] = set()
        while True:
            if time.monotonic() >= deadline:
                raise ChannelLost(f"the request's deadline passed with its call to {group} on the channel")
            candidates = [p for p in self.peers(group, handle) if p.replica_id not in tried]
            if not candidates:
                self.counts["fallback"] += 1
                return None
            peer = min(candidates, key=lambda p: (p.in_flight, random.random()))
            tried.add(peer.replica_id)
            answer = await self._attempt(peer, CallHeader(next(self._ids), layer, tuple(spans), dtype, fingerprint),
                                         rows_ND, deadline)
            if answer is None or answer.error == "busy":
                self.counts["retries"] += 1
                on_retry()
                continue
            if answer.error is None:
                self.counts["answers"] += 1
                return answer.rows
            if answer.error == "app_changed":
                raise MoEAppChanged(answer.message)
            raise ExpertComputeError(f"expert deployment '{group}' {'refused' if answer.error == 'refused' else 'failed'}"
                                     f" a channel call (layer {layer}, spans {list(spans)}): {answer.message}")

    async def _attempt(self, peer: _Peer, header: CallHeader, rows_ND: np.ndarray, deadline: float) -> Answer | None:
        """One send of the call to `peer`: its answer, or None if the peer died or stayed silent."""
        future = asyncio.get_running_loop().create_future()
        self._pending[header.request_id] = (future, peer)
        peer.in_flight += 1
        timeout = max(0.0, min(self.silent_s, deadline - time.monotonic()))
        try:
            return await asyncio.wait_for(self._send_and_wait(peer, header, rows_ND, future), timeout)
        except asyncio.TimeoutError:
            self.counts["silent"] += 1
            return None
        except _PeerLost:
            self.counts["lost"] += 1
            return None
        finally:
            self._pending.pop(header.request_id, None)
            peer.in_flight -= 1

    async def _send_and_wait(self, peer: _Peer, header: CallHeader, rows_ND: np.ndarray,
                             future: asyncio.Future) -> Answer:
        await peer.socket.send_multipart(encode_call(header, rows_ND, self.secret), copy=False)
        answer = await future
        if answer.error == "busy":
            self.counts["busy"] += 1
        return answer

    def watch(self, handles: dict[str, DeploymentHandle]) -> None:
        """Start following the running replicas of these deployments (Serve's long poll), so that the first
        calls find them."""
        for handle in handles.values():
            running_replicas(handle)

    def peers(self, group: str, handle: DeploymentHandle) -> list[_Peer]:
        """The live peers of deployment `group`, refreshed from Serve at most once a refresh_s."""
        now = time.monotonic()
        if now - self._refreshed.get(group, -float("inf")) >= self.refresh_s:
            metadata = running_replicas(handle)
            if metadata is not None:  # else not known yet: asked again on the next call
                self._refreshed[group] = now
                self._refresh(group, metadata)
        return [p for p in self._peers.get(group, {}).values() if not p.dead]

    def _refresh(self, group: str, metadata: dict[str, dict]) -> None:
        known = self._peers.setdefault(group, {})
        for replica_id, meta in metadata.items():
            address = meta.get("channel")
            if isinstance(address, str) and address.startswith("tcp://") and replica_id not in known:
                known[replica_id] = self._connect(replica_id, address)
        for replica_id in [r for r in known if r not in metadata]:
            self._drop(known.pop(replica_id))

    def _connect(self, replica_id: str, address: str) -> _Peer:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        peer = _Peer(replica_id, address, sock)
        peer.tasks = [asyncio.ensure_future(self._read(peer)), asyncio.ensure_future(self._watch(peer, monitor))]
        return peer

    def _drop(self, peer: _Peer) -> None:
        """Serve no longer runs this replica: fail its waiting calls (sent elsewhere) and close its socket."""
        self.counts["dropped"] += 1
        self._lost(peer)
        for task in peer.tasks:
            task.cancel()
        peer.socket.disable_monitor()
        peer.socket.close(linger=0)

    def _lost(self, peer: _Peer) -> None:
        peer.dead = True
        for future, owner in list(self._pending.values()):
            if owner is peer and not future.done():
                future.set_exception(_PeerLost(peer.address))

    async def _read(self, peer: _Peer) -> None:
        """Answers from one replica, each to the attempt that waits for its id; any other is late."""
        while True:
            frames = await peer.socket.recv_multipart(copy=False)
            try:
                answer = decode_answer(frames)
            except ChannelMessageError as exc:
                logger.warning("a malformed answer from %s was dropped: %s", peer.address, exc)
                continue
            waiting = self._pending.get(answer.request_id)
            if waiting is None or waiting[1] is not peer or waiting[0].done():
                self.counts["late"] += 1
                continue
            waiting[0].set_result(answer)

    async def _watch(self, peer: _Peer, monitor: zmq.asyncio.Socket) -> None:
        """The replica's connection dropped (its process died): its calls go elsewhere at once."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost(peer)
                    return
        finally:
            monitor.close(linger=0)

    def close(self) -> None:
        for peers in self._peers.values():
            for peer in peers.values():
                self._drop(peer)
        self._peers.clear()
