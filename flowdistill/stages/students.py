"""The students stage: the same flow-matching student trained with every coupling, once per seed, and scored on
quality vs NFE, straightness, training cost and sampling time."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from flowdistill.components import needs_teacher
from flowdistill.report_doc import Doc
from flowdistill.runs import PlannedRun
from flowdistill.scoring import Scoring, aggregate, evaluate_student, quality_grid, reach_table
from flowdistill.stage import PipelineView, ScoreContext, Stage
from shared.evaluate import mean_and_std


def plan(pipeline: PipelineView) -> list[PlannedRun]:
    """One run of the spec's student per coupling and seed; a coupling that reads a teacher gets the pipeline's."""
    spec, runs = pipeline.spec, []
    for coupling in spec.couplings:
        overrides, inputs = [f"method.coupling.name={coupling}"], {}
        if needs_teacher(coupling):
            overrides.append(f"method.coupling.mode={spec.coupling_mode}")
            inputs["method.coupling.teacher"] = pipeline.teacher
        for seed in spec.seeds:
            runs.append(pipeline.plan_run("students", f"{coupling}-s{seed}", spec.student,
                                          [*overrides, *pipeline.extra_overrides(coupling), f"seed={seed}"], inputs,
                                          {"coupling": coupling, "seed": str(seed)}))
    return runs


def first_seed(pipeline: PipelineView) -> list[PlannedRun]:
    """The seed-0 run of every coupling student (figures show one seed)."""
    return [r for r in pipeline.coupling_students() if r.role["seed"] == str(pipeline.spec.seeds[0])]


def sample_panels(pipeline: PipelineView, runs: list[PlannedRun], ctx: ScoreContext) -> None:
    """One sample figure per run at each scored NFE, added to the context's sample figures."""
    from shared.evaluate import generate
    from shared.plots import save_samples_figure

    spec = pipeline.spec
    for planned in runs:
        run = ctx.load(planned)
        image = run.dataset.kind == "image"
        n = (36 if run.dataset.shape[-1] <= 16 else 64) if image else 1000  # small images large
        for steps in spec.steps:
            s = generate(run, n, steps, spec.solvers[0], spec.grids[0], 0)
            path = ctx.figures / f"samples-{planned.label}-{steps}.png"
            save_samples_figure(s.x, path, run.dataset.levels, None if image else run.dataset.test,
                                f"{planned.label}: {s.nfe} NFE")
            ctx.sample_figures[f"{planned.label} @ {steps} NFE"] = path.name


