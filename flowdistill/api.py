"""The public API: train, load, sample and score runs with the application's component tables bound in.

    import flowdistill as fd
    run_dir = fd.train("recipes/toy2d/fm_independent.yaml", ["train.steps=500"])
    run = fd.load_run(run_dir)
    samples = fd.sample(run, n=1000, steps=4)           # Samples(x, nfe, seconds); steps default: the run's eval
    logp = fd.log_likelihood(run, run.dataset.test[:100])  # nats per sample
    fd.save_teacher(my_flow, data="8gaussians", out="runs/my-flow")  # your own flow as a teacher run
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowdistill.components import CATALOG
from flowdistill.own_teacher import save_teacher
from shared import run as runs
from shared import run_prepare
from shared.config import RunConfig
from shared.device import resolve_device
from shared.run import Run

__all__ = ["Run", "RunConfig", "load_run", "log_likelihood", "resolve_config", "resolve_device", "sample",
           "save_teacher", "train"]


def resolve_config(source: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated config of a recipe file (or of a run directory's config.yaml) with key=value overrides."""
    return run_prepare.resolve_config(source, list(overrides), CATALOG)


def train(config: RunConfig | str | Path, overrides: Sequence[str] = (), resume: bool = False,
          overwrite: bool = False) -> Path:
    """Train a config (or a recipe path with overrides) into `<out_dir>/<name>/`; returns the run directory."""
    cfg = config if isinstance(config, RunConfig) else resolve_config(config, overrides)
    return runs.train_run(cfg, CATALOG, resume=resume, overwrite=overwrite)


def load_run(run_dir: str | Path, weights: str = "auto", device: str | torch.device = "cpu") -> Run:
    """A finished run's model (evaluation weights), sampler, data and config; teachers are not loaded."""
    return runs.load_run(run_dir, CATALOG, weights=weights, device=resolve_device(device))


def sampling_settings(run: Run, steps: int | None = None, solver: str | None = None, grid: str | None = None
                      ) -> tuple[int, str, str]:
    """(steps, solver, grid) with each one not given taken from the run's own eval settings (the largest of its
    `eval.steps`), as `sample`, `eval` and `nll` all resolve them."""
    return steps or max(run.config.eval.steps), solver or run.config.eval.solver, grid or run.config.eval.grid


def sample(run: Run, n: int, steps: int | None = None, solver: str | None = None, grid: str | None = None,
           seed: int = 0) -> Any:
    """`n` samples (n, *shape) of a loaded run with their NFE per sample and wall seconds (`shared.evaluate.Samples`);
    steps, solver and grid default to the run's own eval settings (`sampling_settings`)."""
    from shared.evaluate import generate

    return generate(run, n, *sampling_settings(run, steps, solver, grid), seed)


@torch.no_grad()
def log_likelihood(run: Run, x: Tensor, divergence: str | None = None, seed: int = 0) -> Tensor:
    """log p(x) (B,) in nats per sample under a loaded run (exact for flows, ODE or few-step otherwise); the
    divergence estimator defaults to the run's `eval.divergence`."""
    from shared.likelihood import choose_divergence

    device = next(run.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    divergence = choose_divergence(divergence or run.config.eval.divergence, x[0].numel())
    result = run.sampler.log_likelihood(run.model, x.to(device), divergence=divergence, generator=generator)
    return result.logp
