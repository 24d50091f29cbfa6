"""Reference log-likelihood of a flow by the instantaneous change of variables.

With dx/dt = v(x, t) the log density along a trajectory obeys d log p_t(x_t)/dt = -div v(x_t, t).
Integrating the state (x, delta) from data at t = 0 to noise at t = 1 with d delta/dt = div v gives
    log p_0(x) = log N(x_1; 0, I) + delta(1).
The divergence is either exact (one vector-Jacobian product per dimension, for small inputs) or
Hutchinson's unbiased estimate eps^T J eps with one probe eps held fixed through the whole solve.

The adaptive solvers control the error of each sample on its own (`shared.adaptive_ode`), so with the
exact divergence a point's log p does not depend on the batch size or on the points batched with it
(up to floating-point rounding); the fixed-grid solvers are batch-independent by construction.
`refinement_change` is the convergence check: how much log p moves when the tolerance is halved
(adaptive) or the grid is refined twofold (fixed), per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from shared.adaptive_ode import odeint_per_sample
from shared.paths import standard_normal_logprob
from shared.sampling import ADAPTIVE_SOLVERS, CountingField

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# The likelihood's fixed-grid solvers are torchdiffeq's (it integrates x and log p jointly); sampling's own
# fixed-step solvers are euler and heun (shared.sampling.FIXED_SOLVERS). Both share the adaptive ones.
LIKELIHOOD_FIXED_SOLVERS = ("euler", "midpoint", "rk4")
LIKELIHOOD_SOLVERS = ADAPTIVE_SOLVERS + LIKELIHOOD_FIXED_SOLVERS
AUTO_EXACT_MAX_DIM = 64
CONVERGED_NATS = 0.005  # largest per-sample change of log p under refinement that counts as converged
# The solver every sampler's ODE likelihood uses (the defaults of `log_likelihood`); part of a cached reference's key.
DEFAULT_METHOD, DEFAULT_RTOL, DEFAULT_ATOL, DEFAULT_PROBE = "dopri5", 1e-5, 1e-5, "rademacher"

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _velocity_with_input(v_fn: VelocityFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """A grad-tracking copy of x and v_fn evaluated on it, so the divergence can be taken by autograd."""
    x = x.detach().requires_grad_(True)
    return x, v_fn(x, t)


def _vjp(v: Tensor, x: Tensor, cotangent: Tensor) -> Tensor:
    """cotangent^T dv/dx shaped like x; zeros when v does not depend on x."""
    if not v.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(v, x, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def divergence_exact(v_fn: VelocityFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(v, div v) with div (B,) the exact Jacobian trace, from one vector-Jacobian product per dimension of x."""
    with torch.enable_grad():
        x, v = _velocity_with_input(v_fn, x, t)
        flat_v = v.reshape(v.shape[0], -1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat_v.shape[1]):
            basis = torch.zeros_like(flat_v)
            basis[:, i] = 1
            div = div + _vjp(v, x, basis.reshape_as(v)).reshape(x.shape[0], -1)[:, i]
    return v.detach(), div.detach()


