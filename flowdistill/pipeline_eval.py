"""The pipeline's evaluate stage: score every run once and write one JSON plus the figures the report shows.

`evaluation-<key>.json` holds the teacher's sampling quality, NFE and time; each student's quality at
every NFE (mean and spread over seeds), curvature, loss curve and training time; the F2D2 few-step
likelihood table against its ODE reference and the teacher's exact NLL; the compact flows' distillation
table (teacher, distilled and undistilled student: NLL, quality at two temperatures, speed); the hardware. Figures go to `figures-<key>/`. The report
reads numbers only from this JSON.
"""
from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from flowdistill.api import load_run, resolve_device
from flowdistill.compare import CompareConfig, aggregate, evaluate_student, evaluate_teacher
from flowdistill.compare_plots import plot_quality
from shared.evaluate import generate, mean_and_std, write_json
from shared.metrics import feature_extractor

Pipeline = Any  # flowdistill.pipeline.Pipeline (not imported: the pipeline imports this module)


def hardware(device: torch.device) -> dict[str, Any]:
    """CPU, cores, GPU and software versions of the machine the evaluation ran on."""
    import os

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sample_panels(pipeline: Pipeline, device: torch.device, figures: Path) -> dict[str, str]:
    """One sample figure per student coupling (seed 0) and per F2D2 map, at each scored NFE; name -> file."""
    from shared.plots import save_samples_figure

    spec, out = pipeline.spec, {}
    chosen = [r for r in pipeline.coupling_students() if r.role["seed"] == str(spec.seeds[0])]
    chosen += [r for r in pipeline.f2d2 if r.role["part"] == "joint"]
    for planned in chosen:
        run = load_run(planned.dir, device=device)
        n = (36 if run.dataset.shape[-1] <= 16 else 64) if run.dataset.kind == "image" else 1000  # small images large
        reference = run.dataset.test if run.dataset.kind == "vector" else None
        for steps in spec.steps:
            s = generate(run, n, steps, spec.solvers[0], spec.grids[0], 0)
            path = figures / f"samples-{planned.label}-{steps}.png"
            save_samples_figure(s.x, path, run.dataset.levels, reference, f"{planned.label}: {s.nfe} NFE")
            out[f"{planned.label} @ {steps} NFE"] = path.name
    return out


def trajectory_figure(pipeline: Pipeline, device: torch.device, path: Path) -> str | None:
    """2D data only: sampling trajectories of each coupling's seed-0 student (the straighter, the fewer steps)."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure
    from shared.sampling import sample

    chosen = [r for r in pipeline.coupling_students() if r.role["seed"] == str(pipeline.spec.seeds[0])]
    first = load_run(chosen[0].dir, device=device)
    if first.dataset.kind != "vector" or first.dataset.dim != 2:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.2), squeeze=False)
    for ax, planned in zip(axes[0], chosen):
        run = load_run(planned.dir, device=device)
        noise = run.sampler.prior_sample(60, run.dataset.shape, device, torch.Generator(device).manual_seed(0))
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


def f2d2_tables(pipeline: Pipeline, device: torch.device) -> list[dict[str, Any]]:
    """Few-step NLL vs the ODE reference and the teacher's exact NLL of each joint F2D2 map (rows per K)."""
    from flowdistill.f2d2_eval import evaluate as f2d2_evaluate

    out = []
    for planned in (r for r in pipeline.f2d2 if r.role["part"] == "joint"):
        run = load_run(planned.dir, device=device)
        result, _ = f2d2_evaluate(run, list(pipeline.spec.steps), pipeline.spec.nll_points, pipeline.spec.n_samples,
                               run.config.eval.divergence, nf_teacher=pipeline.teacher_ref)
        out.append({"label": planned.label, "on": planned.role["on"], "reference": result["reference"],
                    "n": result["n"], "rows": result["rows"]})
    return out


def depth(run: Any) -> int | None:
    """Flow steps of a normalizing flow read from its config's shape fields: blocks x layers (TarFlow), levels x
    steps (Glow); None for a flow family that has neither."""
    model = run.config.model
    for outer, inner in (("blocks", "layers"), ("levels", "steps")):
        if hasattr(model, outer) and hasattr(model, inner):
            return int(getattr(model, outer)) * int(getattr(model, inner))
    return None


