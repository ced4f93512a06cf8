"""Milliseconds per decode step of B sequences at several contexts, through the DecodeLoop (in process, no Ray).

    .venv/bin/python scripts/decode_step_bench.py --hf-model /tmp/bench22/decode-16-layer \
        --checkpoint /tmp/bench22/decode-16-layer-moe [--batch 8] [--contexts 128 512 2048] \
        [--new-tokens 32] [--extra-tokens E] [--repeats 1] [--hf-generate] [--json out.json]

For each context S: B requests of S random prompt ids (greedy, ignore_eos) are submitted together
to a `DecodeLoop(runner.model, runner.moe_call, max_num_seqs=B)` of
`HFMoERunner.in_process(hf_model, checkpoint)`; every token event's arrival time is recorded in
its emit callback, with the loop's step count then (stats["steps"], counted before a step's
tokens go out, so it says which step a token is of). A step in which all B sequences get a token
is a decode step of the whole batch (every prompt prefilled, none ended); the interval between
two consecutive such steps, averaged over the B sequences' tokens, is one sample. Once N + 1 such
steps have gone by, the requests are cancelled (SequenceHandle.cancel) and the loop drains. The
requests ask for N + extra tokens (--extra-tokens, default B x S / 16 + 8) so that the first
sequences still decode when the last prompt is in: a loop that prefills in chunks beside the
decoding sequences takes many steps to take in B long prompts. The step time reported for S is
the median and p90 of the samples (N per batch, pooled over --repeats batches).

One torch thread (torch.set_num_threads(1)); one untimed warm-up request first. "other cores":
how many cores other processes kept busy during the batches (from /proc/stat, minus this
process's own CPU time): on a shared machine, read the step times beside it. With
--hf-generate, the same batch through transformers' `model.generate` of the whole HF model
(greedy, N new tokens, one torch thread): its step time is the interval between consecutive
calls of a stopping criterion (called once per generated token), after the first (the prefill).

It uses only DecodeLoop's submit / close / stats, GenerationRequest and Event, so it runs against
any version of the loop: to measure a commit, run it with PYTHONPATH pointing at that commit's
checkout (check `python -c 'import moe_cluster; print(moe_cluster.__file__)'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time

import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine(*names: str) -> tuple:
    """DecodeLoop, GenerationRequest, SamplingParams of the moe_cluster imported: moe_cluster/engine/ (since
    the engine's own package) or moe_cluster/hf/ (before). Chosen by what that package's directory holds,
    not by trying to import: with PYTHONPATH at an older checkout, an editable install of a newer one
    would answer `import moe_cluster.engine` from the newer one."""
    import importlib
    from pathlib import Path

    import moe_cluster

    if (Path(moe_cluster.__file__).parent / "engine" / "scheduler.py").is_file():
        modules = {"DecodeLoop": "engine.scheduler", "GenerationRequest": "engine.scheduler",
                   "SamplingParams": "engine.sampling"}
    else:
        modules = {"DecodeLoop": "hf.decode_loop", "GenerationRequest": "hf.decode_loop",
                   "SamplingParams": "hf.sampling"}
    package = Path(moe_cluster.__file__).parent
    found = tuple(getattr(importlib.import_module(f"moe_cluster.{modules[name]}"), name) for name in names)
    for thing in found:
        if not Path(importlib.import_module(thing.__module__).__file__).is_relative_to(package):
            raise RuntimeError(f"{thing.__module__} is not from {package}: mixed checkouts")
    return found


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherWork:
    """How many cores other processes kept busy meanwhile: (machine busy - this process's CPU) / wall."""

    def __enter__(self) -> "OtherWork":
        self.busy, self.own, self.wall = busy_cpu_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = busy_cpu_s()
        wall = time.perf_counter() - self.wall
        self.cores = None if busy is None or self.busy is None else \
            max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall
        self.own_cores = (time.process_time() - self.own) / wall


def step_times(tokens: list[tuple[int, float, int]], batch: int) -> list[float]:
    """Decode steps of the whole batch, in s, from the token events (sequence, arrival time, the loop's step
    count when it was told: stats["steps"], counted before a step's tokens go out). The steps in which all
    `batch` sequences got a token are the steps of the whole batch (every prompt prefilled, none ended); each
    pair of consecutive ones gives one sample: the mean over the sequences of the interval between their two
    tokens."""
    steps: dict[int, dict[int, float]] = {}
    for sequence, arrival, step in tokens:
        steps.setdefault(step, {})[sequence] = arrival
    return [statistics.fmean(steps[k + 1][i] - steps[k][i] for i in steps[k]) for k in sorted(steps)
            if len(steps[k]) == batch and len(steps.get(k + 1, ())) == batch]


def run_batch(loop, prompts: list[list[int]], new_tokens: int, extra_tokens: int, timeout_s: float = 3600) -> dict:
    """Submit the prompts together (max_new_tokens = new_tokens + extra_tokens each, greedy, ignore_eos) and
    collect their token events until `new_tokens` + 1 steps of the whole batch have gone by, then cancel
    them and wait until the loop is idle."""
    GenerationRequest, SamplingParams = engine("GenerationRequest", "SamplingParams")
    batch = len(prompts)
    arrivals: list[list[float]] = [[] for _ in prompts]
    tokens: list[tuple[int, float, int]] = []  # (sequence, arrival, the loop's step count then)
    per_step: dict[int, int] = {}
    errors: list[BaseException] = []
    ended = [0]
    enough = threading.Event()  # new_tokens + 1 steps of the whole batch, or every request ended

    def emit_for(i: int):
        def emit(event) -> None:  # in the loop's thread
            now = time.perf_counter()
            if event.token_id is not None:
                step = loop.stats["steps"]
                arrivals[i].append(now)
                tokens.append((i, now, step))
                per_step[step] = per_step.get(step, 0) + 1
                if sum(count == batch for count in per_step.values()) > new_tokens:
                    enough.set()
            if event.error is not None:
                errors.append(event.error)
            if event.last:
                ended[0] += 1
                if ended[0] == batch:
                    enough.set()
        return emit

    steps_before = loop.stats.get("steps", 0)
    started = time.perf_counter()
    handles = [loop.submit(GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens + extra_tokens,
                                             sampling=SamplingParams(ignore_eos=True)), emit_for(i))
               for i, prompt in enumerate(prompts)]  # back to back: they join together as far as the loop lets them
    if not enough.wait(timeout=timeout_s):
        raise TimeoutError(f"the batch did not finish within {timeout_s:.0f} s")
    wall = time.perf_counter() - started
    for handle in handles:
        handle.cancel()  # they leave at the next step boundary
    deadline = time.monotonic() + 600
    while (loop.stats.get("running") or loop.stats.get("waiting")) and time.monotonic() < deadline:
        time.sleep(0.01)
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}") from errors[0]
    steps = step_times(tokens, batch)[:new_tokens]
    if len(steps) < new_tokens:
        print(f"    only {len(steps)} steps of all {batch} sequences (every prompt prefilled, none ended): "
              f"raise --extra-tokens", flush=True)
    return {"step_s": steps, "wall_s": wall, "first_token_s": [times[0] - started for times in arrivals if times],
            "loop_steps": loop.stats.get("steps", 0) - steps_before}


