"""The teacher stage: train the normalizing-flow teacher (or take a ready one) and score its own sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flowdistill.report_doc import Doc
from flowdistill.runs import PlannedRun, ReadyRun
from flowdistill.scoring import evaluate_teacher
from flowdistill.stage import PipelineView, ScoreContext, Stage, runs_done


def plan(pipeline: PipelineView) -> list[PlannedRun]:
    """The teacher run to train; none when the pipeline names a shipped teacher."""
    return [] if isinstance(pipeline.teacher, ReadyRun) else [pipeline.teacher]


def status(pipeline: PipelineView) -> str:
    """`shipped (...)` / `given (...)` for a ready teacher, else whether its run is done."""
    return pipeline.teacher.status() if isinstance(pipeline.teacher, ReadyRun) else runs_done(pipeline, "teacher")


def card(pipeline: PipelineView) -> dict[str, Any]:
    """The figures of a packed teacher's model card (empty for a teacher without one)."""
    from flowdistill.packed import CARD, read_card

    return read_card(pipeline.teacher.dir) if (Path(pipeline.teacher.dir) / CARD).is_file() else {}


def score(pipeline: PipelineView, ctx: ScoreContext) -> dict[str, Any]:
    """The teacher's sample quality, NFE and time per sample, parameters and card; its sample figure."""
    from shared.plots import save_samples_figure

    teacher, n = ctx.teacher, pipeline.spec.n_samples
    row, samples = evaluate_teacher(teacher, n, ctx.extractor)
    image = teacher.dataset.kind == "image"
    save_samples_figure(samples.x[:64] if image else samples.x, ctx.figures / "samples-teacher.png",
                        teacher.dataset.levels, None if image else teacher.dataset.test,
                        f"teacher: {samples.nfe} NFE")
    ctx.sample_figures["teacher"] = "samples-teacher.png"
    row["seconds_per_sample"] = samples.seconds / len(samples.x)
    row["params"] = sum(p.numel() for p in teacher.model.parameters())
    return {"teacher": {**row, "run": pipeline.teacher_ref, "card": card(pipeline)}, "dim": teacher.dataset.dim}


def section(doc: Doc, result: dict[str, Any]) -> None:
    """The teacher's row: parameters, eta, NFE, quality and time per sample."""
    teacher = result["teacher"]
    doc.heading("Teacher")
    doc.table([{**teacher, "ms_per_sample": 1000 * teacher["seconds_per_sample"]}],
              ["name", "params", "eta", "nfe", "metric", "value", "ms_per_sample"])


TEACHER = Stage("teacher", plan=plan, status=status, score=score, section=section)
