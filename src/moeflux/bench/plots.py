"""``moeflux report``: PNG plots of one or more ``moeflux bench --json`` files (needs matplotlib).

* ``latency_vs_tokens.png``: median latency against tokens, log-log, one panel per layer
  shape, one line per system, the roofline floor dashed.
* ``tflops.png``: TFLOP/s per shape per system (bars), the measured GEMM peak dashed.
* ``expert_load.png``: tokens per expert, for each layer's largest batch, the mean dashed.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from moeflux.bench.metrics import geomean

PLOT_FILES = ("latency_vs_tokens.png", "tflops.png", "expert_load.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("moeflux report draws with matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _colors(documents: list[dict]) -> dict[str, str]:
    """One color per system, the same in every plot."""
    names = []
    for document in documents:
        names += [name for name in document["settings"]["systems"] if name not in names]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _subtitle(documents: list[dict]) -> str:
    """Device, dtype, mode, date and commit, each listed once however many files share it."""

    def values(section: str, key: str) -> str:
        return " / ".join(dict.fromkeys(str(document[section][key]) for document in documents))

    return (f"{values('env', 'device')}, {values('settings', 'dtype')}, {values('settings', 'mode')}, "
            f"{values('env', 'date')}, commit {values('env', 'commit')}")  # fmt: skip


def _grid(plt, panels: int, width: float = 4.6, height: float = 3.6):
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.6), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return figure, list(axes.flat)


def plot_latency(documents: list[dict], path: str, colors: dict[str, str]) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 2, 10 rather than 5x10^-1
    panels = []  # (title, rows, shapes)
    for document in documents:
        by_layer = defaultdict(list)
        for row in document["rows"]:
            if row["status"] == "ok":
                by_layer[row["layer"]].append(row)
        floors = {shape["name"]: shape for shape in document["shapes"]}
        for layer, rows in by_layer.items():
            panels.append((f"{layer} ({document['settings']['dtype']})", rows, floors))
    figure, axes = _grid(plt, max(len(panels), 1))
    for ax, (title, rows, shapes) in zip(axes, panels):
        # Shapes of one layer with the same T (e.g. 2 x 4096 and 1 x 8192) merge into one point.
        by_system = defaultdict(lambda: defaultdict(list))
        for row in rows:
            by_system[row["system"]][row["T"]].append(row["median_ms"])
        for system, points in by_system.items():
            tokens = sorted(points)
            ax.plot(tokens, [geomean(points[t]) for t in tokens], marker="o", markersize=4, label=system,
                    color=colors.get(system))  # fmt: skip
        floors = defaultdict(list)
        for name in {row["shape"] for row in rows}:
            floors[shapes[name]["tokens"]].append(shapes[name]["floor_ms"])
        tokens = sorted(floors)
        ax.plot(tokens, [geomean(floors[t]) for t in tokens], linestyle="--", marker="_", markersize=12,
                color="black", linewidth=1, label="roofline floor")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high / low < 20:  # under ~1 decade the major ticks are too few: label the minor ones too
            ax.yaxis.set_minor_formatter(plain)
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens T")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("moeflux bench: latency vs tokens\n" + _subtitle(documents), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_tflops(documents: list[dict], path: str, colors: dict[str, str]) -> None:
    plt = _pyplot()
    groups = []  # (shape name, {system: tflops}, gemm peak)
    for document in documents:
        peak = document["calibration"]["gemm_tflops"]
        for shape in document["shapes"]:
            bars = {row["system"]: row["tflops"] for row in document["rows"]
                    if row["status"] == "ok" and row["shape"] == shape["name"]}  # fmt: skip
            if bars:
                groups.append((shape["name"], bars, peak))
    systems = list(dict.fromkeys(system for _, bars, _ in groups for system in bars))
    width = 0.8 / max(len(systems), 1)
    bars = len(groups) * max(len(systems), 1)
    figure, ax = plt.subplots(figsize=(min(20.0, max(6.0, 0.3 * bars + 2)), 5.2))
    for i, system in enumerate(systems):
        xs = [g + (i - (len(systems) - 1) / 2) * width for g, (_, bars, _) in enumerate(groups) if system in bars]
        ys = [bars[system] for _, bars, _ in groups if system in bars]
        ax.bar(xs, ys, width=width, label=system, color=colors.get(system))
    for g, (_, _, peak) in enumerate(groups):
        ax.hlines(peak, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1,
                  label="measured GEMM peak" if g == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([name for name, _, _ in groups], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s (FLOPs counted from the shape)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("moeflux bench: TFLOP/s per shape\n" + _subtitle(documents), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_expert_load(documents: list[dict], path: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    chosen = []  # the largest batch of each layer: its histogram is the least noisy
    for document in documents:
        largest = {}
        for shape in document["shapes"]:
            if shape["tokens_per_expert"] is None:
                continue
            if shape["tokens"] >= largest.get(shape["layer"], {}).get("tokens", -1):
                largest[shape["layer"]] = shape
        chosen += largest.values()
    figure, axes = _grid(plt, max(len(chosen), 1), height=3.0)
    for ax, shape in zip(axes, chosen):
        counts = shape["tokens_per_expert"]
        ax.bar(range(len(counts)), counts, width=1.0, color="#1f77b4", edgecolor="white",
               linewidth=0.3 if len(counts) <= 64 else 0)  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(shape["mean_tokens_per_expert"], color="black", linestyle="--", linewidth=1, label="mean")
        ax.set_xlabel("expert")
        ax.set_ylabel("(token, slot) pairs")
        ax.set_title(f"{shape['name']} (T={shape['tokens']})\nimbalance max/mean = {shape['load_imbalance']:.2f}",
                     fontsize=8)  # fmt: skip
    if chosen:
        axes[0].legend(fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "no per-expert counts in these results", ha="center", va="center")
    figure.suptitle("moeflux bench: expert load\n" + _subtitle(documents), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_report(documents: list[dict], out_dir: str) -> list[str]:
    """Write the three plots of ``documents`` (``moeflux bench --json`` files) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    colors = _colors(documents)
    paths = [os.path.join(out_dir, name) for name in PLOT_FILES]
    plot_latency(documents, paths[0], colors)
    plot_tflops(documents, paths[1], colors)
    plot_expert_load(documents, paths[2])
    return paths
