"""A hand-written flow on vectors, written as a user would write one, for `flowdistill.save_teacher`.

    u = (x - shift) exp(-log_scale)                   elementwise
    v = sinh(exp(log_tail) asinh(u) - skew)           elementwise sinh-arcsinh
    z = v, then z[j] += shear * v[i]                  (i, j) = (0, 1), or (1, 0) with flip=True

log|det dz/dx| = sum_d [ -log_scale + log_tail + log cosh(exp(log_tail) asinh(u) - skew) - 0.5 log(1 + u^2) ]
(the shear has determinant 1).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SinhArcsinhFlow(nn.Module):
    """Elementwise sinh-arcsinh flow on (B, dim) vectors followed by a unit-determinant shear."""

    def __init__(self, dim: int = 2, eta: float = 0.0, flip: bool = False):
        super().__init__()
        self.init_kwargs = {"dim": dim, "eta": eta, "flip": flip}
        self.eta, self.num_classes, self.data_shape = float(eta), 0, (dim,)
        self.pair = (1, 0) if flip else (0, 1)
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.log_tail = nn.Parameter(torch.zeros(dim))
        self.skew = nn.Parameter(torch.zeros(dim))
        self.shear = nn.Parameter(torch.zeros(()))

    @property
    def decode_passes(self) -> int:
        """One decode is one pass."""
        return 1

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, dim) -> z (B, dim), log|det dz/dx| (B,) in nats."""
        u = (x - self.shift) * torch.exp(-self.log_scale)
        inner = torch.exp(self.log_tail) * torch.asinh(u) - self.skew
        v = torch.sinh(inner)
        i, j = self.pair
        z = v.clone()
        z[:, j] = v[:, j] + self.shear * v[:, i]
        logdet = (-self.log_scale + self.log_tail + torch.log(torch.cosh(inner)) - 0.5 * torch.log1p(u**2)).sum(1)
        return z, logdet

    def decode(self, z: Tensor, y: Tensor | None = None, use_cache: bool = True, guidance: float = 0.0) -> Tensor:
        """z (B, dim) -> x (B, dim), the inverse of `encode`."""
        i, j = self.pair
        v = z.clone()
        v[:, j] = z[:, j] - self.shear * z[:, i]
        u = torch.sinh((torch.asinh(v) + self.skew) * torch.exp(-self.log_tail))
        return u * torch.exp(self.log_scale) + self.shift

    def scale_prior_noise(self, noise: Tensor) -> Tensor:
        """N(0, I) prior: unchanged."""
        return noise

    def forward(self, x: Tensor, *, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The training direction, `encode`."""
        return self.encode(x, y)


class EncodeOnlyFlow(nn.Module):
    """A module that encodes but has no inverse: not a flow teacher."""

    def __init__(self):
        super().__init__()
        self.eta, self.num_classes, self.data_shape, self.decode_passes = 0.0, 0, (2,), 1
        self.scale = nn.Parameter(torch.ones(2))

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, 2) -> (x * scale, sum log|scale|)."""
        return x * self.scale, self.scale.abs().log().sum().expand(len(x))

    def scale_prior_noise(self, noise: Tensor) -> Tensor:
        """N(0, I) prior: unchanged."""
        return noise
