"""The expert replica's end of a direct channel: a ZeroMQ ROUTER socket answered by a thread of its own.

Shape legend: N rows of one expert call, D model dim.

The socket thread receives each call (protocol/channel.py), checks it (the secret, the header,
the sizes), refuses it with `busy` when `max_waiting` calls already wait, and hands it straight
to the replica's math thread (the one-thread executor every call of the replica computes on),
where `compute` checks and answers it as Serve's `forward` would (the same fingerprint and dtype
checks, the same counters). The event loop is not on this path: a call crosses two threads (the
socket thread and the math thread) instead of four, and never waits behind Serve's own work on
the loop. The answer comes back to the socket thread through an inproc pipe: a ZeroMQ socket is
used by one thread only (the ROUTER and the pipe's reader by the socket thread, each pipe writer
by the thread that made it).
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Executor
from typing import Callable

import numpy as np
import zmq

from ..protocol.channel import (CallHeader, ChannelMessageError, decode_call, dtype_of_wire, encode_answer,
                                encode_error)
from .errors import MoEAppChanged

__all__ = ["ChannelServer", "MAX_WAITING"]

logger = logging.getLogger("ray.serve")

MAX_WAITING = 64  # calls received and not yet answered; more are refused with `busy` (the caller tries elsewhere)
_pipes = itertools.count()

Compute = Callable[[CallHeader, np.ndarray], np.ndarray]  # out_ND for a call's rows x_ND, or raises


class ChannelServer:
    """Binds tcp://`host`:<random port> and answers calls with `compute`, run on `executor`."""

    def __init__(self, host: str, secret: str, compute: Compute, executor: Executor,
                 max_waiting: int = MAX_WAITING) -> None:
        self._secret, self._compute, self._executor, self.max_waiting = secret, compute, executor, max_waiting
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._pipe = f"inproc://channel-answers-{next(_pipes)}"
        self._answers_in = self._ctx.socket(zmq.PULL)
        self._answers_in.bind(self._pipe)
        self._writers = threading.local()  # each computing thread's own end of the pipe
        self._lock = threading.Lock()  # guards waiting and rows_waiting (socket thread and computing thread)
        self.waiting = 0  # calls received and not yet answered
        self.rows_waiting = 0  # their rows (autoscaling: work waiting)
        self.counts = {"calls": 0, "answered": 0, "busy": 0, "refused": 0, "failed": 0}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="expert-channel", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        return {"address": self.address, "waiting": self.waiting, "rows_waiting": self.rows_waiting, **self.counts}

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2.0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._answers_in, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(200))
                if self._answers_in in ready:
                    while self._answers_in.poll(0):
                        self._router.send_multipart(self._answers_in.recv_multipart(copy=False), copy=False)
                if self._router in ready:
                    while self._router.poll(0):
                        self._receive(self._router.recv_multipart(copy=False))
        except Exception:  # noqa: BLE001 - the thread must say why it ended
            logger.exception("the expert's channel thread failed: calls go through Serve's path")
        finally:
            for sock in (self._router, self._answers_in):
                sock.close(linger=0)

    def _receive(self, frames: list) -> None:
        """One call from `frames` ([caller identity, header, rows]): refused, or handed to the executor."""
        identity, body = frames[0], frames[1:]
        self.counts["calls"] += 1
        try:
            header, rows_ND = decode_call(body, self._secret)
        except ChannelMessageError as exc:
            self.counts["refused"] += 1
            self._router.send_multipart([identity, *encode_error(0, "refused", str(exc))])
            return
        if self.waiting >= self.max_waiting:
            self.counts["busy"] += 1
            self._router.send_multipart([identity, *encode_error(header.request_id, "busy",
                                                                 f"{self.waiting} calls wait on this replica")])
            return
        with self._lock:
            self.waiting += 1
            self.rows_waiting += rows_ND.shape[0]
        try:
            self._executor.submit(self._answer, identity, header, rows_ND)
        except RuntimeError:  # the replica is shutting its executor down: the caller tries another replica
            with self._lock:
                self.waiting -= 1
                self.rows_waiting -= rows_ND.shape[0]
            self._router.send_multipart([identity, *encode_error(header.request_id, "busy", "the replica is stopping")])

    def _answer(self, identity: zmq.Frame, header: CallHeader, rows_ND: np.ndarray) -> None:
        """Compute the call (on the executor's thread) and hand its answer (or error) to the socket thread."""
        try:
            out_ND = self._compute(header, rows_ND)
            frames = encode_answer(header.request_id, out_ND, dtype_of_wire(out_ND))  # checked by the caller
            self.counts["answered"] += 1
        except MoEAppChanged as exc:
            frames = encode_error(header.request_id, "app_changed", str(exc))
        except Exception as exc:  # noqa: BLE001 - the expert failed: the caller fails the request
            self.counts["failed"] += 1
            frames = encode_error(header.request_id, "compute", f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.waiting -= 1
            self.rows_waiting -= rows_ND.shape[0]
        self._writer().send_multipart([identity, *frames], copy=False)

    def _writer(self) -> zmq.Socket:
        """This thread's end of the answers pipe (a ZeroMQ socket belongs to one thread)."""
        writer = getattr(self._writers, "socket", None)
        if writer is None:
            writer = self._writers.socket = self._ctx.socket(zmq.PUSH)
            writer.setsockopt(zmq.SNDHWM, 0)  # never blocks the computing thread; bounded by max_waiting
            writer.setsockopt(zmq.LINGER, 0)
            writer.connect(self._pipe)
        return writer
