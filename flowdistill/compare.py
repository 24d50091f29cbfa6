"""`flowdistill compare SPEC`: the same student trained on each coupling, compared against the teacher.

A spec (YAML, `key=value` overrides) lists teacher and student entries, each a recipe followed by
overrides ("recipes/digits/fm_nf_teacher.yaml method.coupling.teacher=runs/t name=nfm"). Teachers are trained
first, then every student once per seed (`<name>-s<seed>`, the `common` overrides applied to all, so
model, optimizer, batch and budget are shared). Finished runs are reused and unfinished ones resumed.
Each student is then scored at every NFE for every solver and grid (W2 on vectors, Fréchet distance on
images), its path curvature is measured, and everything lands in `<out_dir>/<name>/`:
`comparison.md` (tables), `results.json`, `quality_vs_nfe.png`, `loss_curves.png`, `samples.png`.
"""
from __future__ import annotations

import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowdistill.api import load_run, resolve_config, resolve_device, train
from flowdistill.compare_plots import plot_losses, plot_quality, plot_samples
from shared.config import ConfigError, RunConfig, apply_overrides, from_dict, read_yaml_mapping, to_dict
from shared.evaluate import (Samples, format_table, generate, mean_and_std, quality_vs_steps, score_split,
                             write_json)
from shared.metrics import feature_extractor, feature_identity, sample_quality
from shared.run import Run
from shared.run_prepare import finished_step, run_dir_of
from shared.rundir import config_path, read_metrics
from shared.sampling import sample


@dataclass
class CompareConfig:
    """What to train and how to score it."""

    name: str = ""  # output folder `<out_dir>/<name>` (default: the spec file's stem)
    out_dir: str = "runs"  # parent of the comparison folder
    teachers: tuple[str, ...] = ()  # "recipe [key=value ...]" entries trained first; scored as references
    students: tuple[str, ...] = ()  # "recipe [key=value ...]" entries, one per coupling, trained once per seed
    common: tuple[str, ...] = ()  # overrides applied to every student (same budget for all)
    seeds: tuple[int, ...] = (0, 1, 2)  # student seeds
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # solver step counts
    solvers: tuple[str, ...] = ("euler", "heun")  # fixed-step solvers compared
    grids: tuple[str, ...] = ("linear", "quadratic")  # time grids compared
    n_samples: int = 2000  # samples per quality measurement
    curvature_steps: int = 64  # Euler steps of the trajectories whose straightness is measured
    curvature_samples: int = 500  # trajectories per curvature measurement
    threshold: float = 0.0  # quality to reach for the "NFE to reach" table (0: the first teacher's quality)
    device: str = "auto"  # evaluation device: auto, cpu, cuda


