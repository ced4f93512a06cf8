"""Coalescing at the router: concurrent requests for one layer become one token batch.

Shape legend: T tokens of one request, B tokens of a merged batch, D model dim.

32 concurrent requests of 128 tokens then cost one round of expert calls (one call per
expert for 4096 rows) instead of 32 rounds. A request that finds the layer idle starts
at once, so a lone client pays no waiting; requests that arrive while a batch is in
flight queue up and leave together in the next batch. When the previous batch merged
several requests (there is concurrency), the next batch waits until as many requests are
queued as were active last time (the last batch plus those that queued meanwhile), at
most `wait_s` or 5% of the last batch's run time if that is longer: concurrent clients
whose answers came back together send their next requests some ms apart, and should
travel together again rather than split into alternating half batches.

That expectation is a guess about clients that were active a moment ago, so a request that
finds the layer idle waits for the others only while they keep arriving: at most twice the
largest gap between arrivals seen in the last merged batch (+1 ms). A lone request after a
burst thus starts (almost) at once instead of waiting `wait_s` for stragglers that never come.

A merged batch is computed in the model's dtype and each request gets its answer in its
own dtype, exactly as if it had run alone (the router casts a lone request to the model
dtype too): an fp32 request merged behind an fp16 one is not computed in fp16.
No Ray here: the router passes in its distributed forward as `run`.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from ..core.dispatch import DispatchPlan, expert_counts

__all__ = ["Coalescer", "MergedBatchError"]

RunBatch = Callable[[torch.Tensor, int], Awaitable[tuple[torch.Tensor, DispatchPlan]]]


class MergedBatchError(RuntimeError):
    """`run` answered a merged batch with the wrong shape: every request of the batch fails (500)."""


@dataclass
class _Pending:
    x_TD: torch.Tensor
    future: asyncio.Future
    arrived_s: float  # loop time of submit: the pace of arrivals bounds the wait after idle
    batch_task: asyncio.Task | None = None  # the merged batch it rides in, once taken
    batch: list["_Pending"] = field(default_factory=list)


class Coalescer:
    """Merges concurrent requests of a layer; `run(x_BD, layer) -> (y_BD, plan)` computes a batch.

    `dtype` is the model's dtype: every batch is sent to `run` in it (x_BD.dtype == dtype).
    """

    def __init__(self, run: RunBatch, dtype: torch.dtype, max_batch_tokens: int, wait_s: float = 0.01) -> None:
        self.run = run
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.wait_s = wait_s
        self._queues: dict[int, collections.deque[_Pending]] = collections.defaultdict(collections.deque)
        self._busy: set[int] = set()
        self._expected: dict[int, int] = collections.defaultdict(int)  # requests active last round
        self._last_batch_s: dict[int, float] = collections.defaultdict(float)
        self._arrival_gap_s: dict[int, float] = collections.defaultdict(float)  # widest, last batch
        self.batches = 0  # merged batches run so far (for stats and tests)
        self.recent_sizes: collections.deque[int] = collections.deque(maxlen=32)  # requests per batch
        self.requests = 0

    async def submit(self, x_TD: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[int]]:
        """(y_TD, rows per expert of this request), as if the request had run alone."""
        loop = asyncio.get_running_loop()
        pending = _Pending(x_TD, loop.create_future(), loop.time())
        self._queues[layer].append(pending)
        if layer not in self._busy:
            self._busy.add(layer)
            asyncio.create_task(self._drain(layer))
        try:
            return await pending.future
        except asyncio.CancelledError:  # e.g. the request's deadline passed
            self._abandon(pending)
            raise

    @staticmethod
    def _abandon(pending: _Pending) -> None:
        """A cancelled request leaves its queue (see _take); a batch all of whose requests were
        cancelled is cancelled too, so that it stops holding the layer (and its expert calls)."""
        if pending.batch_task is not None and all(p.future.done() for p in pending.batch):
            pending.batch_task.cancel()

    async def _drain(self, layer: int) -> None:
        queue = self._queues[layer]
        idle_gap_s = None  # the layer was idle: stragglers must keep coming within this gap
        if self._expected[layer] > 1:
            idle_gap_s = 2 * self._arrival_gap_s[layer] + 0.001
        try:
            while queue:
                limit_s = max(self.wait_s, 0.05 * self._last_batch_s[layer])
                await self._wait_for_stragglers(queue, self._expected[layer], limit_s, idle_gap_s)
                idle_gap_s = None  # later rounds: the active clients are waiting for this batch's answers
                batch = self._take(queue)
                if not batch:
                    continue
                started = asyncio.get_running_loop().time()
                await self._run_batch(batch, layer)
                self._last_batch_s[layer] = asyncio.get_running_loop().time() - started
                self._expected[layer] = len(batch) + len(queue)
                self._arrival_gap_s[layer] = _widest_gap_s(batch)
        finally:
            self._busy.discard(layer)

    async def _wait_for_stragglers(self, queue: collections.deque[_Pending], expected: int,
                                   limit_s: float, idle_gap_s: float | None) -> None:
        """Under concurrency, wait (<= limit_s) until `expected` requests or a full batch are queued;
        after idle (idle_gap_s set), also stop once no request arrived for idle_gap_s: the burst is over."""
        if expected <= 1 or self.wait_s <= 0:
            return  # a lone client never waits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while (len(queue) < expected and self._queued_tokens(queue) < self.max_batch_tokens
               and loop.time() < deadline):
            if idle_gap_s is not None and loop.time() - queue[-1].arrived_s > idle_gap_s:
                return
            await asyncio.sleep(0.0005)

    def _take(self, queue: collections.deque[_Pending]) -> list[_Pending]:
        """The first live request, then more while they fit in max_batch_tokens; cancelled ones drop out."""
        batch: list[_Pending] = []
        tokens = 0
        while queue:
            if queue[0].future.done():
                queue.popleft()
                continue
            if batch and tokens + queue[0].x_TD.shape[0] > self.max_batch_tokens:
                break
            tokens += queue[0].x_TD.shape[0]
            batch.append(queue.popleft())
        return batch

    @staticmethod
    def _queued_tokens(queue: collections.deque[_Pending]) -> int:
        return sum(p.x_TD.shape[0] for p in queue)

    async def _run_batch(self, batch: list[_Pending], layer: int) -> None:
        self.batches += 1
        self.requests += len(batch)
        self.recent_sizes.append(len(batch))
        try:
            x_BD = self._merge(batch)
            task = asyncio.ensure_future(self.run(x_BD, layer))
            for pending in batch:
                pending.batch_task, pending.batch = task, batch
            y_BD, plan = await task
            _check_batch_output(y_BD, x_BD, layer, len(batch))
        except asyncio.CancelledError:  # every request of the batch was cancelled (_abandon)
            for pending in batch:
                pending.future.cancel()
            return
        except Exception as exc:  # noqa: BLE001 - every request of the batch fails the same way
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            stop = start + pending.x_TD.shape[0]
            if not pending.future.done():  # the caller may have been cancelled
                result = y_BD[start:stop].to(pending.x_TD.dtype)
                pending.future.set_result((result, expert_counts(plan, start, stop)))
            start = stop

    def _merge(self, batch: list[_Pending]) -> torch.Tensor:
        """x_BD: the requests' rows one after the other, in the model dtype (no copy for a lone
        request already in it). Casting up to fp32 is exact; each request's own dtype comes back
        when its answer is cut out."""
        if len(batch) == 1:
            return batch[0].x_TD.to(self.dtype)
        return torch.cat([p.x_TD.to(self.dtype) for p in batch])


def _widest_gap_s(batch: list[_Pending]) -> float:
    """The largest time between consecutive arrivals of a batch's requests (0 for a lone one)."""
    times = sorted(p.arrived_s for p in batch)
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _check_batch_output(y_BD: torch.Tensor, x_BD: torch.Tensor, layer: int, requests: int) -> None:
    """MergedBatchError unless y_BD is a tensor of x_BD's shape: cutting a short answer back into
    requests would give the last ones too few rows, or none, with no error."""
    if not isinstance(y_BD, torch.Tensor) or tuple(y_BD.shape) != tuple(x_BD.shape):
        got = list(y_BD.shape) if isinstance(y_BD, torch.Tensor) else type(y_BD).__name__
        raise MergedBatchError(f"the distributed forward answered a merged batch of {requests} request(s) for "
                               f"layer {layer} with {got} for input {list(x_BD.shape)}: every request of the "
                               "batch failed, none got a partial answer; this is a bug in the router, "
                               "report it with the router's log")
