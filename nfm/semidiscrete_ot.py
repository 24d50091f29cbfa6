"""Semidiscrete optimal transport from N(0, I) noise to the N training points: the dual fit behind SD-FM.

Problem (Mousavi-Hosseini, Zhang, Klein, Cuturi; arXiv 2509.25519). The noise x0 ~ N(0, I_d) is the continuous
source, the data y_1..y_N with weights 1/N the discrete target. With the inner-product cost c(x0, y) = -<x0, y>,
whose optimal plan is the one of |x0 - y|^2 / 2 (the two costs differ by terms of x0 alone and y alone), the
semi-dual is the concave problem

    max_g D(g),   D(g) = (1/N) sum_k g_k - E_{x0} [ max_k ( <x0, y_k> + g_k ) ],
    dD/dg_k = 1/N - P_{x0}( k = argmax_j <x0, y_j> + g_j ),

and at its maximum x0 -> y_{k*(x0)}, k*(x0) = argmax_k g_k + <x0, y_k>, is the optimal transport map, with
D(g) + d/2 + mean_k |y_k|^2 / 2 = W_2^2 / 2 (the `w2_half` below). The assignment k* is a maximum inner-product
search (MIPS, `nfm.mips`), computed in tiles with buffers reused across the fit's iterations.

Convergence diagnostic: chi^2(p || uniform) = N sum_k p_k^2 - 1 = N |dD/dg|^2 of the assignment frequencies p,
estimated without bias from the counts c of B noise draws as N sum_k c_k (c_k - 1) / (B (B - 1)) - 1 (0 when
every data point receives exactly its share; the SD-FM paper reports gains saturating near 0.05).

Coarse to fine (`levels`): in low dimension the dual is badly conditioned at large N (a cell's mass changes over
a step of g that shrinks like N^(-2/d)), so stochastic ascent from g = 0 needs many small steps. The fit then
starts on a random subsample of N / 3^L points (L levels, nested, `LEVEL_FACTOR`), and each finer level starts
from the coarser potential extended to the new points by its c-transform restricted to the coarse cells'
barycentres b_j:
with psi = -g the conjugate of the Brenier potential, convex, whose gradient at y_j is a point of cell j,

    g_k = -max_j ( -g_j + <b_j, y_k - y_j> ),

the largest convex minorant of psi through the coarse tangent planes (exact at the coarse points themselves);
b_j is the mean of the noise the coarse fit assigned to j over its last quarter of steps (no extra draws).
Each coarser level runs half the finest level's iterations. Each level is the same Adam ascent with a cosine
decay, at a step reduced by (N_coarse / N)^(1.5 + 2/d): 2/d for the cells' width, 1.5 because the finer level
starts near its optimum (`REFINE_EXPONENT`; on the 2D mixture 0.6, 0.9, 1.2, 1.5 gave mean final chi^2 0.078,
0.060, 0.044, 0.036 over 3 seeds at equal iterations).

Convergence criterion (`convergence_problem`): a fitted potential is converged when its final chi^2, measured
on at least 10 N fresh noise draws, is at most `chi2_tol` (default 0.05) and its W_2^2/2 estimate is
non-negative (weak duality makes D(g) + d/2 + mean|y|^2/2 a lower bound of W_2^2/2 >= 0, so a negative value
means g is far from the maximum). An unconverged fit warns, or raises `NotConvergedError` when asked to.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from nfm.mips import InnerProductSearch
from shared.checkpoint import CheckpointError, atomic_write_bytes
from shared.progress import Progress

INFO_KEYS = ("n", "dim", "iters", "batch", "lr", "seed", "levels", "polish", "chi2", "dual", "w2_half", "fit_seconds")
CHI2_TOL = 0.05  # default convergence tolerance on the final chi^2 (the SD-FM paper's saturation level)
COARSEST = 4096  # levels=-1 (auto) refines from a subsample of at most this many points
LEVEL_FACTOR = 3  # points of a level per point of the next coarser one (3 beat 2 and 8 on the 2D mixture)
REFINE_EXPONENT = 1.5  # a finer level's step: the coarser level's times (N_coarse / N)^(REFINE_EXPONENT + 2/d)
POLISH_FRACTION, POLISH_STEP = 4, 0.25  # a polish round: iters / 4 steps from a quarter of the finest level's step
TRACK_FRACTION = 4  # a coarse level's cell barycentres are the mean noise of its last 1 / TRACK_FRACTION steps
ON_UNCONVERGED = ("warn", "error")


class NotConvergedError(RuntimeError):
    """A fitted potential fails the convergence criterion and the caller asked for an error."""


@dataclass
class SemidiscretePotential:
    """A fitted dual potential g (N,) over a data set's train rows, with its fit settings and diagnostics."""

    g: Tensor  # float32 (N,): the train-time pairing is argmax_k g_k + <x0, y_k>
    fingerprint: str  # `Dataset.fingerprint` of the data it was fitted on
    info: dict[str, float] = field(default_factory=dict)  # INFO_KEYS: final chi^2, dual D(g), W_2^2/2, ...
    history: dict[str, Tensor] = field(default_factory=dict)  # per logged window: iter, dual, chi2


