"""Scoring of trained runs, shared by `flowdistill compare`, the pipeline's evaluate stage and the experiment
drivers: a student's quality at every NFE (cached per weights), its path curvature, loss curve and training
time, a teacher's own sampling, likelihoods against an exact density, aggregation over seeds, the NFE at
which a student reaches a threshold, and the best student at each NFE by the project's rule for "beats".

Quality is W2 on vectors and the Fréchet distance on images (`shared.metrics.sample_quality`), lower is better.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.evaluate import Samples, generate, mean_and_std, quality_vs_steps, score_split, write_json
from shared.metrics import feature_identity, sample_quality
from shared.run import Run
from shared.rundir import read_metrics
from shared.sampling import sample


@dataclass(frozen=True)
class Scoring:
    """How students are scored: NFE, solvers and time grids of the quality table, samples per value, and the
    Euler steps and trajectories of the curvature measurement."""

    steps: tuple[int, ...] = (1, 2, 4, 8)
    solvers: tuple[str, ...] = ("euler",)
    grids: tuple[str, ...] = ("linear",)
    n_samples: int = 500
    curvature_steps: int = 32
    curvature_samples: int = 200

    @classmethod
    def of(cls, spec: Any) -> "Scoring":
        """The scoring settings of a comparison or pipeline spec (fields of the same names)."""
        return cls(tuple(spec.steps), tuple(spec.solvers), tuple(spec.grids), spec.n_samples, spec.curvature_steps,
                   spec.curvature_samples)


def curvature(run: Run, steps: int, n: int, seed: int = 0) -> float:
    """Mean over an Euler trajectory of |v(x_t, t) - (x_1 - x_0)|^2 per dimension: 0 for straight paths."""
    device = next(run.model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = run.sampler.prior_sample(n, run.dataset.shape, device, gen)
    traj = sample(run.model, noise, steps=steps, solver="euler", return_trajectory=True).trajectory
    velocities = (traj[:-1] - traj[1:]) * steps  # dx/dt of each step: t runs from 1 (noise) down to 0 (data)
    chord = traj[0] - traj[-1]  # the constant velocity of the straight path between the two ends
    return (velocities - chord).pow(2).flatten(2).mean().item()


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, loss) from a run's metrics log."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def train_seconds(run_dir: Path, batch_size: int) -> float:
    """Training wall time estimated from the logged throughput of every interval."""
    rows = [r for r in read_metrics(run_dir) if "samples_per_s" in r]
    seconds, last = 0.0, 0
    for r in rows:
        seconds += (r["step"] - last) * batch_size / max(r["samples_per_s"], 1e-9)
        last = r["step"]
    return seconds


def _row_id(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["solver"], row["grid"], row["steps"]


def saved_evaluation(saved: dict[str, Any], key: dict[str, Any]) -> tuple[dict[tuple[str, str, int], dict[str, Any]],
                                                                           float | None]:
    """What a saved evaluation can still serve: its quality rows by (solver, grid, steps) when it scored the same
    weights with the same sample count in the same feature space, and its curvature when that was measured with
    the same settings."""
    have = saved.get("key")
    if not isinstance(have, dict) or have.get("step") != key["step"]:
        return {}, None
    same_scoring = have.get("n") == key["n"] and have.get("features") == key["features"]
    rows = {_row_id(r): r for r in saved.get("rows", [])} if same_scoring else {}
    return rows, saved.get("curvature") if have.get("curvature") == key["curvature"] else None


def evaluate_student(run: Run, spec: Scoring, extractor: Any) -> dict[str, Any]:
    """Quality rows for every solver x grid x step count, curvature and losses of one student.

    Cached in its run folder row by row: a later spec re-evaluates only the (solver, grid, steps) cells the
    cache lacks, and the cache keeps the union of everything measured on these weights. A cache measured with
    other features (a retrained classifier) is measured again, so one table never mixes two feature spaces."""
    key = {"step": run.step, "n": spec.n_samples, "features": feature_identity(extractor),
           "curvature": [spec.curvature_steps, spec.curvature_samples]}
    cache = run.dir / "compare-eval.json"
    have, curv = saved_evaluation(json.loads(cache.read_text()) if cache.is_file() else {}, key)
    rows, fresh = [], False
    for solver in spec.solvers:
        for grid in spec.grids:
            missing = [n for n in spec.steps if (solver, grid, n) not in have]
            if missing:
                fresh = True
                for row in quality_vs_steps(run, missing, solver, grid, spec.n_samples, 0, extractor):
                    have[_row_id(row)] = row
            rows += [have[(solver, grid, n)] for n in spec.steps]
    if curv is None:
        fresh, curv = True, curvature(run, spec.curvature_steps, spec.curvature_samples)
    steps, losses = loss_curve(run.dir)
    result = {"key": key, "rows": list(have.values()), "curvature": curv, "loss_steps": steps, "losses": losses,
              "final_loss": losses[-1] if losses else math.nan,
              "train_seconds": train_seconds(run.dir, run.config.train.batch_size)}
    if fresh:
        write_json(cache, result)
    return {**result, "rows": rows}


def evaluate_teacher(run: Run, n: int, extractor: Any) -> tuple[dict[str, Any], Samples]:
    """Sample quality, NFE and wall time of a teacher's own (autoregressive) sampling."""
    s = generate(run, n, 1, "euler", "linear", 0)
    q = sample_quality(s.x, run.dataset, extractor)
    return {"name": run.config.name, "nfe": s.nfe, **q, "seconds": s.seconds, "n": n,
            "eta": float(getattr(run.model, "eta", 0.0))}, s


