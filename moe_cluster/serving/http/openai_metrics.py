"""What a serving dashboard reads of a runner's OpenAI API: Ray metrics, exported in Prometheus format
by Ray's metrics export on every node, as the router's are (serving/metrics.py; Ray prefixes `ray_`).

    moe_runner_time_to_first_token_seconds{model}     histogram  request arrival -> its first token
    moe_runner_time_per_output_token_seconds{model}   histogram  (last token - first token) / (tokens - 1)
    moe_runner_e2e_request_latency_seconds{model}     histogram  request arrival -> its last token
    moe_runner_requests_running{model}                gauge      sequences in the decode loop's steps
    moe_runner_requests_waiting{model}                gauge      sequences queued for a step
    moe_runner_prompt_tokens{model}                   counter    prompt tokens prefilled
    moe_runner_generation_tokens{model}               counter    tokens generated
    moe_runner_requests_finished{model, reason}       counter    stop | length | error | abort (client gone)

A "request" here is one sequence of the decode loop: one choice of an answer (a request with 3
prompts and n = 2 is 6), as vLLM counts the sequences of its engine. Times are seconds from the
moment the answer began (its arrival on the runner, tokenizing included), on the monotonic clock.
"""

from __future__ import annotations

import time

from ray.util import metrics

from ...engine.scheduler import Event

__all__ = ["RunnerMetrics", "AnswerClock"]

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards made for it read these the same way
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0]
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0]


class RunnerMetrics:
    """The Ray metrics of one runner replica's OpenAI API, tagged with the served model's name."""

    def __init__(self, model: str) -> None:
        tags = ("model",)
        self.ttft = metrics.Histogram("moe_runner_time_to_first_token_seconds", "request arrival to its first "
                                      "token (s)", boundaries=TTFT_BUCKETS_S, tag_keys=tags)
        self.tpot = metrics.Histogram("moe_runner_time_per_output_token_seconds", "mean time between a request's "
                                      "tokens after the first (s)", boundaries=TPOT_BUCKETS_S, tag_keys=tags)
        self.e2e = metrics.Histogram("moe_runner_e2e_request_latency_seconds", "request arrival to its last "
                                     "token (s)", boundaries=E2E_BUCKETS_S, tag_keys=tags)
        self.running = metrics.Gauge("moe_runner_requests_running", "sequences in the decode loop's steps",
                                     tag_keys=tags)
        self.waiting = metrics.Gauge("moe_runner_requests_waiting", "sequences waiting for a step", tag_keys=tags)
        self.prompt_tokens = metrics.Counter("moe_runner_prompt_tokens", "prompt tokens prefilled", tag_keys=tags)
        self.generation_tokens = metrics.Counter("moe_runner_generation_tokens", "tokens generated", tag_keys=tags)
        self.finished = metrics.Counter("moe_runner_requests_finished", "requests (sequences) ended, by reason: "
                                        "stop, length, error, abort", tag_keys=("model", "reason"))
        for metric in (self.ttft, self.tpot, self.e2e, self.running, self.waiting, self.prompt_tokens,
                       self.generation_tokens, self.finished):
            metric.set_default_tags({"model": model})

    def load(self, running: int, waiting: int) -> None:
        """The decode loop's `on_load`: its sequences running and waiting, at each step boundary."""
        self.running.set(running)
        self.waiting.set(waiting)

    def answer(self) -> AnswerClock:
        """The clock of an answer, started now (its arrival)."""
        return AnswerClock(self)


class AnswerClock:
    """The times and tokens of one answer's sequences: `start(prompt_lengths)` once they are submitted,
    `event(i, event)` for each of their events, `close()` when the answer is over (sequences that did
    not end then are counted as aborted: the client went away)."""

    def __init__(self, metrics_: RunnerMetrics) -> None:
        self.metrics = metrics_
        self.arrived = time.monotonic()
        self.prompts: list[int] = []
        self.first: list[float | None] = []  # when each sequence's first event came
        self.tokens: list[int] = []
        self.open: set[int] = set()

    def start(self, prompt_lengths: list[int]) -> None:
        self.prompts, self.open = prompt_lengths, set(range(len(prompt_lengths)))
        self.first, self.tokens = [None] * len(prompt_lengths), [0] * len(prompt_lengths)

    def event(self, i: int, event: Event) -> None:
        now, m = time.monotonic(), self.metrics
        if self.first[i] is None and event.error is None:
            self.first[i] = now  # its prefill is done: the prompt is in, the first token (if any) out
            m.prompt_tokens.inc(self.prompts[i])
            m.ttft.observe(now - self.arrived)
        if event.token_id is not None:
            self.tokens[i] += 1
            m.generation_tokens.inc()
        if event.last and i in self.open:
            self.open.discard(i)
            self._ended(i, now, "error" if event.error is not None else event.finish_reason)

    def close(self) -> None:
        now = time.monotonic()
        for i in sorted(self.open):
            self._ended(i, now, "abort")
        self.open.clear()

    def _ended(self, i: int, now: float, reason: str) -> None:
        m = self.metrics
        m.finished.inc(tags={"reason": reason})
        if reason in ("stop", "length"):  # the latencies of answers that completed
            m.e2e.observe(now - self.arrived)
            if self.tokens[i] > 1:
                m.tpot.observe((now - self.first[i]) / (self.tokens[i] - 1))
