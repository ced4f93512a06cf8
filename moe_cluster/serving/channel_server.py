"""The expert replica's end of a direct channel: a ZeroMQ ROUTER socket answered by a thread of its own.

Shape legend: N rows of one expert call, D model dim.

The socket thread receives each call (protocol/channel.py), checks it (the secret, the header,
the sizes), refuses it with `busy` when `max_waiting` calls already wait, and hands it to the
replica's event loop, where the expert's own `forward` runs it exactly as a Serve call (the same
answer checks, fingerprint check, autoscaling counters, and the math on the math thread). The
answer comes back to the socket thread through an inproc pipe: a ZeroMQ socket is used by one
thread only (the ROUTER and the pipe's reader by the socket thread, the pipe's writer by the loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Awaitable, Callable

import numpy as np
import zmq

from ..protocol.channel import (CallHeader, ChannelMessageError, decode_call, dtype_of_wire, encode_answer,
                                encode_error)
from .errors import MoEAppChanged

__all__ = ["ChannelServer", "MAX_WAITING"]

logger = logging.getLogger("ray.serve")

MAX_WAITING = 64  # calls received and not yet answered; more are refused with `busy` (the caller tries elsewhere)
_pipes = itertools.count()

Handler = Callable[[CallHeader, np.ndarray], Awaitable[np.ndarray]]


class ChannelServer:
    """Binds tcp://`host`:<random port> and answers calls with `handler` (a coroutine run on `loop`)."""

    def __init__(self, host: str, secret: str, handler: Handler, loop: asyncio.AbstractEventLoop,
                 max_waiting: int = MAX_WAITING) -> None:
        self._secret, self._handler, self._loop, self.max_waiting = secret, handler, loop, max_waiting
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        pipe = f"inproc://channel-answers-{next(_pipes)}"
        self._answers_in = self._ctx.socket(zmq.PULL)
        self._answers_in.bind(pipe)
        self._answers_out = self._ctx.socket(zmq.PUSH)  # written on the event loop only
        self._answers_out.setsockopt(zmq.SNDHWM, 0)  # never blocks the loop; bounded by max_waiting
        self._answers_out.connect(pipe)
        self.waiting = 0  # calls handed to the loop and not yet answered (the socket thread's own counter)
        self.counts = {"calls": 0, "answered": 0, "busy": 0, "refused": 0, "failed": 0}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="expert-channel", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        return {"address": self.address, "waiting": self.waiting, **self.counts}

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
                        self.waiting -= 1
                if self._router in ready:
                    while self._router.poll(0):
                        self._receive(self._router.recv_multipart(copy=False))
        except Exception:  # noqa: BLE001 - the thread must say why it ended
            logger.exception("the expert's channel thread failed: calls go through Serve's path")
        finally:
            for sock in (self._router, self._answers_in):
                sock.close(linger=0)

    def _receive(self, frames: list) -> None:
        """One call from `frames` ([caller identity, header, rows]): refused, or handed to the loop."""
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
        self.waiting += 1
        asyncio.run_coroutine_threadsafe(self._answer(identity, header, rows_ND), self._loop)

    async def _answer(self, identity: zmq.Frame, header: CallHeader, rows_ND: np.ndarray) -> None:
        """Run the call on the event loop and hand its answer (or error) to the socket thread."""
        try:
            out_ND = await self._handler(header, rows_ND)
            frames = encode_answer(header.request_id, out_ND, dtype_of_wire(out_ND))  # checked by the caller
            self.counts["answered"] += 1
        except MoEAppChanged as exc:
            frames = encode_error(header.request_id, "app_changed", str(exc))
        except Exception as exc:  # noqa: BLE001 - the expert failed: the caller fails the request
            self.counts["failed"] += 1
            frames = encode_error(header.request_id, "compute", f"{type(exc).__name__}: {exc}")
        self._answers_out.send_multipart([identity, *frames], copy=False)
