"""Sampling a flow: integrate dx/dt = v(x, t) from noise at t = 1 down to data at t = 0.

Fixed-step solvers (`euler`, `heun`) walk a time grid and cost a known number of network
evaluations per step; adaptive solvers go through `torchdiffeq.odeint`. Every sampler reports
the number of function evaluations (NFE) it actually made, counted by `CountingField`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

GRIDS = ("linear", "quadratic", "geometric")
FIXED_SOLVERS = ("euler", "heun")
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS


def time_grid(steps: int, kind: str = "linear", device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Times (steps + 1,) from 1 down to 0, crowding steps near the data (t = 0) unless linear.

    linear: 1 - k / K.  quadratic: (1 - k / K)^2.  geometric: 1, 1/2, ..., 2^-(K-1), then 0 (every step
    halves t; each jump is a dyadic size on its own dyadic grid, which Shortcut-trained flow maps need).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choices: {', '.join(GRIDS)}")
    grid = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "quadratic":
        grid = grid.pow(2)
    elif kind == "geometric":
        grid = torch.cat([torch.pow(2.0, -torch.arange(steps, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)])
    return grid.to(device=device, dtype=dtype)


class CountingField:
    """A velocity field `model(x, t, **extras)` that counts its calls in `nfe` (one call = one batched forward)."""

    def __init__(self, model: Callable[..., Tensor], **extras: Any) -> None:
        self.model = model
        self.extras = extras
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Velocity at states x (B, *shape) and time t, a scalar or (B,), broadcast to (B,)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        self.nfe += 1
        return self.model(x, t, **self.extras)


@dataclass
class SampleResult:
    """Samples (B, *shape) at t = 0, the NFE spent, and optionally the states (len(grid), B, *shape) along the grid."""

    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None


def _euler_step(field: CountingField, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One explicit Euler step from t to t_next (1 evaluation)."""
    return x + (t_next - t) * field(x, t)


def _heun_step(field: CountingField, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Euler predictor then trapezoidal corrector from t to t_next (2 evaluations)."""
    dt = t_next - t
    v = field(x, t)
    x_pred = x + dt * v
    return x + 0.5 * dt * (v + field(x_pred, t_next))


_STEPS = {"euler": _euler_step, "heun": _heun_step}


@torch.no_grad()
def sample(model: Callable[..., Tensor], noise: Tensor, steps: int = 8, solver: str = "euler",
           grid: str = "linear", rtol: float = 1e-5, atol: float = 1e-5, return_trajectory: bool = False,
           **extras: Any) -> SampleResult:
    """Map noise (B, *shape) at t = 1 to samples at t = 0 along `model`'s velocity field.

    Fixed-step solvers take `steps` steps on the `grid`; adaptive solvers choose their own steps
    with tolerances rtol/atol and use `steps`/`grid` only for where a requested trajectory is recorded.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choices: {', '.join(SOLVERS)}")
    field = CountingField(model, **extras)
    if solver in FIXED_SOLVERS:
        times = time_grid(steps, grid, device=noise.device, dtype=noise.dtype)
        step = _STEPS[solver]
        x = noise
        states = [x]
        for t, t_next in zip(times[:-1], times[1:]):
            x = step(field, x, t, t_next)
            if return_trajectory:
                states.append(x)
        trajectory = torch.stack(states) if return_trajectory else None
        return SampleResult(x, field.nfe, trajectory)
    if return_trajectory:
        times = time_grid(steps, grid, device=noise.device, dtype=noise.dtype)
    else:
        times = torch.tensor([1.0, 0.0], device=noise.device, dtype=noise.dtype)
    # Land a step exactly on t = 0 instead of reading the end point off the solver's interpolant.
    options = dict(step_t=times[[0, -1]])
    from torchdiffeq import odeint  # imported here: it pulls in scipy

    states = odeint(lambda t, x: field(x, t), noise, times, rtol=rtol, atol=atol, method=solver, options=options)
    return SampleResult(states[-1], field.nfe, states if return_trajectory else None)
