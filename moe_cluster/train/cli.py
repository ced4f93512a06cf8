"""`moe-cluster train` and `moe-cluster perplexity`: their flags and what they run.

`add_train_commands(commands, add_command)` adds both subcommands to the CLI's subparsers;
`add_command(commands, name, **kwargs)` is the CLI's own maker (it shows the defaults in --help).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..cli_checks import UsageError, checkpoint_dir, existing_file, hf_model_dir, output_dir, tokenizer_dir
from .balance import BALANCE_METHODS
from .model import PRESETS

__all__ = ["add_train_commands"]


def add_train_commands(commands: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]
                       ) -> None:
    _add_train(add_command(
        commands, "train", help="train a small MoE language model (and a dense baseline) on CPU, then export it",
        description="Train a decoder-only MoE language model (a Mixtral whose MoE blocks are moe-cluster's "
                    "routing, dispatch and experts) and a dense model with the same active parameters, on the "
                    "same batches, on text every machine has (Python's standard library source, the manual "
                    "pages), with a byte-level BPE tokenizer trained on the training split. Writes DIR/model "
                    "(save_pretrained: transformers, `import-hf`, `serve` and `generate` read it), "
                    "DIR/metrics.json (val_ppl, dense_val_ppl, unigram_val_ppl, loads, tokens/s), DIR/val.txt, "
                    "DIR/history.json and PNG plots. Progress (loss, tokens/s, ETA) goes to stderr."))
    _add_perplexity(add_command(
        commands, "perplexity", help="perplexity of a text under a Hugging Face causal LM, MoE blocks on the cluster",
        description="exp(mean token NLL) of --text, tokenized by the model's tokenizer and cut into "
                    "non-overlapping windows of --context-length tokens, each scored on its own. With "
                    "--checkpoint (the import-hf output of --hf-model) the MoE blocks run on an embedded local "
                    "Ray cluster (one deployment per expert), or in this process with --in-process; without "
                    "it, transformers runs the whole model (its own MoE blocks)."))


def _add_train(train: argparse.ArgumentParser) -> None:
    train.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    train.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                       help="model and data size (tiny: D=128, 4 layers, 8 experts top-2, context 128, 400 steps "
                            "of 16 windows: minutes on 2 cores; small: D=256, 6 layers, context 256, 2000 steps; smoke: D=32, "
                            "20 steps, seconds: checks the pipeline)")
    train.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    train.add_argument("--workers", type=int, default=1,
                       help="data-parallel workers: 1 trains in this process; W > 1 runs on Ray Train "
                            "(TorchTrainer, gloo, 1 CPU each; a running Ray cluster if there is one, else a "
                            "local one). The global batch is the same for any W")
    train.add_argument("--balance", choices=BALANCE_METHODS, help="load balancing: aux (Switch loss alpha*E*sum "
                       "f_i P_i), loss_free (DeepSeek-V3 selection bias, used in training only: Mixtral stores "
                       "none), none (default: the preset's, aux)")
    train.add_argument("--aux-alpha", type=float, help="weight alpha of the Switch loss (default: 0.01)")
    train.add_argument("--z-loss", type=float, help="weight of the router z-loss, 0 = off (default: 0)")
    train.add_argument("--top-k", type=int, help="experts per token (default: the preset's, 2)")
    train.add_argument("--ablations", action="store_true",
                       help="also train top-1/top-4 and each other balancing method, and measure perplexity with "
                            "each expert masked and the tokens per expert by domain (several times longer)")
    train.add_argument("--seed", type=int, default=0, help="seed of the data split, the weights and the batches")
    train.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    train.set_defaults(run=_cmd_train)


def _add_perplexity(perplexity: argparse.ArgumentParser) -> None:
    perplexity.add_argument("--hf-model", type=Path, required=True,
                            help="Hugging Face model directory with its tokenizer (e.g. DIR/model of `train`)")
    perplexity.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score (e.g. DIR/val.txt)")
    perplexity.add_argument("--checkpoint", type=Path,
                            help="the model's MoE blocks, as `moe-cluster import-hf HF_MODEL CHECKPOINT` wrote them")
    perplexity.add_argument("--in-process", action="store_true",
                            help="with --checkpoint: MoE blocks in this process (no Ray)")
    perplexity.add_argument("--context-length", type=int,
                            help="window length (default: the model's max_position_embeddings)")
    perplexity.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster (default: all)")
    perplexity.add_argument("--json", action="store_true",
                            help='print {"perplexity": ..., "tokens": ...} alone on stdout (the rest goes to stderr)')
    perplexity.set_defaults(run=_cmd_perplexity)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import run_training

    output_dir(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    changes = {k: v for k, v in dict(steps=args.steps, balance=args.balance, aux_alpha=args.aux_alpha,
                                     z_loss=args.z_loss, top_k=args.top_k, seed=args.seed).items() if v is not None}
    cfg = PRESETS[args.preset].replace(**changes)  # a bad value raises ValueError: the CLI's one line
    metrics = run_training(cfg, args.out, workers=args.workers, ablations=args.ablations,
                           log=lambda line: print(line, flush=True))
    keys = ("val_ppl", "dense_val_ppl", "unigram_val_ppl", "val_tokens", "tokens_per_s", "train_wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {args.out}/model, metrics.json, val.txt, history.json and the plots")
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    if args.in_process and args.checkpoint is None:
        raise UsageError("--in-process needs --checkpoint (without it, transformers runs the whole model "
                         "in this process anyway)")
    tokenizer_dir(hf_model_dir(args.hf_model), "--hf-model")  # the text is tokenized by the model's tokenizer
    existing_file(args.text, "--text", "a UTF-8 text file (e.g. DIR/val.txt of `moe-cluster train`)")
    if args.checkpoint is not None:
        checkpoint_dir(args.checkpoint)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        ppl, tokens = _perplexity(args)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": tokens}))
    else:
        where = "transformers" if args.checkpoint is None else "in process" if args.in_process else "on the cluster"
        print(f"perplexity {ppl:.4f} over {tokens} tokens (MoE blocks {where}, {time.perf_counter() - started:.1f}s)")
    return 0


def _perplexity(args: argparse.Namespace) -> tuple[float, int]:
    from transformers import AutoConfig, AutoTokenizer

    from .evaluate import perplexity

    ids = AutoTokenizer.from_pretrained(args.hf_model)(args.text.read_text(encoding="utf-8"),
                                                       add_special_tokens=False)["input_ids"]
    length = args.context_length or int(AutoConfig.from_pretrained(args.hf_model).max_position_embeddings)
    if args.checkpoint is None:
        from transformers import AutoModelForCausalLM

        from .evaluate import logits_fn

        return perplexity(logits_fn(AutoModelForCausalLM.from_pretrained(args.hf_model)), ids, length)
    if args.in_process:
        from ..hf.runner import HFMoERunner
        from .evaluate import logits_fn

        return perplexity(logits_fn(HFMoERunner.in_process(args.hf_model, args.checkpoint).model), ids, length)
    from .cluster import perplexity_on_local_cluster

    return perplexity_on_local_cluster(args.hf_model, args.checkpoint, ids, length, args.num_cpus,
                                       log=lambda line: print(line, flush=True))
