"""Evaluation of any run: batched sampling with timing, quality vs steps, reference NLL on a split."""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from shared.checkpoint import atomic_write_text
from shared.data import bits_per_dim, dequantize
from shared.likelihood import choose_divergence, default_solver_settings
from shared.metrics import FeatureExtractor, feature_extractor, reference_split, sample_quality
from shared.reference_cache import (ReferenceKey, ReferenceScores, cached_reference, generator_digest, points_digest,
                                    weights_digest)
from shared.run import Run
from shared.tabular import read_table
from shared.timing import sync


LARGE_SAMPLE = 100_000  # draws from this many samples on are estimated first and show a progress bar
HELD_COPIES = 4  # copies of the samples held at once: batches, their concatenation, user units, the .npz bytes


@dataclass
class Samples:
    """Generated samples with the NFE per sample and the wall time spent producing them."""

    x: Tensor
    nfe: int
    seconds: float


def generate_with(run: Run, n: int, sample_fn: Callable[[Tensor], Any], seed: int = 0,
                  batch_size: int = 500, warmup: int = 8) -> Samples:
    """Draw `n` samples in batches from seeded prior noise with `sample_fn(noise) -> SampleResult`, timed.

    The first `warmup` noise rows are sampled once, untimed, before the clock starts, so one-off costs (lazy
    allocation, cache set-up, kernel selection) do not count as sampling time; the samples are those of the
    seeded noise either way."""
    device = next(run.model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out, nfe, seconds = [], 0, 0.0
    batches = tqdm(range(0, n, batch_size), desc=f"sampling {n:,}", unit="batch", leave=False,
                   disable=None if n >= LARGE_SAMPLE else True)
    for start in batches:
        noise = run.sampler.prior_sample(min(batch_size, n - start), run.dataset.shape, device, gen)
        if start == 0 and warmup > 0:
            sample_fn(noise[:warmup])
        sync(device)
        t0 = time.perf_counter()
        result = sample_fn(noise)
        sync(device)
        seconds += time.perf_counter() - t0
        out.append(result.samples.float().cpu())
        nfe = result.nfe
    return Samples(torch.cat(out), nfe, seconds)


@torch.no_grad()
def generate(run: Run, n: int, steps: int, solver: str, grid: str, seed: int = 0, batch_size: int = 500) -> Samples:
    """Draw `n` samples from a run's model in batches; noise is seeded so every setting sees the same noise."""
    return generate_with(run, n, lambda noise: run.sampler.sample(run.model, noise, steps=steps, solver=solver,
                                                                 grid=grid), seed, batch_size)


def available_memory() -> int:
    """Bytes of memory this machine can still give a process (MemAvailable; free pages where /proc is absent)."""
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_sample_memory(run: Run, n: int) -> int:
    """Refuse to draw `n` samples whose copies held while drawing and writing exceed the available memory;
    returns the bytes needed."""
    per_sample = math.prod(run.dataset.shape) * 8 * HELD_COPIES  # float64 in the user's units at worst
    needed, free = n * per_sample, available_memory()
    if needed > free:
        raise ValueError(f"--n {n}: the samples need about {needed / 2**30:.1f} GiB of memory while they are drawn "
                         f"and written, more than the {free / 2**30:.1f} GiB available; draw at most "
                         f"--n {max(free // per_sample, 1)} at a time (several files with different --seed)")
    return needed


def sampling_estimate(run: Run, n: int, steps: int, solver: str, grid: str, pilot: int = 1000) -> str:
    """One line for a large draw: its time, from a timed pilot of `pilot` samples, and its memory."""
    trial = generate(run, pilot, steps, solver, grid, seed=0)
    rate = pilot / max(trial.seconds, 1e-9)
    return (f"drawing {n:,} samples: about {duration(n / rate)} at the {rate:,.0f} samples/s of a {pilot}-sample "
            f"pilot, about {require_sample_memory(run, n) / 2**30:.2f} GiB of memory")


def duration(seconds: float) -> str:
    """A rough duration in the unit a person would use: 40 s, 12 min, 17.3 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def quality_vs_steps(run: Run, steps_list: list[int], solver: str, grid: str, n: int, seed: int = 0,
                     extractor: FeatureExtractor | None = None, split: str = "test") -> list[dict[str, Any]]:
    """One row per step count: metric (W2 or Fréchet distance against `split`), extractor, NFE, wall time,
    samples/s."""
    reference_split(run.dataset, split)  # a missing split fails before any sampling
    if run.dataset.kind == "image" and extractor is None:
        extractor = feature_extractor(run.dataset, device=str(next(run.model.parameters()).device))
    rows = []
    for steps in tqdm(steps_list, desc="eval", leave=False, disable=None):
        s = generate(run, n, steps, solver, grid, seed)
        q = sample_quality(s.x, run.dataset, extractor, split=split)
        rows.append({"steps": steps, "solver": solver, "grid": grid, "nfe": s.nfe, **q,
                     "seconds": s.seconds, "samples_per_s": n / max(s.seconds, 1e-9), "n": n})
    return rows


def evaluation_points(run: Run, split: str, n: int, seed: int) -> tuple[Tensor, torch.Generator]:
    """The first n points of a split on the model's device, dequantized for image data with a generator
    seeded by `seed`; the generator is returned so that later draws (probes) continue its stream."""
    data = {"test": run.dataset.test, "train": run.dataset.train, "val": run.dataset.val}.get(split)
    if data is None:
        raise ValueError(f"no {split!r} split in this run's data; choices: train, test"
                         + (", val" if run.dataset.val is not None else " (val needs data.val_fraction > 0)"))
    if len(data) == 0:
        missing = run.dataset.meta.get("missing")
        raise ValueError(f"the {split} split is empty" + (f": {missing}; pass --data FILE to score a file"
                                                           if missing else ""))
    device = next(run.model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = data[:n].to(device)
    if run.dataset.levels is not None:
        x = dequantize(x, run.dataset.levels, gen)
    return x, gen


def file_points(run: Run, path: str | Path) -> Tensor:
    """The rows (N, D) of a .npy/.npz/.csv file in the file's units, mapped to the run's model units.

    A tabular run applies its saved standardisation z = (x - mean) / std; other vector runs take the
    values as they are. Image runs are refused.
    """
    if run.dataset.kind != "vector":
        raise ValueError(f"--data scores tables of vectors (.npy, .npz, .csv of shape (N, D)); this run models "
                         f"{run.dataset.kind}s of shape {run.dataset.shape}")
    table = read_table(Path(path).expanduser(), min_rows=1)
    if table.shape[1] != run.dataset.dim:
        raise ValueError(f"{str(path)!r} has {table.shape[1]} columns; the run models vectors of {run.dataset.dim}")
    std = run.dataset.standardization
    x = std.to_model(table) if std is not None else table
    return x.float().to(next(run.model.parameters()).device)


def cache_folder(run: Run) -> Path | None:
    """The folder whose cache/ holds a run's reference likelihoods: the run directory, or None (no caching) for
    a packed run (shipped or exported: a verified artefact that is not written into)."""
    from shared.rundir import PACKED_WEIGHTS

    return None if (Path(run.dir) / PACKED_WEIGHTS).is_file() else Path(run.dir)


def likelihood_key(model: torch.nn.Module, x: Tensor, divergence: str, estimate: str,
                   generator: torch.Generator | None, batch_size: int) -> ReferenceKey:
    """The cache key of a likelihood of points x under `model` (see shared.reference_cache): randomness
    (the generator's state and the batch the probes are drawn per) counts only for a Hutchinson estimate."""
    randomness = f"generator {generator_digest(generator)}, batch {batch_size}" if divergence == "hutchinson" else ""
    return ReferenceKey(weights_digest(model), points_digest(x), len(x), estimate, divergence, randomness)


def score_batches(fn: Callable[[Tensor, torch.Generator], Any], x: Tensor, generator: torch.Generator,
                  batch_size: int, desc: str = "nll") -> ReferenceScores:
    """Per-point log p (N,) float64 and NFE (N,) int64 on the CPU of `fn(batch, generator) -> LikelihoodResult`
    over x in batches, and the wall seconds (CUDA work included)."""
    logps, nfes, seconds = [], [], 0.0
    for start in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=None):
        sync(x.device)
        t0 = time.perf_counter()
        res = fn(x[start:start + batch_size], generator)
        sync(x.device)
        seconds += time.perf_counter() - t0
        logps.append(res.logp.detach().double().cpu())
        nfes.append(res.per_sample_nfe())
    return ReferenceScores(torch.cat(logps), torch.cat(nfes), seconds)


def nfe_summary(nfe: Tensor, prefix: str = "nfe") -> dict[str, float]:
    """Mean, min and max NFE per point of a point set: {prefix}_mean, {prefix}_min, {prefix}_max."""
    nfe = nfe.double()
    return {f"{prefix}_mean": nfe.mean().item(), f"{prefix}_min": int(nfe.min().item()),
            f"{prefix}_max": int(nfe.max().item())}


def format_nfe(summary: dict[str, Any], prefix: str = "nfe") -> str:
    """'879 NFE per point (mean; 610-1203)', or '1 NFE per point' when every point costs the same."""
    low, high = summary[f"{prefix}_min"], summary[f"{prefix}_max"]
    if low == high:
        return f"{low} NFE per point"
    return f"{summary[f'{prefix}_mean']:.0f} NFE per point (mean; {low}-{high})"


def run_likelihood(run: Run, x: Tensor, generator: torch.Generator, divergence: str, batch_size: int = 250,
                   label: str = "test", cache: bool = True) -> ReferenceScores:
    """The run's own log p of points x (model units), per point with its NFE; an ODE likelihood is read from
    (and written to) the run's reference cache unless `cache` is False. `divergence` is already resolved."""
    def compute() -> ReferenceScores:
        return score_batches(lambda y, g: run.sampler.log_likelihood(run.model, y, divergence=divergence,
                                                                     generator=g), x, generator, batch_size)

    if not (cache and getattr(run.sampler, "ode_likelihood", False)):
        return compute()
    key = likelihood_key(run.model, x, divergence, f"ode likelihood, {default_solver_settings()}", generator,
                         batch_size)
    return cached_reference(cache_folder(run), key, compute, label)


@torch.no_grad()
def score_points(run: Run, x: Tensor, generator: torch.Generator, divergence: str = "auto", batch_size: int = 250,
                 label: str = "test", cache: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Likelihood of points x (N, *shape) in model units: a summary and per-sample columns (each (N,)).

    Columns: `index` (row of x), `logp_nats` (model log p, nats per sample, in the units the summary's
    `units` names), `bits_per_dim` for images, `exact_logp_nats` / `abs_error_nats` when the exact
    density is known, and last `nfe` (model evaluations of each point). Tabular runs report log p in the
    units of the user's file,
        log p_user(x) = log p_std(z) - sum_d log std_d,
    and keep the standardised value in `logp_standardised_nats`. The summary holds means, standard
    errors, the NFE per point (mean, min, max) and wall time; `gap_to_exact_nats` is mean model NLL minus
    mean exact NLL (negative: the model claims more density than the truth). An ODE likelihood comes from
    the run's reference cache when these points were scored before (`cached`: true; `seconds` is then the
    time the computation took).
    """
    if not len(x):
        raise ValueError(f"no points to score in {label}")
    div = choose_divergence(divergence, run.dataset.dim)
    scores = run_likelihood(run, x, generator, div, batch_size, label, cache)
    logp = scores.logp
    columns: dict[str, Tensor] = {"index": torch.arange(len(logp)), "logp_nats": logp}
    std = run.dataset.standardization
    if std is not None:
        columns["logp_standardised_nats"], logp = logp, std.logp_to_user(logp)
        columns["logp_nats"] = logp
    nll = -logp
    out = {"split": label, "n": len(nll), "divergence": "exact (flow)" if run.sampler.exact_likelihood else div,
           "units": run.dataset.units, "nll_nats": nll.mean().item(), "nll_nats_stderr": standard_error(nll),
           **nfe_summary(scores.nfe), "seconds": scores.seconds, "cached": scores.cached}
    if std is not None:
        out["log_jacobian_nats"] = std.log_jacobian  # -sum(log std): added to every standardised log p
    if run.dataset.levels is not None:
        columns["bits_per_dim"] = bits_per_dim(nll, run.dataset.dim, run.dataset.levels)
        out["bits_per_dim"] = columns["bits_per_dim"].mean().item()
    if run.dataset.log_density is not None:
        exact = run.dataset.log_density(x.cpu()).double()
        columns["exact_logp_nats"], columns["abs_error_nats"] = exact, (logp - exact).abs()
        out.update(exact_nll_nats=-exact.mean().item(), gap_to_exact_nats=(nll.mean() + exact.mean()).item(),
                   gap_stderr=standard_error(-(logp - exact)), mean_abs_error_nats=columns["abs_error_nats"].mean().item())
    columns["nfe"] = scores.nfe  # last: the columns before it keep their places
    return out, columns


def score_split(run: Run, split: str = "test", n: int = 0, divergence: str = "auto", seed: int = 0,
                batch_size: int = 250, cache: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Likelihood of the first `n` points of a split (all when n = 0): `score_points` on that split."""
    points = getattr(run.dataset, split, None)
    x, gen = evaluation_points(run, split, n or (0 if points is None else len(points)), seed)
    return score_points(run, x, gen, divergence, batch_size, split, cache)


def write_nll(folder: str | Path, stem: str, summary: dict[str, Any], columns: dict[str, Tensor],
              title: str = "") -> list[Path]:
    """`<stem>.json` (summary), `<stem>.csv` (per sample) and, with an exact density, `<stem>-calibration.png`."""
    folder = Path(folder)
    paths = [write_json(folder / f"{stem}.json", summary), write_columns(folder / f"{stem}.csv", columns)]
    if "exact_logp_nats" in columns:
        from shared.plots import save_calibration  # imported here: it pulls in matplotlib

        paths.append(save_calibration({f"model ({summary['divergence']})": columns["logp_nats"]},
                                      columns["exact_logp_nats"], folder / f"{stem}-calibration.png",
                                      title or f"{stem}: mean gap {summary['gap_to_exact_nats']:+.4f} nats"))
    return paths


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of repeated measurements (seeds, runs); the spread of one value is 0."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of a 1-D tensor (0 for one value)."""
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


def reference_nll(run: Run, split: str = "test", n: int = 500, divergence: str = "auto", seed: int = 0,
                  batch_size: int = 250) -> dict[str, Any]:
    """Mean NLL (nats per sample, and bits/dim for images) of `n` points of a split under the run's model."""
    return score_split(run, split, n, divergence, seed, batch_size)[0]


def write_columns(path: str | Path, columns: dict[str, Tensor]) -> Path:
    """Per-sample columns as CSV (header row, one line per sample), written atomically."""
    names = list(columns)
    rows = zip(*(columns[k].tolist() for k in names))
    lines = [",".join(names)] + [",".join(str(v) if isinstance(v, int) else repr(float(v)) for v in row)
                                 for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of the given columns (floats to 4 significant digits)."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return Path(path)
