#!/usr/bin/env python
"""Soak test: minutes of bounded load on loopback, every answer checked against the oracle.

    .venv/bin/python scripts/soak.py                          # start the default app, 300 s, 8 clients
    .venv/bin/python scripts/soak.py --duration-s 60 --clients 4 --report soak.json
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000   # a running server (no process figures)

By default it starts an embedded local Ray cluster with the app of a Serve config file
(`deployments/default.yaml`: the tiny preset), like `moe-cluster serve`. `--clients`
threads each send one request at a time (a closed loop: the load is bounded), drawn from
a pool of requests whose answers were computed in-process with `reference_forward`. At
the start and at the end it records the RSS, the open file descriptors and the TCP
connections of every Ray process of the app (router, experts, proxy, controller, raylet,
GCS) and the object store's usage, and prints them with the request counts: growth of any
of them over a long soak is a leak (the direct channels of `--transport channel` keep one
socket per router-replica pair, and must not add one per call). It exits 1 if any answer was
wrong or any request failed. Every socket of the app it starts is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from moe_cluster import MoEModel, preset_config  # noqa: E402
from moe_cluster.client import MoEClient, MoEHTTPError  # noqa: E402
from moe_cluster.tools.ports import free_port  # noqa: E402
from moe_cluster.core.reference import reference_forward  # noqa: E402
from moe_cluster.checkpoint import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long to send requests (default 300)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one request each at a time")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request: 1..this (default 64)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of the app this script starts "
                                                             "(default: a free one)")
    parser.add_argument("--config", type=Path, default=ROOT / "deployments" / "default.yaml",
                        help="Serve config file of the app to start (default: deployments/default.yaml)")
    parser.add_argument("--transport", choices=("auto", "object_store", "by_value", "nixl", "cuda_ipc", "channel"),
                        help="the app's transport of rows to the experts (default: the config's)")
    parser.add_argument("--url", help="soak a running server instead of starting one (RSS and object store "
                                      "figures need the cluster to be this script's)")
    parser.add_argument("--token-env", help="environment variable holding the bearer token, if auth is on")
    parser.add_argument("--report-every-s", type=float, default=30.0, help="progress line interval")
    parser.add_argument("--report", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


# --- the app and its oracle -----------------------------------------------------------------

def start_app(config: Path, port: int, transport: str | None = None) -> str:
    """Start Ray and the app of `config` on 127.0.0.1:port (its `transport` replaced if given); returns its URL."""
    from ray import serve

    from moe_cluster.serving.app import build_app
    from moe_cluster.serving.local import read_serve_config
    from moe_cluster.serving.runtime import start_local_serve

    file_app = read_serve_config(config)
    port = port or free_port()
    start_local_serve(("127.0.0.1", port))
    # An embedded cluster is this machine: the experts' channels on loopback, as `moe-cluster serve` does.
    app_args = {"channel_host": "127.0.0.1", **file_app.args, **({"transport": transport} if transport else {})}
    serve.run(build_app(app_args), name=file_app.name, route_prefix=file_app.route_prefix)
    return f"http://127.0.0.1:{port}{file_app.route_prefix.rstrip('/')}"


def load_oracle(info: dict) -> MoEModel:
    """The served model, from what /v1/info says about its source."""
    source = info["source"]
    if "checkpoint" in source:
        return load_model(source["checkpoint"])  # the path must be readable here too
    return MoEModel.random(preset_config(source["preset"]), seed=source["seed"])


def request_pool(model: MoEModel, max_tokens: int, size: int = 64) -> list[tuple]:
    rng = np.random.default_rng(0)
    layers = model.config.moe_layer_ids
    pool = []
    for i in range(size):
        x = rng.standard_normal((int(rng.integers(1, max_tokens + 1)), model.config.d_model)).astype(np.float32)
        pool.append((x, layers[i % len(layers)], reference_forward(model, torch.from_numpy(x), layers[i % len(layers)])
                     .numpy()))
    return pool


# --- Ray process and object store figures ----------------------------------------------------

def ray_processes() -> dict[str, int]:
    """{label: pid} of the app's actors (router, experts, proxy, controller), the raylet and the GCS."""
    import ray

    out = {}
    for actor in ray._private.state.actors().values():
        if actor["State"] != "ALIVE" or not actor.get("Pid"):
            continue
        name = actor.get("Name") or actor.get("ActorClassName", "actor")
        if name.startswith("SERVE_REPLICA::"):
            name = name.split("#")[1]  # the deployment: router, expert-3, ...
        elif name.startswith("SERVE_PROXY_ACTOR"):
            name = "proxy"
        elif name == "SERVE_CONTROLLER_ACTOR":
            name = "controller"
        out[name if name not in out else f"{name}@{actor['Pid']}"] = actor["Pid"]
    for kind, infos in ray._private.worker._global_node.all_processes.items():
        if kind == "gcs_server" and infos:
            out[kind] = infos[0].process.pid
    raylet = _raylet_pid(list(out.values()))
    if raylet:
        out["raylet"] = raylet
    return out


