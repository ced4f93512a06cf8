"""Where the direct channel wins: one request through the router per transport, by tokens (p50 ms).

One local Ray cluster (127.0.0.1), one app per transport, each with one expert deployment hosting
every expert (so a request of T tokens is one call of T*top_k rows, T*top_k*D*4 bytes in fp32), and
the router's handle called by value from this driver (the same hop for every transport):

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python scripts/channel_crossover.py [--preset mixtral-mini] [--n 30]

Prints one line per (T, transport): p50 and p90 of the whole request, and the call size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TRANSPORTS = ("channel", "by_value", "object_store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mixtral-mini")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024, 2048])
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()

    import numpy as np
    from ray import serve

    from moe_cluster.core.config import preset_config
    from moe_cluster.serving import runtime
    from moe_cluster.serving.app import build_app
    from moe_cluster.tools.ports import free_port

    config = preset_config(args.preset)
    runtime.start_local_serve(("127.0.0.1", free_port()), num_cpus=2)
    try:
        handles = {}
        for transport in TRANSPORTS:
            handles[transport] = serve.run(build_app({
                "preset": args.preset, "transport": transport, "channel_host": "127.0.0.1", "torch_threads": 1,
                "max_batch_tokens": None, "max_tokens_per_request": 8192,
                "placement": [{"name": f"all-{transport}", "experts": list(range(config.num_experts))}]}),
                name=transport, route_prefix=f"/{transport}")
        rng = np.random.default_rng(0)
        for tokens in args.tokens:
            x = rng.standard_normal((tokens, config.d_model)).astype(np.float32)
            mib = tokens * config.top_k * config.d_model * 4 / 2**20
            for transport, handle in handles.items():
                by_value = handle.options(_by_reference=x.nbytes > 2**20)
                times = []
                for i in range(args.n + 3):
                    started = time.perf_counter()
                    by_value.forward.remote(x, 0).result()
                    if i >= 3:
                        times.append((time.perf_counter() - started) * 1e3)
                times.sort()
                print(f"T={tokens:5d} call {mib:7.3f} MiB {transport:12s} p50 {statistics.median(times):8.2f} ms "
                      f"p90 {times[int(0.9 * len(times))]:8.2f} ms", flush=True)
    finally:
        runtime.stop_local_serve()


if __name__ == "__main__":
    main()
