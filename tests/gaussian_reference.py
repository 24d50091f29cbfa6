"""Closed forms for Gaussian data N(mean, diag(std^2)) (the exact velocity field, joint flow map and density)
and the exact velocity of an isotropic Gaussian mixture (`MixtureVelocity`).

Under the interpolant of shared.paths, x_t ~ N(m_t, diag(sigma_t^2)) with m_t = (1 - t) mean and
sigma_t^2 = (1 - t)^2 std^2 + t^2. The probability-flow ODE is affine, so the flow map is
X(x, t, s) = m_s + (sigma_s / sigma_t) (x - m_t) and, with the sign of f2d2.flowmap,
(s - t) D(x, t, s) = -sum_i log(sigma_s,i / sigma_t,i). These are the references the tests hold
samplers, ODE likelihoods, flow-map losses, divergence targets and few-step likelihoods to.
mean and std are shaped like one sample (vectors (D,) or images (C, H, W)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shared.densities import GaussianMixture


class _Gaussian(nn.Module):
    """Per-dimension mean and std (float64 buffers), each shaped like one sample."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.double())
        self.register_buffer("std", std.double())

    def _time(self, t: Tensor) -> Tensor:
        """t (B,) as float64 (B, 1, ..., 1), broadcastable against a batch."""
        return t.double().reshape(-1, *([1] * self.mean.dim()))

    def moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """m_t and sigma_t, each (B, *shape), at times t (B,)."""
        tb = self._time(t)
        return (1 - tb) * self.mean, ((1 - tb) ** 2 * self.std**2 + tb**2).sqrt()

    def rate(self, t: Tensor) -> Tensor:
        """d log sigma_t / dt = (t - (1 - t) std^2) / sigma_t^2 per dimension, (B, *shape); div v per dimension."""
        tb = self._time(t)
        return (tb - (1 - tb) * self.std**2) / ((1 - tb) ** 2 * self.std**2 + tb**2)


class GaussianVelocity(_Gaussian):
    """Exact marginal velocity v(x, t) = -mean + rate(t) (x - m_t), (B, *shape) -> same; div v = sum rate(t)."""

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
        dt = self._time(s) - self._time(t)
        same = dt.abs() < 1e-12
        safe = torch.where(same, torch.ones_like(dt), dt)
        xd = x.double()
        jump = m_s + sig_s / sig_t * (xd - m_t) - xd
        u = torch.where(same, -self.mean + self.rate(t) * (xd - m_t), jump / safe)
        d = torch.where(same, -self.rate(t), -torch.log(sig_s / sig_t) / safe).flatten(1).sum(1)
        return u.to(x.dtype), d.to(x.dtype)


def gaussian_log_density(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, diag(std^2)) (B,) in nats per sample; mean and std shaped like one sample."""
    z = (x.double() - mean.double()) / std.double()
    return (-0.5 * z.pow(2) - torch.log(std.double()) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


class MixtureVelocity(nn.Module):
    """`GaussianMixture.velocity` as a module (float64): the exact flow of an isotropic Gaussian mixture."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mixture.velocity(x, t)