def _raylet_pid(worker_pids: list[int]) -> int | None:
    """The raylet is the parent of the worker processes of this (one-node) cluster."""
    import psutil

    for pid in worker_pids:
        try:
            parent = psutil.Process(pid).parent()
        except psutil.Error:
            continue
        if parent is not None and parent.name() == "raylet":
            return parent.pid
    return None


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    import psutil  # ships with Ray (ray/thirdparty_files), importable once ray is imported

    out = {}
    for label, pid in sorted(pids.items()):
        try:
            out[label] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:  # gone: a replica that was replaced
            out[label] = None
    return out


def open_files(pids: dict[str, int]) -> dict[str, dict[str, int | None]]:
    """{label: {"fds": open file descriptors, "tcp": TCP connections}} of each process (None: it is gone)."""
    import psutil

    out = {}
    for label, pid in sorted(pids.items()):
        try:
            process = psutil.Process(pid)
            out[label] = {"fds": process.num_fds(), "tcp": len(process.net_connections(kind="tcp"))}
        except psutil.Error:
            out[label] = {"fds": None, "tcp": None}
    return out


def object_store() -> dict[str, float]:
    """Bytes used in the object store (all nodes) and the number of objects."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # This script's own cluster by its address: with no address Ray looks for "auto", which fails
    # when other Ray clusters run on the machine.
    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"used_mib": round(stats.object_store_bytes_used / 2**20, 2), "objects": stats.num_local_objects}


def snapshot(own_cluster: bool) -> dict:
    if not own_cluster:
        return {}
    pids = ray_processes()
    rss, files = rss_mib(pids), open_files(pids)
    return {"time": time.time(), "pids": pids, "rss_mib": rss, "open": files,
            "rss_total_mib": round(sum(v for v in rss.values() if v), 1),
            "fds_total": sum(f["fds"] or 0 for f in files.values()),
            "tcp_total": sum(f["tcp"] or 0 for f in files.values()), "object_store": object_store()}


# --- the load ----------------------------------------------------------------------------------

class Soak:
    """`clients` threads sending pool requests until `stop` is set; counts everything."""

    def __init__(self, url: str, pool: list[tuple], clients: int, token: str | None) -> None:
        self.url, self.pool, self.clients, self.token = url, pool, clients, token
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # ok, wrong, http_<status>, error_<type>
        self.examples: list[str] = []  # the first few failures, for the report
        self.latencies: list[float] = []

    def run(self, duration_s: float, report_every_s: float, sample=lambda: {}) -> list[dict]:
        """Send requests for duration_s; every report_every_s print progress and record sample()."""
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        started, samples = time.monotonic(), []
        deadline = started + duration_s
        while (now := time.monotonic()) < deadline:
            time.sleep(min(report_every_s, deadline - now))
            with self.lock:
                done, failed = sum(self.counts.values()), sum(n for k, n in self.counts.items() if k != "ok")
            elapsed = time.monotonic() - started
            samples.append({"elapsed_s": round(elapsed), "requests": done, **sample()})
            extra = "".join(f", {k} {v}" for k, v in samples[-1].items() if k not in ("elapsed_s", "requests"))
            print(f"soak: {elapsed:6.0f}s  {done} requests ({done / elapsed:.1f}/s), {failed} failed{extra}",
                  flush=True)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        return samples

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with MoEClient(self.url, timeout=60, token=self.token) as client:
            while not self.stop.is_set():
                x, layer, expected = rng.choice(self.pool)
                started = time.monotonic()
                outcome = self._one(client, x, layer, expected)
                with self.lock:
                    self.counts[outcome] += 1
                    if outcome == "ok":
                        self.latencies.append(time.monotonic() - started)

    def _one(self, client: MoEClient, x: np.ndarray, layer: int, expected: np.ndarray) -> str:
        """The outcome of one request: ok, wrong, http_<status> or error_<exception type>.

        Never raises: any exception (a reset connection, a truncated body, a decode error, a
        KeyError in the reply) is a failed request, and the client thread goes on.
        """
        request = f"T={x.shape[0]} layer={layer}"
        try:
            y = client.forward(x, layer)
            if y.shape != expected.shape:
                return self._failed("wrong", f"{request}: shape {list(y.shape)}, expected {list(expected.shape)}")
            if not np.allclose(y, expected, rtol=1e-5, atol=1e-5):
                return self._failed("wrong", f"{request}: max abs diff {np.abs(y - expected).max():.3g}")
            return "ok"
        except MoEHTTPError as exc:
            return self._failed(f"http_{exc.status}", exc.message)
        except Exception as exc:  # noqa: BLE001 - any exception is a failed request, counted by its type
            return self._failed(f"error_{type(exc).__name__}", f"{request}: {exc}")

    def _failed(self, kind: str, message: str) -> str:
        with self.lock:
            if len(self.examples) < 5:
                self.examples.append(f"{kind}: {message[:300]}")
        return kind


# --- main ----------------------------------------------------------------------------------------

def rss_sample(own_cluster: bool) -> dict:
    """RSS of the router and of all the app's Ray processes now, for the progress lines."""
    if not own_cluster:
        return {}
    pids = ray_processes()
    rss, files = rss_mib(pids), open_files(pids)
    return {"router_rss_mib": rss.get("router"), "total_rss_mib": round(sum(v for v in rss.values() if v)),
            "fds": sum(f["fds"] or 0 for f in files.values()), "tcp": sum(f["tcp"] or 0 for f in files.values())}


