"""The expert deployment: hosts some (layer, expert) pairs and computes one chunk per call.

Shape legend: N rows sent to this expert, D model dim.

A replica loads only the experts it hosts (from the checkpoint's per-expert files, or
draws them from the seed of a random model), on CUDA when Ray gave the actor a GPU and
CUDA is available, else on the CPU.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch
from ray import serve

from ..checkpoint import load_experts
from ..core.config import ModelConfig
from ..core.init import random_expert
from ..core.placement import ExpertGroup
from ..protocol.channel import CallHeader
from .args import AppArgs, ResolvedApp, uses_channel
from .autoscaling import CHANNEL_CALLS, ROWS_PER_S, ROWS_WAITING, RowRate
from .channel_server import ChannelServer
from .errors import MoEAppChanged
from .runtime import pick_device, set_torch_threads
from .tensors import from_wire, to_wire
from .transport import DirectRows

__all__ = ["ExpertServer"]


@serve.deployment  # options: DEPLOYMENT_DEFAULTS["experts"] and the config (serving/args.py)
class ExpertServer:
    """Computes Expert_{layer, expert}(x_ND) for the pairs `group.hosted`."""

    def __init__(self, app: ResolvedApp, group: ExpertGroup) -> None:
        set_torch_threads(app.args.torch_threads)
        self.group_name = group.name
        self.fingerprint = app.fingerprint  # of the weights and placement this replica was built for
        self.device = pick_device()
        self.dtype = app.config.dtype
        self.experts = {pair: module.to(self.device)
                        for pair, module in _build_experts(app.args, app.config, list(group.hosted),
                                                           dict(app.digests)).items()}
        self.calls: collections.Counter[tuple[int, int]] = collections.Counter()
        self.rows: collections.Counter[tuple[int, int]] = collections.Counter()
        self.row_rate = RowRate(window_s=2.0)
        self.compute_s = 0.0  # time spent in expert math (for stats: where the time goes)
        self.requests = 0  # calls received (each may carry several experts' rows)
        self.rows_waiting = 0  # rows of Serve calls received and not yet answered (autoscaling: work waiting)
        # Guards the counters of answered calls: Serve's calls count them on the event loop, channel calls on
        # the math thread, and stats() reads them on the loop.
        self._counting = threading.Lock()
        # The one thread that runs the expert math: calls compute one at a time, as they did on the event
        # loop, so torch's intra-op threads (set_torch_threads: a process-wide setting that new threads
        # adopt) keep their meaning and concurrent calls do not oversubscribe the replica's cores.
        self._math = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-math-{group.name}")
        # Held by every computation (`_compute`): the channel's socket thread computes a call itself when it
        # is free (serving/channel_server.py). Reentrant: that thread holds it around `_compute` too.
        self._math_lock = threading.RLock()
        # The direct channel (serving/channel_server.py), bound in record_replica_metadata (on the event loop).
        self._channel_host = (app.args.channel_host or ray.util.get_node_ip_address()) \
            if uses_channel(app.args.transport, app.args.channel_max_bytes) else None
        self._channel_secret = app.channel_secret
        # The largest call of this app: every row of a request (each token once per chosen expert), fp32 at most.
        self._max_call_bytes = app.args.max_tokens_per_request * app.config.top_k * app.config.d_model * 4
        self.channel: ChannelServer | None = None

    async def forward(self, layer: int, spans: list[tuple[int, int]], x_ND: np.ndarray | DirectRows,
                      fingerprint: str | None = None) -> np.ndarray | DirectRows:
        """out_ND for rows x_ND [N, D] in the model dtype (bf16 as uint16): the rows of each (expert, rows)
        span of `spans`, one after the other (N = the sum of rows), through that expert of `layer`.
        `fingerprint`: the caller's `ResolvedApp.fingerprint`; another one than this replica's raises
        MoEAppChanged (the rows were routed with other gates). Rows sent through a direct transport
        (DirectRows: a torch tensor, serving/transport.py) are answered the same way.

        The math runs on this replica's math thread, never on its event loop: a call that computes
        for seconds must not hold up `ping` (the router's health check), `stats` or Serve's own calls."""
        direct = isinstance(x_ND, DirectRows)  # a torch tensor in Ray's direct transport (NIXL, CUDA IPC)
        x = await x_ND.get() if direct else x_ND
        n = x.shape[0]
        modules = self._checked_modules(layer, spans, n, fingerprint)
        # Counted on the event loop only (Serve reads it from another thread: an int read is atomic).
        # A call cancelled by its caller stops counting here although its math may still finish.
        self.rows_waiting += n
        try:
            y, seconds = await asyncio.get_running_loop().run_in_executor(
                self._math, self._compute, modules, spans, x, direct)
        finally:
            self.rows_waiting -= n
        self._count(layer, spans, n, seconds)
        return DirectRows.put(y, x_ND.transport) if direct else y

    async def record_replica_metadata(self) -> dict:
        """Published to every caller through Serve (ReplicaSelection.replica_metadata): the address of this
        replica's channel socket, bound here (Serve calls this once, on the event loop, before the replica
        takes calls); {} when the app's transport uses no channel."""
        if self._channel_host is None:
            return {}
        if self.channel is None:
            self.channel = ChannelServer(self._channel_host, self._channel_secret, self._channel_call, self._math,
                                         self._math_lock, self._max_call_bytes)
        return {"channel": self.channel.address, "group": self.group_name}

    def __del__(self) -> None:
        """Serve's graceful shutdown of the replica: close the channel (its sockets and context) and the math
        thread, so that the process ends at once."""
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()
        if hasattr(self, "_math"):
            self._math.shutdown(wait=False, cancel_futures=True)

    def _channel_call(self, header: CallHeader, x_ND: np.ndarray) -> np.ndarray:
        """A call that came on the channel, on the channel's socket thread or the math thread: `forward`'s
        checks, math and counters (its rows waiting are the channel's own count)."""
        if header.dtype != self.dtype:
            raise ValueError(f"rows of dtype {header.dtype} sent to a replica of a {self.dtype} model")
        spans = list(header.spans)
        modules = self._checked_modules(header.layer, spans, x_ND.shape[0], header.fingerprint)
        y, seconds = self._compute(modules, spans, x_ND, False)
        self._count(header.layer, spans, x_ND.shape[0], seconds)
        return y

    def _checked_modules(self, layer: int, spans: list[tuple[int, int]], rows: int,
                         fingerprint: str | None) -> list[torch.nn.Module]:
        """The module of each span's expert; MoEAppChanged for another app version's rows, ValueError for an
        expert not hosted here or spans that do not cover the `rows` sent."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise MoEAppChanged(f"deployment {self.group_name} serves app version {self.fingerprint}, the rows were "
                                f"routed for version {fingerprint}: its app was redeployed with other weights or "
                                "placement")
        modules = [self._module(layer, expert) for expert, _ in spans]
        if sum(count for _, count in spans) != rows:
            raise ValueError(f"spans {spans} cover {sum(count for _, count in spans)} rows but {rows} were sent")
        return modules

    def _compute(self, modules: list[torch.nn.Module], spans: list[tuple[int, int]],
                 x_ND: np.ndarray | torch.Tensor, direct: bool) -> tuple[np.ndarray | torch.Tensor, float]:
        """(the answer, seconds of math), under the math lock (on the math thread, or the channel's socket
        thread): a torch tensor for a direct-transport call, else the wire array. Touches no counter."""
        started = time.perf_counter()
        with self._math_lock, torch.no_grad():
            # Arrays from the object store are read-only; .to(device) copies on GPU, and
            # the matmuls only read x on CPU.
            x = x_ND if direct else from_wire(np.asarray(x_ND), self.dtype)
            x = x.to(self.device, non_blocking=True)
            y = torch.cat([module(part) for module, part in zip(modules, _split(x, spans))])
            out = y if direct else to_wire(y.cpu())
        return out, time.perf_counter() - started

    def _count(self, layer: int, spans: list[tuple[int, int]], rows: int, seconds: float) -> None:
        """Record one answered call (on the event loop for Serve's calls, the math thread for the channel's)."""
        with self._counting:
            self.compute_s += seconds
            self.requests += 1
            for expert, count in spans:
                self.calls[(layer, expert)] += 1
                self.rows[(layer, expert)] += count
        self.row_rate.add(int(rows))

    def _module(self, layer: int, expert: int) -> torch.nn.Module:
        module = self.experts.get((layer, expert))
        if module is None:
            raise ValueError(f"deployment {self.group_name} does not host (layer {layer}, expert {expert}); "
                             f"it hosts {sorted(self.experts)}")
        return module

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (see autoscaling.py): token rows computed per second, rows received
        but not yet answered, and calls that came on the channel and are not yet answered (Serve does not
        see those). Serve calls it from a threadpool: RowRate and the channel's counters have locks, and
        rows_waiting is an int that only the event loop writes."""
        return {ROWS_PER_S: self.row_rate.per_second(), ROWS_WAITING: float(self._rows_waiting()),
                CHANNEL_CALLS: float(self.channel.waiting if self.channel is not None else 0)}

    def _rows_waiting(self) -> int:
        """Rows received and not yet answered: Serve's calls and the channel's."""
        return self.rows_waiting + (self.channel.rows_waiting if self.channel is not None else 0)

    async def ping(self) -> str:
        """The router's health check: answered on the event loop, which the expert math never holds."""
        return self.group_name

    async def stats(self) -> dict:
        """What this replica hosts and has done: for tests, health checks and the stats endpoint."""
        with self._counting:
            calls, rows = sorted(self.calls.items()), sorted(self.rows.items())
            compute_s, requests = self.compute_s, self.requests
        return {
            "group": self.group_name,
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "hosted": [list(p) for p in sorted(self.experts)],
            "calls": [[layer, expert, n] for (layer, expert), n in calls],
            "rows": [[layer, expert, n] for (layer, expert), n in rows],
            ROWS_PER_S: self.row_rate.per_second(),
            ROWS_WAITING: self._rows_waiting(),
            "compute_s": compute_s,
            "requests": requests,
            "channel": self.channel.stats() if self.channel is not None else None,
            "time": time.time(),
        }