def load_spec(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read a comparison spec and apply `key=value` overrides."""
    path = Path(path)
    data = read_yaml_mapping(path, "comparison spec", "recipes/toy2d/compare.yaml")
    data.setdefault("name", path.stem)
    spec = from_dict(CompareConfig, apply_overrides(data, overrides or []))
    if not spec.students:
        raise ConfigError(f"comparison spec {str(path)!r} lists no students")
    return spec


def entry_config(entry: str, common: tuple[str, ...] | list[str] = (), final: tuple[str, ...] | list[str] = ()
                 ) -> RunConfig:
    """The run config of one spec entry (a recipe path and its overrides) between `common` and `final` overrides."""
    parts = shlex.split(entry)
    if not parts:
        raise ConfigError("empty entry in the comparison spec")
    return resolve_config(parts[0], [*common, *parts[1:], *final])


def ensure_trained(cfg: RunConfig) -> Path:
    """Train a run unless its checkpoint already reached `train.steps`; resume an unfinished one.

    A student whose coupling reads a precomputed teacher-pair cache gets the cache extracted first.
    """
    if finished_step(cfg) >= cfg.train.steps:
        return run_dir_of(cfg)
    if getattr(getattr(cfg.method, "coupling", None), "mode", "") == "precomputed":
        from nfm.coupling_cache import extract

        extract(cfg, load_run)
    return train(cfg, resume=config_path(run_dir_of(cfg)).is_file())


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


def evaluate_student(run: Run, spec: CompareConfig, extractor: Any) -> dict[str, Any]:
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


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"


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


def markdown(spec: CompareConfig, rows: list[dict[str, Any]], teachers: list[dict[str, Any]],
             straight: list[dict[str, Any]], reach: list[dict[str, Any]], threshold: float, command: str,
             density: list[dict[str, Any]] | None = None) -> str:
    """The comparison report: quality vs NFE per solver/grid, teacher rows, straightness, NFE to reach, and the
    likelihood against the exact density when the data has one."""
    metric = rows[0]["metric"]
    lines = [f"# Comparison `{spec.name}`", "", f"Command: `{command}`", "",
             f"Quality: {metric} (lower is better), mean ± std over seeds {list(spec.seeds)}, "
             f"{spec.n_samples} samples per cell.", ""]
    for solver in spec.solvers:
        for grid in spec.grids:
            sel = [r for r in rows if r["solver"] == solver and r["grid"] == grid]
            nfes = sorted({r["nfe"] for r in sel})
            lines += [f"## {solver}, {grid} grid", "", "| student | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---|" + "---|" * len(nfes)]
            for label in dict.fromkeys(r["student"] for r in sel):
                cells = {r["nfe"]: _fmt(r["mean"], r["std"]) for r in sel if r["student"] == label}
                lines.append(f"| {label} | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
            lines.append("")
    lines += ["## Best student at each NFE", "", "Decided by the project's rule for \"beats\" (one-sided Welch "
              "t-test over seeds at 5 %, `docs/verdicts.md`): anything else is a tie.", "",
              format_table(verdict_rows(rows), ["setting", "nfe", "best", "runner_up", "verdict", "how"]), ""]
    if teachers:
        lines += ["## Teachers (autoregressive sampling)", "",
                  format_table(teachers, ["name", "eta", "nfe", "metric", "value", "seconds", "n"]), ""]
    lines += ["## Straightness, loss and training time", "",
              "Curvature: mean |v(x_t,t) - (x_1 - x_0)|^2 per dimension along "
              f"{spec.curvature_steps}-step Euler trajectories (0 = straight).", "",
              format_table(straight, ["student", "curvature", "final_loss", "train_seconds"]), "",
              f"## NFE to reach {metric} <= {threshold:.4g}", "",
              format_table(reach, ["student", "nfe", "setting", "quality", "speedup_vs_teacher"]), ""]
    if density:
        lines += ["## Likelihood against the exact density", "",
                  "Nats per sample on the first test points; gap = model NLL - exact NLL (negative: more density "
                  "than the truth) ± its paired standard error; students (first seed) by their adaptive ODE. "
                  "Per-sample calibration: `likelihood_calibration.png`.", "",
                  format_table(density, ["model", "likelihood", "nfe", "nll", "exact_nll", "gap", "gap_se",
                                         "mean_abs_error"]), ""]
    return "\n".join(lines)


def student_configs(spec: CompareConfig) -> dict[str, list[RunConfig]]:
    """Per student entry (by its run name), the run config of every seed: `<name>-s<seed>`."""
    configs: dict[str, list[RunConfig]] = {}
    for entry in spec.students:
        base = entry_config(entry, spec.common)
        for seed in spec.seeds:
            cfg = entry_config(entry, spec.common, [f"seed={seed}", f"name={base.name}-s{seed}"])
            configs.setdefault(base.name, []).append(cfg)
    if len({c.data.name for cfgs in configs.values() for c in cfgs}) != 1:
        raise ConfigError("all students of a comparison must train on the same data set")
    return configs


def comparison_plan(spec: CompareConfig) -> list[dict[str, Any]]:
    """Every run a comparison needs, teachers first: role, run folder, steps it needs, and its state
    (`finished`, `resumes at step N` or `to train`); nothing is trained or written."""
    cfgs = [("teacher", entry_config(e)) for e in spec.teachers]
    cfgs += [("student", c) for group in student_configs(spec).values() for c in group]
    rows = []
    for role, cfg in cfgs:
        done = finished_step(cfg)
        state = "finished" if done >= cfg.train.steps else f"resumes at step {done}" if done else "to train"
        rows.append({"role": role, "run": str(run_dir_of(cfg)), "steps": cfg.train.steps, "state": state})
    return rows


def run_comparison(spec: CompareConfig, command: str = "") -> Path:
    """Train what is missing, evaluate everything, write the report; returns the comparison folder."""
    from accelerate import PartialState

    for entry in tqdm(spec.teachers, desc="teachers", disable=None):
        ensure_trained(entry_config(entry))
    student_cfgs = student_configs(spec)
    for cfgs in tqdm(list(student_cfgs.values()), desc="students", disable=None):
        for cfg in cfgs:
            ensure_trained(cfg)
    state = PartialState()
    out = Path(spec.out_dir) / spec.name
    if not state.is_main_process:
        return out
    device = resolve_device(spec.device)
    first = load_run(run_dir_of(next(iter(student_cfgs.values()))[0]), device=device)
    extractor = feature_extractor(first.dataset, device=str(device)) if first.dataset.kind == "image" else None
    teachers, panels = [], {}
    for entry in spec.teachers:
        trun = load_run(run_dir_of(entry_config(entry)), device=device)
        row, s = evaluate_teacher(trun, spec.n_samples, extractor)
        teachers.append(row)
        panels[f"{row['name']} ({row['nfe']} NFE)"] = s.x
    results, curves, straight = {}, {}, []
    for label, cfgs in tqdm(list(student_cfgs.items()), desc="evaluate", disable=None):
        results[label], curves[label] = [], []
        for cfg in cfgs:
            run = load_run(run_dir_of(cfg), device=device)
            res = evaluate_student(run, spec, extractor)
            results[label].append(res)
            curves[label].append((res["loss_steps"], res["losses"]))
        cur = mean_and_std([r["curvature"] for r in results[label]])
        loss = mean_and_std([r["final_loss"] for r in results[label]])
        straight.append({"student": label, "curvature": _fmt(*cur), "final_loss": _fmt(*loss),
                         "train_seconds": statistics.fmean(r["train_seconds"] for r in results[label])})
        run = load_run(run_dir_of(cfgs[0]), device=device)  # first seed's samples for the figure
        for steps in sorted({1, 4, max(spec.steps)} & set(spec.steps)):
            panels[f"{label}: {steps} NFE"] = generate(run, 64 if run.dataset.kind == "image" else 2000, steps,
                                                       spec.solvers[0], spec.grids[0], 0).x
    density = None
    if first.dataset.log_density is not None:
        scored = {row["name"]: load_run(run_dir_of(entry_config(e)), device=device) for row, e in zip(teachers, spec.teachers)}
        scored.update({label: load_run(run_dir_of(cfgs[0]), device=device) for label, cfgs in student_cfgs.items()})
        out.mkdir(parents=True, exist_ok=True)
        density = likelihood_vs_exact(scored, min(spec.n_samples, 1000), out / "likelihood_calibration.png")
    rows = aggregate(results)
    threshold = spec.threshold or (teachers[0]["value"] if teachers else min(r["mean"] for r in rows))
    teacher_seconds = teachers[0]["seconds"] / teachers[0]["n"] if teachers else None
    reach = reach_table(rows, threshold, teacher_seconds)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"spec": to_dict(spec), "features": feature_identity(extractor),
                                      "threshold": threshold, "teachers": teachers,
                                      "likelihood_vs_exact": density,
                                      "rows": rows, "straightness": straight, "reach": reach,
                                      "per_seed": {k: [{x: r[x] for x in ("rows", "curvature", "final_loss")}
                                                       for r in v] for k, v in results.items()}})
    from shared.checkpoint import atomic_write_text

    atomic_write_text(out / "comparison.md", markdown(spec, rows, teachers, straight, reach, threshold, command, density)
                      + "\n")
    plot_quality(rows, teachers, spec.solvers, spec.grids, out / "quality_vs_nfe.png")
    plot_losses(curves, out / "loss_curves.png")
    plot_samples(panels, first.dataset.levels, first.dataset.test if first.dataset.kind == "vector" else None,
                 out / "samples.png")
    return out
