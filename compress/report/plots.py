"""PNG plots for reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn as nn  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def layer_density(before: list[dict], after: list[dict], path: Path) -> Path:
    """Per layer: params before, nonzeros after (log scale), and bits where quantized."""
    names = [r["name"] for r in before]
    a = {r["name"]: r for r in after}
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [r["params"] for r in before], 0.4, label="params before")
    ax.bar(x + 0.2, [a.get(n, {}).get("nonzeros", 0) for n in names], 0.4, label="nonzeros after")
    for i, n in enumerate(names):
        bits = a.get(n, {}).get("bits")
        if bits:
            ax.annotate(f"{bits}b", (x[i] + 0.2, max(1, a[n]["nonzeros"])), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("count")
    ax.set_title("per-layer parameters and nonzeros")
    ax.legend()
    return _save(fig, path)


def weight_histograms(before: nn.Module, after: nn.Module, path: Path, max_layers: int = 6) -> Path:
    """Histogram of each weight layer's values before/after (zeros of pruned weights left out)."""
    def weights(m):
        return {n: mod.weight.detach().flatten().cpu().numpy() for n, mod in m.named_modules()
                if isinstance(mod, (nn.Conv2d, nn.Linear))}

    wb, wa = weights(before), weights(after)
    names = [n for n in wb if n in wa][:max_layers] or list(wa)[:max_layers]
    cols = min(3, max(1, len(names)))
    rows = max(1, (len(names) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        b = wb.get(n, np.array([]))
        a = wa[n]
        lim = float(np.abs(b).max()) if b.size else float(np.abs(a).max() or 1)
        bins = np.linspace(-lim, lim, 80)
        if b.size:
            ax.hist(b, bins=bins, alpha=0.5, label="before")
        ax.hist(a[a != 0], bins=bins, alpha=0.6, label="after (nonzero)")
        ax.set_title(n, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def bytes_per_stage(stages: list[dict], path: Path) -> Path:
    """Where the bytes go: size after each stage (dense -> pruned -> quantized -> coded)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = [s["stage"] for s in stages]
    vals = [s["bytes"] for s in stages]
    bars = ax.bar(labels, vals, color=plt.cm.viridis(np.linspace(0.15, 0.85, len(vals))))
    for b, v in zip(bars, vals):
        ax.annotate(f"{v / 1024:,.1f} KiB\n{vals[0] / max(v, 1):.1f}x", (b.get_x() + b.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("bytes")
    ax.set_title("model size per stage")
    return _save(fig, path)


def accuracy_vs_size(points: list[dict], path: Path) -> Path:
    """Accuracy against size for each stage / candidate."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for p in points:
        ax.scatter(p["bytes"] / 1024, p["accuracy"], s=30)
        ax.annotate(p["label"], (p["bytes"] / 1024, p["accuracy"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size (KiB)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy against size")
    ax.grid(alpha=0.3)
    return _save(fig, path)