def _build_experts(args: AppArgs, config: ModelConfig, pairs: list[tuple[int, int]],
                   digests: dict[str, str] | None = None) -> dict[tuple[int, int], torch.nn.Module]:
    """The hosted (layer, expert) modules. From a checkpoint, each file is checked against `digests` (the
    app's, taken when it was built) before it is read: a replica started after the directory was rewritten
    (a replacement, a scale-up) raises CheckpointChanged, so Serve reports it unhealthy with that message,
    instead of serving other weights than its app's."""
    if args.checkpoint:
        out = {}
        by_expert: dict[int, list[int]] = collections.defaultdict(list)
        for layer, expert in pairs:
            by_expert[expert].append(layer)
        for expert, layers in by_expert.items():
            out.update(load_experts(args.checkpoint, config, [expert], layers, digests=digests))
        return out
    return {(layer, expert): random_expert(config, args.seed, layer, expert) for layer, expert in pairs}


def _split(x_ND: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The rows of each span. A slice whose start is not 64-byte aligned is copied: GEMM kernels may
    block differently on unaligned data, and every expert must compute exactly what it would alone."""
    pieces, start = [], 0
    for _, rows in spans:
        piece = x_ND[start:start + rows]
        pieces.append(piece if piece.data_ptr() % 64 == 0 else piece.clone())
        start += rows
    return pieces
