"""The figure of `moe-cluster bench` (results.png), drawn from its results dict; no Ray.

Three panels: tokens/s and p50 latency against T with one client (a line for each mode that
has records), and tokens/s with concurrent clients (a bar per mode); one legend under them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["plot", "MODES"]

MODES = ("inprocess", "transformers", "monolithic", "handle", "handle-auto", "http")  # the plot's order and colours


def plot(results: dict[str, Any], path: Path, log: Callable[[str], None]) -> None:
    """Write the figure of `results` (run_bench's dict) to `path`; a log line if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'moe-cluster[bench]')")
        return
    single = [r for r in results["records"] if r["clients"] == 1 and r["mode"] in MODES]
    many = [r for r in results["records"] if r["clients"] > 1]
    colour = {mode: f"C{i}" for i, mode in enumerate(MODES)}
    fig, (ax_tps, ax_lat, ax_many) = plt.subplots(1, 3, figsize=(15, 4.8), width_ratios=(1, 1, 0.7))
    for mode in (m for m in MODES if any(r["mode"] == m for r in single)):
        rows = sorted((r for r in single if r["mode"] == mode), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rows]
        ax_tps.plot(tokens, [r["tokens_per_s"] for r in rows], marker="o", color=colour[mode], label=mode)
        ax_lat.plot(tokens, [r["p50_ms"] for r in rows], marker="o", color=colour[mode])
    ax_lat.axhline(results["serve_floor_p50_ms"], color="grey", linestyle="--", label="Serve floor (1 expert)")
    ax_lat.axhline(results["serve_fanout_floor_p50_ms"], color="grey", linestyle=":",
                   label=f"Serve fan-out floor ({results['fanout_width']} experts)")
    measured_t = sorted({r["tokens"] for r in single})
    _log_axes(ax_tps, measured_t, "throughput", "tokens/s")
    _log_axes(ax_lat, measured_t, "latency", "p50 latency (ms)")
    _plot_concurrent(ax_many, many, single, colour)
    handles, labels = [], []
    for ax in (ax_tps, ax_lat, ax_many):
        ax_handles, ax_labels = ax.get_legend_handles_labels()
        handles, labels = handles + ax_handles, labels + ax_labels
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"moe-cluster bench: {results['preset']} ({results['cores']} cores, "
                 f"peak {results['matmul_peak_gflops']:.0f} GFLOP/s)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend under the panels, off the data
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log(f"wrote {path}")


def _log_axes(ax, measured_t: list[int], title: str, ylabel: str) -> None:
    """Log-log axes with a tick at each measured T and plain numbers (10 20 50, not 10^1)."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(measured_t, [str(t) for t in measured_t])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("tokens per request (one client)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _plot_concurrent(ax, many: list[dict], single: list[dict], colour: dict[str, str]) -> None:
    """Bars: tokens/s with concurrent clients per mode (p50 on each bar), and the one-client
    in-process throughput at the largest T as a reference line."""
    if not many:
        ax.set_axis_off()
        return
    modes = [m for m in MODES if any(r["mode"] == m for r in many)]
    rows = [next(r for r in many if r["mode"] == m) for m in modes]
    bars = ax.bar(modes, [r["tokens_per_s"] for r in rows], color=[colour[m] for m in modes])
    ax.bar_label(bars, labels=[f"p50 {r['p50_ms']:.0f} ms" for r in rows], fontsize=8)
    inprocess = [r for r in single if r["mode"] == "inprocess"]
    if inprocess:
        big = max(inprocess, key=lambda r: r["tokens"])
        ax.axhline(big["tokens_per_s"], color=colour["inprocess"], linestyle="--",
                   label=f"inprocess, one client, T={big['tokens']}")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{rows[0]['clients']} concurrent clients x T={rows[0]['tokens']}")
