"""The two interfaces every method implements: a loss for the trainer and a sampler for evaluation.

A loss is called as `loss(model, batch, generator) -> (scalar, logs)` and holds whatever it needs
(coupling, path, time sampler, a frozen teacher). A sampler maps prior noise to data and scores
data, and needs only the run's own model: `load_run` builds the sampler, never the loss.
`VelocityFieldSampler` is the sampler of every velocity-field model v(x, t) (flow-matching students).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from shared.likelihood import LikelihoodResult, log_likelihood
from shared.sampling import SampleResult, sample


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / Accelerate wrappers, as a loss receives it (torch.func.jvp cannot trace through DDP)."""
    while hasattr(model, "module"):
        model = model.module
    return model


class Loss(Protocol):
    """What the trainer calls once per step. A loss may also define `prepare(device)`, which training
    calls once before the first step (e.g. to fit a coupling), so that work is not timed as a step."""

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss for one batch and a dict of detached per-batch diagnostics."""
        ...


class Sampler(Protocol):
    """What `sample`, `nll` and `eval` call on a loaded run."""

    exact_likelihood: bool  # True when log_likelihood is exact (a normalizing flow), not an estimate

    def prior_sample(self, n: int, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor: ...

    def sample(self, model: nn.Module, noise: Tensor, steps: int = 8, solver: str = "euler",
               grid: str = "linear") -> SampleResult: ...

    def log_likelihood(self, model: nn.Module, x: Tensor, divergence: str = "exact",
                       generator: torch.Generator | None = None) -> LikelihoodResult: ...


class VelocityFieldSampler:
    """ODE sampling and ODE likelihood of a velocity field v(x, t) (t = 1 noise, t = 0 data)."""

    exact_likelihood = False
    # log_likelihood integrates an ODE with shared.likelihood's default solver: costly, and fixed by the
    # weights, points, divergence (and probes), so shared.evaluate caches it (shared.reference_cache)
    ode_likelihood = True

    def prior_sample(self, n: int, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor:
        """Draw the noise that sampling starts from (standard normal at t = 1), (n, *shape)."""
        return torch.randn(n, *shape, device=device, generator=generator)

    def sample(self, model: nn.Module, noise: Tensor, steps: int = 8, solver: str = "euler",
               grid: str = "linear") -> SampleResult:
        """Map noise to data with the project's ODE sampler; reports the NFE used."""
        return sample(model, noise, steps=steps, solver=solver, grid=grid)

    def log_likelihood(self, model: nn.Module, x: Tensor, divergence: str = "exact",
                       generator: torch.Generator | None = None) -> LikelihoodResult:
        """Reference log-density (nats per sample) by the instantaneous change of variables."""
        return log_likelihood(model, x, divergence=divergence, generator=generator)