def compact_table(pipeline: Pipeline, teacher: Any, device: torch.device, extractor: Any) -> dict[str, Any] | None:
    """Teacher vs distilled vs undistilled compact flows: per-run rows and per-variant means over seeds."""
    from flowdistill.flow_scores import add_speedups, score_flow, summarize

    if not pipeline.compact:
        return None
    n = pipeline.spec.n_samples
    rows = [{"role": "teacher", "seed": None, "depth": depth(teacher), **score_flow(teacher, n, extractor)}]
    for planned in (r for r in pipeline.compact if "variant" in r.role):
        run = load_run(planned.dir, device=device)
        rows.append({"role": planned.role["variant"], "seed": int(planned.role["seed"]), "depth": depth(run),
                     **score_flow(run, n, extractor)})
    summary = summarize(rows)
    add_speedups(summary)
    for entry in summary:
        entry["depth"] = next(r["depth"] for r in rows if r["role"] == entry["role"])
    return {"rows": rows, "summary": summary}


def teacher_card(pipeline: Pipeline) -> dict[str, Any]:
    """The figures of a shipped teacher's model card (empty for a teacher trained by the pipeline)."""
    from flowdistill.packed import read_card
    from shared.catalog import NAMED_RUN_PREFIX

    return read_card(pipeline.teacher.dir) if pipeline.teacher_ref.startswith(NAMED_RUN_PREFIX) else {}


def fit_warnings(pipeline: Pipeline) -> list[str]:
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


def evaluate_pipeline(pipeline: Pipeline) -> Path:
    """Score every run of the pipeline and write `evaluation-<key>.json` and its figures; returns the JSON path."""
    spec = pipeline.spec
    device = resolve_device(spec.device)
    figures = pipeline.root / f"figures-{pipeline.evaluation_key()}"
    scoring = CompareConfig(steps=spec.steps, solvers=spec.solvers, grids=spec.grids, n_samples=spec.n_samples,
                            curvature_steps=spec.curvature_steps, curvature_samples=spec.curvature_samples)
    teacher = load_run(pipeline.teacher_ref, device=device)
    extractor = feature_extractor(teacher.dataset, device=str(device)) if teacher.dataset.kind == "image" else None
    teacher_row, teacher_samples = evaluate_teacher(teacher, spec.n_samples, extractor)
    from shared.plots import save_samples_figure

    save_samples_figure(teacher_samples.x[:64] if teacher.dataset.kind == "image" else teacher_samples.x,
                        figures / "samples-teacher.png", teacher.dataset.levels,
                        teacher.dataset.test if teacher.dataset.kind == "vector" else None,
                        f"teacher: {teacher_samples.nfe} NFE")
    teacher_row["seconds_per_sample"] = teacher_samples.seconds / len(teacher_samples.x)
    teacher_row["params"] = sum(p.numel() for p in teacher.model.parameters())
    per_coupling: dict[str, list[dict[str, Any]]] = {}
    for planned in pipeline.coupling_students():
        run = load_run(planned.dir, device=device)
        per_coupling.setdefault(planned.role["coupling"], []).append(evaluate_student(run, scoring, extractor))
    rows = aggregate(per_coupling)
    straightness = []
    for c, res in per_coupling.items():
        curvature, curvature_std = mean_and_std([r["curvature"] for r in res])
        straightness.append({"coupling": c, "curvature": curvature, "curvature_std": curvature_std,
                             "final_loss": statistics.fmean(r["final_loss"] for r in res),
                             "train_seconds": statistics.fmean(r["train_seconds"] for r in res)})
    losses = {c: {"steps": res[0]["loss_steps"], "losses": res[0]["losses"]} for c, res in per_coupling.items()}
    plot_quality(rows, [teacher_row], scoring.solvers, scoring.grids, figures / "quality_vs_nfe.png")
    result = {
        "pipeline": spec.name, "key": pipeline.evaluation_key(), "figures": figures.name,
        "teacher": {**teacher_row, "run": pipeline.teacher_ref, "card": teacher_card(pipeline)},
        "dim": teacher.dataset.dim, "warnings": fit_warnings(pipeline),
        "students": rows, "straightness": straightness, "losses": losses,
        "f2d2": f2d2_tables(pipeline, device),
        "compact": compact_table(pipeline, teacher, device, extractor),
        "sample_figures": {"teacher": "samples-teacher.png", **sample_panels(pipeline, device, figures)},
        "trajectories": trajectory_figure(pipeline, device, figures / "trajectories.png"),
        "quality_figure": "quality_vs_nfe.png", "hardware": hardware(device),
        "runs": {r.label: str(r.dir) for r in pipeline.trained_runs()},
    }
    return write_json(pipeline.evaluation_path(), result)