def summary(soak: Soak, duration_s: float, start: dict, end: dict, samples: list[dict]) -> dict:
    latencies = sorted(soak.latencies)
    total = sum(soak.counts.values())
    return {
        "duration_s": duration_s, "clients": soak.clients, "requests": total, "ok": soak.counts["ok"],
        "errors": total - soak.counts["ok"], "by_outcome": dict(soak.counts), "failures": soak.examples,
        "requests_per_s": round(total / duration_s, 1) if duration_s else None,
        "latency_s": {"p50": latencies[len(latencies) // 2], "p99": latencies[int(len(latencies) * 0.99)],
                      "max": latencies[-1]} if latencies else None,
        "start": start, "end": end, "samples": samples,
    }


def print_summary(result: dict) -> None:
    print(f"\nsoak: {result['duration_s']:.0f}s, {result['clients']} clients: {result['requests']} requests "
          f"({result['requests_per_s']}/s), {result['ok']} right, {result['errors']} failed or wrong "
          f"{result['by_outcome']}")
    if result["latency_s"]:
        print("latency s: " + ", ".join(f"{k} {v:.3f}" for k, v in result["latency_s"].items()))
    for failure in result["failures"]:
        print(f"  {failure}")
    start, end = result["start"], result["end"]
    if not start:
        return
    print(f"{'process':<16}{'RSS start MiB':>15}{'RSS end MiB':>13}{'fds':>11}{'tcp':>9}  pid")
    for label in sorted(set(start["rss_mib"]) | set(end["rss_mib"])):
        same = start["pids"].get(label) == end["pids"].get(label)
        before, after = start["open"].get(label, {}), end["open"].get(label, {})
        print(f"{label:<16}{start['rss_mib'].get(label) or '-':>15}{end['rss_mib'].get(label) or '-':>13}"
              f"{_change(before.get('fds'), after.get('fds')):>11}{_change(before.get('tcp'), after.get('tcp')):>9}  "
              f"{end['pids'].get(label, '-')}{'' if same else ' (new process)'}")
    print(f"{'total':<16}{start['rss_total_mib']:>15}{end['rss_total_mib']:>13}"
          f"{_change(start['fds_total'], end['fds_total']):>11}{_change(start['tcp_total'], end['tcp_total']):>9}")
    print(f"object store: {start['object_store']['used_mib']} MiB / {start['object_store']['objects']} objects at "
          f"the start, {end['object_store']['used_mib']} MiB / {end['object_store']['objects']} at the end")


def _change(before: int | None, after: int | None) -> str:
    """`before->after` of a count, '-' where a process was not there."""
    return f"{'-' if before is None else before}->{'-' if after is None else after}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = None
    if args.token_env:
        import os
        token = os.environ.get(args.token_env) or sys.exit(f"soak: environment variable {args.token_env} is empty")
    own_cluster = args.url is None
    url = start_app(args.config, args.port, args.transport) if own_cluster else args.url.rstrip("/")
    try:
        client = MoEClient(url, token=token)
        client.wait_ready(timeout=300)
        pool = request_pool(load_oracle(client.info()), args.max_tokens)
        print(f"soak: {url}, {args.clients} clients for {args.duration_s:.0f}s", flush=True)
        start = snapshot(own_cluster)
        soak = Soak(url, pool, args.clients, token)
        samples = soak.run(args.duration_s, args.report_every_s, lambda: rss_sample(own_cluster))
        result = summary(soak, args.duration_s, start, snapshot(own_cluster), samples)
    finally:
        if own_cluster:
            from moe_cluster.serving.runtime import stop_local_serve
            stop_local_serve()
    print_summary(result)
    if args.report:
        args.report.write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
