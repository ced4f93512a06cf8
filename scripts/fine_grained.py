"""Fine-grained MoE through the cluster vs in process: what one expert call per deployment and each
transport cost (issue 13's measurement, until `moe-cluster bench` has the olmoe-mini preset).

    .venv/bin/python scripts/fine_grained.py --transport auto --tokens 1 64 1024

Model: E=64 experts, top-8, D=512, F=256, SwiGLU, one MoE layer, random weights (seed 0),
packed into 8 deployments of 8 experts (one replica each, one torch thread); the router and
this process use one torch thread too. Every answer is checked against the in-process model
(1e-5). Prints the median over --reps calls of each T, the handle taking numpy arrays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no traffic leaves the machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--transport", choices=("auto", "object_store", "by_value"), default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024], help="T per request")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per T (after 3 warm-up calls)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from ray import serve

    from moe_cluster import ModelConfig, MoEModel
    from moe_cluster.checkpoint import save_model
    from moe_cluster.serving.app import build_app
    from moe_cluster.serving.runtime import start_local_serve, stop_local_serve

    config = ModelConfig(d_model=512, d_ff=256, num_experts=64, top_k=8, expert_kind="swiglu")
    model = MoEModel.random(config, seed=0)
    checkpoint = tempfile.mkdtemp(prefix="fine-grained-")
    save_model(model, checkpoint)
    torch.set_num_threads(1)
    placement = [{"name": f"experts-{g * 8}-{g * 8 + 7}", "experts": list(range(g * 8, g * 8 + 8))} for g in range(8)]
    start_local_serve(None, access_log=False)  # as the bench: no access log line per expert call
    try:
        handle = serve.run(build_app({"checkpoint": checkpoint, "torch_threads": 1, "router_torch_threads": 1,
                                      "placement": placement, "max_batch_tokens": None, "transport": args.transport,
                                      "max_tokens_per_request": max(args.tokens)}), name="fine", route_prefix=None)
        print(f"transport {args.transport}: E=64 top-8 D=512 F=256, 8 deployments of 8 experts", flush=True)
        for tokens in args.tokens:
            x = np.random.default_rng(tokens).standard_normal((tokens, 512)).astype(np.float32)
            for _ in range(3):
                handle.forward.remote(x, 0).result()
            cluster_s, inprocess_s = [], []
            for _ in range(args.reps):
                started = time.perf_counter()
                y = handle.forward.remote(x, 0).result()
                cluster_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                expected = model.forward(torch.from_numpy(x), 0).numpy()
                inprocess_s.append(time.perf_counter() - started)
                if np.abs(y - expected).max() > 1e-5:
                    raise SystemExit(f"T={tokens}: the cluster's answer differs from the in-process model")
            call_kib = tokens * config.top_k * config.d_model * 4 / 8 / 1024  # rows spread over 8 deployments
            print(f"T={tokens}: handle p50 {statistics.median(cluster_s) * 1e3:.1f} ms, "
                  f"in-process {statistics.median(inprocess_s) * 1e3:.1f} ms "
                  f"(~{call_kib:.0f} KiB of rows a call)", flush=True)
    finally:
        stop_local_serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
