"""Per-expert autoscaling on token load and on the work waiting.

Each expert replica reports three custom metrics (`ExpertServer.record_autoscaling_stats`):
`rows_per_s`, the token rows it computed per second over the last `RowRate.window_s`
seconds, `rows_waiting`, the rows of the calls it has received and not yet answered, and
`channel_calls`, the calls that came on its direct channel (serving/channel.py) and are not
yet answered. Serve itself counts the calls of a deployment that take its request path:
queued at the callers' handles and ongoing in its replicas
(`AutoscalingContext.total_num_requests`); channel calls never pass through Serve, so the
replicas count them. `TokenLoadPolicy` asks for enough replicas for whichever demand is larger:

    by rows  = ceil((sum of rows_per_s + sum of rows_waiting / drain_s) / target_rows_per_s)
    by calls = ceil((calls queued or ongoing + sum of channel_calls) / target_ongoing_requests)
    replicas = max(by rows, by calls)

So a saturated deployment (calls waiting beyond `target_ongoing_requests` per replica, Serve's
own autoscaling_config field, default 2) grows whatever rows per second its replicas manage,
and a deployment never drops to 0 replicas while a call waits for it. With
`min_replicas: 0`, the first call to an idle deployment waits at the router's handle; Serve
sees it queued and starts a replica (its cold-start path, then this rule keeps it), and the
call is answered once the replica is up, or fails with 504 at the request's deadline
(`request_timeout_s`: give it room for a replica's start). Without reports yet (replicas
starting) the rows part keeps the current target.

Serve applies min_replicas/max_replicas, the up/down scaling factors and the delays on
top. Every expert deployment carries its own autoscaling_config, so a hot expert grows
while cold ones stay at their minimum. In a Serve config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 2       # calls per replica (queued or computing) before it grows
      metrics_interval_s: 0.5          # custom metrics lag ~10 s at the default
      look_back_period_s: 2
      upscale_delay_s: 1
      downscale_delay_s: 5
      policy:
        policy_function: moe_cluster.serving.autoscaling:TokenLoadPolicy
        policy_kwargs: {target_rows_per_s: 4000, drain_s: 1.0}
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any

__all__ = ["RowRate", "TokenLoadPolicy", "ROWS_PER_S", "ROWS_WAITING", "CHANNEL_CALLS", "POLICY_PATH"]

ROWS_PER_S = "rows_per_s"
ROWS_WAITING = "rows_waiting"
CHANNEL_CALLS = "channel_calls"
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0  # Serve's own default for autoscaling_config.target_ongoing_requests
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
    """Serve autoscaling policy: enough replicas for the rows computed and the work waiting.

    Serve instantiates it once per deployment with `policy_kwargs` and calls it with an
    `AutoscalingContext` every control-loop tick. `target_rows_per_s`: the rows one replica
    should compute per second; `drain_s`: how soon rows waiting in the replicas should be done,
    at that rate. The calls per replica come from the autoscaling_config's
    `target_ongoing_requests`. The rule is in the module docstring.
    """

    def __init__(self, target_rows_per_s: float = 4000.0, drain_s: float = 1.0) -> None:
        if target_rows_per_s <= 0:
            raise ValueError(f"target_rows_per_s must be > 0, got {target_rows_per_s}")
        if drain_s <= 0:
            raise ValueError(f"drain_s must be > 0, got {drain_s}")
        self.target_rows_per_s = float(target_rows_per_s)
        self.drain_s = float(drain_s)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        by_rows, rows_demand = self._by_rows(ctx)
        on_channels = sum(((ctx.aggregated_metrics or {}).get(CHANNEL_CALLS) or {}).values())
        calls = float(ctx.total_num_requests or 0.0) + float(on_channels)
        by_calls = math.ceil(calls / _target_ongoing_requests(ctx))
        state = dict(ctx.policy_state)
        state.update(last_rows_demand=rows_demand, last_calls=calls)
        # Serve clamps it to min..max_replicas and applies the factors and delays.
        return max(by_rows, by_calls), state

    def _by_rows(self, ctx: Any) -> tuple[int, float | None]:
        """(replicas for the rows computed and waiting, that demand in rows/s); without any report
        yet (replicas starting) the current target, and None."""
        metrics = ctx.aggregated_metrics or {}
        computed, waiting = metrics.get(ROWS_PER_S), metrics.get(ROWS_WAITING)
        if not computed and not waiting:
            return ctx.target_num_replicas, None
        demand = sum((computed or {}).values()) + sum((waiting or {}).values()) / self.drain_s
        return math.ceil(demand / self.target_rows_per_s), float(demand)


def _target_ongoing_requests(ctx: Any) -> float:
    """Calls one replica should hold (queued or computing): the deployment's autoscaling_config."""
    target = getattr(ctx.config, "target_ongoing_requests", None)
    return float(target) if target else DEFAULT_TARGET_ONGOING_REQUESTS
