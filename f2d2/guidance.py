"""Maximum-likelihood self-guidance: move the initial noise uphill on the model's own one-step log-likelihood.

With the sign of f2d2.flowmap, one jump z (t = 1) -> X(z, 1, 0) (t = 0) gives the model's estimate
    log p_0(X(z, 1, 0)) = log N(z; 0, I) + (0 - 1) D(z, 1, 0) = log N(z) - D(z, 1, 0),
so each guidance step is one Adam step on z maximising it, before the usual K-step sampling.
"""
from __future__ import annotations

import torch
from torch import Tensor

from f2d2.flowmap import FlowMapFn, few_step_sample
from shared.paths import standard_normal_logprob
from shared.sampling import SampleResult


def one_step_log_likelihood(model: FlowMapFn, z: Tensor) -> Tensor:
    """log N(z) - D(z, 1, 0) (B,): the model's log p_0 of the one-jump sample of noise z (nats per sample)."""
    ones = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
    return standard_normal_logprob(z) - model(z, ones, torch.zeros_like(ones))[1]


def guide_noise(model: FlowMapFn, noise: Tensor, lr: float, iterations: int = 1) -> tuple[Tensor, int]:
    """Noise after `iterations` Adam steps (learning rate lr) on -sum(log N(z) - D(z, 1, 0)), and the NFE spent.

    Each step costs one forward and one backward pass through the map, counted as 2 NFE. Adam's
    first step moves every coordinate by about lr, whatever the gradient's scale.
    """
    z = noise.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(iterations):
            (z.grad,) = torch.autograd.grad(-one_step_log_likelihood(model, z).sum(), z)
            opt.step()
    return z.detach(), 2 * iterations


def guided_sample(model: FlowMapFn, noise: Tensor, steps: int, lr: float, iterations: int = 1,
                  grid: str = "linear") -> SampleResult:
    """Self-guided noise, then `steps` jumps to the data; NFE = steps + 2 * iterations."""
    z, nfe = guide_noise(model, noise, lr, iterations)
    result, _ = few_step_sample(model, z, steps, grid)
    return SampleResult(result.samples, result.nfe + nfe)
