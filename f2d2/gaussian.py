"""Closed forms for Gaussian data N(mean, diag(std^2)): the exact velocity field and joint flow map.

Under the interpolant of shared.paths, x_t ~ N(m_t, diag(sigma_t^2)) with m_t = (1 - t) mean and
sigma_t^2 = (1 - t)^2 std^2 + t^2. The probability-flow ODE is affine, so the flow map is
X(x, t, s) = m_s + (sigma_s / sigma_t) (x - m_t) and, with the sign of f2d2.flowmap,
(s - t) D(x, t, s) = -sum_i log(sigma_s,i / sigma_t,i). These are the references the tests hold
the losses, the divergence targets and the few-step likelihood to.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _Gaussian(nn.Module):
    """Per-dimension mean and std (float64 buffers) of vector data (D,)."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.double())
        self.register_buffer("std", std.double())

    def moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """m_t and sigma_t, each (B, D), at times t (B,)."""
        tb = t.double()[:, None]
        return (1 - tb) * self.mean, ((1 - tb) ** 2 * self.std**2 + tb**2).sqrt()

    def rate(self, t: Tensor) -> Tensor:
        """d log sigma_t / dt = (t - (1 - t) std^2) / sigma_t^2 per dimension, (B, D); equals div v per dimension."""
        tb = t.double()[:, None]
        return (tb - (1 - tb) * self.std**2) / ((1 - tb) ** 2 * self.std**2 + tb**2)


class GaussianVelocity(_Gaussian):
    """Exact marginal velocity v(x, t) = -mean + rate(t) (x - m_t), (B, D) -> (B, D); div v = sum rate(t)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        m_t, _ = self.moments(t)
        return (-self.mean + self.rate(t) * (x.double() - m_t)).to(x.dtype)


class GaussianFlowMap(_Gaussian):
    """Exact joint flow map: (x, t, s) -> (u, D) of f2d2.flowmap; on s = t, u = v and D = -div v."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__(mean, std)
        self.div_scale = float(mean.numel())

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        m_t, sig_t = self.moments(t)
        m_s, sig_s = self.moments(s)
        dt = (s.double() - t.double())[:, None]
        same = dt.abs() < 1e-12
        safe = torch.where(same, torch.ones_like(dt), dt)
        xd = x.double()
        jump = m_s + sig_s / sig_t * (xd - m_t) - xd
        u = torch.where(same, -self.mean + self.rate(t) * (xd - m_t), jump / safe)
        d = torch.where(same, -self.rate(t), -torch.log(sig_s / sig_t) / safe).sum(1)
        return u.to(x.dtype), d.to(x.dtype)


def gaussian_log_density(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, diag(std^2)) (B,) in nats per sample."""
    z = (x.double() - mean.double()) / std.double()
    return (-0.5 * z.pow(2) - torch.log(std.double()) - 0.5 * math.log(2 * math.pi)).sum(1)
