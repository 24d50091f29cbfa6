"""The stage table of the main job (`flowdistill run`): the stages in the order they plan, run, score and report.

A stage is a `flowdistill.stage.Stage` defined in a module of its own; adding one is that module and a line
here (its settings go under `stage_options: {<name>: ...}` in the pipeline spec).
"""
from __future__ import annotations

from flowdistill.pipeline_eval import EVALUATE
from flowdistill.report import REPORT
from flowdistill.stage import Stage
from flowdistill.stages.compact import COMPACT
from flowdistill.stages.couplings import COUPLINGS
from flowdistill.stages.f2d2 import F2D2
from flowdistill.stages.students import STUDENTS
from flowdistill.stages.teacher import TEACHER

STAGES: tuple[Stage, ...] = (
    TEACHER,  # the normalizing-flow teacher, trained or shipped
    COUPLINGS,  # its NFM pairs, extracted once
    STUDENTS,  # one student per coupling and seed
    F2D2,  # flow maps with a divergence head on chosen students
    COMPACT,  # compact flows distilled from the teacher, with their controls
    EVALUATE,  # every stage's scores in one JSON
    REPORT,  # report.md and report.html
)
