"""The figures of a comparison: quality vs NFE, training losses, sample panels (PNG files)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TEACHER_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # one line style per teacher


def plot_quality(rows: list[dict[str, Any]], teachers: list[dict[str, Any]], solvers: Sequence[str],
                 grids: Sequence[str], path: Path) -> None:
    """Quality vs NFE (aggregated rows: student, solver, grid, nfe, mean, std, metric), one panel per solver x
    grid, error bars over seeds, teachers (name, nfe, value) as black horizontal lines named in the legend."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure

    combos = [(s, g) for s in solvers for g in grids]
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False, sharey=True)
    for ax, (solver, grid) in zip(axes[0], combos):
        for label in dict.fromkeys(r["student"] for r in rows):
            sel = sorted((r for r in rows if r["student"] == label and r["solver"] == solver and r["grid"] == grid),
                         key=lambda r: r["nfe"])
            ax.errorbar([r["nfe"] for r in sel], [r["mean"] for r in sel], yerr=[r["std"] for r in sel],
                        marker="o", ms=3, capsize=2, label=label)
        for t, style in zip(teachers, TEACHER_STYLES * len(teachers)):  # in the legend: close values stay legible
            ax.axhline(t["value"], ls=style, lw=1, color="k", alpha=0.6, label=f"{t['name']} ({t['nfe']} NFE)")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{solver}, {grid}")
        nfes = sorted({r["nfe"] for r in rows if r["solver"] == solver and r["grid"] == grid})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(rows[0]["metric"])
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_losses(curves: dict[str, list[tuple[list[int], list[float]]]], path: Path) -> None:
    """Training loss vs step for every student (one line per seed)."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, runs) in enumerate(curves.items()):
        for j, (steps, losses) in enumerate(runs):
            ax.plot(steps, losses, color=f"C{i}", alpha=0.8, lw=1, label=label if j == 0 else None)
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_samples(panels: dict[str, torch.Tensor], levels: int | None, reference: torch.Tensor | None, path: Path) -> None:
    """One panel per (model, NFE): an image grid of (B, C, H, W) samples or a 2D scatter of (B, 2) points over
    the reference data."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure, image_grid

    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels.items()):
        if x.dim() == 4:
            ax.imshow(image_grid(x[:36], levels, nrow=6), cmap="gray" if x.shape[1] == 1 else None)
        else:
            if reference is not None:
                ax.scatter(*reference[:2000].T.numpy(), s=1, c="0.8")
            ax.scatter(*x[:2000].T.numpy(), s=1)
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
