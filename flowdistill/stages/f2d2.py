"""The F2D2 stage: flow maps with a divergence head distilled from chosen students (u stage, then the joint u + D
stage), scored on few-step likelihood against their ODE reference and the teacher's exact NLL."""
from __future__ import annotations

from typing import Any

from flowdistill.report_doc import Doc
from flowdistill.runs import PlannedRun
from flowdistill.stage import PipelineView, ScoreContext, Stage
from shared.config import ConfigError, RunConfig


COLUMNS = ("K", "nfe", "nll", "ref_nll", "nf_nll", "mae", "bpd", "ref_bpd", "naive_nll", "seconds", "ref_seconds",
           "ref_nfe", "speedup", "quality")


def check_steps(pipeline: PipelineView, cfg: RunConfig) -> None:
    """Refuse, before anything trains, NFE the joint map cannot be scored at (untrained Shortcut jumps)."""
    from f2d2.flowmap import untrained_jumps

    if cfg.method.variant != "shortcut":
        return
    bad = [k for k in pipeline.spec.steps if untrained_jumps(k, "linear", cfg.method.levels)]
    if bad:
        raise ConfigError(f"pipeline steps {bad}: a Shortcut F2D2 map with method.levels={cfg.method.levels} is "
                          f"scored on the linear grid with K a power of two up to {2 ** cfg.method.levels}; "
                          "drop those steps or use a meanflow f2d2 recipe")


def plan(pipeline: PipelineView) -> list[PlannedRun]:
    """Per coupling in `f2d2_on`: the u stage started from its seed-0 student, then the joint stage from the u stage."""
    spec, runs = pipeline.spec, []
    if not spec.f2d2_u:
        return runs
    for coupling in spec.f2d2_on:
        base = next(r for r in pipeline.students if r.role == {"coupling": coupling, "seed": str(spec.seeds[0])})
        u = pipeline.plan_run("f2d2", f"f2d2_u-{coupling}", spec.f2d2_u,
                              inputs={"method.teacher": base, "train.init_from": base},
                              role={"on": coupling, "part": "u"})
        joint = pipeline.plan_run("f2d2", f"f2d2-{coupling}", spec.f2d2_joint,
                                  inputs={"method.teacher": base, "train.init_from": u},
                                  role={"on": coupling, "part": "joint"})
        check_steps(pipeline, joint.config)
        runs += [u, joint]
    return runs


def joints(pipeline: PipelineView) -> list[PlannedRun]:
    """The joint (u + D) maps: the ones scored and shown."""
    return [r for r in pipeline.f2d2 if r.role["part"] == "joint"]


def score(pipeline: PipelineView, ctx: ScoreContext) -> dict[str, Any]:
    """Few-step NLL vs the ODE reference and the teacher's exact NLL of each joint map (rows per K); its samples."""
    from flowdistill.f2d2_eval import evaluate as f2d2_evaluate
    from flowdistill.stages.students import sample_panels

    spec, out = pipeline.spec, []
    for planned in joints(pipeline):
        run = ctx.load(planned)
        result, _ = f2d2_evaluate(run, list(spec.steps), spec.nll_points, spec.n_samples, run.config.eval.divergence,
                                  nf_teacher=pipeline.teacher_ref)
        out.append({"label": planned.label, "on": planned.role["on"], "reference": result["reference"],
                    "n": result["n"], "rows": result["rows"], "reference_convergence": result["reference_convergence"]})
    sample_panels(pipeline, joints(pipeline), ctx)
    return {"f2d2": out}


def section(doc: Doc, result: dict[str, Any]) -> None:
    """One few-step likelihood table per joint map."""
    if not result["f2d2"]:
        return
    doc.heading("F2D2: few-step likelihood vs the ODE reference")
    for table in result["f2d2"]:
        doc.text(f"{table['label']} (distilled from the {table['on']} student), reference: {table['reference']}, "
                 f"{table['n']} test points; NLL in nats per sample.")
        doc.table(table["rows"], [c for c in COLUMNS if c in table["rows"][0]])
    doc.text("nf_nll is the teacher flow's exact NLL of the same points (of its eta-perturbed density when "
             "its eta > 0): one encode, no ODE.")


F2D2 = Stage("f2d2", plan=plan, score=score, section=section)
