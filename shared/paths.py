"""The project's one time convention and the flow-matching interpolant.

Convention (used by every sampler, loss and likelihood in flowdistill):
    t = 0 is data, t = 1 is noise;  x_t = (1 - t) * x + t * z;  velocity target v = z - x.
Sampling integrates dx/dt = v(x, t) from t = 1 down to t = 0. Pairing x with z (the coupling)
happens before the path sees them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times (B,) so they broadcast against a batch shaped like `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t z for data x, paired noise z and per-sample times t (B,)."""
    tb = broadcast_time(t, x)
    return (1 - tb) * x + tb * z


def velocity_target(x: Tensor, z: Tensor) -> Tensor:
    """Conditional velocity d x_t / dt = z - x of the linear interpolant."""
    return z - x


def sample_times(n: int, kind: str, device: torch.device | str, generator: torch.Generator | None = None,
                 mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Training times in (0, 1): `uniform` or `logit_normal` (sigmoid of N(mean, std^2))."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"unknown time sampler {kind!r}; choices: uniform, logit_normal")


TIME_SAMPLERS = ("uniform", "logit_normal")


def standard_normal_logprob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all but the batch dimension (nats per sample)."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))
