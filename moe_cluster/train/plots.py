"""The PNG figures of `moe-cluster train`, drawn from its history and metrics (matplotlib, Agg).

    loss.png           training loss per step of every model trained (moving average of 10 steps)
    experts.png        per MoE layer: each expert's share of the routed rows over training (stacked),
                       and the max violation (max load / mean load - 1) on a second axis
    domains.png        per MoE layer: share of each domain's validation rows that went to each expert
                       (only with the per-domain loads, i.e. --ablations)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["write_plots"]


def write_plots(histories: dict[str, dict], metrics: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install 'moe-cluster[train]')")
        return
    _loss(plt, histories, out / "loss.png")
    _experts(plt, histories["moe"], out / "experts.png")
    if "domain_expert_load" in metrics:
        _domains(plt, metrics["domain_expert_load"], out / "domains.png")
    log(f"wrote the plots in {out}")


def _smooth(values: list[float], width: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def _loss(plt, histories: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot(_smooth(history["loss"]), label=name, linewidth=2 if name in ("moe", "dense") else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token, mean of 10 steps)")
    ax.set_ylim(top=min(max(h["loss"][min(len(h["loss"]) - 1, 20)] for h in histories.values()) + 0.5, 9))
    ax.legend()
    ax.set_title("training loss: MoE vs dense (same active parameters, same batches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _experts(plt, history: dict, path: Path) -> None:
    loads = history["tokens_per_expert"]  # [step][layer][E]
    layers, experts = len(loads[0]), len(loads[0][0])
    fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.8), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        shares = [_smooth([s[layer][e] / max(1, sum(s[layer])) for s in loads]) for e in range(experts)]
        ax.stackplot(range(len(loads)), shares, labels=[f"e{e}" for e in range(experts)])
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        twin = ax.twinx()
        twin.plot(_smooth([s[layer] for s in history["max_violation"]]), color="black", linewidth=1)
        twin.set_ylabel("max violation" if layer == layers - 1 else "")
    axes[0][0].set_ylabel("share of routed rows")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=experts, frameon=False)
    fig.suptitle("tokens per expert over training (stacked shares; black: max load / mean - 1)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _domains(plt, by_domain: dict[str, list[list[int]]], path: Path) -> None:
    domains = sorted(by_domain)
    layers, experts = len(by_domain[domains[0]]), len(by_domain[domains[0]][0])
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 0.6 * len(domains) + 2.2), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        grid = [[c / max(1, sum(by_domain[d][layer])) for c in by_domain[d][layer]] for d in domains]
        image = ax.imshow(grid, cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(experts), [str(e) for e in range(experts)])
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains))
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}")
        for d, row in enumerate(grid):
            for e, share in enumerate(row):
                ax.text(e, d, f"{share:.2f}", ha="center", va="center", color="white", fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the domain's rows")
    fig.suptitle("validation rows per expert, by domain", y=1.04)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
