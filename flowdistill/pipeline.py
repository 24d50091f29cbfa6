"""`flowdistill run PIPELINE`: one data set through teacher, couplings, students, F2D2, evaluation, report.

The stages come from one table, `flowdistill.pipeline_stages.STAGES` (each entry a `flowdistill.stage.Stage`:
the runs it plans, what it does, its part of the evaluation and its report section), in order:

    teacher     the normalizing-flow teacher (`train`), or a shipped one (`pretrained:<name>`)
    couplings   its NFM pairs, precomputed once for every NFM student (`couplings`)
    students    the same student with each coupling, at equal budget, once per seed (`train`)
    f2d2        F2D2 flow maps (u stage, then joint stage) on chosen students (`train`)
    compact     a compact flow distilled from the teacher (method `nf_kd`) and its undistilled twin; with
                `compact_nfm`, also the NFM student paired by the compact flow (`train`)
    evaluate    every stage's scores in one JSON and its figures (`eval`, `f2d2-eval`)
    report      report.md and a self-contained report.html (`flowdistill.report`)

Every run of a stage lives in `<out_dir>/<name>/runs/<label>-<key>/`, the key a hash of its resolved
config, which names the directories of the runs it reads (so their keys are part of it). A finished
run whose key matches is reused, an interrupted one resumes from its checkpoint, and changing a value
reruns exactly the runs whose config it changes and everything downstream of them.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from flowdistill.pipeline_files import read_stage_json
from flowdistill.pipeline_spec import PipelineConfig
from flowdistill.runs import PlannedRun, ReadyRun, RunSource, plan_run
from flowdistill.stage import Stage
from shared.config import ConfigError, to_dict
from shared.hashing import content_key


class Pipeline:
    """The planned runs of every stage of one spec, in the order of its stage table (`pipeline_stages.STAGES`)."""

    def __init__(self, spec: PipelineConfig, stages: Sequence[Stage] | None = None):
        from flowdistill.pipeline_stages import STAGES

        self.spec = spec
        self.stages: dict[str, Stage] = {s.name: s for s in (STAGES if stages is None else stages)}
        self.root = Path(spec.out_dir) / spec.name
        self.runs_dir = self.root / "runs"
        self.command = "flowdistill run"  # how the evaluation and the report name the command that reruns them
        ref = spec.teacher.strip()
        self.teacher: RunSource = (ReadyRun.of(ref) if ReadyRun.named_by(ref)
                                   else self.plan_run("teacher", "teacher", spec.teacher))
        self._runs: dict[str, list[PlannedRun]] = {}
        for stage in self.stages.values():
            self._runs[stage.name] = stage.plan(self) if stage.plan else []

    def plan_run(self, stage: str, label: str, entry: str, overrides: Sequence[str] = (),
                 inputs: Mapping[str, RunSource] | None = None, role: Mapping[str, str] | None = None) -> PlannedRun:
        """A run of `entry` (recipes resolved from the spec's folder first) in this pipeline's runs folder."""
        return plan_run(stage, label, entry, overrides=overrides, inputs=inputs, root=self.root,
                        recipe_dir=self.spec.spec_dir or None, role=role)

    @property
    def teacher_ref(self) -> str:
        """How the teacher is named in its students' configs: `pretrained:<name>`, or the trained run's folder."""
        return self.teacher.ref

    def extra_overrides(self, coupling: str) -> list[str]:
        """The spec's `coupling_overrides` of one coupling as a list of key=value strings."""
        extra = self.spec.coupling_overrides.get(coupling, [])
        return shlex.split(extra) if isinstance(extra, str) else list(extra)

    # ------------------------------------------------------------------ runs by stage

    def runs_of(self, stage: str) -> list[PlannedRun]:
        """The training runs a stage consists of (none for a stage that trains nothing)."""
        return self._runs.get(stage, [])

    @property
    def students(self) -> list[PlannedRun]:
        return self.runs_of("students")

    @property
    def f2d2(self) -> list[PlannedRun]:
        return self.runs_of("f2d2")

    @property
    def compact(self) -> list[PlannedRun]:
        return self.runs_of("compact")

    def coupling_students(self) -> list[PlannedRun]:
        """Every flow-matching student scored on quality vs NFE: the runs of any stage with a coupling role."""
        return [r for runs in self._runs.values() for r in runs if "coupling" in r.role]

    def trained_runs(self) -> list[PlannedRun]:
        """Every training run of the pipeline, stage by stage."""
        return [r for runs in self._runs.values() for r in runs]

    # ------------------------------------------------------------------ keys and plan

    def evaluation_key(self) -> str:
        """Key of the evaluation: every run's key plus the scoring settings."""
        keys = [r.key for r in self.trained_runs()]
        if isinstance(self.teacher, ReadyRun):  # not trained here: its weights' manifest stands for it
            keys.insert(0, self.teacher.key)
        settings = {k: v for k, v in to_dict(self.spec).items() if k not in ("name", "out_dir", "device", "spec_dir")}
        return content_key([keys, settings], 10)

    def evaluation_path(self) -> Path:
        return self.root / f"evaluation-{self.evaluation_key()}.json"

    def stage_status(self, stage: str) -> str:
        """One line: what is done and what would run."""
        return self.stages[stage].line(self)

    def has_work(self, stage: str) -> bool:
        """Whether running `stage` now would train, extract or score anything (a reused stage does not)."""
        return self.stages[stage].has_work(self)

    def plan(self) -> str:
        """The stages, what is already done and what would run, one line per stage and per run."""
        lines = [f"pipeline {self.spec.name} -> {self.root}"]
        for i, stage in enumerate(self.stages, 1):
            lines.append(f"  {i}/{len(self.stages)} {stage}: {self.stage_status(stage)}")
            for r in self.runs_of(stage):
                lines.append(f"      {r.label:<28} {r.status():<26} {r.dir}")
        return "\n".join(lines)


def select_stages(only: list[str] | None = None, start: str | None = None, until: str | None = None,
                  stages: Sequence[str] | None = None) -> list[str]:
    """The stages to run: `only` (a list), or the range `start`..`until` (inclusive) of `stages` (the table's)."""
    names = list(stages) if stages is not None else stage_names()
    for name in [*(only or []), start, until]:
        if name is not None and name not in names:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    if only:
        return [s for s in names if s in only]
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --until {until}")
    return names[first:last + 1]


def stage_names() -> list[str]:
    """The names of the stage table, in order."""
    from flowdistill.pipeline_stages import STAGES

    return [s.name for s in STAGES]


def record_timing(pipeline: Pipeline, stage: str, seconds: float) -> None:
    """Add a stage's wall seconds to `<pipeline>/timings.json` (the report's timing table); only stages that did
    work are recorded, so a rerun that reuses a stage keeps the time it took when it ran."""
    from shared.checkpoint import atomic_write_text

    path = pipeline.root / "timings.json"
    timings = read_stage_json(path, "delete it to record the stage times afresh") if path.is_file() else {}
    timings[stage] = seconds
    atomic_write_text(path, json.dumps(timings, indent=1) + "\n")


def run_pipeline(pipeline: Pipeline, stages: list[str], log: Callable[[str], None] = print,
                 command: str = "") -> dict[str, float]:
    """Run the selected stages in order; returns seconds per stage (all processes take part in training; a stage
    marked main-only runs on the main process while the others wait)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk through gloo
    log = log if state.is_main_process else (lambda text: None)
    pipeline.command = command or "flowdistill run"
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, name in enumerate(stages, 1):
        stage = pipeline.stages[name]
        t0, worked = time.perf_counter(), stage.has_work(pipeline)
        log(f"[stage {i}/{len(stages)}] {name}: {stage.line(pipeline)} (elapsed {time.perf_counter() - t_all:.0f} s)")
        if not stage.main_only:
            stage.execute(pipeline, log)
        else:
            if state.is_main_process:
                stage.execute(pipeline, log)
            state.wait_for_everyone()
        seconds[name] = time.perf_counter() - t0
        if state.is_main_process and worked and stage.timed:
            record_timing(pipeline, name, seconds[name])
    return seconds
