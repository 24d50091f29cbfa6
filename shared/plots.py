"""Pictures people would rather look at than numbers: sample grids, 2D scatters, quality-vs-NFE curves."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from shared.checkpoint import atomic_write_via  # noqa: E402
from shared.data import model_to_image  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a figure as PNG atomically (see shared.checkpoint.atomic_write_via) and close it."""
    try:
        atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def image_grid(images: Tensor, levels: int, nrow: int | None = None) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows*H, cols*W, C) uint8 array with 1-pixel gaps."""
    imgs = model_to_image(images.detach().cpu().float(), levels).to(torch.float32)
    imgs = (imgs * (255.0 / (levels - 1))).round().clamp(0, 255).to(torch.uint8)
    n, c, h, w = imgs.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = imgs[i].permute(1, 2, 0).numpy()
    return grid


def save_samples_figure(samples: Tensor, path: str | Path, levels: int | None = None,
                        reference: Tensor | None = None, title: str = "") -> Path:
    """Save a sample grid (images) or a scatter over the reference data (2D vectors) as PNG, atomically."""
    path = Path(path)
    if samples.dim() == 4:
        grid = image_grid(samples, levels or 256)
        side = max(4.0, min(10.0, grid.shape[1] / 40))
        fig, ax = plt.subplots(figsize=(side, side * grid.shape[0] / grid.shape[1]))
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
    else:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        pts = samples.detach().cpu().float().numpy()
        if reference is not None:
            ref = reference.detach().cpu().float().numpy()
            ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, c="tab:blue", label="samples")
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.axis("off" if samples.dim() == 4 else "on")
    save_figure(fig, path)
    return path


def save_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, xlabel: str, ylabel: str,
                title: str = "", logx: bool = True) -> Path:
    """Line plot of named (x, y) series, e.g. sample quality vs NFE, as PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
    return Path(path)


def save_calibration(model_logp: dict[str, Tensor], exact_logp: Tensor, path: str | Path, title: str = "",
                     units: str = "nats per sample") -> Path:
    """Scatter of model log p against the exact log p, one point per sample, with the y = x line, as PNG.

    model_logp: named per-sample estimates, each (N,) in nats per sample, aligned with exact_logp (N,).
    A point above the line is a sample the model gives more density than the truth.
    """
    exact = exact_logp.detach().double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    values = [exact]
    for name, logp in model_logp.items():
        est = logp.detach().double().cpu().numpy()
        ax.scatter(exact, est, s=4, alpha=0.5, label=name)
        values.append(est)
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
    ax.set_xlabel(f"exact log p ({units})")
    ax.set_ylabel(f"model log p ({units})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=3)
    save_figure(fig, Path(path))
    return Path(path)