def likelihood_vs_exact(runs: dict[str, Run], n: int, path: Path) -> list[dict[str, Any]]:
    """Per run: log p of the first n test points against the data's exact density, in nats per sample (mean
    NLL, gap = model NLL - exact NLL with its paired standard error, mean per-sample |error|), and a
    calibration plot of every run's per-sample log p against the exact one at `path`."""
    from shared.plots import save_calibration

    rows, estimates, exact = [], {}, None
    for label, run in runs.items():
        res, columns = score_split(run, "test", n, run.config.eval.divergence)
        rows.append({"model": label, "likelihood": res["divergence"], "nfe": res["nfe_mean"], "nll": res["nll_nats"],
                     "exact_nll": res["exact_nll_nats"], "gap": res["gap_to_exact_nats"], "gap_se": res["gap_stderr"],
                     "mean_abs_error": res["mean_abs_error_nats"]})
        estimates[label], exact = columns["logp_nats"], columns["exact_logp_nats"]
    save_calibration(estimates, exact, path, f"log p against the exact density ({n} test points)")
    return rows


def aggregate(students: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (student, solver, grid, steps): quality mean/std over seeds, NFE, seconds per sample."""
    out = []
    for label, results in students.items():
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for res in results:
            for r in res["rows"]:
                groups.setdefault((r["solver"], r["grid"], r["steps"]), []).append(r)
        for (solver, grid, steps), rows in groups.items():
            mean, std = mean_and_std([r["value"] for r in rows])
            out.append({"student": label, "solver": solver, "grid": grid, "steps": steps, "nfe": rows[0]["nfe"],
                        "metric": rows[0]["metric"], "mean": mean, "std": std, "seeds": len(rows),
                        "values": [r["value"] for r in rows],
                        "seconds_per_sample": statistics.fmean(r["seconds"] / r["n"] for r in rows)})
    return out


def reach_table(rows: list[dict[str, Any]], threshold: float, teacher_seconds: float | None) -> list[dict[str, Any]]:
    """Per student: the fewest NFE whose mean quality is at or below `threshold`, and the speed-up there."""
    out = []
    for label in dict.fromkeys(r["student"] for r in rows):
        ok = sorted((r for r in rows if r["student"] == label and r["mean"] <= threshold),
                    key=lambda r: (r["nfe"], r["mean"]))
        if not ok:
            best = min((r for r in rows if r["student"] == label), key=lambda r: r["mean"])
            out.append({"student": label, "nfe": "not reached", "setting": "", "quality": best["mean"],
                        "speedup_vs_teacher": ""})
            continue
        r = ok[0]
        speed = teacher_seconds / r["seconds_per_sample"] if teacher_seconds else ""
        out.append({"student": label, "nfe": r["nfe"], "setting": f"{r['solver']}/{r['grid']}", "quality": r["mean"],
                    "speedup_vs_teacher": speed})
    return out


def verdict_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per solver, grid and NFE: the best student against the runner-up, decided by the project's one rule for
    "beats" (`flowdistill.verdict`: one-sided Welch t-test over seeds at 5 %); a tie is never called a win."""
    from flowdistill.verdict import HOLDS, better_claim

    out = []
    for key in dict.fromkeys((r["solver"], r["grid"], r["nfe"]) for r in rows):
        ranked = sorted((r for r in rows if (r["solver"], r["grid"], r["nfe"]) == key), key=lambda r: r["mean"])
        if len(ranked) < 2:
            continue
        best, second = ranked[:2]
        finding = better_claim("", best["student"], best.get("values") or [best["mean"]], second["student"],
                               second.get("values") or [second["mean"]], best["metric"])
        out.append({"setting": f"{key[0]}/{key[1]}", "nfe": key[2], "best": f"{best['student']} ({finding.a.text()})",
                    "runner_up": f"{second['student']} ({finding.b.text()})",
                    "verdict": "beats the runner-up" if finding.verdict == HOLDS else "tie", "how": finding.note})
    return out


def mean_std_text(mean: float, std: float) -> str:
    """`mean ± std` (4 and 2 significant digits), the mean alone when there is no spread."""
    return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"


def quality_grid(rows: list[dict[str, Any]], solver: str, grid: str, label: str = "student"
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Aggregated rows (`aggregate`) of one solver and grid as a table: one row per student (its column named
    `label`), one column per NFE holding mean ± std over seeds; returns (rows, columns)."""
    sel = [r for r in rows if r["solver"] == solver and r["grid"] == grid]
    nfes = sorted({r["nfe"] for r in sel})
    table = []
    for student in dict.fromkeys(r["student"] for r in sel):
        row: dict[str, Any] = {label: student}
        row.update({f"NFE {r['nfe']}": mean_std_text(r["mean"], r["std"]) for r in sel if r["student"] == student})
        table.append(row)
    return table, [label] + [f"NFE {n}" for n in nfes]