def chi2_estimate(counts: Tensor, draws: int) -> Tensor:
    """Unbiased chi^2(p || uniform) = N sum_k p_k^2 - 1 from assignment counts (N,) of `draws` noise samples.

    Computed as N (c . c - draws) / (draws (draws - 1)) - 1 in float64, without temporaries when `counts` is
    already float64.
    """
    counts = counts.double()
    return counts.numel() * (torch.dot(counts, counts) - draws) / (draws * (draws - 1)) - 1


class AssignmentSampler:
    """Draws B noise samples x0 ~ N(0, I_d) and assigns them to data y (N, d) under a potential g, in place.

    Holds the search's tiles, the noise batch (B, d) and the counts (N,) float64, all on y's device, so a call
    allocates nothing of size N. `counts` holds the last call's assignment counts, `arg` (B,) its assignments.
    """

    def __init__(self, y: Tensor, batch: int, generator: torch.Generator, chunk: int = 0):
        if batch < 2:
            raise ValueError(f"the noise batch must hold at least 2 samples (chi^2 needs pairs), got {batch}")
        self.search = InnerProductSearch(y, chunk)
        self.batch, self.generator = batch, generator
        device = self.search.keys.device
        self.noise = torch.empty(batch, self.search.keys.shape[1], device=device)
        self.counts = torch.zeros(self.search.n, dtype=torch.float64, device=device)
        self.arg = torch.zeros(batch, dtype=torch.long, device=device)
        self._ones = torch.ones(batch, dtype=torch.float64, device=device)

    def __call__(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Estimates of D(g) and chi^2 from one fresh batch, as 0-dim float64 tensors on the device (no sync)."""
        torch.randn(self.noise.shape, generator=self.generator, out=self.noise)
        best, arg = self.search(self.noise, g)
        self.arg = arg
        self.counts.zero_().index_add_(0, arg, self._ones)
        dual = g.sum().double() / self.search.n - best.double().mean()
        return dual, chi2_estimate(self.counts, self.batch)


class DualAscent:
    """Adam ascent on D(g) from g = 0 (or a given start `g`): g <- g + lr_t m_hat / (sqrt(v_hat) + eps),
    dD/dg_k = 1/N - c_k / B.

    The moments and the gradient are preallocated (N,) float32 buffers updated in place; the dual and chi^2
    estimates of the iterations since the last `window()` are summed on the device and read only there.
    """

    def __init__(self, y: Tensor, batch: int, generator: torch.Generator, chunk: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, g: Tensor | None = None):
        self.sampler = AssignmentSampler(y, batch, generator, chunk)
        n, device = self.sampler.search.n, self.sampler.noise.device
        self.g = torch.zeros(n, device=device) if g is None else g.to(device, torch.float32).clone()
        self._m, self._v = torch.zeros(n, device=device), torch.zeros(n, device=device)
        self._grad, self._denom = torch.empty(n, device=device), torch.empty(n, device=device)
        self.betas, self.eps = betas, eps
        self.steps = 0
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)
        self._window = 0
        self.cell_sums: Tensor | None = None  # per-cell noise sums and counts once `track_cells` is called
        self.cell_counts: Tensor | None = None

    def track_cells(self) -> None:
        """From the next step on, sum each batch's noise rows per assigned cell (for `cell_barycentres`-like means)."""
        self.cell_sums = torch.zeros_like(self.sampler.search.keys)
        self.cell_counts = torch.zeros(self.sampler.search.n, device=self.cell_sums.device)

    def step(self, lr: float) -> None:
        """One iteration: a noise batch, the stochastic gradient of D at g, and an Adam step of size `lr`."""
        dual, chi2 = self.sampler(self.g)
        if self.cell_sums is not None:
            self.cell_sums.index_add_(0, self.sampler.arg, self.sampler.noise)
            self.cell_counts.add_(self.sampler.counts)
        self._sums[0] += dual
        self._sums[1] += chi2
        self._window += 1
        n, batch = self.sampler.search.n, self.sampler.batch
        torch.mul(self.sampler.counts, -1.0 / batch, out=self._grad)
        self._grad.add_(1.0 / n)
        self.steps += 1
        b1, b2 = self.betas
        self._m.mul_(b1).add_(self._grad, alpha=1 - b1)
        self._v.mul_(b2).addcmul_(self._grad, self._grad, value=1 - b2)
        torch.sqrt(self._v, out=self._denom)
        self._denom.div_(math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        self.g.addcdiv_(self._m, self._denom, value=lr / (1 - b1 ** self.steps))

    def window(self) -> tuple[float, float]:
        """Mean dual and chi^2 estimates over the steps since the last call (one host sync); resets the sums."""
        if self._window == 0:
            raise RuntimeError("no DualAscent.step since the last window()")
        dual, chi2 = (self._sums / self._window).tolist()
        self._sums.zero_()
        self._window = 0
        return dual, chi2


@torch.no_grad()
def evaluate_potential(g: Tensor, y: Tensor, generator: torch.Generator, batches: int = 20, batch: int = 4096,
                       chunk: int = 0) -> dict[str, float]:
    """Dual D(g), W_2^2/2 = D + d/2 + mean|y|^2/2 and chi^2, averaged over `batches` fresh noise batches."""
    y = y.reshape(y.shape[0], -1).float()
    sampler = AssignmentSampler(y, batch, generator, chunk)
    sums = torch.zeros(2, dtype=torch.float64, device=y.device)
    g = g.to(y.device).float()
    for _ in range(batches):
        dual, chi2 = sampler(g)
        sums[0] += dual
        sums[1] += chi2
    dual, chi2 = (sums / batches).tolist()
    w2_half = dual + y.shape[1] / 2 + y.double().pow(2).sum(1).mean().item() / 2
    return {"dual": dual, "chi2": chi2, "w2_half": w2_half}


def convergence_problem(info: dict[str, float], chi2_tol: float = CHI2_TOL) -> str:
    """Why a fit with final diagnostics `info` (chi2, w2_half) is not converged; "" when it is.

    Converged: chi^2 <= chi2_tol and W_2^2/2 >= 0 (see the module docstring); NaNs fail both tests.
    """
    problems = []
    if not info["chi2"] <= chi2_tol:
        problems.append(f"chi^2 of the assignments {info['chi2']:.4g} > tolerance {chi2_tol:g}")
    if not info["w2_half"] >= 0:
        problems.append(f"W_2^2/2 estimate {info['w2_half']:.4g} < 0")
    return "; ".join(problems)


def check_convergence(potential: SemidiscretePotential, chi2_tol: float = CHI2_TOL,
                      on_unconverged: str = "warn") -> None:
    """Warn (on_unconverged="warn") or raise `NotConvergedError` ("error") when the potential is not converged."""
    if on_unconverged not in ON_UNCONVERGED:
        raise ValueError(f"on_unconverged must be one of {', '.join(ON_UNCONVERGED)}, got {on_unconverged!r}")
    info = potential.info
    problem = convergence_problem(info, chi2_tol)
    if not problem:
        return
    settings = ", ".join(f"{k} {info[k]:g}" for k in ("iters", "batch", "lr") if k in info)
    message = (f"the semidiscrete OT potential over {int(info.get('n', len(potential.g)))} points has not converged "
               f"({problem}; fitted with {settings or 'unknown settings'}): its pairs are far from the optimal "
               "transport plan. Fit longer (raise method.coupling.iters) or with more noise per iteration (raise "
               "method.coupling.batch); if chi^2 stalls rather than falls, lower method.coupling.lr")
    if on_unconverged == "error":
        raise NotConvergedError(message)
    warnings.warn(message, stacklevel=3)

def level_sizes(n: int, levels: int, coarsest: int = COARSEST, factor: int | None = None) -> list[int]:
    """Subsample sizes of a coarse-to-fine fit over n points, coarsest first and ending at n.

    `levels` coarser levels, each `factor` times smaller than the next (stopping above 1 point); -1: as many as
    bring the coarsest level to at most `coarsest` points (none when n <= coarsest).
    """
    if levels < -1:
        raise ValueError(f"levels must be >= -1 (-1: automatic), got {levels}")
    factor = factor or LEVEL_FACTOR
    sizes = [n]
    while (len(sizes) <= levels or (levels == -1 and sizes[-1] > coarsest)) and sizes[-1] // factor >= 2:
        sizes.append(sizes[-1] // factor)
    return sizes[::-1]


@torch.no_grad()
def cell_barycentres(g: Tensor, y: Tensor, generator: torch.Generator, draws: int, batch: int = 4096,
                     chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Mean noise point b (N, d) and draw count (N,) of each cell {x0: argmax_k g_k + <x0, y_k> = j}.

    From ceil(draws / batch) batches of noise; a cell that received no draw has count 0 and b = 0.
    """
    search = InnerProductSearch(y, chunk)
    sums = torch.zeros_like(search.keys)
    counts = torch.zeros(search.n, device=sums.device)
    ones = torch.ones(batch, device=sums.device)
    noise = torch.empty(batch, search.keys.shape[1], device=sums.device)
    for _ in range(max(1, math.ceil(draws / batch))):
        torch.randn(noise.shape, generator=generator, out=noise)
        _, arg = search(noise, g)
        sums.index_add_(0, arg, noise)
        counts.index_add_(0, arg, ones)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


@torch.no_grad()
def refine_potential(g_coarse: Tensor, y_coarse: Tensor, y_fine: Tensor, barycentres: Tensor, counts: Tensor,
                     chunk: int = 0) -> Tensor:
    """Extend a coarse potential to finer points: g_k = -max_j (-g_j + <b_j, y_k - y_j>) over non-empty cells j.

    psi = -g is convex with a subgradient b_j (any point of cell j, here its barycentre) at y_j; the result is
    the largest convex minorant through those tangent planes, evaluated at y_fine (N_fine, d): a maximum
    inner-product search with keys b_j and bias -g_j - <b_j, y_j> (empty cells get bias -inf).
    """
    bias = -g_coarse.float() - (barycentres * y_coarse).sum(1)
    bias = bias.masked_fill(counts == 0, -math.inf)
    best, _ = InnerProductSearch(barycentres, chunk)(y_fine, bias)
    return -best


def _ascend(ascent: DualAscent, iters: int, step_size: float, log_every: int, bar: Progress, chi2_tol: float,
            history: dict[str, list[float]], done: int, track_from: int | None = None) -> None:
    """`iters` Adam steps with a cosine decay from `step_size` to 0, logging every `log_every` (iterations offset by
    `done` levels' iterations in `history` and on `bar`); the cells' noise is tracked from step `track_from` on."""
    for it in range(iters):
        if it == track_from:
            ascent.track_cells()
        ascent.step(step_size * 0.5 * (1 + math.cos(math.pi * it / iters)))
        bar.update()
        if (it + 1) % log_every == 0 or it + 1 == iters:
            mean_dual, mean_chi2 = ascent.window()
            history["iter"].append(done + it + 1)
            history["dual"].append(mean_dual)
            history["chi2"].append(mean_chi2)
            bar.report(done + it + 1, {"dual": f"{mean_dual:.4g}", "chi2": f"{mean_chi2:.3g}",
                                       "target": f"<={chi2_tol:g}"})


def fit_potential(y: Tensor, fingerprint: str, iters: int = 2000, batch: int = 4096, lr: float = 0.01,
                  seed: int = 0, chunk: int = 0, log_every: int = 50, eval_batches: int = 20,
                  progress: bool = True, log_seconds: float = 30.0, chi2_tol: float = CHI2_TOL,
                  on_unconverged: str = "warn", levels: int = -1, eval_draws: float = 10.0,
                  polish: int = 1) -> SemidiscretePotential:
    """Stochastic ascent on D(g) over data rows y (N, ...), on y's device, coarse to fine; checks convergence.

    Adam (`DualAscent`) with a cosine step-size decay to zero; the step is `lr` times the data's RMS norm
    sqrt(mean_k |y_k|^2), the scale of <x0, y_k>, so one `lr` suits data sets of any size and dimension.
    `levels` (-1: automatic, see `level_sizes`; 0: one level from g = 0) coarser fits on nested random
    subsamples come first, each of iters // 2 iterations, each finer one started from `refine_potential` at the
    step of the module docstring; with N <= `COARSEST` the automatic setting is one level. Every `log_every`
    iterations the window's mean dual and chi^2 estimates are recorded and shown: on a progress bar
    (`progress`), else as a log line at most every `log_seconds`. The final `info` holds `evaluate_potential` on
    at least `eval_batches` fresh batches and `eval_draws` N noise draws (10: the criterion's default; the
    estimate's standard deviation is about (4 / (eval_draws N))^(1/2), so large N can afford fewer). While it
    fails the criterion, up to `polish` further cosine cycles of iters / 4 steps from a quarter of the finest
    level's step continue the finest level, each followed by a new evaluation (`info["polish"]`: rounds run); a
    fit that still fails the criterion (chi^2 > chi2_tol or W_2^2/2 < 0) warns or raises (`check_convergence`).
    """
    if iters < 1 or log_every < 1:
        raise ValueError(f"iters and log_every must be >= 1, got iters={iters}, log_every={log_every}")
    if on_unconverged not in ON_UNCONVERGED:
        raise ValueError(f"on_unconverged must be one of {', '.join(ON_UNCONVERGED)}, got {on_unconverged!r}")
    start = time.perf_counter()
    y = y.reshape(y.shape[0], -1).float()
    n, dim = y.shape
    generator = torch.Generator(device=y.device).manual_seed(seed)
    sizes = level_sizes(n, levels)
    order = None  # nested subsamples: prefixes of one seeded permutation
    if len(sizes) > 1:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(y.device)
    history: dict[str, list[float]] = {"iter": [], "dual": [], "chi2": []}
    done = 0  # iterations of the coarser levels, each half the finest level's
    bar = Progress(iters + (len(sizes) - 1) * max(1, iters // 2), f"sdot fit over {n} points", progress, log_seconds)
    step_size = lr * y.pow(2).sum(1).mean().sqrt().item()
    g: Tensor | None = None
    for level, size in enumerate(sizes):
        points = y if size == n else y[order[:size]]  # the finest level in the data's own row order
        if level:
            coarse, sums, counts = y[order[:sizes[level - 1]]], ascent.cell_sums, ascent.cell_counts
            g = refine_potential(g, coarse, points, sums / counts.clamp_min(1).unsqueeze(1), counts, chunk)
            step_size *= (sizes[level - 1] / size) ** (REFINE_EXPONENT + 2 / dim)
        ascent = DualAscent(points, batch, generator, chunk, g=g)
        steps = iters if size == n else max(1, iters // 2)
        _ascend(ascent, steps, step_size, log_every, bar, chi2_tol, history, done,
                track_from=None if size == n else steps - max(1, steps // TRACK_FRACTION))
        done += steps
        g = ascent.g
    bar.close()
    eval_batches = max(eval_batches, math.ceil(eval_draws * n / batch))
    final = evaluate_potential(g, y, generator, eval_batches, batch, chunk)
    rounds = 0
    while rounds < polish and convergence_problem(final, chi2_tol):  # a shorter, gentler cosine cycle, re-checked
        steps = max(1, iters // POLISH_FRACTION)
        bar = Progress(steps, f"sdot fit polish {rounds + 1} over {n} points", progress, log_seconds)
        _ascend(ascent, steps, step_size * POLISH_STEP, log_every, bar, chi2_tol, history, done)
        bar.close()
        done, rounds = done + steps, rounds + 1
        final = evaluate_potential(ascent.g, y, generator, eval_batches, batch, chunk)
    info = {"n": n, "dim": dim, "iters": iters, "batch": batch, "lr": lr, "seed": seed, "levels": len(sizes) - 1,
            "polish": rounds, **final, "fit_seconds": time.perf_counter() - start}
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()}
    potential = SemidiscretePotential(g, fingerprint, info, tensors)
    check_convergence(potential, chi2_tol, on_unconverged)
    return potential


def save_potential(path: str | Path, potential: SemidiscretePotential) -> None:
    """Write the potential, its history and metadata (fingerprint, settings, final chi^2) as safetensors, atomically."""
    tensors = {"g": potential.g.detach().cpu().contiguous(),
               **{f"history.{k}": v.cpu().contiguous() for k, v in potential.history.items()}}
    metadata = {"fingerprint": potential.fingerprint, **{k: repr(v) for k, v in potential.info.items()}}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_potential(path: str | Path, fingerprint: str | None = None, n: int | None = None) -> SemidiscretePotential:
    """Read a saved potential; refuse one fitted on other data (fingerprint or size differs) or a corrupt file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the semidiscrete OT potential {path}: {err}") from None
    if "g" not in tensors or "fingerprint" not in metadata:
        raise CheckpointError(f"{path} is not a semidiscrete OT potential (no `g` tensor or no fingerprint)")
    saved, g = metadata["fingerprint"], tensors["g"]
    if fingerprint is not None and saved != fingerprint:
        raise CheckpointError(f"the semidiscrete OT potential {path} was fitted on data with fingerprint {saved}, "
                              f"but this run's data has fingerprint {fingerprint}; delete the file to refit, or set "
                              f"method.coupling.potential to another path")
    if n is not None and g.shape != (n,):
        raise CheckpointError(f"the semidiscrete OT potential {path} has {tuple(g.shape)} entries; "
                              f"the data has {n} train points")
    info = {k: float(metadata[k]) for k in INFO_KEYS if k in metadata}
    history = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("history.")}
    return SemidiscretePotential(g.float(), saved, info, history)
