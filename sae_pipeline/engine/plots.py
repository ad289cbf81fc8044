"""Pictures of a trained SAE (matplotlib, headless): loss curves, reconstructions, codes, filters.

Each function returns a matplotlib Figure; ``save_all`` writes the ones that apply as PNG files
(reconstructions and filters only for image-like data, the code map only with labels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on workers

import matplotlib.pyplot as plt
import numpy as np


def image_side(n_features: int) -> int | None:
    """The side of a square image with ``n_features`` pixels, if there is one (8 for 64)."""
    side = math.isqrt(n_features)
    return side if side * side == n_features and side >= 4 else None


def loss_curves(histories: dict[str, dict[str, Any]]):
    """One panel per phase: training and validation loss per epoch."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histories.items(), strict=True):
        ax.plot(hist["train_loss"], label="train")
        ax.plot(hist["val_loss"], label="validation")
        if hist.get("best_epoch", -1) >= 0:
            ax.axvline(hist["best_epoch"], color="grey", ls=":", label="kept")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("MSE")
    axes[0][-1].legend()
    fig.tight_layout()
    return fig


def reconstructions(x: np.ndarray, recon: np.ndarray, side: int, n: int = 10):
    """Inputs (top row) and their reconstructions (bottom row)."""
    n = min(n, len(x))
    fig, axes = plt.subplots(2, n, figsize=(n, 2.2), squeeze=False)
    for i in range(n):
        for row, data in enumerate((x, recon)):
            axes[row][i].imshow(data[i].reshape(side, side), cmap="gray_r")
            axes[row][i].axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def code_map(codes: np.ndarray, labels: np.ndarray):
    """Codes in 2-D (the codes themselves, or their first two principal components)."""
    if codes.shape[1] > 2:
        from sklearn.decomposition import PCA

        codes, title = PCA(n_components=2).fit_transform(codes), "codes (first 2 PCs)"
    else:
        title = "codes"
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=6)
    fig.colorbar(sc, ax=ax, label="label")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def first_layer_filters(weight: np.ndarray, side: int, n: int = 32):
    """The first layer's weight rows as images: what each unit responds to."""
    n = min(n, len(weight))
    cols = 8
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(weight[i].reshape(side, side), cmap="RdBu_r")
    fig.tight_layout()
    return fig


def save_all(
    out_dir: Path,
    histories: dict[str, dict[str, Any]],
    x_test: np.ndarray,
    recon_test: np.ndarray,
    codes_test: np.ndarray,
    labels_test: np.ndarray | None,
    first_weight: np.ndarray,
) -> list[Path]:
    """Write every picture that applies to ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss_curves.png": loss_curves(histories)}
    side = image_side(x_test.shape[1])
    if side:
        figures["reconstructions.png"] = reconstructions(x_test, recon_test, side)
        figures["first_layer_filters.png"] = first_layer_filters(first_weight, side)
    if labels_test is not None:
        figures["code_map.png"] = code_map(codes_test, labels_test)
    paths = []
    for name, fig in figures.items():
        path = out_dir / name
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
