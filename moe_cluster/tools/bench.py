"""`moe-cluster bench`: what spreading the experts over a cluster costs, measured side by side.

On the same weights (a preset drawn from a seed), in one run:
  inprocess   MoEModel.forward in this process (all cores)
  monolithic  one Serve deployment holding the whole MoE layer (what a user would deploy instead)
  handle      the cluster (router + one deployment per expert) through a DeploymentHandle
              (monolithic and handle get and return numpy arrays, the fast way through Ray)
  handle-auto the same through MoEHandle (serving/handle.py): by value up to Serve's gRPC limit,
              Serve's default (by reference) above it
  http        the cluster through HTTP (msgpack)
  transformers  transformers' MixtralSparseMoeBlock on the same weights (Mixtral-shaped presets)
for T tokens per request, one client at a time (the modes take turns call by call, so a
drifting machine speed hits them alike), and with concurrent clients; plus the
machine's matmul peak and two Serve floors, timed in turns with the T=1 calls:
  serve_floor         p50 of a no-op router calling one no-op expert (two hops)
  serve_fanout_floor  p50 of a no-op router calling top_k no-op experts of top_k
                      deployments at once: the fewest hops and calls one token can cost
                      with one deployment per expert (a token visits top_k experts); Serve's
                      default handles throughout, so also `serve_default_fanout_floor_p50_ms`
With --decode, also greedy decoding of a whole model through the runner (bench_decode.py).
Fine-grained presets (64+ experts: olmoe-mini) pack 8 experts per deployment.
It also records, per T, the router's phases (route, experts, combine) of a batch of that T.

Every mode's answers are held to the oracle (`reference_forward`, see bench_oracle.py): each
mode for every T and every MoE layer, and every answer of every concurrent client. The
largest |answer - oracle| per mode, T and layer (`max_abs_diff_vs_oracle`) and per concurrent
mode (`concurrent_vs_oracle`) are in results.json; `wrong_answers` lists those over ORACLE_ATOL.
Writes DIR/results.json and DIR/results.png.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ray import serve

from ..core.config import preset_config
from ..core.model import MoEModel
from ..serving.runtime import check_port_free
from .bench_apps import MonolithicMoE, cluster_args, floor_app
from .bench_decode import decode_records
from .bench_oracle import (ORACLE_ATOL, ClientRequest, check_against_oracle, compute_oracle, max_abs_diff,
                           wrong_answers)

__all__ = ["BenchSettings", "run_bench", "matmul_peak_gflops", "cluster_args", "ORACLE_ATOL"]


@dataclass(frozen=True)
class BenchSettings:
    preset: str = "tiny"
    seed: int = 0
    tokens: tuple[int, ...] = (1, 64, 1024, 4096)
    clients: int = 32
    client_tokens: int = 128
    min_reps: int = 5  # per (mode, T): at least this many timed calls ...
    min_seconds: float = 2.0  # ... and at least this long
    client_requests: int = 8  # requests per concurrent client
    port: int = 8765
    experts_per_deployment: int | None = None  # None: 8 for 64+ experts (olmoe-mini), else 1
    decode: bool = False  # also time greedy decoding through the runner (bench_decode.py)
    decode_models: tuple[str, ...] = ("4-layer", "16-layer")  # of bench_decode.DECODE_MODELS
    decode_model: tuple[tuple[str, Any], ...] = ()  # MixtralConfig fields over each of them (tests)
    transport: str = "auto"  # AppArgs.transport of the cluster and the decode MoE app (channel: on 127.0.0.1)


@dataclass
class Record:
    mode: str
    tokens: int
    clients: int
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    transport: str | None = None  # the cluster's transport setting (handle, http); None for other modes


# --- measurement -----------------------------------------------------------------------------

def matmul_peak_gflops(size: int = 2048, reps: int = 5) -> float:
    """fp32 GEMM throughput of this process with its current torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - started) / 1e9


def transformers_block(model: MoEModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """transformers' MixtralSparseMoeBlock holding the first MoE layer's weights, for Mixtral-shaped
    presets (SwiGLU, softmax, renormalised top-k, no biases); None when it does not apply or is not
    installed."""
    config = model.config
    mixtral_shaped = (config.expert_kind == "swiglu" and config.normalize_top_k and not config.gate_bias
                      and config.score_func == "softmax" and not config.num_shared_experts and config.n_group == 1)
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    if not mixtral_shaped:
        return None
    hf_config = MixtralConfig(hidden_size=config.d_model, intermediate_size=config.d_ff,
                              num_local_experts=config.num_experts, num_experts_per_tok=config.top_k)
    block = MixtralSparseMoeBlock(hf_config).eval()
    layer = model.layers[0]
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate_and_shared.gate.weight_ED)
        for e, expert in enumerate(layer.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([expert.w1, expert.w3]))
            block.experts.down_proj[e].copy_(expert.w2)

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return block(x_TD.unsqueeze(0))[0]

    return forward


