"""`moe-cluster bench --decode`: greedy decoding of a whole model, MoE blocks in process vs on the cluster.

Two Mixtral-like models (DECODE_MODELS), random weights drawn from the bench's seed:
  4-layer   the README's: D=1024, F=3584, 8 SwiGLU experts, top-2, 4 layers, 16 heads (8 key/value),
            vocab 32000: few layers, each a real amount of math
  16-layer  deep and small: D=256, F=512, 8 experts, top-2, 16 layers, 4 heads (2 key/value), vocab
            2048: a decoding step is 16 MoE calls one after the other, so the cost of a call shows
            (real models have 24-61 MoE layers)
Each is written once under OUT/decode-<name> (Hugging Face format) and OUT/decode-<name>-moe
(`import-hf`), reused by later runs with the same seed, and served by an app of its own while it
is timed (removed before the next model's).

Modes, each at batch 1 and 8 (PROMPT_TOKENS prompt tokens, NEW_TOKENS new tokens per run):
  decode-inprocess        `HFMoERunner.in_process`: the MoE blocks computed in this process
  decode-cluster          the runner app on the cluster, routing every MoE layer itself and calling
                          the expert deployments directly (`moe_calls: direct`, the default)
  decode-cluster-router   the same runner with every MoE layer a call to the MoE app's router
                          (`moe_calls: router`): what the direct hop saves
Every process computes with one torch thread (this one too while it decodes), as `moe-cluster
generate --torch-threads 1` in the README. The modes take turns run by run. `ms_per_token` is
the median over the decode steps of every timed run (step 0, the prefill, excluded). Every
cluster mode's tokens must equal the in-process ones (greedy on the same weights): any other
output is a wrong answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ray import serve

__all__ = ["DecodeResults", "decode_records", "DECODE_MODELS"]

DECODE_MODELS = {
    "4-layer": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    "16-layer": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=2048),
}
PROMPT_TOKENS, NEW_TOKENS, BATCHES, RUNS = 8, 16, (1, 8), 3
CLUSTER_MODES = {"decode-cluster": "direct", "decode-cluster-router": "router"}  # mode: the runner's moe_calls


@dataclass
class DecodeResults:
    records: list[dict[str, Any]] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: its shape and the run's settings


def decode_records(settings, out_dir: Path, log: Callable[[str], None]) -> DecodeResults:
    """Decode every model of `settings.decode_models` in every mode at every batch size (Serve must be
    running); the records (each names its model) and any wrong answers."""
    results = DecodeResults()
    for name in settings.decode_models:
        shape = {**DECODE_MODELS[name], **dict(settings.decode_model)}
        results.models[name] = {**shape, "seed": settings.seed, "prompt_tokens": PROMPT_TOKENS,
                                "new_tokens": NEW_TOKENS, "timed_runs": RUNS}
        log(f"decode model {name}: {shape['num_hidden_layers']} MoE layers, D={shape['hidden_size']}, "
            f"F={shape['intermediate_size']}, {shape['num_local_experts']} experts")
        decode_one_model(settings, name, shape, out_dir, results, log)
    return results


def decode_one_model(settings, name: str, shape: dict[str, Any], out_dir: Path, results: DecodeResults,
                     log: Callable[[str], None]) -> None:
    """Write (or reuse) model `name`, serve it, time every mode at every batch size, and remove its apps."""
    from ..hf.runner import GenerateLimits, HFMoERunner

    hf_dir, checkpoint = write_decode_model(out_dir, name, settings.seed, shape, log)
    generators = deploy_runners(hf_dir, checkpoint, name, log, settings.transport)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = HFMoERunner.in_process(hf_dir, checkpoint, limits=GenerateLimits(max_input_tokens=4096))
        generators = {"decode-inprocess": local.generate, **generators}
        for batch in BATCHES:
            time_batch(generators, batch, shape["vocab_size"], name, results, log, settings.transport)
    finally:
        torch.set_num_threads(threads)
        for app in [*CLUSTER_MODES, "decode-moe"]:
            serve.delete(f"{app}-{name}")  # the next model's replicas get the machine


def time_batch(generators: dict[str, Callable], batch: int, vocab_size: int, model: str, results: DecodeResults,
               log, transport: str = "auto") -> None:
    """Every mode at one batch size, in turns: one warm-up run each, then RUNS timed runs each."""
    ids = [[(17 * b + 3 * i) % (vocab_size - 1) + 1 for i in range(PROMPT_TOKENS)] for b in range(batch)]
    steps_ms: dict[str, list[float]] = {mode: [] for mode in generators}
    outputs: dict[str, list] = {}
    for run in range(RUNS + 1):
        for mode, generate in generators.items():
            result = generate(ids, NEW_TOKENS)
            outputs.setdefault(mode, result["output_ids"])
            wrong = f"{mode} {model} batch {batch}: output ids differ from decode-inprocess"
            if result["output_ids"] != outputs["decode-inprocess"] and wrong not in results.wrong_answers:
                results.wrong_answers.append(wrong)
            if run:  # run 0 warms every replica up
                steps_ms[mode] += [step["ms"] for step in result["timings"]["per_token"][1:]]
    for mode, ms in steps_ms.items():
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        calls = CLUSTER_MODES.get(mode)
        results.records.append({
            "mode": mode, "decode_model": model, "tokens": batch, "clients": 1, "batch": batch, "ms_per_token": p50,
            "tokens_per_s": batch * 1e3 / p50, "p50_ms": p50, "p99_ms": p99, "requests": len(ms),
            "transport": None if calls is None else transport, "moe_calls": calls})
        log(f"  {mode:>22}  {model} batch {batch}: {p50:8.2f} ms per decode step (median of {len(ms)}), "
            f"p99 {p99:8.2f} ms, {batch * 1e3 / p50:7.1f} tokens/s")


def write_decode_model(out_dir: Path, name: str, seed: int, shape: dict[str, Any], log) -> tuple[Path, Path]:
    """(HF model dir, its import-hf checkpoint) of the Mixtral-like model `name` of `shape`, written unless
    already there."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        raise ImportError("bench --decode needs transformers: pip install -e '.[hf]'") from None
    from ..hf.importer import import_hf_checkpoint

    hf_dir, checkpoint = out_dir / f"decode-{name}", out_dir / f"decode-{name}-moe"
    stamp = hf_dir / "bench-seed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"seed": seed, **shape} \
            and (checkpoint / "config.json").is_file():
        log(f"decode model {name}: reusing {hf_dir} (seed {seed})")
        return hf_dir, checkpoint
    started = time.perf_counter()
    log(f"decode model {name}: drawing it (seed {seed}) into {hf_dir} ...")
    torch.manual_seed(seed)
    MixtralForCausalLM(MixtralConfig(**shape)).save_pretrained(hf_dir)
    import_hf_checkpoint(hf_dir, checkpoint, log=lambda _: None)
    stamp.write_text(json.dumps({"seed": seed, **shape}))
    log(f"decode model {name}: written and imported in {time.perf_counter() - started:.0f}s")
    return hf_dir, checkpoint


def deploy_runners(hf_dir: Path, checkpoint: Path, name: str, log, transport: str = "auto") -> dict[str, Callable]:
    """The MoE app of decode model `name` (one deployment per expert, `transport` between its callers and
    experts; channels on 127.0.0.1) and two runner apps calling it: {mode: generate(ids, new_tokens)}."""
    from ..serving.app import build_app
    from ..serving.runner import build_runner_app

    log(f"deploying decode model {name}'s MoE app and its runners (direct, via the router) ...")
    serve.run(build_app({"checkpoint": str(checkpoint), "torch_threads": 1, "router_torch_threads": 1,
                         "transport": transport, "channel_host": "127.0.0.1"}),
              name=f"decode-moe-{name}", route_prefix=None)
    generators = {}
    for mode, calls in CLUSTER_MODES.items():
        handle = serve.run(build_runner_app({"hf_model": str(hf_dir), "moe_app": f"decode-moe-{name}",
                                             "moe_calls": calls, "torch_threads": 1, "max_input_tokens": 4096}),
                           name=f"{mode}-{name}", route_prefix=None)
        generators[mode] = lambda ids, n, handle=handle: handle.generate.remote(ids, n).result()
    return generators
