"""Adaptive Runge-Kutta integration with one step size per sample, so that a sample's result does not
depend on the batch it is solved in.

torchdiffeq's adaptive solvers take one step size for the whole batch: the error norm runs over every
sample's state, so the steps a point gets, and its result to within the tolerance, change with the
batch size and with the points it is batched with. Here sample i carries its own time t_i and step h_i,
and accepts or rejects its step on its own error ratio

    r_i = max over state parts p of rms_d(e_{i,p,d} / tol_{i,p,d}),   tol = atol + rtol * max(|y_0|, |y_1|),

(the norm torchdiffeq applies to a batch of one); the next step is h_i * min(10, max(0.9 r_i^(-1/order),
0.2 on a reject, 1 on an accept)). Tableaus, the initial step (Hairer, Norsett & Wanner II.4) and the
step that lands exactly on t_end are torchdiffeq's, so a sample is integrated as torchdiffeq would
integrate it alone. Each field call takes only the samples still running, with their own times.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

# The adaptive methods of shared.sampling.ADAPTIVE_SOLVERS, with their order as torchdiffeq declares it.
PER_SAMPLE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
SAFETY, IFACTOR, DFACTOR = 0.9, 10.0, 0.2
MAX_STEPS = 100_000

# func(t (B_a,), parts [(B_a, *shape_p)], index (B_a,) of the samples in the batch) -> derivatives, same shapes
PartsField = Callable[[Tensor, list[Tensor], Tensor], Sequence[Tensor]]


def _tableau(method: str, dtype: torch.dtype, device: torch.device) -> tuple[list[float], list[Tensor], Tensor,
                                                                             Tensor, int]:
    """(alpha, beta rows, c_sol, c_error, order) of torchdiffeq's solver `method`."""
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"unknown adaptive method {method!r}; choices: {', '.join(PER_SAMPLE_METHODS)}")
    from torchdiffeq._impl.odeint import SOLVERS  # imported here: it pulls in scipy

    solver = SOLVERS[method]
    tab = solver.tableau
    return ([float(a) for a in tab.alpha], [b.to(device, dtype) for b in tab.beta], tab.c_sol.to(device, dtype),
            tab.c_error.to(device, dtype), int(solver.order))


def _per_sample_norm(values: Tensor, sizes: list[int]) -> Tensor:
    """max over parts of the RMS of each part: (B, N) with N = sum(sizes) -> (B,)."""
    return torch.stack([chunk.pow(2).mean(1).sqrt() for chunk in values.split(sizes, dim=1)], 1).amax(1)


def _initial_step(call: Callable[[Tensor, Tensor, Tensor], Tensor], t0: Tensor, y0: Tensor, f0: Tensor,
                  index: Tensor, order: int, rtol: float, atol: float, sizes: list[int]) -> Tensor:
    """torchdiffeq's first step (B,) float64, per sample: min(100 h0, (0.01 / max(d1, d2))^(1 / order))."""
    scale = atol + y0.abs() * rtol
    d0 = _per_sample_norm(y0 / scale, sizes).double()
    d1 = _per_sample_norm(f0 / scale, sizes).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    f1 = call(t0 + h0, y0 + h0.to(y0.dtype)[:, None] * f0, index)
    d2 = _per_sample_norm((f1 - f0) / scale, sizes).double() / h0
    flat = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(flat, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / torch.maximum(d1, d2).clamp_min(1e-300)) ** (1.0 / order))
    return torch.minimum(100 * h0, h1)


def odeint_per_sample(func: PartsField, y0: Sequence[Tensor], t0: float = 0.0, t1: float = 1.0,
                      method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                      max_steps: int = MAX_STEPS) -> list[Tensor]:
    """Solve dy/dt = func(t, y) from t0 to t1 > t0 for every sample with its own step-size control.

    y0: state parts, each (B, *shape_p) with the batch first (e.g. x (B, D) and a log-density
    accumulator (B,)); returns the parts at t1, same shapes. `func(t, parts, index)` gets the times (B_a,)
    of the B_a samples still running, their parts and their rows `index` in the batch, and must treat
    samples independently (no batch statistics). Raises when a sample needs more than `max_steps` steps.
    """
    parts = [p.reshape(p.shape[0], -1) for p in y0]
    sizes = [p.shape[1] for p in parts]
    y = torch.cat(parts, 1)
    batch, dtype, device = y.shape[0], y.dtype, y.device
    alpha, beta, c_sol, c_error, order = _tableau(method, dtype, device)
    fsal = float(c_sol[-1]) == 0 and len(beta[-1]) == len(c_sol) - 1 and bool((c_sol[:-1] == beta[-1]).all())

    def call(t: Tensor, state: Tensor, index: Tensor) -> Tensor:
        split = [s.reshape(len(index), *p.shape[1:]) for s, p in zip(state.split(sizes, 1), y0)]
        out = func(t.to(dtype), split, index)
        return torch.cat([o.reshape(len(index), -1).to(dtype) for o in out], 1)

    index = torch.arange(batch, device=device)
    t = torch.full((batch,), float(t0), dtype=torch.float64, device=device)
    f = call(t, y, index)
    h = _initial_step(call, t, y, f, index, order, rtol, atol, sizes)
    for _ in range(max_steps):
        if len(index) == 0:
            return [s.reshape(p.shape) for s, p in zip(y.split(sizes, 1), y0)]
        ta, ya, fa = t[index], y[index], f[index]
        h_a = h[index]
        land = ta + h_a >= t1  # a step that would pass t1 is shortened to end exactly there
        t_next = torch.where(land, torch.full_like(ta, float(t1)), ta + h_a)
        dt = t_next - ta
        if not bool((dt > 0).all()):
            raise FloatingPointError(f"step size underflow at t = {ta[dt <= 0].min().item():.6g}")
        dts = dt.to(dtype)[:, None]
        stages = [fa]
        yi = ya
        for a, b in zip(alpha, beta):
            ti = t_next if a == 1.0 else ta + a * dt
            yi = ya + dts * sum(coef * k for coef, k in zip(b, stages))
            stages.append(call(ti, yi, index))
        y_new = yi if fsal else ya + dts * sum(coef * k for coef, k in zip(c_sol, stages))
        err = dts * sum(coef * k for coef, k in zip(c_error, stages))
        tol = atol + rtol * torch.maximum(ya.abs(), y_new.abs())
        ratio = _per_sample_norm(err / tol, sizes).double()
        if not bool(torch.isfinite(y_new).all()):
            ratio = torch.where(torch.isfinite(y_new).all(1), ratio, torch.full_like(ratio, math.inf))
        accept = ratio <= 1
        floor = torch.where(accept, torch.ones_like(ratio), torch.full_like(ratio, DFACTOR))
        factor = torch.minimum(torch.full_like(ratio, IFACTOR),
                               torch.maximum(SAFETY / ratio.clamp_min(1e-300) ** (1.0 / order), floor))
        h[index] = torch.where(ratio == 0, dt * IFACTOR, dt * factor)
        done = index[accept]
        t[done], y[done], f[done] = t_next[accept], y_new[accept], stages[-1][accept]
        index = index[~(accept & land)]
    raise RuntimeError(f"{len(index)} sample(s) needed more than {max_steps} steps (method {method})")
