"""Concurrent HTTP load with every answer checked against the oracle (for the fault tests).

    pool = request_pool(model, seed=0)
    with Load(url, pool, clients=8) as load:
        ...                                   # kill things meanwhile
    summary = summarize(load.outcomes)

Each client thread has its own MoEClient (one keep-alive connection) and sends requests
drawn from a pool of (x, layer, expected) precomputed with `reference_forward`, so the
clients spend no CPU on the oracle while they run. Every request gets an Outcome: an
exception of any kind (a reset connection, a truncated body, a decode error, a KeyError in
the reply) is recorded as a failure with its type, and the client goes on with the next
request, so no failure is lost with a dead thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_cluster.client import MoEClient, MoEHTTPError
from moe_cluster.core.reference import reference_forward

__all__ = ["Outcome", "Load", "request_pool", "summarize", "first_success_after", "CLEAR_ERRORS",
           "WRONG_ANSWER", "CLIENT_ERROR"]

WRONG_ANSWER = -1  # the status recorded for a 200 whose output differs from the oracle
CLIENT_ERROR = 0  # the status recorded when the client raised: refused, reset, timeout, bad body, ...
# What a failed request may say: our router's JSON errors (the client returns their "error" text).
CLEAR_ERRORS = {503: "ExpertCallError: ", 504: "DeadlineExceeded: "}


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    finished: float
    status: int  # 200, an HTTP error status, WRONG_ANSWER or CLIENT_ERROR
    message: str = ""  # for CLIENT_ERROR: "<exception type>: <text>"

    @property
    def kind(self) -> str:
        """ok, wrong, http_<status> or the type of the exception the client raised."""
        if self.status == 200:
            return "ok"
        if self.status == WRONG_ANSWER:
            return "wrong"
        if self.status == CLIENT_ERROR:
            return self.message.partition(":")[0]
        return f"http_{self.status}"


def request_pool(model, size: int = 48, max_tokens: int = 64, seed: int = 0) -> list[tuple]:
    """`size` requests (x [T, D] float32 numpy, layer, oracle y) with T in 1..max_tokens."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(size):
        layer = model.config.moe_layer_ids[i % len(model.config.moe_layer_ids)]
        x = rng.standard_normal((int(rng.integers(1, max_tokens + 1)), model.config.d_model)).astype(np.float32)
        pool.append((x, layer, reference_forward(model, torch.from_numpy(x), layer).numpy()))
    return pool


@dataclass
class Load:
    """`clients` threads sending requests from `pool` to `url` until the with-block ends."""

    url: str
    pool: list[tuple]
    clients: int = 8
    token: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __enter__(self) -> "Load":
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed,), daemon=True)
                         for seed in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with MoEClient(self.url, timeout=60, token=self.token) as client:
            while not self._stop.is_set():
                x, layer, expected = rng.choice(self.pool)
                started = time.monotonic()
                status, message = self._one(client, x, layer, expected)
                self.outcomes.append(Outcome(started, time.monotonic(), status, message))  # atomic in CPython

    @staticmethod
    def _one(client: MoEClient, x: np.ndarray, layer: int, expected: np.ndarray) -> tuple[int, str]:
        """(status, message) of one request; never raises (a raised exception is a failure too)."""
        request = f"T={x.shape[0]} layer={layer}"
        try:
            y = client.forward(x, layer)
            if y.shape != expected.shape:
                return WRONG_ANSWER, f"{request}: shape {list(y.shape)}, expected {list(expected.shape)}"
            if not np.allclose(y, expected, rtol=1e-5, atol=1e-5):
                return WRONG_ANSWER, f"{request}: max abs difference {np.abs(y - expected).max():.3g}"
            return 200, ""
        except MoEHTTPError as exc:
            return exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - any exception is a failed request, recorded with its type
            return CLIENT_ERROR, f"{type(exc).__name__}: {exc}"


def first_success_after(outcomes: list[Outcome], moment: float) -> float | None:
    """Seconds from `moment` until the first success of a request sent after it (None: none)."""
    finished = [o.finished for o in outcomes if o.status == 200 and o.started >= moment]
    return min(finished) - moment if finished else None


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts by kind (ok, wrong, http_503, ConnectionResetError, ...), the success rate, and the
    unclear failures (anything but a 200 or a clear 503/504): their count and the first few."""
    ok = sum(o.status == 200 for o in outcomes)
    clear, unclear = [], []
    for o in outcomes:
        if o.status != 200:
            (clear if o.message.startswith(CLEAR_ERRORS.get(o.status, "\0")) else unclear).append(o)
    latencies = sorted(o.finished - o.started for o in outcomes if o.status == 200)
    return {
        "requests": len(outcomes), "ok": ok, "success_rate": ok / max(len(outcomes), 1),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "clear_errors": len(clear), "wrong_answers": sum(o.status == WRONG_ANSWER for o in outcomes),
        "unclear": [(o.kind, o.message[:200]) for o in unclear[:5]], "unclear_count": len(unclear),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "max_s": latencies[-1] if latencies else None,
    }
