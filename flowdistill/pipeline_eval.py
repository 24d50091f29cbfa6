"""The pipeline's evaluate stage: every stage of the table scores its runs once, into one JSON plus figures.

`evaluation-<key>.json` holds the pipeline's name, key and figures folder, each stage's entries (the teacher's
sampling; the students' quality vs NFE, curvature, losses and training time; the F2D2 few-step likelihood
table; the compact flows' distillation table), the sample figures, warnings, the hardware and the run
folders. Figures go to `figures-<key>/`. The report reads numbers only from this JSON.
"""
from __future__ import annotations

from pathlib import Path

from flowdistill.api import load_run, resolve_device
from flowdistill.pipeline_files import evaluation_outputs, json_damage
from flowdistill.stage import Log, PipelineView, ScoreContext, Stage
from shared.evaluate import write_json
from shared.machine import describe_machine
from shared.metrics import feature_extractor


def evaluate_pipeline(pipeline: PipelineView) -> Path:
    """Score every stage of the pipeline and write `evaluation-<key>.json` and its figures; returns the JSON path."""
    device = resolve_device(pipeline.spec.device)
    teacher = load_run(pipeline.teacher_ref, device=device)
    extractor = feature_extractor(teacher.dataset, device=str(device)) if teacher.dataset.kind == "image" else None
    figures = pipeline.root / f"figures-{pipeline.evaluation_key()}"
    ctx = ScoreContext(device, extractor, teacher, figures)
    ctx.result.update({"pipeline": pipeline.spec.name, "key": pipeline.evaluation_key(), "figures": figures.name})
    for stage in pipeline.stages.values():
        if stage.score is None:
            continue
        entries = stage.score(pipeline, ctx)
        clash = sorted(set(entries) & set(ctx.result))
        if clash:
            raise ValueError(f"stage {stage.name!r} scores {', '.join(clash)}, which an earlier stage already wrote; "
                             "give its entries names of its own")
        ctx.result.update(entries)
    result = {**ctx.result, "warnings": ctx.warnings, "sample_figures": ctx.sample_figures,
              "hardware": describe_machine(device), "runs": {r.label: str(r.dir) for r in pipeline.trained_runs()}}
    return write_json(pipeline.evaluation_path(), result)


def status(pipeline: PipelineView) -> str:
    """`done` when this evaluation's JSON exists and reads back, else `to run` (saying why when damaged)."""
    path = pipeline.evaluation_path()
    damage = json_damage(path)
    if damage:
        return f"to run ({path} is damaged: {damage}; it is recomputed)"
    return "done" if path.is_file() else "to run"


def run(pipeline: PipelineView, log: Log) -> None:
    """Evaluate unless this evaluation's JSON exists (a figures folder left by a failed one is cleared)."""
    if status(pipeline) != "done":
        with evaluation_outputs(pipeline.root / f"figures-{pipeline.evaluation_key()}", pipeline.command):
            evaluate_pipeline(pipeline)


EVALUATE = Stage("evaluate", run=run, status=status, main_only=True)
