"""A stage added to the main job in one file: a wider student (the spec's student with `model.hidden` from
`stage_options.wide.hidden`) trained once, scored by its quality at one NFE, and given a report section."""
from __future__ import annotations

from typing import Any

from flowdistill.scoring import Scoring, evaluate_student
from flowdistill.stage import Stage


def plan(pipeline) -> list:
    options = pipeline.spec.stage_options.get("wide", {})
    return [pipeline.plan_run("wide", "wide-s0", pipeline.spec.student,
                              [f"model.hidden={options.get('hidden', 64)}", "seed=0"], role={"width": "wide"})]


def score(pipeline, ctx) -> dict[str, Any]:
    scoring = Scoring(steps=(1,), n_samples=pipeline.spec.n_samples, curvature_steps=4, curvature_samples=20)
    result = evaluate_student(ctx.load(pipeline.runs_of("wide")[0]), scoring, ctx.extractor)
    return {"wide": {"hidden": pipeline.runs_of("wide")[0].config.model.hidden, "value": result["rows"][0]["value"]}}


def section(doc, result: dict[str, Any]) -> None:
    doc.heading("Wide student")
    doc.table([result["wide"]], ["hidden", "value"])


WIDE = Stage("wide", plan=plan, score=score, section=section)
