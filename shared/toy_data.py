"""The generated 2D data sets: samplers of toy densities, and the exact log density where it is known.

Each is drawn fresh from `DataConfig.seed` (train from seed 2 * seed, test from 2 * seed + 1), so no file
is read. Besides the four classic shapes, every density of `shared.densities.KNOWN_DENSITIES` is a data
set whose `Dataset.log_density` is exact.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from shared.config import DataConfig
from shared.data import Dataset, DataError, make_dataset
from shared.densities import KNOWN_DENSITIES



def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Eight N(centre, 0.1^2 I) on a circle of radius sqrt(2): per-coordinate std ~1.005."""
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    centres = math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
    return centres + 0.1 * torch.randn(n, 2, generator=g)


def _moons(n: int, g: torch.Generator) -> Tensor:
    """Two half circles (as sklearn's make_moons, noise 0.05), centred and scaled by sqrt(2) to unit std."""
    t = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    points = torch.stack([x - 0.5, y - 0.25], 1) + 0.05 * torch.randn(n, 2, generator=g)
    return math.sqrt(2) * points


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 squares of a 4x4 board on [-2, 2]^2 with floor(x) + floor(y) even (density 1/8)."""
    col = torch.randint(-2, 2, (n,), generator=g)
    row = 2 * torch.randint(-1, 1, (n,), generator=g) + col.remainder(2)
    cell = torch.stack([col, row], 1).float()
    # keep points strictly inside their square after float32 rounding
    return torch.minimum(cell + torch.rand(n, 2, generator=g), torch.nextafter(cell + 1, cell))


def _spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved 1.5-turn spirals of radius 2, even along their length, noise std 0.05: std ~1."""
    s = torch.rand(n, generator=g).sqrt()
    theta, radius = 3 * math.pi * s, 2 * s
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    points = sign[:, None] * radius[:, None] * torch.stack([theta.cos(), theta.sin()], 1)
    return points + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard_log_density(x: Tensor) -> Tensor:
    """Exact log p of `_checkerboard`: log(1/8) on the 8 squares, -inf elsewhere (B,)."""
    cell = x.double().floor()
    inside = ((cell >= -2) & (cell <= 1)).all(1) & ((cell[:, 0] + cell[:, 1]).remainder(2) == 0)
    value = torch.full(inside.shape, -math.log(8.0), dtype=torch.float64)
    return torch.where(inside, value, torch.full_like(value, -math.inf))


def _load_toy(sample: Callable[[int, torch.Generator], Tensor], meta: dict, cfg: DataConfig,
              log_density: Callable[[Tensor], Tensor] | None = None) -> Dataset:
    """Draw train and test points from seeds 2*seed and 2*seed+1 (test does not depend on n_train)."""
    if cfg.n_train < 1 or cfg.n_test < 1:
        raise DataError(f"data.n_train and data.n_test must be >= 1, got {cfg.n_train} and {cfg.n_test}")
    train = sample(cfg.n_train, torch.Generator().manual_seed(2 * cfg.seed))
    test = sample(cfg.n_test, torch.Generator().manual_seed(2 * cfg.seed + 1))
    return dataclasses.replace(make_dataset(cfg.name, train, test, meta=dict(meta)), log_density=log_density)


TOY_DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "8gaussians": partial(_load_toy, _eight_gaussians, {}),
    "moons": partial(_load_toy, _moons, {}),
    "checkerboard": partial(_load_toy, _checkerboard, {}, log_density=_checkerboard_log_density),
    **{name: partial(_load_toy, density.sample, {"known_density": name}, log_density=density.log_prob)
       for name, density in KNOWN_DENSITIES.items()},
    "spirals": partial(_load_toy, _spirals, {}),
}
