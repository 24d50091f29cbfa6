"""A stage of the main job (`flowdistill run`) as one table entry: the runs it plans, what it does, its part of
the evaluation and its section of the report.

The table itself is `flowdistill.pipeline_stages.STAGES`; a new stage is one module defining a `Stage` and one
line there. Stages are planned in table order (a stage may read the runs of the stages before it through
`Pipeline.runs_of`), run in table order, scored in table order after every run has trained (a stage's
scores may read the entries of the stages scored before it, `ScoreContext.result`), and reported in table
order between the Findings and the samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch

from flowdistill.pipeline_spec import PipelineConfig
from flowdistill.report_doc import Doc
from flowdistill.runs import PlannedRun, RunSource

if TYPE_CHECKING:
    from shared.run import Run

Log = Callable[[str], None]


class PipelineView(Protocol):
    """What a stage may ask of the pipeline it belongs to (`flowdistill.pipeline.Pipeline` implements it)."""

    spec: PipelineConfig
    root: Path  # the pipeline folder, `<out_dir>/<name>`
    teacher: RunSource  # the teacher: planned by the teacher stage, or a ready run
    command: str  # the command that reruns the pipeline (named in messages)
    stages: dict[str, "Stage"]  # the stage table, by name, in order

    @property
    def teacher_ref(self) -> str:
        """How the teacher is named in configs: `pretrained:<name>` or a run folder."""

    @property
    def students(self) -> list[PlannedRun]:
        """The students stage's runs."""

    @property
    def f2d2(self) -> list[PlannedRun]:
        """The f2d2 stage's runs."""

    @property
    def compact(self) -> list[PlannedRun]:
        """The compact stage's runs."""

    def runs_of(self, stage: str) -> list[PlannedRun]:
        """The training runs of a stage planned so far."""

    def coupling_students(self) -> list[PlannedRun]:
        """The runs of every stage with a coupling role (scored on quality vs NFE)."""

    def trained_runs(self) -> list[PlannedRun]:
        """Every training run, stage by stage."""

    def plan_run(self, stage: str, label: str, entry: str, overrides: Sequence[str] = (),
                 inputs: Mapping[str, RunSource] | None = None, role: Mapping[str, str] | None = None) -> PlannedRun:
        """A run of a spec entry in the pipeline's runs folder (`flowdistill.runs.plan_run`)."""

    def extra_overrides(self, coupling: str) -> list[str]:
        """The spec's extra overrides of one coupling's students."""

    def evaluation_key(self) -> str:
        """The key of the evaluation: every run's key and the scoring settings."""

    def evaluation_path(self) -> Path:
        """`<root>/evaluation-<key>.json`."""

    def stage_status(self, stage: str) -> str:
        """A stage's plan line."""


@dataclass
class ScoreContext:
    """What every stage's scoring shares: the device, the feature extractor (images), the teacher, the figures
    folder, the evaluation entries written so far, the sample figures and the warnings; runs load once."""

    device: torch.device
    extractor: Any  # shared.metrics feature extractor for images, None for vectors
    teacher: "Run"
    figures: Path
    result: dict[str, Any] = field(default_factory=dict)  # the evaluation's entries, stage by stage
    sample_figures: dict[str, str] = field(default_factory=dict)  # caption -> file name in `figures`
    warnings: list[str] = field(default_factory=list)
    _loaded: dict[Path, "Run"] = field(default_factory=dict)

    def load(self, planned: PlannedRun) -> "Run":
        """A planned run's evaluation weights on the device, loaded once per evaluation."""
        from flowdistill.api import load_run

        if planned.dir not in self._loaded:
            self._loaded[planned.dir] = load_run(planned.dir, device=self.device)
        return self._loaded[planned.dir]


def train_planned(pipeline: PipelineView, stage: str, log: Log) -> None:
    """What a training stage does: train, resume or reuse each of its planned runs, in order."""
    runs = pipeline.runs_of(stage)
    for j, planned in enumerate(runs, 1):
        status = planned.status()
        log(f"  run {j}/{len(runs)} {planned.label}: {status}")
        if status != "done":
            planned.ensure_trained()


def runs_done(pipeline: PipelineView, stage: str) -> str:
    """The plan line of a training stage: how many of its runs are done."""
    runs = pipeline.runs_of(stage)
    if not runs:
        return "nothing to train"
    return f"{sum(r.status() == 'done' for r in runs)}/{len(runs)} runs done"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    plan      the training runs it adds (None: it trains nothing)
    run       what it does when run, given the pipeline and a log (default: train its planned runs)
    status    its line in `--plan` (default: its runs done out of planned); "to run..." means it has work
    score     its entries of the evaluation JSON (a mapping merged into it; keys must not clash)
    section   writes its part of the report from the evaluation JSON
    main_only whether only the main process runs it (evaluation, report); the others wait
    timed     whether its wall time goes into the report's timing table (not the report's own)
    """

    name: str
    plan: Callable[[PipelineView], list[PlannedRun]] | None = None
    run: Callable[[PipelineView, Log], None] | None = None
    status: Callable[[PipelineView], str] | None = None
    score: Callable[[PipelineView, ScoreContext], dict[str, Any]] | None = None
    section: Callable[[Doc, dict[str, Any]], None] | None = None
    main_only: bool = False
    timed: bool = True

    def line(self, pipeline: PipelineView) -> str:
        """Its plan line: what is done and what would run."""
        return self.status(pipeline) if self.status else runs_done(pipeline, self.name)

    def has_work(self, pipeline: PipelineView) -> bool:
        """Whether running it now would train, extract or score anything (a reused stage does not)."""
        if self.plan is None:
            return self.line(pipeline).startswith("to run")
        return any(r.status() != "done" for r in pipeline.runs_of(self.name))

    def execute(self, pipeline: PipelineView, log: Log) -> None:
        """Run it: its own action, or train its planned runs."""
        if self.run is not None:
            self.run(pipeline, log)
        else:
            train_planned(pipeline, self.name, log)