def trajectory_figure(pipeline: PipelineView, ctx: ScoreContext, path: Path) -> str | None:
    """2D data only: sampling trajectories of each coupling's seed-0 student (the straighter, the fewer steps)."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure
    from shared.sampling import sample

    chosen = first_seed(pipeline)
    first = ctx.load(chosen[0])
    if first.dataset.kind != "vector" or first.dataset.dim != 2:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.2), squeeze=False)
    for ax, planned in zip(axes[0], chosen):
        run = ctx.load(planned)
        noise = run.sampler.prior_sample(60, run.dataset.shape, ctx.device, torch.Generator(ctx.device).manual_seed(0))
        traj = sample(run.model, noise, steps=32, solver="euler", return_trajectory=True).trajectory.cpu()
        ax.scatter(*run.dataset.test[:1000].T.numpy(), s=1, c="0.8")
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0].numpy(), traj[:, i, 1].numpy(), lw=0.6, alpha=0.7)
        ax.set_title(planned.role["coupling"], fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    return path.name


def fit_warnings(pipeline: PipelineView) -> list[str]:
    """One line per semidiscrete OT student whose saved potential fails the convergence check."""
    from nfm.couplings import SDOT_FILE
    from nfm.semidiscrete_ot import convergence_problem, load_potential
    from shared.rundir import couplings_dir

    out = []
    for planned in pipeline.coupling_students():
        coupling = planned.config.method.coupling
        if getattr(coupling, "name", "") != "semidiscrete_ot":
            continue
        path = Path(coupling.potential) if coupling.potential else couplings_dir(planned.dir) / SDOT_FILE
        if not path.is_file():
            continue
        problem = convergence_problem(load_potential(path).info, coupling.chi2_tol)
        if problem:
            out.append(f"{planned.label}: its semidiscrete OT fit did not converge ({problem}); raise "
                       "method.coupling.iters in the pipeline's coupling_overrides")
    return out


def score(pipeline: PipelineView, ctx: ScoreContext) -> dict[str, Any]:
    """Every coupling student's quality per NFE (mean and spread over seeds), curvature, loss curve, training
    time; the quality figure (teacher included), the sample figures, the 2D trajectories, fit warnings."""
    from flowdistill.compare_plots import plot_quality

    scoring = Scoring.of(pipeline.spec)
    per_coupling: dict[str, list[dict[str, Any]]] = {}
    for planned in pipeline.coupling_students():
        per_coupling.setdefault(planned.role["coupling"], []).append(
            evaluate_student(ctx.load(planned), scoring, ctx.extractor))
    rows = aggregate(per_coupling)
    straightness = []
    for coupling, res in per_coupling.items():
        curvature, curvature_std = mean_and_std([r["curvature"] for r in res])
        straightness.append({"coupling": coupling, "curvature": curvature, "curvature_std": curvature_std,
                             "final_loss": statistics.fmean(r["final_loss"] for r in res),
                             "train_seconds": statistics.fmean(r["train_seconds"] for r in res)})
    losses = {c: {"steps": res[0]["loss_steps"], "losses": res[0]["losses"]} for c, res in per_coupling.items()}
    plot_quality(rows, [ctx.result["teacher"]], scoring.solvers, scoring.grids, ctx.figures / "quality_vs_nfe.png")
    sample_panels(pipeline, first_seed(pipeline), ctx)
    ctx.warnings += fit_warnings(pipeline)
    return {"students": rows, "straightness": straightness, "losses": losses, "quality_figure": "quality_vs_nfe.png",
            "trajectories": trajectory_figure(pipeline, ctx, ctx.figures / "trajectories.png")}


def speed_rows(students: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per coupling and solver/grid: milliseconds per sample at each NFE."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in students:
        row = rows.setdefault((r["student"], r["solver"], r["grid"]),
                              {"coupling": r["student"], "solver": r["solver"], "grid": r["grid"]})
        row[f"ms @ {r['nfe']} NFE"] = 1000 * r["seconds_per_sample"]
    nfes = sorted({r["nfe"] for r in students})
    return list(rows.values()), ["coupling", "solver", "grid"] + [f"ms @ {n} NFE" for n in nfes]


def section(doc: Doc, result: dict[str, Any]) -> None:
    """Quality vs NFE per solver and grid, straightness, sampling time, NFE to reach the teacher, trajectories."""
    teacher, metric = result["teacher"], result["teacher"]["metric"]
    doc.heading("Students: quality vs NFE")
    for solver in dict.fromkeys(r["solver"] for r in result["students"]):
        for grid in dict.fromkeys(r["grid"] for r in result["students"]):
            rows, cols = quality_grid(result["students"], solver, grid, "coupling")
            doc.text(f"{solver} solver, {grid} time grid ({metric}, mean ± std over seeds):")
            doc.table(rows, cols)
    doc.image("quality vs NFE", result["quality_figure"])
    doc.heading("Straightness and training")
    doc.table(result["straightness"], ["coupling", "curvature", "curvature_std", "final_loss", "train_seconds"])
    doc.heading("Sampling time and NFE")
    doc.text(f"The teacher samples in {1000 * teacher['seconds_per_sample']:.4g} ms per sample ({teacher['nfe']} "
             f"NFE, {metric} {teacher['value']:.4g}). Students, milliseconds per sample:")
    doc.table(*speed_rows(result["students"]))
    doc.text(f"Fewest NFE at which each coupling's mean {metric} reaches the teacher's ({teacher['value']:.4g}), "
             "and the sampling speed-up over the teacher there:")
    doc.table(reach_table(result["students"], teacher["value"], teacher["seconds_per_sample"]),
              ["student", "nfe", "setting", "quality", "speedup_vs_teacher"])
    if result.get("trajectories"):
        doc.heading("Sampling trajectories (2D)")
        doc.image("trajectories", result["trajectories"])


STUDENTS = Stage("students", plan=plan, score=score, section=section)
