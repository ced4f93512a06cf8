"""Per-expert observability on the router: Ray metrics (Prometheus) and a JSON snapshot.

Exported through Ray's metrics export (Prometheus text on each node's metrics port; Ray
prefixes the names with `ray_`):

    moe_expert_rows_total{layer, expert, deployment}      token rows routed to each expert
    moe_expert_call_latency_ms{expert, deployment}        router -> expert -> router time of one call
    moe_load_imbalance{layer}                             max/mean rows per expert since start
    moe_expert_replicas{deployment}                       running replicas of each expert deployment
    moe_expert_retries{expert, deployment}                calls sent again after a replica failed

The JSON snapshot (`GET /v1/stats`) holds the same figures as seen by one router replica.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
from ray.util import metrics

__all__ = ["RouterMetrics", "load_imbalance"]

_LATENCY_BUCKETS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_RECENT_CALLS = 1000  # latency samples kept per expert for the JSON percentiles


def load_imbalance(rows_E: np.ndarray) -> float:
    """max/mean of the rows per expert; 1.0 is perfectly balanced, 0.0 when nothing was routed."""
    mean = float(rows_E.mean()) if rows_E.size else 0.0
    return float(rows_E.max()) / mean if mean > 0 else 0.0


class RouterMetrics:
    def __init__(self, layer_ids: tuple[int, ...], num_experts: int) -> None:
        self.rows_by_layer = {layer: np.zeros(num_experts, dtype=np.int64) for layer in layer_ids}
        self.latency_ms: dict[int, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=_RECENT_CALLS))
        self.calls = collections.Counter[int]()
        self._rows = metrics.Counter("moe_expert_rows", "token rows routed to each expert",
                                     tag_keys=("layer", "expert", "deployment"))
        self._latency = metrics.Histogram("moe_expert_call_latency_ms", "router->expert call time (ms)",
                                          boundaries=_LATENCY_BUCKETS_MS, tag_keys=("expert", "deployment"))
        self._imbalance = metrics.Gauge("moe_load_imbalance", "max/mean rows per expert", tag_keys=("layer",))
        self.retries = collections.Counter[int]()
        self.batches = 0
        self.phase_ms: collections.Counter[str] = collections.Counter()
        self.last_phases_ms: dict[str, float] = {}
        self._retries = metrics.Counter("moe_expert_retries", "expert calls sent again after a replica failure",
                                        tag_keys=("expert", "deployment"))
        self._replicas = metrics.Gauge("moe_expert_replicas", "running replicas per expert deployment",
                                       tag_keys=("deployment",))

    def record_plan(self, layer: int, counts: tuple[int, ...], owner: dict[tuple[int, int], str]) -> None:
        """Rows routed per expert by one request."""
        rows_E = self.rows_by_layer[layer]
        rows_E += np.asarray(counts, dtype=np.int64)
        for expert, count in enumerate(counts):
            if count:
                self._rows.inc(count, tags={"layer": str(layer), "expert": str(expert),
                                            "deployment": owner[(layer, expert)]})
        self._imbalance.set(load_imbalance(rows_E), tags={"layer": str(layer)})

    def record_call(self, expert: int, deployment: str, latency_ms: float) -> None:
        self.calls[expert] += 1
        self.latency_ms[expert].append(latency_ms)
        self._latency.observe(latency_ms, tags={"expert": str(expert), "deployment": deployment})

    def record_phases(self, **phases_ms: float) -> None:
        """Where one batch's time went on the router: route, experts (the fan-out), combine."""
        self.batches += 1
        for phase, ms in phases_ms.items():
            self.phase_ms[phase] += ms
        self.last_phases_ms = phases_ms

    def record_retry(self, expert: int, deployment: str) -> None:
        self.retries[expert] += 1
        self._retries.inc(tags={"expert": str(expert), "deployment": deployment})

    def record_replicas(self, replicas: dict[str, int]) -> None:
        for deployment, count in replicas.items():
            self._replicas.set(count, tags={"deployment": deployment})

    def snapshot(self, deployments_of_expert: dict[int, list[str]]) -> dict[str, Any]:
        layers = {str(layer): {"rows": rows_E.tolist(), "imbalance": load_imbalance(rows_E)}
                  for layer, rows_E in self.rows_by_layer.items()}
        experts = []
        for expert, deployments in sorted(deployments_of_expert.items()):
            recent = np.asarray(self.latency_ms.get(expert, ()), dtype=np.float64)
            latency = ({"p50": float(np.percentile(recent, 50)), "p99": float(np.percentile(recent, 99)),
                        "mean": float(recent.mean()), "max": float(recent.max())} if recent.size else None)
            experts.append({"expert": expert, "deployments": deployments, "calls": self.calls[expert],
                            "retries": self.retries[expert],
                            "rows": int(sum(rows_E[expert] for rows_E in self.rows_by_layer.values())),
                            "latency_ms": latency})
        phases = {"batches": self.batches, "last_ms": self.last_phases_ms,
                  "mean_ms": {k: v / self.batches for k, v in self.phase_ms.items()} if self.batches else {}}
        return {"layers": layers, "experts": experts, "router_phases": phases}
