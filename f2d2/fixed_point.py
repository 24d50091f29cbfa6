"""The flow map Shortcut-F2D2 training converges to, built without training from an exact tangent field.

Shortcut's targets (`f2d2.losses.shortcut_targets`) define each jump of size 2^-k as a composition of
two half jumps, down to the finest size 2^-levels, where the map's tangent (v, -div v) enters. Given
the exact tangent, `ConvergedShortcutMap` evaluates that recursion directly, so its few-step log p is
what a perfectly trained map would report. Against an exact density this separates the estimator's
own bias (what the target rule converges to) from fitting error. `euler_half_step_targets` is the
earlier finest-level rule (two Euler half steps), kept as the reference the bias is measured against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from f2d2.losses import shortcut_targets
from shared.likelihood import divergence_exact
from shared.paths import broadcast_time

Tangent = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x (B, D), t (B,)) -> (v (B, D), -div v (B,))
TargetRule = Callable[..., tuple[Tensor, Tensor]]


def exact_tangent(velocity: Callable[[Tensor, Tensor], Tensor]) -> Tangent:
    """(v(x, t), -div v(x, t)) in float64, the divergence by autograd (one backward per dimension)."""
    def tangent(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        v, div = divergence_exact(velocity, x.double(), t.double())
        return v, -div
    return tangent


def euler_half_step_targets(net: Callable, x: Tensor, t: Tensor, s: Tensor, fine: Tensor) -> tuple[Tensor, Tensor]:
    """The earlier rule: every level, the finest included, averages its two half jumps; at the finest level
    those are tangents, i.e. two Euler half steps, u* = (v(x, t) + v(x_r, r)) / 2, D* likewise."""
    r = (t + s) / 2
    u1, d1 = net(x, t, torch.where(fine, t, r))
    u2, d2 = net(x + broadcast_time(r - t, x) * u1, r, torch.where(fine, r, s))
    return (u1 + u2) / 2, (d1 + d2) / 2


class ConvergedShortcutMap:
    """(x, t, s) -> (u, D): the fixed point of a Shortcut target rule over `levels` on an exact tangent.

    Every jump of one call must have the same dyadic size 2^-k, k <= levels (as the few-step grids of
    trained jumps give); t = s returns the tangent. A jump of size 2^-k costs 2^(levels - k + 1) tangents.
    """

    div_scale = 1.0

    def __init__(self, tangent: Tangent, levels: int = 6, targets: TargetRule = shortcut_targets):
        self.tangent, self.levels, self.targets = tangent, levels, targets

    def __call__(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        size = (s - t).abs()
        if bool((size == 0).all()):
            return self.tangent(x, t)
        k = round(-math.log2(size[0].item()))
        if not (0 <= k <= self.levels and torch.allclose(size, torch.full_like(size, 2.0**-k))):
            raise ValueError(f"jumps of one call must share a dyadic size 2^-k with k <= {self.levels}; "
                             f"got sizes {size.unique().tolist()[:4]}")
        fine = torch.full_like(t, k == self.levels, dtype=torch.bool)
        return self.targets(self, x, t, s, fine)
