"""Couplings: given a data batch, return the noise each data point is paired with.

Every flow-matching student in flowdistill trains on pairs (x, z) produced here; the path
(`shared.paths`) receives them already coupled. A recipe picks one by name in its own section,
`method.coupling: {name: ..., <its keys>}`; each coupling has a config dataclass and is built by
`Coupling.from_config(cfg, ctx)` (ctx: `shared.catalog.BuildContext`). The name table is
`flowdistill.components.COUPLINGS`.

    independent      z ~ N(0, I), drawn without looking at x (plain flow matching)
    minibatch_ot     the batch's noise permuted by exact OT on |x_i - z_j|^2 (POT `ot.emd`), or sampled
                     from an entropic plan (`ot.sinkhorn`) when `ot_reg > 0`
    semidiscrete_ot  SD-FM: fresh noise x0 paired with the data point argmax_k g_k + <x0, y_k> of a
                     fitted dual potential g (`nfm.semidiscrete_ot`); it picks the data for the noise
    nf_teacher       NFM: z = f_teacher(x + eta eps') / sigma_f from a trained flow (TarFlow or Glow; the
                     cell noise of a dequantized one), online or from a precomputed cache (`nfm.teacher_coupling`, `nfm.coupling_cache`)
    nf_teacher_ot    NFM-OT: the teacher's z re-paired with fresh N(0, I) noise by exact minibatch OT

The loss asks for `coupling.pairs(x, generator) -> (x, z)`; couplings that choose the data (SD-FM)
override it, the others only implement `coupling(x, generator) -> z`. Randomness comes from the
given generator only, so a resumed run repeats its pairs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from nfm.mips import InnerProductSearch
from nfm.semidiscrete_ot import (CHI2_TOL, ON_UNCONVERGED, SemidiscretePotential, check_convergence, fit_potential,
                                 load_potential, save_potential)
from shared.catalog import BuildContext
from shared.rundir import couplings_dir

SDOT_FILE = "sdot_potential.safetensors"  # default potential file inside a run's couplings folder


class CouplingConfig:
    """What every coupling config declares: the runs its pairs read, by role (none unless it says otherwise)."""

    def run_dependencies(self) -> dict[str, str]:
        """Runs the coupling reads during training, by role (`teacher` for pairs from a flow teacher)."""
        return {}


@dataclass
class IndependentConfig(CouplingConfig):
    """`coupling: {name: independent}`: no options."""

    name: str = "independent"


@dataclass
class MinibatchOTConfig(CouplingConfig):
    """`coupling: {name: minibatch_ot, reg: 0}`."""

    name: str = "minibatch_ot"
    reg: float = 0.0  # entropic regularisation relative to the mean cost (0: the exact plan, ot.emd)


@dataclass
class SemidiscreteOTConfig(CouplingConfig):
    """`coupling: {name: semidiscrete_ot, ...}`: the dual potential's fit."""

    name: str = "semidiscrete_ot"
    potential: str = ""  # potential file (default <run dir>/couplings/sdot_potential.safetensors)
    iters: int = 2000  # stochastic-ascent iterations of the dual fit
    batch: int = 4096  # noise samples per fit iteration
    lr: float = 0.01  # Adam step of the fit, relative to the data's RMS norm
    chunk: int = 0  # data points per tile of the inner-product search (0: 256 on the CPU, 16384 on a GPU)
    chi2_tol: float = CHI2_TOL  # converged when the final chi^2 of the assignments is at most this (and W2^2/2 >= 0)
    on_unconverged: str = "warn"  # what an unconverged fit (or a loaded unconverged potential) does: warn | error
    levels: int = -1  # coarse-to-fine subsample levels (-1: automatic, none up to 4,096 points; 0: one level)
    polish: int = 1  # extra short cosine cycles of the finest level while the final check fails


