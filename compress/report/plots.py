"""PNG plots for reports (matplotlib, headless). Each answers one question at a glance:

* ``bytes_per_stage``  -- where did the bytes go? (linear axis: a drop looks as big as it is)
* ``accuracy_vs_size`` -- what did each candidate cost, against the budget, and which was kept?
* ``layer_density``    -- which layers were pruned / quantized, and how hard?
* ``weight_histograms``-- what did the weights look like before and after?
* ``sensitivity``      -- (l1-filter) which layers can lose filters? (see prune.l1_filter)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch.nn as nn

from compress.errors import printable


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(name: str) -> str:
    """A name from a file as a plot's text: control characters escaped, a '$' not read as mathtext."""
    return printable(name).replace("$", r"\$")


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,.0f} B"


def layer_density(before: list[dict], after: list[dict] | None, path: Path) -> Path:
    """Per layer: the share of weights kept (nonzero) after, with bits where quantized. With no
    ``after`` (one model), the share of nonzeros of that model."""
    after = after or before
    names = [r["name"] for r in before]
    a = {r["name"]: r for r in after}
    b = {r["name"]: r for r in before}
    dens = [100.0 * a.get(n, {}).get("nonzeros", 0) / max(b[n]["params"], 1) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 4))
    x = np.arange(len(names))
    bars = ax.bar(x, dens, color="#3b7dd8")
    for i, n in enumerate(names):
        bits = a.get(n, {}).get("bits")
        label = f"{dens[i]:.1f}%" + (f"\n{bits} bit" if bits else "")
        ax.annotate(label, (bars[i].get_x() + bars[i].get_width() / 2, dens[i]), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 115)
    ax.set_xticks(x, [f"{_label(n)}\n({b[n]['params']:,})" for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("weights kept (nonzero), % of layer")
    ax.set_xlabel("layer (parameters)")
    ax.set_title("per-layer density" + (" after compression" if after is not before else ""), pad=12)
    return _save(fig, path)


def weight_histograms(before: nn.Module, after: nn.Module | None, path: Path, max_layers: int = 6) -> Path:
    """Histogram of each weight layer's values before / after (pruned zeros left out of 'after')."""

    def weights(m):
        return {
            n: mod.weight.detach().flatten().cpu().numpy()
            for n, mod in m.named_modules()
            if isinstance(mod, (nn.Conv2d, nn.Linear))
        }

    wb = weights(before)
    wa = weights(after) if after is not None else {}
    names = ([n for n in wb if n in wa] or list(wb))[:max_layers]
    cols = min(3, max(1, len(names)))
    rows = max(1, (len(names) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names, strict=False):
        b = wb[n]
        lim = float(np.abs(b).max()) or 1.0
        bins = np.linspace(-lim, lim, 80)
        ax.hist(b, bins=bins, alpha=0.5, label="before" if n in wa else "weights")
        if n in wa:
            a = wa[n]
            ax.hist(a[a != 0], bins=bins, alpha=0.6, label="after (nonzero)")
        ax.set_title(n, fontsize=8)
        ax.set_xlabel("weight value", fontsize=7)
        ax.set_ylabel("count", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def bytes_per_stage(stages: list[dict], path: Path) -> Path:
    """Where the bytes go: size after each stage (dense -> pruned -> quantized -> coded), linear axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [s["stage"] for s in stages]
    vals = [s["bytes"] for s in stages]
    kib = [v / 1024 for v in vals]
    bars = ax.bar(labels, kib, color=plt.cm.viridis(np.linspace(0.15, 0.85, len(vals))))
    for bar, v, k in zip(bars, vals, kib, strict=False):
        ax.annotate(
            f"{_kib(v)}\n{vals[0] / max(v, 1):.1f}x smaller" if v != vals[0] else _kib(v),
            (bar.get_x() + bar.get_width() / 2, k),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, max(kib) * 1.25)
    ax.set_ylabel("size (KiB)")
    ax.set_title("model size after each stage", pad=10)
    return _save(fig, path)


def accuracy_vs_size(
    points: list[dict],
    path: Path,
    base_accuracy: float | None = None,
    budget: float | None = None,
    label: str = "accuracy %",
) -> Path:
    """Score (the metric's ``label``) against file size for every candidate tried; the budget line; kept ones
    ringed.

    points: {"label", "stage", "bytes", "accuracy", "kept": bool, "within_budget": bool}.
    """
    fig, ax = plt.subplots(figsize=(7, 4.4))
    stages = list(dict.fromkeys(p.get("stage", "") for p in points))
    colors = dict(zip(stages, plt.cm.tab10(np.arange(len(stages)) % 10), strict=False))
    for st in stages:
        pts = [p for p in points if p.get("stage", "") == st]
        ax.plot(
            [p["bytes"] / 1024 for p in pts],
            [p["accuracy"] for p in pts],
            "-o",
            ms=5,
            lw=1,
            color=colors[st],
            label=st,
            alpha=0.85,
        )
        for p in pts:  # small labels, alternately above and below the line to avoid collisions
            i = pts.index(p)
            ax.annotate(
                p["label"],
                (p["bytes"] / 1024, p["accuracy"]),
                fontsize=6.5,
                xytext=(3, 5 if i % 2 else -10),
                textcoords="offset points",
                color=colors[st],
            )
    kept = [p for p in points if p.get("kept")]
    if kept:
        ax.scatter(
            [p["bytes"] / 1024 for p in kept],
            [p["accuracy"] for p in kept],
            s=160,
            facecolors="none",
            edgecolors="k",
            linewidths=1.5,
            label="kept",
            zorder=5,
        )
    if base_accuracy is not None and budget is not None:
        ax.axhline(base_accuracy - budget, color="#a4161a", ls="--", lw=1, label=f"budget (-{budget:g} pt)")
        ax.axhline(base_accuracy, color="grey", ls=":", lw=1, label=f"{label.removesuffix(' %')} before")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel(f"validation {label}")
    ax.set_title(f"every candidate tried: {label.removesuffix(' %')} against size", pad=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def sensitivity(sens: dict, path: Path, label: str = "accuracy %") -> Path:
    """Li et al.'s Figure 2: score (the metric's ``label``) against fraction of filters pruned, one line per layer (each
    pruned alone). Many layers get distinct colour x line-style pairs and a legend beside the plot."""
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    layers = list(sens["layers"].items())
    cmap = plt.cm.tab10
    for i, (name, row) in enumerate(layers):
        rs = sorted(float(r) for r in row["accuracy"])
        ax.plot(
            [100 * r for r in rs],
            [row["accuracy"][r] for r in rs],
            marker="o",
            ms=3,
            color=cmap(i % 10),
            ls=styles[(i // 10) % len(styles)],
            label=f"{name} ({row['channels']})",
        )
    ax.axhline(sens["baseline"], color="k", lw=0.8, ls="--", label="unpruned")
    ax.set_xlabel("filters pruned away (%)")
    ax.set_ylabel(f"validation {label}")
    ax.set_title("L1-filter sensitivity: each layer pruned alone, no fine-tuning", pad=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(layers) // 16)
    return _save(fig, path)
