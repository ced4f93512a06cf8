"""Per-expert autoscaling on token load.

Each expert replica reports `rows_per_s`: the token rows it computed per second over the
last `RowRate.window_s` seconds (`ExpertServer.record_autoscaling_stats`). `TokenLoadPolicy`
sizes an expert deployment from the sum over its replicas:

    replicas = ceil(sum of rows_per_s / target_rows_per_s)

Serve applies min_replicas/max_replicas, the up/down scaling factors and the delays on
top. Every expert deployment carries its own autoscaling_config, so a hot expert grows
while cold ones stay at their minimum. In a Serve config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      metrics_interval_s: 0.5          # custom metrics lag ~10 s at the default
      look_back_period_s: 2
      upscale_delay_s: 1
      downscale_delay_s: 5
      policy:
        policy_function: moe_cluster.serving.autoscaling:TokenLoadPolicy
        policy_kwargs: {target_rows_per_s: 4000}
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any

__all__ = ["RowRate", "TokenLoadPolicy", "ROWS_PER_S", "POLICY_PATH"]

ROWS_PER_S = "rows_per_s"
POLICY_PATH = "moe_cluster.serving.autoscaling:TokenLoadPolicy"


class RowRate:
    """Rows per second over a sliding window, from (time, rows) events.

    Thread-safe: the replica's event loop calls add() while Serve calls
    `record_autoscaling_stats` (hence per_second()) from a threadpool (Ray 2.60).
    """

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._rows_in_window = 0
        self._lock = threading.Lock()  # guards _events and _rows_in_window together

    def add(self, rows: int, now: float | None = None) -> None:
        with self._lock:  # the time too, so that events enter the deque in time order
            now = time.monotonic() if now is None else now
            self._events.append((now, rows))
            self._rows_in_window += rows
            self._expire(now)

    def per_second(self, now: float | None = None) -> float:
        with self._lock:
            now = time.monotonic() if now is None else now
            self._expire(now)
            return self._rows_in_window / self.window_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._rows_in_window -= self._events.popleft()[1]


class TokenLoadPolicy:
    """Serve autoscaling policy: enough replicas that each handles `target_rows_per_s`.

    Serve instantiates it once per deployment with `policy_kwargs` and calls it with an
    `AutoscalingContext` every control-loop tick.
    """

    def __init__(self, target_rows_per_s: float = 4000.0) -> None:
        if target_rows_per_s <= 0:
            raise ValueError(f"target_rows_per_s must be > 0, got {target_rows_per_s}")
        self.target_rows_per_s = float(target_rows_per_s)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get(ROWS_PER_S)
        if not per_replica:
            # No report yet (replicas starting): keep the current decision.
            return ctx.target_num_replicas, ctx.policy_state
        total = float(sum(per_replica.values()))
        desired = math.ceil(total / self.target_rows_per_s)  # Serve clamps it to min..max_replicas
        state = dict(ctx.policy_state)
        state["last_rows_per_s"] = total
        return desired, state
