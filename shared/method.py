"""The plug-in point for training methods: a loss object that also knows how its model samples and scores.

The trainer only calls `method(model, batch, generator) -> (loss, logs)`. The CLI's `sample`, `nll`
and `eval` call `method.sample` / `method.log_likelihood`, so a velocity-field student, a
normalizing-flow teacher and a flow map all share one run format and one evaluation path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shared.likelihood import LikelihoodResult, log_likelihood
from shared.sampling import SampleResult, sample


class Method:
    """Base method for models that are velocity fields v(x, t): ODE sampling and ODE likelihood."""

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss for one batch and a dict of detached per-batch diagnostics."""
        raise NotImplementedError

    def prior_sample(self, n: int, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor:
        """Draw the noise that sampling starts from (standard normal at t = 1)."""
        return torch.randn(n, *shape, device=device, generator=generator)

    def sample(self, model: nn.Module, noise: Tensor, steps: int = 8, solver: str = "euler",
               grid: str = "linear") -> SampleResult:
        """Map noise to data with the project's ODE sampler; reports the NFE used."""
        return sample(model, noise, steps=steps, solver=solver, grid=grid)

    def log_likelihood(self, model: nn.Module, x: Tensor, divergence: str = "exact",
                       generator: torch.Generator | None = None) -> LikelihoodResult:
        """Reference log-density (nats per sample) by the instantaneous change of variables."""
        return log_likelihood(model, x, divergence=divergence, generator=generator)
