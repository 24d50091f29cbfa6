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

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flowdistill.api import load_run, resolve_config, resolve_device
from flowdistill.compare_plots import plot_losses, plot_quality, plot_samples
from flowdistill.runs import ensure_trained, parse_entry
from flowdistill.scoring import (Scoring, aggregate, evaluate_student, evaluate_teacher, likelihood_vs_exact,
                                 mean_std_text, quality_grid, reach_table, verdict_rows)
from shared.config import ConfigError, RunConfig, apply_overrides, from_dict, read_yaml_mapping, to_dict
from shared.evaluate import format_table, generate, mean_and_std, write_json
from shared.metrics import feature_extractor, feature_identity
from shared.run_prepare import finished_step, run_dir_of


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
    recipe, overrides = parse_entry(entry, "entry in the comparison spec")
    return resolve_config(recipe, [*common, *overrides, *final])


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
            lines += [f"## {solver}, {grid} grid", "", format_table(*quality_grid(rows, solver, grid)), ""]
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
    scoring = Scoring.of(spec)
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
            res = evaluate_student(run, scoring, extractor)
            results[label].append(res)
            curves[label].append((res["loss_steps"], res["losses"]))
        cur = mean_and_std([r["curvature"] for r in results[label]])
        loss = mean_and_std([r["final_loss"] for r in results[label]])
        straight.append({"student": label, "curvature": mean_std_text(*cur), "final_loss": mean_std_text(*loss),
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
