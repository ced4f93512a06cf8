#!/usr/bin/env python
"""GPU smoke check: the model and the serving cluster on one real GPU, against the CPU oracle.

    export PYTHONPATH=/tmp/site:$PWD        # Ray & co. unpacked in /tmp/site, this checkout on the path
    python3 scripts/gpu_smoke.py --out $OUT  # writes $OUT/gpu_smoke.json; exit 1 if any check failed

Five stages, each in its own try/except so that one failure does not hide the others:

  env    Python, torch, CUDA and GPU facts, and the versions of the serving stack (ray, pydantic, ...).
  core   `MoEModel` moved to CUDA against `reference_forward` on the CPU: presets tiny and
         mixtral-mini (seed 0), every MoE layer, T in {1, 64, 4096}; fp32 with TF32 off
         (atol = rtol = 1e-4) and bf16 (the same bf16 model on the CPU; loose tolerance).
  perf   The in-process path on the GPU (mixtral-mini, fp32 and bf16, T in {1, 64, 1024, 4096}):
         warm-up, then p50 / mean ms per call and tokens/s (torch.cuda.synchronize + perf_counter).
  runner The whole-model runner on the device (no Ray): a tiny Mixtral (tests/support/hf_models.py)
         imported, `HFMoERunner.in_process(device=...)` (dense model, inputs, KV and MoE blocks there),
         greedy in float32 (TF32 off) through `generate` and through the decode loop (batched decode
         steps, logits back on the CPU), each token for token against transformers' generate on the CPU;
         then dtype auto (bfloat16 on a GPU): its dtype, its tokens' agreement with float32, and ms per
         decode token of a batch of 8 for both dtypes.
  serve  A local Ray cluster with the real GPU (ray.init(num_gpus=1)); `build_app` for mixtral-mini
         with the router and every expert deployment on a fraction of it (num_gpus 0.1, num_cpus 0);
         /v1/info must say router_device cuda, every expert's stats must say device cuda; outputs
         through a DeploymentHandle and through HTTP (MoEClient, msgpack and JSON) against the CPU
         oracle (fp32, atol = rtol = 1e-4); p50 latency of T=1 and T=4096 through the handle
         (torch tensors and numpy arrays) and of T=1 over HTTP. Serve and Ray are shut down at
         the end.

Tokens whose K-th and (K+1)-th gate scores are closer than 1e-5 (a near tie: float rounding
on another device may pick another expert) are left out of the comparisons and counted.

Without CUDA the CUDA-only stages (core, perf, runner) are skipped with a message, unless `--device cpu`
asks to run them on the CPU (to test this script); the serve stage still runs, with a fake GPU
resource (`ray.init(num_gpus=1)`), so the replicas fall back to the CPU and the device checks
expect "cpu". Sizes are smaller on the CPU by default (see --serve-tokens, --latency-calls).

$OUT/gpu_smoke.json is rewritten after every stage (a run cut short still leaves what it had);
on a serving failure the tails of the Ray session's logs are copied to $OUT/ray_logs/.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing
# Ray workers inherit the environment: make sure they can import moe_cluster as well.
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if not any(Path(p).resolve() == ROOT for p in _paths):
    os.environ["PYTHONPATH"] = os.pathsep.join(_paths + [str(ROOT)])
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network there; no usage-stats attempt

import torch  # noqa: E402

from moe_cluster import MoEModel, preset_config  # noqa: E402
from moe_cluster.core.config import ModelConfig  # noqa: E402
from moe_cluster.core.reference import reference_forward  # noqa: E402
from moe_cluster.tools.ports import free_port  # noqa: E402
from moe_cluster.core.routing import gate_scores  # noqa: E402

FP32_TOL = 1e-4  # atol = rtol; TF32 is off, so CUDA and CPU fp32 agree far better than this
BF16_RTOL = 3e-2  # elementwise: |y - ref| <= BF16_RTOL * (|ref| + rms(ref))
BF16_REL_FRO = 2e-2  # and ||y - ref|| / ||ref|| <= this
NEAR_TIE = 1e-5  # gate-score gap below which a token's top-k choice may differ between devices
T_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_smoke {time.perf_counter() - T_START:7.1f}s] {message}", flush=True)


# --- the report --------------------------------------------------------------------------------


class Report:
    """Checks (pass/fail), numbers and stage outcomes, written to JSON after every stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                                     "argv": sys.argv[1:], "stages": {}, "checks": [], "env": {}, "perf": {},
                                     "runner": {}, "serve": {}, "errors": []}

    def check(self, name: str, passed: bool, **details: Any) -> bool:
        self.data["checks"].append({"name": name, "passed": bool(passed), **details})
        shown = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
        log(f"{'PASS' if passed else 'FAIL'} {name}" + (f" ({shown})" if shown else ""))
        return bool(passed)

    def stage(self, name: str, fn: Callable[[], None], skip: str | None = None) -> None:
        if skip:
            log(f"=== stage {name}: SKIPPED ({skip})")
            self.data["stages"][name] = {"status": "skipped", "reason": skip}
            self.write()
            return
        log(f"=== stage {name}")
        started = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next stage
            traceback.print_exc()
            sys.stdout.flush()
            status = "error"
            self.data["errors"].append({"stage": name, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()})
        seconds = time.perf_counter() - started
        self.data["stages"][name] = {"status": status, "seconds": round(seconds, 2)}
        log(f"=== stage {name}: {status} in {seconds:.1f}s")
        self.write()

    @property
    def passed(self) -> bool:
        return (all(c["passed"] for c in self.data["checks"])
                and all(s["status"] != "error" for s in self.data["stages"].values()))

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T_START, 2)
        self.data["passed"] = self.passed
        self.data["failed_checks"] = [c["name"] for c in self.data["checks"] if not c["passed"]]
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- models and comparisons --------------------------------------------------------------------