class Coupling:
    """Base class: `coupling(x, generator)` returns noise z shaped like x, paired with x row by row."""

    name = "base"

    @classmethod
    def from_config(cls, cfg: Any, ctx: BuildContext | None = None) -> "Coupling":
        """Build from the coupling's config section and the build context (data set, run config)."""
        return cls()

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def pairs(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The training pairs (data, noise) for a data batch x (B, ...): by default (x, coupling(x))."""
        return x, self(x, generator)


class IndependentCoupling(Coupling):
    """The product coupling: z ~ N(0, I) drawn independently of x (plain flow matching)."""

    name = "independent"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def squared_costs(x: Tensor, z: Tensor) -> np.ndarray:
    """Cost matrix M_ij = |x_i - z_j|^2 of flattened batches x, z (B, ...), float64 (B, B) on the CPU."""
    import ot

    return ot.dist(x.detach().reshape(len(x), -1).double().cpu().numpy(),
                   z.detach().reshape(len(z), -1).double().cpu().numpy())


def exact_assignment(cost: np.ndarray) -> np.ndarray:
    """The permutation sigma minimising sum_i M_{i, sigma(i)}: `ot.emd` with uniform weights (a permutation plan).

    Falls back to scipy's `linear_sum_assignment` when the network simplex stops short of optimality or its plan is
    not a permutation matrix.
    """
    import ot
    from scipy.optimize import linear_sum_assignment

    n = cost.shape[0]
    uniform = np.full(n, 1.0 / n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan, log = ot.emd(uniform, uniform, cost, numItermax=max(100_000, 50 * n * n), log=True)
    perm = plan.argmax(1)
    if log["result_code"] == 1 and np.unique(perm).size == n and np.allclose(plan[np.arange(n), perm], 1.0 / n):
        return perm
    return linear_sum_assignment(cost)[1]


class MinibatchOTCoupling(Coupling):
    """OT-FM: z ~ N(0, I) for the batch, then re-paired by OT on the squared Euclidean cost of flattened rows.

    `reg = 0`: the exact plan (`ot.emd`), a permutation, so z is the drawn noise re-ordered.
    `reg > 0`: the entropic plan (`ot.sinkhorn`, stabilised variant, reg relative to the mean cost) and, for each
    x_i, a noise row sampled from plan row i with the generator: rows may repeat, so z is then not a permutation.
    """

    name = "minibatch_ot"

    def __init__(self, reg: float = 0.0):
        if reg < 0:
            raise ValueError(f"method.coupling.reg must be >= 0, got {reg}")
        self.reg = reg

    @classmethod
    def from_config(cls, cfg: MinibatchOTConfig, ctx: BuildContext | None = None) -> "MinibatchOTCoupling":
        return cls(reg=cfg.reg)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return z[self.assign(x, z, generator)]

    def assign(self, x: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Index (B,) int64 on x's device of the noise row paired with each data row."""
        cost = squared_costs(x, z)
        if self.reg == 0:
            return torch.from_numpy(exact_assignment(cost)).to(x.device)
        import ot

        n = len(cost)
        uniform = np.full(n, 1.0 / n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plan = ot.sinkhorn(uniform, uniform, cost / cost.mean(), self.reg, method="sinkhorn_stabilized",
                               numItermax=5_000)
        rows = torch.from_numpy(plan).to(x.device).clamp_min(0)
        return torch.multinomial(rows, 1, generator=generator).squeeze(1)


class SemidiscreteOTCoupling(Coupling):
    """SD-FM: pairs fresh noise x0 (B, ...) with the data points y_{k*}, k* = argmax_k g_k + <x0, y_k>.

    The potential g is fitted once (`nfm.semidiscrete_ot.fit_potential`) on the first call, on the training
    device, unless `path` already holds one for the same data (checked by fingerprint); a fitted potential is
    saved to `path`. A fitted or loaded potential that fails the convergence criterion (final chi^2 above
    `chi2_tol` or a negative W_2^2/2) warns, or raises `NotConvergedError` with on_unconverged="error" (then
    nothing is saved). The data moves to the training device on the first call.
    """

    name = "semidiscrete_ot"

    def __init__(self, data: Tensor, fingerprint: str, path: str | Path | None = None, iters: int = 2000,
                 batch: int = 4096, lr: float = 0.01, chunk: int = 0, seed: int = 0, progress: bool = True,
                 chi2_tol: float = CHI2_TOL, on_unconverged: str = "warn", levels: int = -1, polish: int = 1):
        if on_unconverged not in ON_UNCONVERGED:
            raise ValueError(f"method.coupling.on_unconverged must be one of {', '.join(ON_UNCONVERGED)}, "
                             f"got {on_unconverged!r}")
        self.data, self.fingerprint = data, fingerprint
        self.path = Path(path) if path else None
        self.fit_options = dict(iters=iters, batch=batch, lr=lr, seed=seed, chunk=chunk, progress=progress,
                                chi2_tol=chi2_tol, on_unconverged=on_unconverged, levels=levels,
                                polish=polish)
        self.chunk, self.chi2_tol, self.on_unconverged = chunk, chi2_tol, on_unconverged
        self.potential: SemidiscretePotential | None = None  # set once loaded or fitted
        self._g: Tensor | None = None
        self._search: InnerProductSearch | None = None

    @classmethod
    def from_config(cls, cfg: SemidiscreteOTConfig, ctx: BuildContext | None = None) -> "SemidiscreteOTCoupling":
        if ctx is None:
            raise ValueError("coupling semidiscrete_ot needs the training data set to fit its potential")
        path = cfg.potential or couplings_dir(ctx.run_dir) / SDOT_FILE
        return cls(ctx.dataset.train, ctx.dataset.fingerprint, path, cfg.iters, cfg.batch, cfg.lr, cfg.chunk,
                   ctx.run_config.seed, ctx.run_config.train.progress, cfg.chi2_tol, cfg.on_unconverged, cfg.levels,
                   cfg.polish)

    def prepare(self, device: torch.device | str) -> None:
        """Load (or fit and save) the potential and move it and the data to `device`."""
        device = torch.device(device)
        if self._g is not None and self._g.device == device:
            return
        if self.potential is None:
            if self.path is not None and self.path.is_file():
                self.potential = load_potential(self.path, self.fingerprint, len(self.data))
                check_convergence(self.potential, self.chi2_tol, self.on_unconverged)
            else:
                self.potential = fit_potential(self.data.to(device), self.fingerprint, **self.fit_options)
                if self.path is not None:
                    save_potential(self.path, self.potential)
                info = self.potential.info
                tqdm.write(f"sdot potential over {int(info['n'])} points: chi2={info['chi2']:.4g}, "
                           f"dual={info['dual']:.6g}, W2^2/2={info['w2_half']:.6g}, {info['fit_seconds']:.1f} s"
                           + (f", saved to {self.path}" if self.path is not None else ""))
        self.data = self.data.to(device)
        self._search = InnerProductSearch(self.data.reshape(len(self.data), -1), self.chunk)
        self._g = self.potential.g.to(device)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError("semidiscrete_ot chooses the data for each noise sample: call pairs(x, generator)")

    @torch.no_grad()
    def pairs(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(y_{k*}, x0) for B = len(x) fresh noise samples; x gives only the batch size, device and dtype."""
        self.prepare(x.device)
        x0 = torch.randn(len(x), self._search.keys.shape[1], device=x.device, generator=generator)
        _, k = self._search(x0, self._g)
        return self.data[k].to(x.dtype), x0.reshape(len(x), *self.data.shape[1:]).to(x.dtype)