def hf_generate_steps(model, prompts: list[list[int]], new_tokens: int) -> list[float]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    calls: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            calls.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([Clock()]),
                       pad_token_id=0)
    return [b - a for a, b in zip(calls, calls[1:])]


def summary(step_s: list[float]) -> dict:
    ms = [s * 1e3 for s in step_s]
    if not ms:
        return {"steps": 0}
    return {"steps": len(ms), "median_ms": round(statistics.median(ms), 1), "p90_ms": round(percentile(ms, 0.9), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-model", required=True, help="the Hugging Face model directory")
    parser.add_argument("--checkpoint", required=True, help="its import-hf MoE checkpoint")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together (B)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="decode steps of the whole batch to time per batch (N)")
    parser.add_argument("--extra-tokens", type=int, default=None,
                        help="max_new_tokens beyond N, so that the first sequences are still decoding when the "
                             "last prompt is in (a chunked prefill takes steps); default B x S / 16 + 8")
    parser.add_argument("--repeats", type=int, default=1, help="batches per context (their steps pooled)")
    parser.add_argument("--min-token-id", type=int, default=3, help="prompt ids are drawn from [this, vocab)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-generate", action="store_true",
                        help="also time transformers' model.generate of the whole HF model, same batch")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import moe_cluster
    from moe_cluster.hf.runner import HFMoERunner

    (DecodeLoop,) = engine("DecodeLoop")

    runner = HFMoERunner.in_process(args.hf_model, args.checkpoint)
    config = runner.model.config
    vocab = int(config.vocab_size)
    longest = max(args.contexts) + args.new_tokens + (args.extra_tokens if args.extra_tokens is not None
                                                      else args.batch * max(args.contexts) // 16 + 8)
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    if max_positions and longest > max_positions:
        parser.error(f"context {max(args.contexts)} + new and extra tokens = {longest} > the model's "
                     f"max_position_embeddings {max_positions}: lower --extra-tokens")
    rng = random.Random(args.seed)
    loop = DecodeLoop(runner.model, runner.moe_call, max_num_seqs=args.batch)
    hf_model = None
    if args.hf_generate:
        from transformers import AutoModelForCausalLM
        hf_model = AutoModelForCausalLM.from_pretrained(args.hf_model, dtype=torch.float32).eval()
    load_before = os.getloadavg()
    results = {"moe_cluster": moe_cluster.__file__, "decode_loop": DecodeLoop.__module__, "hf_model": args.hf_model,
               "checkpoint": args.checkpoint, "batch": args.batch, "new_tokens": args.new_tokens,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "loadavg_before": load_before, "contexts": []}
    print(f"moe_cluster from {moe_cluster.__file__} ({DecodeLoop.__module__}); B={args.batch}, N={args.new_tokens}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load_before[0]:.2f}",
          flush=True)
    try:
        run_batch(loop, [[rng.randrange(args.min_token_id, vocab) for _ in range(16)]], 3, 1)  # warm-up, untimed
        if hf_model is not None:
            hf_generate_steps(hf_model, [[rng.randrange(args.min_token_id, vocab) for _ in range(16)]], 4)
        header = (f"{'context':>7} {'steps':>5} {'median ms':>9} {'p90 ms':>8} {'min..max ms':>15} "
                  f"{'batch wall s':>12} {'other cores':>11}")
        if hf_model is not None:
            header += f" {'HF generate median/p90 ms':>26}"
        print(header, flush=True)
        for context in args.contexts:
            steps, walls, loop_steps, hf_steps, others = [], [], [], [], []
            for _ in range(args.repeats):
                prompts = [[rng.randrange(args.min_token_id, vocab) for _ in range(context)]
                           for _ in range(args.batch)]
                with OtherWork() as other:
                    extra = args.extra_tokens if args.extra_tokens is not None else args.batch * context // 16 + 8
                batch = run_batch(loop, prompts, args.new_tokens, extra)
                others.append(other)
                steps += batch["step_s"]
                walls.append(batch["wall_s"])
                loop_steps.append(batch["loop_steps"])
                if hf_model is not None:
                    hf_steps += hf_generate_steps(hf_model, prompts, args.new_tokens)
            other_cores = [o.cores for o in others if o.cores is not None]
            row = {"context": context, **summary(steps), "step_ms": [round(s * 1e3, 1) for s in steps],
                   "batch_wall_s": [round(w, 2) for w in walls], "loop_steps": loop_steps,
                   "own_cores": [round(o.own_cores, 2) for o in others],
                   "other_cores": [round(c, 2) for c in other_cores], "loadavg": os.getloadavg()}
            line = (f"{context:>7} {row['steps']:>5} {row.get('median_ms', float('nan')):>9.1f} "
                    f"{row.get('p90_ms', float('nan')):>8.1f} "
                    f"{row.get('min_ms', float('nan')):>7.1f}..{row.get('max_ms', float('nan')):<7.1f} "
                    f"{statistics.fmean(walls):>12.2f} "
                    f"{statistics.fmean(other_cores) if other_cores else float('nan'):>11.2f}")
            if hf_model is not None:
                row["hf_generate"] = {**summary(hf_steps), "step_ms": [round(s * 1e3, 1) for s in hf_steps]}
                line += f" {row['hf_generate'].get('median_ms', float('nan')):>17.1f}/" \
                        f"{row['hf_generate'].get('p90_ms', float('nan')):<8.1f}"
            results["contexts"].append(row)
            print(line, flush=True)
    finally:
        loop.close()
    results["loadavg_after"] = os.getloadavg()
    print(f"load average after: {results['loadavg_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
