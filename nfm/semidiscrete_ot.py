"""Semidiscrete optimal transport from N(0, I) noise to the N training points: the dual fit behind SD-FM.

Problem (Mousavi-Hosseini, Zhang, Klein, Cuturi; arXiv 2509.25519). The noise x0 ~ N(0, I_d) is the continuous
source, the data y_1..y_N with weights 1/N the discrete target. With the inner-product cost c(x0, y) = -<x0, y>,
whose optimal plan is the one of |x0 - y|^2 / 2 (the two costs differ by terms of x0 alone and y alone), the
semi-dual is the concave problem

    max_g D(g),   D(g) = (1/N) sum_k g_k - E_{x0} [ max_k ( <x0, y_k> + g_k ) ],
    dD/dg_k = 1/N - P_{x0}( k = argmax_j <x0, y_j> + g_j ),

and at its maximum x0 -> y_{k*(x0)}, k*(x0) = argmax_k g_k + <x0, y_k>, is the optimal transport map, with
D(g) + d/2 + mean_k |y_k|^2 / 2 = W_2^2 / 2 (the `w2_half` below). The assignment k* is a maximum inner-product
search (MIPS), computed here in blocks of data points.

Convergence diagnostic: chi^2(p || uniform) = N sum_k p_k^2 - 1 of the assignment frequencies p, estimated
without bias from the counts c of B noise draws as N sum_k c_k (c_k - 1) / (B (B - 1)) - 1 (0 when every data
point receives exactly its share; the SD-FM paper reports gains saturating near 0.05).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm.auto import tqdm

from shared.checkpoint import CheckpointError, atomic_write_bytes

INFO_KEYS = ("n", "dim", "iters", "batch", "lr", "seed", "chi2", "dual", "w2_half", "fit_seconds")


@dataclass
class SemidiscretePotential:
    """A fitted dual potential g (N,) over a data set's train rows, with its fit settings and diagnostics."""

    g: Tensor  # float32 (N,): the train-time pairing is argmax_k g_k + <x0, y_k>
    fingerprint: str  # `Dataset.fingerprint` of the data it was fitted on
    info: dict[str, float] = field(default_factory=dict)  # INFO_KEYS: final chi^2, dual D(g), W_2^2/2, ...
    history: dict[str, Tensor] = field(default_factory=dict)  # per logged window: iter, dual, chi2


