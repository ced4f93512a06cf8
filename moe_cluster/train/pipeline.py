"""`moe-cluster train`, start to end: text -> tokenizer -> training (in process, or data-parallel on Ray
Train) -> evaluation -> export. What it writes in DIR:

    model/          the MoE model as `save_pretrained` writes it (Mixtral) + tokenizer files
    tokenizer.json  the byte-level BPE trained on the training split
    val.txt         the validation text (documents joined by <|endoftext|>): `perplexity --text` scores it
    metrics.json    val_ppl, dense_val_ppl, unigram_val_ppl, parameters, tokens/s, loads, ablations
    history.json    per step and model: loss, tokens per expert per layer, max violation
    loss.png, experts.png (+ domains.png with --ablations)
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .balance import BALANCE_METHODS
from .data import Corpus, DOC_SEPARATOR, encode_documents, load_corpus, train_tokenizer
from .evaluate import expert_load, logits_fn, masked_perplexities, perplexity, unigram_perplexity
from .loop import Trainee, build_trainees, train_models
from .model import TrainConfig, export_model, moe_blocks, parameter_counts
from .plots import write_plots

__all__ = ["TrainData", "prepare_data", "variants_of", "run_training", "exported_routing", "perplexity_tokens"]


@dataclass
class TrainData:
    corpus: Corpus
    tokenizer: object  # tokenizers.Tokenizer
    stream: torch.Tensor  # the training split's tokens, documents separated by EOS
    val_ids: list[int]  # val.txt tokenized as one text (what `perplexity --text val.txt` scores)
    val_ids_by_domain: dict[str, list[int]]


def prepare_data(cfg: TrainConfig, out: Path, log: Callable[[str], None]) -> TrainData:
    corpus = load_corpus(cfg.seed, cfg.chars_per_domain)
    tokenizer = train_tokenizer([d.text for d in corpus.train], cfg.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    stream = encode_documents(tokenizer, corpus.train)
    val_text = corpus.val_text()
    (out / "val.txt").write_text(val_text, encoding="utf-8")
    by_domain = {domain: tokenizer.encode(DOC_SEPARATOR.join(d.text for d in corpus.val if d.domain == domain)).ids
                 for domain in corpus.domains}
    data = TrainData(corpus, tokenizer, stream, tokenizer.encode(val_text).ids, by_domain)
    counts = {dom: sum(1 for d in corpus.train if d.domain == dom) for dom in corpus.domains}
    log(f"data: {len(corpus.train)} training documents {counts}, {len(corpus.val)} validation documents; "
        f"{stream.numel()} training tokens, {len(data.val_ids)} validation tokens (vocabulary {cfg.vocab_size})")
    return data


def variants_of(cfg: TrainConfig, ablations: bool) -> dict[str, TrainConfig]:
    """The models to train: the MoE and its dense baseline; with ablations, top-1/2/4 and each balancing."""
    variants = {"moe": cfg, "dense": cfg}
    if ablations:
        for k in (1, 2, 4):
            if k != cfg.top_k and k <= cfg.num_experts:
                variants[f"moe_top{k}"] = cfg.replace(top_k=k)
        for method in BALANCE_METHODS:
            if method != cfg.balance:
                variants[f"moe_{method}"] = cfg.replace(balance=method)
    return variants


@contextlib.contextmanager
def exported_routing(model: torch.nn.Module):
    """Route as the exported model does: without the loss-free selection bias (Mixtral has no slot for it)."""
    blocks = moe_blocks(model)
    saved = [b.use_selection_bias for b in blocks]
    for b in blocks:
        b.use_selection_bias = False
    try:
        yield model
    finally:
        for b, used in zip(blocks, saved):
            b.use_selection_bias = used


def run_training(cfg: TrainConfig, out: Path, workers: int = 1, ablations: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and export into `out`; returns metrics.json's content."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out, log)
    variants = variants_of(cfg, ablations)
    log(f"training {', '.join(variants)} for {cfg.steps} steps of {cfg.batch_size} x {cfg.context_length} tokens"
        + (f" on Ray Train ({workers} workers)" if workers > 1 else " in this process"))
    if workers > 1:
        from .distributed import train_on_ray

        trainees = train_on_ray(variants, data.stream, cfg, workers)
    else:
        trainees = build_trainees(variants)
        train_models(trainees, data.stream, cfg)
    trained_s = time.perf_counter() - started
    metrics = evaluate_all({t.name: t for t in trainees}, data, cfg, ablations)
    metrics.update(workers=workers, train_wall_seconds=round(trained_s, 1))
    export_model(trainees[0].model, cfg, data.tokenizer, out / "model")
    histories = {t.name: t.history.to_dict() for t in trainees}
    (out / "history.json").write_text(json.dumps(histories))
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_plots(histories, metrics, out, log)
    return metrics


def _summary(trainee: Trainee, val_ids: list[int]) -> dict:
    history, cfg = trainee.history, trainee.cfg
    with exported_routing(trainee.model) as model:
        ppl, _ = perplexity(logits_fn(model), val_ids, cfg.context_length)
    out = {"val_ppl": ppl, "parameters": parameter_counts(trainee.model), "train_seconds": round(history.seconds, 1),
           "tokens_per_s": round(history.tokens / max(history.seconds, 1e-9), 1),
           "final_train_loss": sum(history.loss[-10:]) / len(history.loss[-10:])}
    if history.max_violation:
        tail = history.max_violation[-max(1, len(history.max_violation) // 10):]
        out["max_violation_final"] = [round(sum(s[i] for s in tail) / len(tail), 4) for i in range(len(tail[0]))]
    if trainee.cfg.balance == "loss_free":  # as trained: the selection bias in place
        out["val_ppl_with_selection_bias"] = perplexity(logits_fn(trainee.model), val_ids, cfg.context_length)[0]
    return out


def evaluate_all(trainees: dict[str, Trainee], data: TrainData, cfg: TrainConfig, ablations: bool) -> dict:
    summaries = {name: _summary(t, data.val_ids) for name, t in trainees.items()}
    moe, dense = summaries["moe"], summaries["dense"]
    metrics = {
        "val_ppl": moe["val_ppl"], "dense_val_ppl": dense["val_ppl"],
        "unigram_val_ppl": unigram_perplexity(data.stream, data.val_ids, cfg.context_length, cfg.vocab_size),
        "val_tokens": perplexity_tokens(data.val_ids, cfg.context_length), "context_length": cfg.context_length,
        "parameters": {"moe": moe["parameters"], "dense": dense["parameters"]},
        "tokens_seen": trainees["moe"].history.tokens,
        "tokens_per_s": {"moe": moe["tokens_per_s"], "dense": dense["tokens_per_s"]},
        "train_seconds": {"moe": moe["train_seconds"], "dense": dense["train_seconds"]},
        "max_violation_final": moe.get("max_violation_final"), "config": cfg.to_dict(), "models": summaries,
    }
    if ablations:
        model, L = trainees["moe"].model, cfg.context_length
        with exported_routing(model):
            metrics["masked_expert_val_ppl"] = masked_perplexities(model, data.val_ids, L)
            metrics["domain_expert_load"] = {d: expert_load(model, ids, L) for d, ids in data.val_ids_by_domain.items()}
    return metrics


def perplexity_tokens(ids: list[int], context_length: int) -> int:
    """How many tokens `perplexity` predicts in `ids`: every token but the first of each window."""
    full, rest = divmod(len(ids), context_length)
    return full * (context_length - 1) + max(rest - 1, 0)
