"""The expert replica's end of a direct channel: a ZeroMQ ROUTER socket answered by a thread of its own.

Shape legend: N rows of one expert call, D model dim.

The socket thread receives each call (protocol/channel.py), checks it (the secret, the header,
the sizes) and refuses it with `busy` when `max_waiting` calls already wait. `compute` checks and
answers it as Serve's `forward` would (the same fingerprint and dtype checks, the same counters),
holding the replica's math lock (every computation of the replica holds it, one at a time):
  - the math is idle (the lock is free), no call waits for the math thread (calls keep their order)
    and the replica's previous call computed within `INLINE_MAX_S`: the socket thread computes the call itself and sends the answer, no thread
    hand-off at all; this is a decoding step's case, where latency is all;
  - else: the call goes to the replica's math thread (the one-thread executor Serve's calls compute
    on) and waits there, counted (`waiting`, `rows_waiting`: autoscaling sees it), while the socket
    thread goes on receiving (and refusing beyond `max_waiting`). A socket thread busy with a long
    computation would leave the calls behind it unseen in the socket's queue, hence the limit.
The event loop is never on this path, so a call never waits behind Serve's own work on it. An
answer computed on the math thread comes back to the socket thread through an inproc pipe: a
ZeroMQ socket is used by one thread only (the ROUTER and the pipe's reader by the socket thread,
the pipe's writer by the executor's one thread).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np
import zmq

from ..protocol.channel import (CallHeader, ChannelMessageError, decode_call, dtype_of_wire, encode_answer,
                                encode_error)
from .errors import MoEAppChanged

__all__ = ["ChannelServer", "MAX_WAITING", "INLINE_MAX_S"]

logger = logging.getLogger("ray.serve")

MAX_WAITING = 64  # calls received and not yet answered; more are refused with `busy` (the caller tries elsewhere)
INLINE_MAX_S = 0.005  # the socket thread computes a call itself only after calls that took at most this long
_pipes = itertools.count()

Compute = Callable[[CallHeader, np.ndarray], np.ndarray]  # out_ND for a call's rows x_ND, or raises


class ChannelServer:
    """Binds tcp://`host`:<random port> and answers calls with `compute`: on the socket thread when
    `math_lock` (a threading.RLock that `compute` and every other computation of the replica hold) is
    free, else on `executor` (of one thread: the pipe's writer socket is that thread's)."""

    def __init__(self, host: str, secret: str, compute: Compute, executor: Executor, math_lock: Any,
                 max_message_bytes: int, max_waiting: int = MAX_WAITING) -> None:
        self._secret, self._compute, self._executor, self.max_waiting = secret, compute, executor, max_waiting
        self._math_lock = math_lock
        self._last_compute_s = 0.0  # how long the previous call computed (written by whichever thread did)
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # The socket listens on the node's address: a frame larger than any call of this app is dropped (with its
        # connection) by ZeroMQ before it is read, so that nobody can make the replica hold gigabytes unasked.
        self._router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        pipe = f"inproc://channel-answers-{next(_pipes)}"
        self._answers_in = self._ctx.socket(zmq.PULL)
        self._answers_in.bind(pipe)
        self._answers_out = self._ctx.socket(zmq.PUSH)  # used on the executor's thread only
        self._answers_out.setsockopt(zmq.SNDHWM, 0)  # never blocks the math thread; bounded by max_waiting
        self._answers_out.connect(pipe)
        self._lock = threading.Lock()  # guards waiting, rows_waiting and counts (socket and math threads)
        self.waiting = 0  # calls received and not yet answered (computing on either thread, or queued)
        self.rows_waiting = 0  # their rows (autoscaling: work waiting)
        self.counts = {"calls": 0, "answered": 0, "inline": 0, "busy": 0, "refused": 0, "failed": 0}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="expert-channel", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        with self._lock:
            return {"address": self.address, "waiting": self.waiting, "rows_waiting": self.rows_waiting, **self.counts}

    def close(self) -> None:
        """Stop the socket thread and close every socket (a context with open sockets would hang at exit). The
        pipe's writer belongs to the executor's thread: it closes it there, after any answer it is sending."""
        self._closed.set()
        self._thread.join(timeout=2.0)
        try:
            self._executor.submit(self._answers_out.close, 0).result(timeout=10)
        except Exception:  # noqa: BLE001 - the executor is already shut down: no thread uses the writer any more
            self._answers_out.close(linger=0)
        self._ctx.term()

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
        """One call from `frames` ([caller identity, header, rows]): refused, computed here, or handed to the
        executor (the module docstring says when)."""
        identity, body = frames[0], frames[1:]
        self._count("calls")
        try:
            header, rows_ND = decode_call(body, self._secret)
        except ChannelMessageError as exc:
            self._count("refused")
            self._router.send_multipart([identity, *encode_error(0, "refused", str(exc))])
            return
        if self.waiting >= self.max_waiting:
            self._count("busy")
            self._router.send_multipart([identity, *encode_error(header.request_id, "busy",
                                                                 f"{self.waiting} calls wait on this replica")])
            return
        with self._lock:
            # The socket thread computes only when nothing waits for the math thread (calls keep their order).
            inline = self.waiting == 0 and self._last_compute_s <= INLINE_MAX_S
            self.waiting += 1
            self.rows_waiting += rows_ND.shape[0]
        if inline and self._math_lock.acquire(blocking=False):  # the math is idle: compute here, no hand-off
            try:
                self._count("inline")
                frames = self._answer_frames(header, rows_ND)
            finally:
                self._math_lock.release()
            self._done(rows_ND)
            self._router.send_multipart([identity, *frames], copy=False)
            return
        try:
            self._executor.submit(self._answer, identity, header, rows_ND)
        except RuntimeError:  # the replica is shutting its executor down: the caller tries another replica
            self._done(rows_ND)
            self._router.send_multipart([identity, *encode_error(header.request_id, "busy", "the replica is stopping")])

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _done(self, rows_ND: np.ndarray) -> None:
        """A call answered (or refused after all): it waits no more."""
        with self._lock:
            self.waiting -= 1
            self.rows_waiting -= rows_ND.shape[0]

    def _answer(self, identity: zmq.Frame, header: CallHeader, rows_ND: np.ndarray) -> None:
        """Compute a call that waited (on the executor's thread) and hand its answer to the socket thread."""
        frames = self._answer_frames(header, rows_ND)
        self._done(rows_ND)
        self._answers_out.send_multipart([identity, *frames], copy=False)

    def _answer_frames(self, header: CallHeader, rows_ND: np.ndarray) -> list:
        """The frames of the answer to a call, or of its error: `compute` never raises out of here. Its time
        is taken inside the math lock: waiting for another computation is not this call's slowness."""
        try:
            with self._math_lock:
                started = time.perf_counter()
                try:
                    out_ND = self._compute(header, rows_ND)
                finally:
                    self._last_compute_s = time.perf_counter() - started
            frames = encode_answer(header.request_id, out_ND, dtype_of_wire(out_ND))  # checked by the caller
            self._count("answered")
            return frames
        except MoEAppChanged as exc:
            return encode_error(header.request_id, "app_changed", str(exc))
        except Exception as exc:  # noqa: BLE001 - the expert failed: the caller fails the request
            self._count("failed")
            return encode_error(header.request_id, "compute", f"{type(exc).__name__}: {exc}")
