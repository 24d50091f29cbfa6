"""Couplings: given a data batch, return the noise each data point is paired with.

Every flow-matching student in flowdistill trains on pairs (x, z) produced here; the path
(`shared.paths`) receives them already coupled. Sources are chosen by name from `COUPLINGS`.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Coupling:
    """Base class: `coupling(x, generator)` returns noise z shaped like x, paired with x row by row."""

    name = "base"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class IndependentCoupling(Coupling):
    """The product coupling: z ~ N(0, I) drawn independently of x (plain flow matching)."""

    name = "independent"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


COUPLINGS: dict[str, type[Coupling]] = {"independent": IndependentCoupling}


def build_coupling(name: str) -> Coupling:
    """Instantiate a coupling by name, listing the choices when the name is unknown."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; choices: {', '.join(sorted(COUPLINGS))}")
    return COUPLINGS[name]()
