"""Figures of what a DynaMixer generates for some images (`DynaMixer.explain`): the mixing matrices of one
layer per segment, and the branch weights of the re-weighting per layer. The notebook
(notebooks/mixing_matrices.ipynb) shows them; `callbacks.MixingFigures` sends them to W&B and TensorBoard.

Figures are bare `matplotlib.figure.Figure`s: no GUI backend is needed, and a notebook's backend stays as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BRANCHES = ("h (columns)", "w (rows)", "c (channels)")


def mixing_figure(maps: list[dict[str, torch.Tensor]], layer: int = 0, image: int = 0) -> Figure:
    """Row mixing (top: the middle row's `W x W` matrix) and column mixing (bottom: the middle column's `H x H`
    matrix) of every segment of `layer`, for image `image` of the `maps` of `DynaMixer.explain`.

    x is the output token `j`, y the source token `i`; each column sums to 1. One colour scale from 0 to the
    largest weight shown."""
    mix_w = maps[layer]["mix_w"][image].float().cpu()  # (H, S, W, W): per row, per segment
    mix_h = maps[layer]["mix_h"][image].float().cpu()  # (W, S, H, H): per column, per segment
    H, S, W = mix_w.shape[0], mix_w.shape[1], mix_w.shape[2]
    row, col = H // 2, W // 2
    vmax = max(mix_w[row].max().item(), mix_h[col].max().item())
    fig = Figure(figsize=(2.3 * S + 1, 5.2), layout="constrained")
    axes = fig.subplots(2, S, squeeze=False)
    for s in range(S):
        for r, (matrix, name) in enumerate(((mix_w[row, s], f"row {row}"), (mix_h[col, s], f"column {col}"))):
            ax = axes[r, s]
            im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"{name}, segment {s}", fontsize=9)
            ax.set_xlabel("output token j", fontsize=8)
            ax.set_ylabel("source token i", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"mixing weight (uniform: 1/{W} = {1 / W:.3f})")
    fig.suptitle(f"layer {layer}: row mixing (top) and column mixing (bottom), image {image}", fontsize=10)
    return fig


def branch_weights_figure(maps: list[dict[str, torch.Tensor]], layer: int = 0, image: int = 0) -> Figure | None:
    """Left: the re-weighting's branch weights per layer (mean over channels and images; 1/3 each is a plain
    average). Right: the per-channel weights of `layer` for image `image`, sorted by the channel branch's.
    None for a model that sums its branches (`fusion="sum"`)."""
    if not all("branch_weights" in m for m in maps):
        return None
    per_layer = torch.stack([m["branch_weights"].float().mean((0, 1)) for m in maps]).cpu().numpy()  # (layers, 3)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    x = np.arange(len(maps))
    for b, marker in zip(range(3), "o^s"):
        ax.plot(x, per_layer[:, b], marker=marker, label=BRANCHES[b])
    ax.axhline(1 / 3, color="gray", ls="--", lw=1, label="1/3 (plain average)")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean branch weight")
    ax.set_title("branch weights per layer (mean over channels and images)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    weights = maps[layer]["branch_weights"][image].float().cpu().numpy()  # (C, 3)
    order = np.argsort(weights[:, 2])
    for b in range(3):
        ax2.plot(weights[order, b], label=BRANCHES[b], lw=1.2)
    ax2.set_xlabel("channel (sorted by the c weight)")
    ax2.set_ylabel("branch weight")
    ax2.set_title(f"layer {layer}, image {image}: per-channel branch weights", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return fig


def to_array(fig: Figure, dpi: int = 80) -> np.ndarray:
    """The figure rendered as an RGB image `(H, W, 3)` of uint8, the form image loggers take."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