_MODELS: dict[tuple[str, str], MoEModel] = {}


def cpu_model(preset: str, dtype: str = "float32", seed: int = 0) -> MoEModel:
    """The seed-`seed` model of `preset` in `dtype`, on the CPU (cached: mixtral-mini takes a while)."""
    key = (preset, dtype)
    if key not in _MODELS:
        config = preset_config(preset)
        if dtype != config.dtype:
            config = config.replace(dtype=dtype)
        _MODELS[key] = MoEModel.random(config, seed=seed)
    return _MODELS[key]


def model_to(model: MoEModel, device: torch.device | str) -> MoEModel:
    """A copy of `model` on `device` (the CPU model stays: it is the oracle)."""
    return copy.deepcopy(model).to(device)


def near_ties(model: MoEModel, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
    """Bool [T]: tokens whose K-th and (K+1)-th gate scores are within NEAR_TIE (computed on the CPU)."""
    config = model.config
    if config.top_k >= config.num_experts:
        return torch.zeros(x_TD.shape[0], dtype=torch.bool)
    scores_TE = gate_scores(x_TD.to(config.torch_dtype), model.layer(layer).gate_and_shared.gate, config)
    top_TK1 = torch.sort(scores_TE, dim=-1, descending=True).values[:, : config.top_k + 1]
    return (top_TK1[:, -2] - top_TK1[:, -1]) < NEAR_TIE


def compare(y_TD: torch.Tensor, ref_TD: torch.Tensor, skip_T: torch.Tensor, kind: str) -> tuple[bool, dict]:
    """(passed, numbers) for y against ref on the tokens not in skip_T; kind "fp32" or "bf16"."""
    y, ref = y_TD.detach().float().cpu(), ref_TD.detach().float().cpu()
    if y.shape != ref.shape:
        return False, {"error": f"shape {list(y.shape)} != {list(ref.shape)}"}
    keep = ~skip_T
    y, ref = y[keep], ref[keep]
    err = (y - ref).abs()
    numbers: dict[str, Any] = {"tokens": int(keep.numel()), "near_ties_skipped": int(skip_T.sum()),
                               "max_abs_err": float(err.max()) if err.numel() else 0.0,
                               "ref_max_abs": float(ref.abs().max()) if ref.numel() else 0.0,
                               "finite": bool(torch.isfinite(y).all())}
    rel_fro = float(err.norm() / ref.norm().clamp_min(1e-30)) if err.numel() else 0.0
    numbers["rel_fro_err"] = rel_fro
    if kind == "fp32":
        ok = bool(torch.allclose(y, ref, rtol=FP32_TOL, atol=FP32_TOL))
    else:
        rms = float(ref.pow(2).mean().sqrt()) if ref.numel() else 0.0
        ok = bool((err <= BF16_RTOL * (ref.abs() + rms)).all()) and rel_fro <= BF16_REL_FRO
    # A few near ties per 4096 tokens are normal; more than 1% would make the check vacuous.
    too_many_ties = int(skip_T.sum()) > max(2, skip_T.numel() // 100)
    return ok and numbers["finite"] and not too_many_ties, numbers


def inputs(T: int, D: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], calls: int, warmup: int, device: torch.device | None = None) -> dict:
    """p50 / mean / min ms of `calls` sequential calls after `warmup` ones."""
    for _ in range(warmup):
        fn()
    if device is not None:
        sync(device)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        if device is not None:
            sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return {"calls": calls, "p50_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "max_ms": max(times)}


def expert_flops(config: ModelConfig, T: int) -> float:
    """Routed-expert FLOPs of one layer for T tokens (the matmuls dominate)."""
    mats = 3 if config.expert_kind == "swiglu" else 2
    return 2.0 * T * config.top_k * mats * config.d_model * config.d_ff


# --- stages ------------------------------------------------------------------------------------


def stage_env(report: Report, device: torch.device | None) -> None:
    env: dict[str, Any] = report.data["env"]
    env.update({"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "cuda_available": torch.cuda.is_available(), "device": str(device) if device else None,
                "pythonpath": os.environ.get("PYTHONPATH", "")})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        env.update({"gpu_count": torch.cuda.device_count(), "gpu_name": props.name,
                    "gpu_capability": f"{props.major}.{props.minor}", "gpu_total_gib": round(total / 2**30, 1),
                    "gpu_free_gib": round(free / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported()})
        env["nvidia_smi"] = _run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                        "--format=csv,noheader"])
    versions = {}
    for module, dist in (("ray", "ray"), ("pydantic", "pydantic"), ("pydantic_core", "pydantic-core"),
                         ("starlette", "starlette"), ("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                         ("grpc", "grpcio"), ("google.protobuf", "protobuf"), ("numpy", "numpy"),
                         ("msgpack", "msgpack"), ("typing_extensions", "typing-extensions"),
                         ("jsonschema", "jsonschema"), ("aiohttp", "aiohttp"), ("yaml", "pyyaml"),
                         ("opentelemetry.trace", "opentelemetry-api")):
        try:
            mod = importlib.import_module(module)
            where = Path(mod.__file__).parent if getattr(mod, "__file__", None) else "?"
            versions[dist] = f"{importlib.metadata.version(dist)} @ {where}"
        except Exception as exc:  # noqa: BLE001 - a missing package is a fact to report, not a crash
            versions[dist] = f"MISSING ({type(exc).__name__}: {exc})"
    env["packages"] = versions
    for key, value in env.items():
        if key != "packages":
            log(f"{key}: {value}")
    for module, version in versions.items():
        log(f"  {module}: {version}")
    try:
        import ray.serve  # noqa: F401 - what Serve imports at startup must be importable
        ok, detail = True, ""
    except Exception as exc:  # noqa: BLE001
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    report.check("env.import_ray_serve", ok, **({"error": detail} if detail else {}))


def stage_core(report: Report, device: torch.device, tokens: list[int]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for preset in ("tiny", "mixtral-mini"):
        ref_model = cpu_model(preset)
        config = ref_model.config
        started = time.perf_counter()
        dev_model = model_to(ref_model, device)
        sync(device)
        log(f"{preset}: fp32 model on {device} in {time.perf_counter() - started:.1f}s")
        for layer in config.moe_layer_ids:
            for T in tokens:
                x = inputs(T, config.d_model, seed=1000 * layer + T)
                ref = reference_forward(ref_model, x, layer)
                y = dev_model.forward(x.to(device), layer)
                sync(device)
                ok, numbers = compare(y, ref, near_ties(ref_model, x, layer), "fp32")
                report.check(f"core.{preset}.fp32.layer{layer}.T{T}", ok, device=str(y.device), **numbers)
        del dev_model
        # bf16: the same weights rounded to bf16, on the device against the CPU (first MoE layer).
        bf16_ref = cpu_model(preset, "bfloat16")
        dev_bf16 = model_to(bf16_ref, device)
        layer = config.moe_layer_ids[0]
        for T in tokens:
            x = inputs(T, config.d_model, seed=7 + T)
            started = time.perf_counter()
            ref = reference_forward(bf16_ref, x.to(torch.bfloat16), layer)
            cpu_s = time.perf_counter() - started
            y = dev_bf16.forward(x.to(device, torch.bfloat16), layer)
            sync(device)
            ok, numbers = compare(y, ref, near_ties(bf16_ref, x, layer), "bf16")
            report.check(f"core.{preset}.bf16.layer{layer}.T{T}", ok, dtype=str(y.dtype), cpu_ref_s=cpu_s, **numbers)
        del dev_bf16
        if device.type == "cuda":
            torch.cuda.empty_cache()


def stage_perf(report: Report, device: torch.device, tokens: list[int]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    perf: dict[str, Any] = report.data["perf"]
    for dtype in ("float32", "bfloat16"):
        model = model_to(cpu_model("mixtral-mini", dtype), device)
        config = model.config
        layer = config.moe_layer_ids[0]
        for T in tokens:
            x = inputs(T, config.d_model, seed=T).to(device, config.torch_dtype)
            calls = 30 if T <= 64 else 20 if T <= 1024 else 10
            timing = time_calls(lambda: model.forward(x, layer), calls=calls, warmup=3, device=device)
            timing["tokens_per_s"] = T / (timing["p50_ms"] / 1e3)
            timing["expert_tflops"] = expert_flops(config, T) / (timing["p50_ms"] / 1e3) / 1e12
            perf[f"mixtral-mini.{dtype}.T{T}"] = timing
            log(f"perf mixtral-mini {dtype:8s} T={T:5d}: p50 {timing['p50_ms']:8.3f} ms  "
                f"mean {timing['mean_ms']:8.3f} ms  {timing['tokens_per_s']:12,.0f} tok/s  "
                f"{timing['expert_tflops']:6.2f} TFLOP/s (experts)")
        model = None  # free the device memory before the next dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        perf["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


RUNNER_PROMPTS = [[1, 5, 9, 17, 33], [2, 127, 64, 8, 3], [7, 7, 7]]


def stage_runner(report: Report, device: torch.device, new_tokens: int = 8) -> None:
    """The whole-model runner on `device` against transformers' greedy generate on the CPU."""
    import asyncio
    import tempfile

    from moe_cluster.engine.scheduler import DecodeLoop, GenerationRequest
    from moe_cluster.hf.importer import import_hf_checkpoint
    from moe_cluster.hf.runner import HFMoERunner
    from tests.support.hf_models import build_hf

    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = report.data["runner"]
    root = Path(tempfile.mkdtemp(prefix="gpu_smoke_runner_"))
    hf_model = build_hf("mixtral")
    hf_model.save_pretrained(root / "hf")
    import_hf_checkpoint(root / "hf", root / "moe", log=lambda _: None)
    expected = [_hf_greedy(hf_model, prompt, new_tokens) for prompt in RUNNER_PROMPTS]

    runner = HFMoERunner.in_process(root / "hf", root / "moe", device=device, dtype="float32")
    out["info"] = runner.info()
    got = [runner.generate([prompt], new_tokens)["output_ids"][0] for prompt in RUNNER_PROMPTS]
    report.check("runner.generate.fp32", got == expected, device=str(runner.device), got=got, expected=expected)
    loop = DecodeLoop(runner.model, runner.moe_call, max_num_seqs=8)
    try:
        streamed = asyncio.run(_decode_all(loop, [GenerationRequest(p, new_tokens) for p in RUNNER_PROMPTS]))
    finally:
        loop.close()
    report.check("runner.decode_loop.fp32", [p + t for p, t in zip(RUNNER_PROMPTS, streamed)] == expected,
                 batched_steps=loop.stats["max_batch"], got=streamed)

    auto = HFMoERunner.in_process(root / "hf", root / "moe", device=device)
    dtype = auto.info()["dtype"]
    report.check("runner.auto_dtype", dtype == ("bfloat16" if device.type == "cuda" else "float32"), dtype=dtype)
    got_auto = [auto.generate([prompt], new_tokens)["output_ids"][0] for prompt in RUNNER_PROMPTS]
    agree = sum(a == b for g, e in zip(got_auto, expected) for a, b in zip(g, e)) - sum(map(len, RUNNER_PROMPTS))
    out["auto_tokens_equal_fp32"] = f"{agree}/{new_tokens * len(RUNNER_PROMPTS)}"
    for name, model in (("fp32", runner), ("auto", auto)):
        batch = [RUNNER_PROMPTS[0]] * 8
        model.generate(batch, 32)  # warm-up in the same shapes: the first bf16 calls on a GPU are ~10x slower
        timings = model.generate(batch, 32)["timings"]
        out[f"{name}.batch8.decode_ms_per_token"] = timings["decode_ms_per_token"]
        out[f"{name}.batch8.dense_ms_per_token"] = timings["dense_ms_per_token"]
        log(f"runner {name} ({model.info()['dtype']}) on {device}, batch 8: {timings['decode_ms_per_token']:.2f} ms "
            f"per decode token ({timings['dense_ms_per_token']:.2f} dense)")


def _hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)[0].tolist()


async def _decode_all(loop, requests: list) -> list[list[int]]:
    """The token ids of each request through the decode loop (they share its steps)."""
    tokens: list[list[int]] = [[] for _ in requests]
    async for i, event in loop.events_of(requests):
        if event.error is not None:
            raise event.error
        if event.token_id is not None:
            tokens[i].append(event.token_id)
    return tokens


def stage_serve(report: Report, args: argparse.Namespace, cuda: bool) -> None:
    import ray
    from ray import serve

    from moe_cluster.client import MoEClient
    from moe_cluster.serving.app import build_app
    from moe_cluster.serving.args import AppArgs
    from moe_cluster.serving.runtime import start_local_serve, stop_local_serve

    info_out: dict[str, Any] = report.data["serve"]
    expected = "cuda" if cuda else "cpu"
    port = args.port or free_port()
    preset = args.serve_preset
    app_args = {
        "preset": preset, "seed": 0, "max_tokens_per_request": 8192,
        "router": {"ray_actor_options": {"num_cpus": 0, "num_gpus": args.router_gpus}},
        "experts": {"ray_actor_options": {"num_cpus": 0, "num_gpus": args.expert_gpus}},
        "transport": args.transport, "channel_host": "127.0.0.1",  # one machine: the experts' channels on loopback
    }
    info_out.update({"port": port, "app_args": app_args, "expected_device": expected})
    log(f"ray.init(num_gpus=1) {'(the real GPU)' if cuda else '(a fake GPU resource: replicas fall back to CPU)'}")
    try:
        start_local_serve(("127.0.0.1", port), num_gpus=1, log_to_driver=args.log_to_driver,
                          object_store_memory=int(args.object_store_gib * 2**30))
    except Exception:
        _copy_log_tails("/tmp/ray/session_latest", args.out / "ray_logs")
        raise
    session_dir = _session_dir()
    info_out["ray_session_dir"] = session_dir
    info_out["cluster_resources"] = ray.cluster_resources()
    log(f"cluster resources: {ray.cluster_resources()}; session {session_dir}")
    try:
        log(f"serve.start on 127.0.0.1:{port}")
        app = build_app(app_args)
        started = time.perf_counter()
        handle = _run_with_timeout(lambda: serve.run(app, name="moe", route_prefix="/"), args.deploy_timeout_s,
                                   "serve.run")
        info_out["deploy_s"] = round(time.perf_counter() - started, 1)
        log(f"app 'moe' running after {info_out['deploy_s']}s")

        info = handle.info.remote().result(timeout_s=60)
        info_out["info"] = {k: info[k] for k in ("d_model", "num_experts", "top_k", "layers", "dtype", "router_device")}
        report.check("serve.router_device", str(info["router_device"]).startswith(expected),
                     router_device=info["router_device"], expected=expected)
        groups = [g.name for g in AppArgs.model_validate(app_args).resolve_placement(preset_config(preset)).groups]
        stats = {name: serve.get_deployment_handle(name, app_name="moe").stats.remote().result(timeout_s=60)
                 for name in groups}
        devices = {name: s["device"] for name, s in stats.items()}
        info_out["expert_devices"] = devices
        info_out["expert_gpu_ids"] = {name: s["gpu_ids"] for name, s in stats.items()}
        report.check("serve.expert_devices", all(d.startswith(expected) for d in devices.values()),
                     devices=sorted(set(devices.values())), deployments=len(devices), expected=expected)
        if cuda:
            info_out["nvidia_smi_apps"] = _run_quiet(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                                      "--format=csv,noheader"])
            log(f"GPU processes: {info_out['nvidia_smi_apps']}")

        ref_model = cpu_model(preset)
        config = ref_model.config
        layers = config.moe_layer_ids
        for i, T in enumerate(args.serve_tokens):
            layer = layers[i % len(layers)]
            x = inputs(T, config.d_model, seed=500 + T)
            ref = reference_forward(ref_model, x, layer)
            ties = near_ties(ref_model, x, layer)
            y = handle.forward.remote(x, layer).result(timeout_s=120)
            ok, numbers = compare(torch.as_tensor(y), ref, ties, "fp32")
            report.check(f"serve.handle.layer{layer}.T{T}", ok, **numbers)

        client = MoEClient(f"http://127.0.0.1:{port}", timeout=120)
        client.wait_ready(timeout=120)
        http_info = client.info()
        report.check("serve.http_info_router_device", str(http_info["router_device"]).startswith(expected),
                     router_device=http_info["router_device"])
        for i, T in enumerate(args.serve_tokens):
            layer = layers[(i + 1) % len(layers)]
            x = inputs(T, config.d_model, seed=900 + T)
            ref = reference_forward(ref_model, x, layer)
            y = client.forward(x.numpy(), layer=layer)
            ok, numbers = compare(torch.from_numpy(y), ref, near_ties(ref_model, x, layer), "fp32")
            report.check(f"serve.http_msgpack.layer{layer}.T{T}", ok, **numbers)
        x = inputs(3, config.d_model, seed=3)
        y = client.forward(x.numpy(), layer=layers[0], wire="json")
        ok, numbers = compare(torch.from_numpy(y), reference_forward(ref_model, x, layers[0]),
                              near_ties(ref_model, x, layers[0]), "fp32")
        report.check(f"serve.http_json.layer{layers[0]}.T3", ok, **numbers)

        latency: dict[str, Any] = {}
        for T in (min(args.serve_tokens), max(args.serve_tokens)):
            # torch tensors as users pass them, and numpy arrays (Ray pickles those without torch.save)
            for kind, x in (("torch", inputs(T, config.d_model, seed=T)),
                            ("numpy", inputs(T, config.d_model, seed=T).numpy())):
                timing = time_calls(lambda: handle.forward.remote(x, layers[0]).result(timeout_s=120),
                                    calls=args.latency_calls, warmup=3)
                timing["tokens_per_s"] = T / (timing["p50_ms"] / 1e3)
                latency[f"handle.{kind}.T{T}"] = timing
                log(f"serve handle ({kind}) T={T:5d}: p50 {timing['p50_ms']:8.2f} ms  "
                    f"mean {timing['mean_ms']:8.2f} ms  {timing['tokens_per_s']:10,.0f} tok/s")
        x1 = inputs(1, config.d_model, seed=1).numpy()
        timing = time_calls(lambda: client.forward(x1, layer=layers[0]), calls=args.latency_calls, warmup=3)
        latency["http_msgpack.T1"] = timing
        log(f"serve http  T=    1: p50 {timing['p50_ms']:8.2f} ms  mean {timing['mean_ms']:8.2f} ms")
        info_out["latency"] = latency
        client.close()
        try:
            info_out["router_stats"] = handle.stats.remote().result(timeout_s=30)
        except Exception as exc:  # noqa: BLE001 - nice to have
            info_out["router_stats"] = f"{type(exc).__name__}: {exc}"
        if args.transport in ("nixl", "cuda_ipc", "channel") and isinstance(info_out["router_stats"], dict):
            calls = info_out["router_stats"]["transport"]["calls"]  # a fallback would show as object_store calls
            report.check("serve.transport_path", calls.get(args.transport, 0) > 0 and calls["object_store"] == 0,
                         transport=args.transport, calls=calls)
    finally:
        serve_failed = sys.exc_info()[0] is not None or any(
            not c["passed"] for c in report.data["checks"] if c["name"].startswith("serve."))
        if serve_failed:
            _copy_log_tails(session_dir, args.out / "ray_logs")
        log("shutting down serve and ray")
        stop_local_serve()
        log("ray is down")


# --- helpers -----------------------------------------------------------------------------------


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """fn() in a daemon thread; TimeoutError if it does not return within timeout_s."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not return within {timeout_s:.0f}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _run_quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"({cmd[0]}: {type(exc).__name__}: {exc})"


def _session_dir() -> str | None:
    try:
        import ray._private.worker as worker
        return worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - only used to find logs
        return None


def _copy_log_tails(session_dir: str | None, dest: Path, max_bytes: int = 32_000) -> None:
    """The last max_bytes of the session's serve logs and of every *.err / *.out log, into dest."""
    if not session_dir:
        return
    logs = Path(session_dir) / "logs"
    try:
        files = sorted(set(logs.glob("serve/*.log")) | set(logs.glob("*.err")) | set(logs.glob("*.out")))
        dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            with path.open("rb") as f:
                f.seek(max(0, size - max_bytes))
                (dest / path.name).write_bytes(f.read())
        log(f"copied the tails of {len(files)} Ray log files to {dest}")
    except Exception as exc:  # noqa: BLE001
        log(f"could not copy Ray logs: {exc}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ints = lambda text: [int(t) for t in text.split(",") if t]  # noqa: E731
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for gpu_smoke.json (default: .)")
    parser.add_argument("--stages", default="env,core,perf,runner,serve",
                        help="comma-separated subset of env,core,perf,runner,serve (default: all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="device of the core, perf and runner stages; auto: cuda if available, else skip "
                             "them")
    parser.add_argument("--core-tokens", type=ints, default=None, help="T of the core checks (default 1,64,4096; "
                                                                       "1,64,256 on the CPU)")
    parser.add_argument("--perf-tokens", type=ints, default=None, help="T of the perf stage "
                                                                       "(default 1,64,1024,4096; 1,64 on the CPU)")
    parser.add_argument("--serve-preset", default="mixtral-mini", help="preset the serve stage deploys")
    parser.add_argument("--serve-tokens", type=ints, default=None, help="T sent through the handle and HTTP; "
                                                                        "latency uses the smallest and largest "
                                                                        "(default 1,64,4096; 1,64,256 on the CPU)")
    parser.add_argument("--latency-calls", type=int, default=None, help="timed calls per latency figure "
                                                                        "(default 20; 5 on the CPU)")
    parser.add_argument("--router-gpus", type=float, default=0.1, help="num_gpus of the router replica")
    parser.add_argument("--expert-gpus", type=float, default=0.1, help="num_gpus of each expert replica")
    parser.add_argument("--transport", default="auto",
                        choices=("auto", "object_store", "by_value", "nixl", "cuda_ipc", "channel"),
                        help="how the serve stage's router sends rows to its experts (cuda_ipc: router and experts "
                             "share the one GPU here; nixl needs the nixl extra; channel: the experts' ZeroMQ "
                             "channels on 127.0.0.1, needs pyzmq)")
    parser.add_argument("--port", type=int, default=0, help="Serve HTTP port (default: a free one in 20000-32767)")
    parser.add_argument("--deploy-timeout-s", type=float, default=240.0, help="limit for serve.run")
    parser.add_argument("--object-store-gib", type=float, default=2.0, help="Ray object store size (GiB)")
    parser.add_argument("--log-to-driver", action="store_true", help="stream the replicas' logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = stages - {"env", "core", "perf", "runner", "serve"}
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: CUDA is not available here")
    device = torch.device("cuda") if (cuda and args.device != "cpu") else (
        torch.device("cpu") if args.device == "cpu" else None)
    small = not cuda
    args.core_tokens = args.core_tokens or ([1, 64, 256] if small else [1, 64, 4096])
    args.perf_tokens = args.perf_tokens or ([1, 64] if small else [1, 64, 1024, 4096])
    args.serve_tokens = args.serve_tokens or ([1, 64, 256] if small else [1, 64, 4096])
    args.latency_calls = args.latency_calls or (5 if small else 20)
    report = Report(args.out / "gpu_smoke.json")
    log(f"gpu smoke: stages {sorted(stages)}, cuda {'available' if cuda else 'NOT available'}, "
        f"core/perf device {device or 'none (skipped)'}, report {report.path}")
    no_device = "CUDA is not available here (pass --device cpu to run it on the CPU)" if device is None else None

    report.stage("env", lambda: stage_env(report, device), skip=None if "env" in stages else "not asked for")
    report.stage("core", lambda: stage_core(report, device, args.core_tokens),
                 skip=no_device if "core" in stages else "not asked for")
    report.stage("perf", lambda: stage_perf(report, device, args.perf_tokens),
                 skip=no_device if "perf" in stages else "not asked for")
    report.stage("runner", lambda: stage_runner(report, device),
                 skip=no_device if "runner" in stages else "not asked for")
    report.stage("serve", lambda: stage_serve(report, args, cuda), skip=None if "serve" in stages else "not asked for")

    report.write()
    checks = report.data["checks"]
    failed = report.data["failed_checks"]
    errors = [name for name, s in report.data["stages"].items() if s["status"] == "error"]
    log(f"{len(checks) - len(failed)}/{len(checks)} checks passed; stages with errors: {errors or 'none'}")
    for name in failed:
        log(f"  FAILED: {name}")
    log(f"{'PASSED' if report.passed else 'FAILED'}; report: {report.path}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
