"""Data sets whose exact log-density is known: Gaussian mixtures in 2, 8 and 32 dimensions and a banana.

Each density draws samples with a torch.Generator and evaluates log p(x) in nats per sample, exactly,
so likelihood estimates (ODE, few-step, flows) can be scored against the truth, not only against
each other. Parameters are fixed by the density's own seed, so `gmm8` is the same density whatever
the data seed (which only changes the drawn points).

    gmm<D>   sum_k w_k N(x; mu_k, s_k^2 I), K = 5 components, unequal weights w and scales s,
             means at distance ~2.5 from the origin
    banana   x1 ~ N(0, 1.5^2), x2 | x1 ~ N(0.4 (x1^2 - 1.5^2), 0.6^2): a curved, non-Gaussian 2D density
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture: weights (K,), means (K, D), stds (K,)."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n points (n, D), float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * eps).float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) (B,) in nats per sample, computed in float64 by log-sum-exp over components."""
        x = x.double().reshape(len(x), -1)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1)  # (B, K)
        log_comp = -0.5 * sq / self.stds.pow(2) - self.dim * self.stds.log() - 0.5 * self.dim * LOG_2PI
        return torch.logsumexp(log_comp + self.weights.log(), dim=1)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact marginal velocity (B, D) float64 at x (B, D), t (B,) under x_t = (1 - t) x_0 + t z.

        Given component k, x_t ~ N((1 - t) mu_k, sigma_k,t^2 I) with sigma_k,t^2 = (1 - t)^2 s_k^2 + t^2 and
        velocity v_k = -mu_k + r_k (x - (1 - t) mu_k), r_k = (t - (1 - t) s_k^2) / sigma_k,t^2; the marginal
        velocity is sum_k P(k | x_t) v_k, and its flow carries N(0, I) at t = 1 to this mixture at t = 0.
        """
        x, t = x.double(), t.double()[:, None]
        var = (1 - t) ** 2 * self.stds**2 + t**2  # (B, K)
        means = (1 - t)[:, :, None] * self.means[None]  # (B, K, D)
        sq = (x[:, None, :] - means).pow(2).sum(-1)
        post = torch.softmax(self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * var.log(), dim=1)
        rate = (t - (1 - t) * self.stds**2) / var
        v = -self.means[None] + rate[:, :, None] * (x[:, None, :] - means)
        return (post[:, :, None] * v).sum(1)


def gaussian_mixture(dim: int, components: int = 5) -> GaussianMixture:
    """The fixed mixture of `gmm<dim>`: weights 0.35/0.25/0.2/0.12/0.08, stds 0.25..0.8, seeded means."""
    g = torch.Generator().manual_seed(1000 + dim)
    weights = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)[:components]
    directions = torch.randn(components, dim, generator=g, dtype=torch.float64)
    means = 2.5 * directions / directions.norm(dim=1, keepdim=True)
    stds = torch.linspace(0.25, 0.8, components, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, stds)


@dataclass(frozen=True)
class Banana:
    """x1 ~ N(0, a^2), x2 = b (x1^2 - a^2) + c eps: log p = log N(x1; 0, a^2) + log N(x2 - b(x1^2 - a^2); 0, c^2)."""

    a: float = 1.5
    b: float = 0.4
    c: float = 0.6
    dim: int = 2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        x1 = self.a * torch.randn(n, generator=generator, dtype=torch.float64)
        x2 = self.b * (x1.pow(2) - self.a**2) + self.c * torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.stack([x1, x2], 1).float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) (B,) in nats per sample (float64)."""
        x = x.double()
        x1, x2 = x[:, 0], x[:, 1]
        r = x2 - self.b * (x1.pow(2) - self.a**2)
        return (-0.5 * (x1 / self.a).pow(2) - math.log(self.a) - 0.5 * (r / self.c).pow(2) - math.log(self.c)
                - LOG_2PI)


KNOWN_DENSITIES = {"gmm2": gaussian_mixture(2), "gmm8": gaussian_mixture(8), "gmm32": gaussian_mixture(32),
                   "banana": Banana()}