def time_interleaved(calls: dict[str, Callable[[], Any]], settings: BenchSettings) -> dict[str, list[float]]:
    """Latencies (s) per caller, taking turns call by call: one warm-up each, then rounds until
    every caller has min_reps calls and min_seconds each. Taking turns means that a machine
    whose speed drifts (shared cores, thermal limits) slows every mode alike."""
    for call in calls.values():
        call()
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    while any(len(v) < settings.min_reps or sum(v) < settings.min_seconds for v in latencies.values()):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            latencies[name].append(time.perf_counter() - t0)
    return latencies


def record(mode: str, tokens: int, clients: int, latencies: list[float], wall_s: float | None = None) -> Record:
    wall = sum(latencies) if wall_s is None else wall_s
    ms = np.asarray(latencies) * 1e3
    return Record(mode, tokens, clients, tokens * len(latencies) / wall, float(np.percentile(ms, 50)),
                  float(np.percentile(ms, 99)), len(latencies))


def concurrent_calls(make_call: Callable[[], Callable[[np.ndarray, int], Any]], requests: list[ClientRequest],
                     settings: BenchSettings) -> tuple[list[float], float, list[float]]:
    """One thread per request (client), each with its own caller `make_call()`, each making one
    warm-up and client_requests timed calls back to back. Returns the timed latencies (s), the
    wall time of the timed part, and |answer - oracle|.max() of every answer (warm-up included;
    compared after each call's clock stopped)."""
    latencies: list[float] = []
    diffs: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests) + 1)

    def client(request: ClientRequest) -> None:
        try:
            call = make_call()
            warm = max_abs_diff(call(request.x_TD, request.layer), request.expected_TD)  # not timed
            with lock:
                diffs.append(warm)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        for _ in range(settings.client_requests):
            t0 = time.perf_counter()
            try:
                y_TD = call(request.x_TD, request.layer)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                return
            latency = time.perf_counter() - t0
            diff = max_abs_diff(y_TD, request.expected_TD)
            with lock:
                latencies.append(latency)
                diffs.append(diff)

    threads = [threading.Thread(target=client, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed its warm-up: raised below
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, time.perf_counter() - started, diffs


def run_bench(settings: BenchSettings, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement, write results.json (+ results.png), return the results dict.

    Raises PortBusyError (before any work) when settings.port is taken."""
    from .bench_plot import plot
    from ..serving.runtime import start_local_serve, stop_local_serve

    check_port_free("127.0.0.1", settings.port)
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    config = preset_config(settings.preset)
    peak = matmul_peak_gflops()
    log(f"matmul peak: {peak:.0f} GFLOP/s fp32 with {cores} threads")
    model = MoEModel.random(config, settings.seed)
    inputs = {t: torch.randn(t, config.d_model, generator=torch.Generator().manual_seed(t)) for t in settings.tokens}
    oracle, requests = compute_oracle(model, inputs, settings.clients, settings.client_tokens, log)

    start_local_serve(("127.0.0.1", settings.port), access_log=False)
    try:
        floor_calls, mono, cluster = deploy(settings, config.d_model, config.top_k, cores, log)
        callers, layers_of = make_callers(model, mono, cluster, settings.port)
        max_diff = check_against_oracle(callers, layers_of, inputs, oracle)
        log("max |output - oracle| per mode over every T and layer: "
            + ", ".join(f"{mode}={max(d for per_t in per_mode.values() for d in per_t.values()):.1e}"
                        for mode, per_mode in max_diff.items()))
        records, floors, phases_ms = single_client_records(settings, callers, floor_calls, inputs, cluster,
                                                           config.moe_layer_ids[0], config.top_k, log)
        concurrent, concurrent_diff = concurrent_records(settings, requests, mono, cluster, log)
        transport = cluster_args(settings).transport
        for rec in records + concurrent:
            rec.transport = transport if rec.mode in ("handle", "handle-auto", "http") else None
        decode = decode_records(settings, out_dir, log) if settings.decode else None
    finally:
        stop_local_serve()
    results = {"preset": settings.preset, "seed": settings.seed, "cores": cores, "matmul_peak_gflops": peak,
               **floors, "fanout_width": config.top_k, "router_phases_ms": phases_ms,
               "oracle_atol": ORACLE_ATOL, "max_abs_diff_vs_oracle": max_diff,
               "concurrent_vs_oracle": concurrent_diff, "wrong_answers": wrong_answers(max_diff, concurrent_diff),
               "model": config.to_dict(), "settings": asdict(settings),
               "placement": cluster_args(settings).resolve_placement(config).describe(),
               "records": [asdict(r) for r in records + concurrent] + (decode.records if decode else [])}
    if decode is not None:
        results["decode_models"] = decode.models
        results["wrong_answers"] += decode.wrong_answers
    results["summary"] = summarize(results, config)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {out_dir / 'results.json'}")
    for wrong in results["wrong_answers"]:
        log(f"WRONG ANSWER (more than {ORACLE_ATOL:g} from the oracle): {wrong}")
    plot(results, out_dir / "results.png", log)
    return results


def deploy(settings: BenchSettings, d_model: int, top_k: int, cores: int, log):
    """The floors, the monolithic deployment and the cluster: (floor_calls, mono handle, cluster handle)."""
    from ..serving.app import build_app

    log(f"deploying the floors (no-op router -> 1 and -> {top_k} no-op experts), the monolithic "
        "deployment and the cluster ...")
    floor = serve.run(floor_app(1), name="floor", route_prefix=None)
    fanout_floor = serve.run(floor_app(top_k), name="fanout-floor", route_prefix=None)
    mono = serve.run(MonolithicMoE.bind(settings.preset, settings.seed, cores), name="monolithic",
                     route_prefix=None)
    cluster = serve.run(build_app(cluster_args(settings)), name="moe", route_prefix="/")
    one_token = np.zeros((1, d_model), np.float32)
    floor_calls = {"serve_floor": lambda: floor.forward.remote(one_token).result(),
                   "serve_fanout_floor": lambda: fanout_floor.forward.remote(one_token).result()}
    return floor_calls, mono, cluster


def make_callers(model: MoEModel, mono, cluster, port: int) -> tuple[dict[str, Callable], dict[str, tuple[int, ...]]]:
    """{mode: (x_TD, layer) -> y_TD} and the layers each mode can compute (transformers' block: one)."""
    from ..client import MoEClient
    from ..serving.handle import MoEHandle

    client = MoEClient(f"http://127.0.0.1:{port}")
    auto = MoEHandle(cluster)
    callers = {
        "inprocess": lambda x, layer: model.forward(x, layer),
        # numpy arrays through the handles: Ray pickles them zero-copy, while a torch tensor
        # goes through torch.save (38 ms to pickle 16 MB on the 2-core machine)
        "monolithic": lambda x, layer: mono.forward.remote(x.numpy(), layer).result(),
        "handle": lambda x, layer: cluster.forward.remote(x.numpy(), layer).result(),
        "handle-auto": lambda x, layer: auto.forward(x.numpy(), layer).result(),
        "http": lambda x, layer: client.forward(x.numpy(), layer),
    }
    layers_of = {mode: model.config.moe_layer_ids for mode in callers}
    hf_block = transformers_block(model)
    if hf_block is not None:  # the first MoE layer as transformers' MixtralSparseMoeBlock
        callers["transformers"] = lambda x, layer: hf_block(x)
        layers_of["transformers"] = model.config.moe_layer_ids[:1]
    return callers, layers_of


def single_client_records(settings: BenchSettings, callers: dict[str, Callable], floor_calls: dict[str, Callable],
                          inputs: dict[int, torch.Tensor], cluster, layer: int, top_k: int, log):
    """One client, every mode in turns, per T (at `layer`): (records, floors, router phases per T)."""
    records: list[Record] = []
    floors: dict[str, float] = {}
    phases_ms: dict[str, dict[str, float]] = {}  # per T: the router's phases of its last batch
    for tokens in settings.tokens:
        x_TD = inputs[tokens]
        calls = {mode: (lambda call=call: call(x_TD, layer)) for mode, call in callers.items()}
        latencies = time_interleaved({**calls, **(floor_calls if tokens == 1 else {})}, settings)
        if tokens == 1:  # the floors in turns with the single-token calls they are compared with
            floors = log_floors(latencies, top_k, log)
        for mode in callers:
            rec = record(mode, tokens, 1, latencies[mode])
            records.append(rec)
            log(f"  {mode:>11}  T={tokens:<5} {rec.tokens_per_s:>10.0f} tok/s  p50 {rec.p50_ms:8.2f} ms  "
                f"p99 {rec.p99_ms:8.2f} ms")
        phases_ms[str(tokens)] = cluster.stats.remote().result()["router_phases"]["last_ms"]
        log(f"  router phases of a T={tokens} batch: "
            + ", ".join(f"{phase} {ms:.1f}" for phase, ms in phases_ms[str(tokens)].items()))
    if not floors:
        floors = log_floors(time_interleaved(floor_calls, settings), top_k, log)
    return records, floors, phases_ms


def log_floors(latencies: dict[str, list[float]], width: int, log) -> dict[str, float]:
    """{serve_floor_p50_ms, serve_fanout_floor_p50_ms}, taken out of `latencies`."""
    floors = {f"{name}_p50_ms": float(np.percentile(latencies.pop(name), 50)) * 1e3
              for name in ("serve_floor", "serve_fanout_floor")}
    # The floor apps use Serve's default handles (by reference) throughout, driven by a default handle.
    floors["serve_default_fanout_floor_p50_ms"] = floors["serve_fanout_floor_p50_ms"]
    log(f"serve floor p50: {floors['serve_floor_p50_ms']:.2f} ms (router -> 1 expert), "
        f"{floors['serve_fanout_floor_p50_ms']:.2f} ms (router -> {width} experts at once)")
    return floors


def concurrent_records(settings: BenchSettings, requests: list[ClientRequest], mono, cluster,
                       log) -> tuple[list[Record], dict[str, dict[str, float]]]:
    """The concurrent-client records, and per mode {answers_checked, max_abs_diff} against the oracle."""
    from ..client import MoEClient

    makers = {
        "monolithic": lambda: (lambda x, layer: mono.forward.remote(x, layer).result()),
        "handle": lambda: (lambda x, layer: cluster.forward.remote(x, layer).result()),
        "http": lambda: (lambda x, layer, c=MoEClient(f"http://127.0.0.1:{settings.port}"): c.forward(x, layer)),
    }
    out, checks = [], {}
    for mode, make_call in makers.items():
        latencies, wall, diffs = concurrent_calls(make_call, requests, settings)
        rec = record(mode, settings.client_tokens, settings.clients, latencies, wall_s=wall)
        out.append(rec)
        checks[mode] = {"answers_checked": len(diffs), "max_abs_diff": max(diffs)}
        log(f"  {mode:>11}  {settings.clients} clients x T={settings.client_tokens}: {rec.tokens_per_s:>10.0f} tok/s "
            f"p50 {rec.p50_ms:8.2f} ms  p99 {rec.p99_ms:8.2f} ms; {len(diffs)} answers, max |output - oracle| "
            f"{max(diffs):.1e}")
    return out, checks


def summarize(results: dict[str, Any], config) -> dict[str, float]:
    """The ratios the performance targets are stated in."""
    single = {(r["mode"], r["tokens"]): r for r in results["records"] if r["clients"] == 1 and "batch" not in r}
    many = {r["mode"]: r for r in results["records"] if r["clients"] > 1}
    big = max(t for _, t in single)
    tps = lambda mode: single[(mode, big)]["tokens_per_s"]  # noqa: E731
    flops_per_token = 2 * config.top_k * config.d_model * config.d_ff * (3 if config.expert_kind == "swiglu" else 2)
    out = {
        "largest_T": big,
        "handle_over_inprocess": tps("handle") / tps("inprocess"),
        "handle_over_monolithic": tps("handle") / tps("monolithic"),
        "handle_T1_p50_over_floor": single[("handle", 1)]["p50_ms"] / results["serve_floor_p50_ms"]
        if ("handle", 1) in single else float("nan"),
        "handle_T1_p50_over_fanout_floor": single[("handle", 1)]["p50_ms"] / results["serve_fanout_floor_p50_ms"]
        if ("handle", 1) in single else float("nan"),
        "handle_auto_T1_p50_over_fanout_floor": single[("handle-auto", 1)]["p50_ms"]
        / results["serve_fanout_floor_p50_ms"] if ("handle-auto", 1) in single else float("nan"),
        "handle_T64_p50_over_inprocess": single[("handle", 64)]["p50_ms"] / single[("inprocess", 64)]["p50_ms"]
        if ("handle", 64) in single else float("nan"),
        "concurrent_handle_over_inprocess": many["handle"]["tokens_per_s"] / tps("inprocess") if many else float("nan"),
        "handle_fraction_of_matmul_peak": tps("handle") * flops_per_token / 1e9 / results["matmul_peak_gflops"],
        "inprocess_fraction_of_matmul_peak": tps("inprocess") * flops_per_token / 1e9 / results["matmul_peak_gflops"],
    }
    if ("transformers", big) in single:
        out["inprocess_over_transformers"] = tps("inprocess") / tps("transformers")
    decode = {(r["mode"], r.get("decode_model", "4-layer"), r["batch"]): r["ms_per_token"]
              for r in results["records"] if "batch" in r}
    for (mode, model, batch), ms in decode.items():
        if mode != "decode-inprocess" and ("decode-inprocess", model, batch) in decode:
            # The README's 4-layer model keeps the names it always had.
            name = mode if model == "4-layer" else f"{mode}-{model}"
            out[f"{name}_over_inprocess_batch{batch}"] = ms / decode[("decode-inprocess", model, batch)]
    return out