def mips(queries: Tensor, keys: Tensor, bias: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """max_k and argmax_k of <q_i, y_k> + b_k for queries (B, d), keys (N, d), bias (N,): (B,) float, (B,) int64.

    Scans blocks of `chunk` keys with a running maximum (memory B x chunk), in float32 even under autocast.
    """
    with torch.autocast(queries.device.type, enabled=False):
        queries, keys, bias = queries.float(), keys.float(), bias.float()
        best = torch.full((queries.shape[0],), -math.inf, device=queries.device)
        arg = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        for start in range(0, keys.shape[0], chunk):
            scores = torch.addmm(bias[start:start + chunk], queries, keys[start:start + chunk].T)
            value, index = scores.max(1)
            better = value > best
            best = torch.where(better, value, best)
            arg = torch.where(better, index + start, arg)
    return best, arg


def chi2_estimate(counts: Tensor, draws: int) -> Tensor:
    """Unbiased chi^2(p || uniform) = N sum_k p_k^2 - 1 from assignment counts (N,) of `draws` noise samples."""
    counts = counts.double()
    return counts.numel() * (counts * (counts - 1)).sum() / (draws * (draws - 1)) - 1


def dual_step(g: Tensor, y: Tensor, batch: int, generator: torch.Generator, chunk: int = 8192
              ) -> tuple[Tensor, Tensor, Tensor]:
    """One batch of B noise draws against data y (N, d): the estimates of dD/dg (N,), D(g) and chi^2 (0-dim)."""
    x0 = torch.randn(batch, y.shape[1], device=y.device, generator=generator)
    best, arg = mips(x0, y, g, chunk)
    counts = torch.bincount(arg, minlength=y.shape[0])
    grad = 1.0 / y.shape[0] - counts.float() / batch
    return grad, g.double().mean() - best.double().mean(), chi2_estimate(counts, batch)


@torch.no_grad()
def evaluate_potential(g: Tensor, y: Tensor, generator: torch.Generator, batches: int = 20, batch: int = 4096,
                       chunk: int = 8192) -> dict[str, float]:
    """Dual D(g), W_2^2/2 = D + d/2 + mean|y|^2/2 and chi^2, averaged over `batches` fresh noise batches."""
    g, y = g.to(y.device).float(), y.reshape(y.shape[0], -1).float()
    dual = chi2 = 0.0
    for _ in range(batches):
        _, d, c = dual_step(g, y, batch, generator, chunk)
        dual, chi2 = dual + d.item() / batches, chi2 + c.item() / batches
    w2_half = dual + y.shape[1] / 2 + y.double().pow(2).sum(1).mean().item() / 2
    return {"dual": dual, "chi2": chi2, "w2_half": w2_half}


@torch.no_grad()
def fit_potential(y: Tensor, fingerprint: str, iters: int = 2000, batch: int = 4096, lr: float = 0.01,
                  seed: int = 0, chunk: int = 8192, log_every: int = 50, eval_batches: int = 20,
                  progress: bool = True) -> SemidiscretePotential:
    """Stochastic ascent on D(g) from g = 0 over data rows y (N, ...), on y's device.

    Adam on -dD/dg with a cosine step-size decay to zero; the step is `lr` times the data's RMS norm
    sqrt(mean_k |y_k|^2), the scale of <x0, y_k>, so one `lr` suits data sets of any size and dimension.
    Every `log_every` iterations the window's mean dual and chi^2 estimates are recorded; the final
    `info` holds `evaluate_potential` on at least `eval_batches` fresh batches and 10 N noise draws.
    """
    start = time.perf_counter()
    y = y.reshape(y.shape[0], -1).float()
    generator = torch.Generator(device=y.device).manual_seed(seed)
    step_size = lr * y.pow(2).sum(1).mean().sqrt().item()
    g = torch.zeros(y.shape[0], device=y.device, requires_grad=True)
    opt = torch.optim.Adam([g], lr=step_size)
    history: dict[str, list[float]] = {"iter": [], "dual": [], "chi2": []}
    sums = torch.zeros(2, dtype=torch.float64, device=y.device)
    bar = tqdm(range(iters), desc="sdot fit", disable=not progress, dynamic_ncols=True, mininterval=0.5,
               file=sys.stderr)
    for it in bar:
        grad, dual, chi2 = dual_step(g.detach(), y, batch, generator, chunk)
        sums += torch.stack([dual, chi2])
        g.grad = -grad
        opt.param_groups[0]["lr"] = step_size * 0.5 * (1 + math.cos(math.pi * it / iters))
        opt.step()
        if (it + 1) % log_every == 0 or it + 1 == iters:
            window = (it % log_every) + 1
            mean_dual, mean_chi2 = (sums / window).tolist()
            sums.zero_()
            history["iter"].append(it + 1)
            history["dual"].append(mean_dual)
            history["chi2"].append(mean_chi2)
            bar.set_postfix(dual=f"{mean_dual:.4g}", chi2=f"{mean_chi2:.3g}")
    bar.close()
    g = g.detach()
    eval_batches = max(eval_batches, math.ceil(10 * y.shape[0] / batch))
    final = evaluate_potential(g, y, generator, eval_batches, batch, chunk)
    info = {"n": y.shape[0], "dim": y.shape[1], "iters": iters, "batch": batch, "lr": lr, "seed": seed, **final,
            "fit_seconds": time.perf_counter() - start}
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()}
    return SemidiscretePotential(g.float(), fingerprint, info, tensors)


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
