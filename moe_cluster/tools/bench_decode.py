"""`moe-cluster bench --decode`: greedy decoding of a whole model, MoE blocks in process vs on the cluster.

The model is the README's Mixtral-like one: D=1024, F=3584, 8 SwiGLU experts, top-2, 4 layers,
16 heads (8 key/value), vocab 32000, random weights drawn from the bench's seed. It is written
once under OUT/decode-model (Hugging Face format) and OUT/decode-model-moe (`import-hf`), and
reused by later runs with the same seed.

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

__all__ = ["DecodeResults", "decode_records", "DECODE_MODEL"]

DECODE_MODEL = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
PROMPT_TOKENS, NEW_TOKENS, BATCHES, RUNS = 8, 16, (1, 8), 3
CLUSTER_MODES = {"decode-cluster": "direct", "decode-cluster-router": "router"}  # mode: the runner's moe_calls


@dataclass
class DecodeResults:
    records: list[dict[str, Any]] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)


def decode_records(settings, out_dir: Path, log: Callable[[str], None]) -> DecodeResults:
    """Decode in every mode at every batch size (Serve must be running); the records and any wrong answers."""
    from ..hf.runner import GenerateLimits, HFMoERunner

    shape = {**DECODE_MODEL, **dict(settings.decode_model)}
    hf_dir, checkpoint = write_decode_model(out_dir, settings.seed, shape, log)
    generators = deploy_runners(hf_dir, checkpoint, log, getattr(settings, "transport", "auto"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = HFMoERunner.in_process(hf_dir, checkpoint, limits=GenerateLimits(max_input_tokens=4096))
        generators = {"decode-inprocess": local.generate, **generators}
        results = DecodeResults(model={**shape, "seed": settings.seed, "prompt_tokens": PROMPT_TOKENS,
                                       "new_tokens": NEW_TOKENS, "timed_runs": RUNS})
        for batch in BATCHES:
            time_batch(generators, batch, shape["vocab_size"], results, log, getattr(settings, "transport", "auto"))
    finally:
        torch.set_num_threads(threads)
    return results


def time_batch(generators: dict[str, Callable], batch: int, vocab_size: int, results: DecodeResults, log,
               transport: str = "auto") -> None:
    """Every mode at one batch size, in turns: one warm-up run each, then RUNS timed runs each."""
    ids = [[(17 * b + 3 * i) % (vocab_size - 1) + 1 for i in range(PROMPT_TOKENS)] for b in range(batch)]
    steps_ms: dict[str, list[float]] = {mode: [] for mode in generators}
    outputs: dict[str, list] = {}
    for run in range(RUNS + 1):
        for mode, generate in generators.items():
            result = generate(ids, NEW_TOKENS)
            outputs.setdefault(mode, result["output_ids"])
            wrong = f"{mode} batch {batch}: output ids differ from decode-inprocess"
            if result["output_ids"] != outputs["decode-inprocess"] and wrong not in results.wrong_answers:
                results.wrong_answers.append(wrong)
            if run:  # run 0 warms every replica up
                steps_ms[mode] += [step["ms"] for step in result["timings"]["per_token"][1:]]
    for mode, ms in steps_ms.items():
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        calls = CLUSTER_MODES.get(mode)
        results.records.append({
            "mode": mode, "tokens": batch, "clients": 1, "batch": batch, "ms_per_token": p50,
            "tokens_per_s": batch * 1e3 / p50, "p50_ms": p50, "p99_ms": p99, "requests": len(ms),
            "transport": None if calls is None else transport, "moe_calls": calls})
        log(f"  {mode:>22}  batch {batch}: {p50:8.2f} ms per decode step (median of {len(ms)}), "
            f"p99 {p99:8.2f} ms, {batch * 1e3 / p50:7.1f} tokens/s")


def write_decode_model(out_dir: Path, seed: int, shape: dict[str, Any], log) -> tuple[Path, Path]:
    """(HF model dir, its import-hf checkpoint) of the Mixtral-like model `shape`, written unless already there."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        raise ImportError("bench --decode needs transformers: pip install -e '.[hf]'") from None
    from ..hf.importer import import_hf_checkpoint

    hf_dir, checkpoint = out_dir / "decode-model", out_dir / "decode-model-moe"
    stamp = hf_dir / "bench-seed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"seed": seed, **shape} \
            and (checkpoint / "config.json").is_file():
        log(f"decode model: reusing {hf_dir} (seed {seed})")
        return hf_dir, checkpoint
    started = time.perf_counter()
    log(f"decode model: drawing the Mixtral-like model (seed {seed}) into {hf_dir} ...")
    torch.manual_seed(seed)
    MixtralForCausalLM(MixtralConfig(**shape)).save_pretrained(hf_dir)
    import_hf_checkpoint(hf_dir, checkpoint, log=lambda _: None)
    stamp.write_text(json.dumps({"seed": seed, **shape}))
    log(f"decode model: written and imported in {time.perf_counter() - started:.0f}s")
    return hf_dir, checkpoint


def deploy_runners(hf_dir: Path, checkpoint: Path, log, transport: str = "auto") -> dict[str, Callable]:
    """The MoE app of the decode model (one deployment per expert, `transport` between its callers and
    experts; channels on 127.0.0.1) and two runner apps calling it."""
    from ..serving.app import build_app
    from ..serving.runner import build_runner_app

    log("deploying the decode model's MoE app and its runners (direct, via the router) ...")
    serve.run(build_app({"checkpoint": str(checkpoint), "torch_threads": 1, "router_torch_threads": 1,
                         "transport": transport, "channel_host": "127.0.0.1"}),
              name="decode-moe", route_prefix=None)
    generators = {}
    for mode, calls in CLUSTER_MODES.items():
        handle = serve.run(build_runner_app({"hf_model": str(hf_dir), "moe_app": "decode-moe", "moe_calls": calls,
                                             "torch_threads": 1, "max_input_tokens": 4096}),
                           name=mode, route_prefix=None)
        generators[mode] = lambda ids, n, handle=handle: handle.generate.remote(ids, n).result()
    return generators
