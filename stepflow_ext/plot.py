"""Pictures of Step-Saliency results: per-layer heatmaps and diagnostic curves (PNG)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def segment_labels(kinds: list[str]) -> list[str]:
    """Q, S1..Sk, A: short labels for the question, the thinking steps and the summary."""
    labels, step = [], 0
    for kind in kinds:
        if kind == "question":
            labels.append("Q")
        elif kind == "step":
            step += 1
            labels.append(f"S{step}")
        else:
            labels.append("A")
    return labels


def _tick_every(n: int) -> int:
    return max(1, math.ceil(n / 12))


def plot_result(result, path, row: int = 0):
    """One heatmap panel per layer (row-normalized shares, log colour scale) and the diagnostic curves."""
    kinds = result.kinds[row]
    labels = segment_labels(kinds)
    shares = result.normalized("row")[row].numpy()
    layers = shares.shape[0]
    s = len(kinds)
    shares = shares[:, :s, :s]
    cols = min(8, layers)
    grid_rows = math.ceil(layers / cols)
    diag = result.diagnose()[row]
    fig = plt.figure(figsize=(2.1 * cols + 1.5, 2.1 * grid_rows + 3.2), constrained_layout=True)
    spec = fig.add_gridspec(grid_rows + 1, cols, height_ratios=[1] * grid_rows + [1.4])
    positive = shares[shares > 0]
    vmin = max(float(positive.min()) if positive.size else 1e-4, 1e-4)
    norm = LogNorm(vmin=vmin, vmax=1.0)
    every = _tick_every(s)
    ticks = list(range(0, s, every))
    image = None
    for layer in range(layers):
        ax = fig.add_subplot(spec[layer // cols, layer % cols])
        data = np.ma.masked_where(np.triu(np.ones((s, s), dtype=bool), 1) | (shares[layer] <= 0), shares[layer])
        image = ax.imshow(data, cmap="magma", norm=norm, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=6, rotation=90)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="share of row saliency (log)")
    ax = fig.add_subplot(spec[grid_rows, :])
    xs = np.arange(layers)
    ax.plot(xs, diag["lock_in_index"], marker="o", label="lock-in index (current step share)")
    ax.plot(xs, diag["summary_thinking_share"], marker="s", label="summary → thinking share")
    ax.plot(xs, diag["summary_recent_share"], marker="^", label="summary → recent share")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    verdict = (f"Shallow Lock-in: {diag['shallow_lock_in']}   Deep Decay: {diag['deep_decay']}")
    ax.set_title(verdict, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