def divergence_hutchinson(v_fn: VelocityFn, x: Tensor, t: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """(v, div estimate (B,)) = sum(probe * J^T probe) from one vector-Jacobian product; unbiased for E[probe probe^T] = I."""
    with torch.enable_grad():
        x, v = _velocity_with_input(v_fn, x, t)
        div = (_vjp(v, x, probe) * probe).reshape(x.shape[0], -1).sum(1)
    return v.detach(), div.detach()


def make_probe(like: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """A Hutchinson probe shaped like `like`: `rademacher` (uniform +-1) or `gaussian` (standard normal)."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    raise ValueError(f"unknown probe {kind!r}; choices: {', '.join(PROBES)}")


def choose_divergence(requested: str, dim: int) -> str:
    """Resolve `auto` to `exact` for inputs of at most 64 dimensions (else `hutchinson`); validate other names."""
    if requested == "auto":
        return "exact" if dim <= AUTO_EXACT_MAX_DIM else "hutchinson"
    if requested not in DIVERGENCES:
        raise ValueError(f"unknown divergence {requested!r}; choices: auto, {', '.join(DIVERGENCES)}")
    return requested


@dataclass
class LikelihoodResult:
    """log p(x) (B,) in nats per sample, the NFE spent (batched model forwards) and the noise endpoint z = x_1.

    `nfe_per_sample` (B,) int64: the forwards each sample took part in (an adaptive solve gives every sample
    its own steps); None where every sample costs `nfe` (fixed grids, one-pass flows, few-step maps).
    """

    logp: Tensor
    nfe: int
    z: Tensor
    nfe_per_sample: Tensor | None = None

    def per_sample_nfe(self) -> Tensor:
        """NFE of each sample (B,) int64 on the CPU."""
        if self.nfe_per_sample is not None:
            return self.nfe_per_sample.detach().long().cpu()
        return torch.full((len(self.logp),), int(self.nfe), dtype=torch.long)


@torch.no_grad()
def log_likelihood(model: Callable[..., Tensor], x: Tensor, divergence: str = "exact", probe: str = DEFAULT_PROBE,
                   method: str = DEFAULT_METHOD, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                   steps: int | None = None,
                   generator: torch.Generator | None = None, **extras: Any) -> LikelihoodResult:
    """Log density (nats per sample) of data x (B, *shape) under the flow of `model`, by solving t = 0 -> 1.

    Solves d(x, delta)/dt = (v(x, t), div v(x, t)) and returns log p(x) = log N(x_1; 0, I) + delta(1).
    `divergence` is `exact`, `hutchinson` or `auto` (see `choose_divergence`); the Hutchinson probe
    is drawn once from `generator` for the whole batch. Fixed-step methods (euler, midpoint, rk4) need
    `steps`; adaptive ones (dopri5, dopri8, bosh3, adaptive_heun) use rtol/atol per sample and ignore it.
    Tensor `extras` with the batch as first dimension are passed per sample; the model must treat
    samples independently. `nfe` counts batched model calls (an adaptive call covers the samples still running);
    `nfe_per_sample` the calls each sample took part in.
    """
    divergence = choose_divergence(divergence, x[0].numel())
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choices: {', '.join(PROBES)}")
    if method not in LIKELIHOOD_SOLVERS:
        raise ValueError(f"unknown likelihood solver {method!r}; choices: {', '.join(LIKELIHOOD_SOLVERS)}")
    if method in LIKELIHOOD_FIXED_SOLVERS and (steps is None or steps < 1):
        raise ValueError(f"fixed-step method {method!r} needs steps >= 1, got {steps}")
    eps = make_probe(x, probe, generator) if divergence == "hutchinson" else None
    counter = CountingField(model, **extras)
    delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def rows_of(index: Tensor) -> tuple[Callable[..., Tensor], Tensor | None]:
        """The counted field restricted to the samples `index`: its per-sample extras and probe rows."""
        counter.extras = {k: v[index] if isinstance(v, Tensor) and v.dim() and len(v) == len(x) else v
                          for k, v in extras.items()}
        return counter, None if eps is None else eps[index]

    calls = torch.zeros(len(x), dtype=torch.long, device=x.device)  # forwards each sample took part in

    def dynamics(t: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        calls[index] += 1
        field, probe_rows = rows_of(index)
        if probe_rows is None:
            return divergence_exact(field, y, t)
        return divergence_hutchinson(field, y, t, probe_rows)

    if method in LIKELIHOOD_FIXED_SOLVERS:
        from torchdiffeq import odeint  # imported here: it pulls in scipy

        every = torch.arange(len(x), device=x.device)
        times = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        # An explicit grid: `step_size=1/steps` can round into one extra, near-empty step.
        grid = torch.linspace(0, 1, steps + 1, dtype=x.dtype, device=x.device)
        xs, deltas = odeint(lambda t, state: dynamics(t.expand(len(x)), state[0], every), (x, delta0), times,
                            method=method, options=dict(grid_constructor=lambda func, y0, t: grid))
        z, delta = xs[-1], deltas[-1]
    else:
        z, delta = odeint_per_sample(lambda t, parts, index: dynamics(t, parts[0], index), (x, delta0),
                                     method=method, rtol=rtol, atol=atol)
    return LikelihoodResult(standard_normal_logprob(z) + delta, counter.nfe, z, calls.cpu())


def refinement_change(model: Callable[..., Tensor], x: Tensor, divergence: str = "exact", method: str = "dopri5",
                      rtol: float = 1e-5, atol: float = 1e-5, steps: int | None = None, seed: int = 0,
                      **extras: Any) -> tuple[LikelihoodResult, Tensor]:
    """The convergence check of `log_likelihood`: (result, |log p_refined - log p| (B,) in nats per sample).

    The refined solve halves rtol and atol (adaptive methods) or doubles `steps` (fixed grids); both
    solves draw the same Hutchinson probe (a generator seeded with `seed`). A reference is converged
    where the change is below `CONVERGED_NATS` (0.005 nats per sample).
    """
    def solve(tol_scale: float, step_scale: int) -> LikelihoodResult:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        return log_likelihood(model, x, divergence, method=method, rtol=rtol * tol_scale, atol=atol * tol_scale,
                              steps=None if steps is None else steps * step_scale, generator=gen, **extras)

    base = solve(1.0, 1)
    refined = solve(0.5, 1) if method not in LIKELIHOOD_FIXED_SOLVERS else solve(1.0, 2)
    return base, (refined.logp - base.logp).abs()


def default_solver_settings() -> str:
    """The ODE likelihood's solver settings as one line (what a cached reference was computed with)."""
    return f"{DEFAULT_METHOD} rtol={DEFAULT_RTOL:g} atol={DEFAULT_ATOL:g} probe={DEFAULT_PROBE}"
