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

import hashlib
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from flowdistill.pipeline_files import read_stage_json
from flowdistill.runs import PlannedRun, ReadyRun, RunSource, plan_run
from flowdistill.stage import Stage
from shared.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict


@dataclass
class PipelineConfig:
    """What a pipeline trains and how it scores it (`recipes/<data>/pipeline.yaml`)."""

    name: str = ""  # output folder `<out_dir>/<name>` (default: the file's parent folder + "-pipeline")
    out_dir: str = "runs"  # parent of the pipeline folder
    teacher: str = ""  # "pretrained:<name>" (a shipped teacher, `flowdistill pretrained`), a finished run folder (trained,
    #                    imported or saved elsewhere), or "recipe [key=value ...]" of the normalizing-flow teacher to train
    student: str = ""  # "recipe [key=value ...]" of the student trained with every coupling
    couplings: tuple[str, ...] = ("independent", "minibatch_ot", "semidiscrete_ot", "nf_teacher", "nf_teacher_ot")
    coupling_mode: str = "precomputed"  # NFM students read the couplings stage's cache, or encode online
    coupling_overrides: dict = field(default_factory=dict)  # coupling name -> extra key=value list for its students
    seeds: tuple[int, ...] = (0,)  # student seeds
    f2d2_u: str = ""  # "recipe [key=value ...]" of the F2D2 u stage ("" skips F2D2)
    f2d2_joint: str = ""  # "recipe [key=value ...]" of the F2D2 joint (u + D) stage
    f2d2_on: tuple[str, ...] = ("nf_teacher", "independent")  # couplings whose seed-0 student F2D2 distils
    compact: str = ""  # "recipe [key=value ...]" of a compact flow (method nf_kd) distilled from the teacher,
    #                    trained once per seed next to its undistilled twin ("" skips the stage)
    compact_nfm: bool = False  # also train the student with NFM pairs from the distilled compact flow (online)
    compact_init: bool = False  # start the distilled compact flow from the teacher's blocks (train.init_from) and add
    #                             the control: the same start trained by maximum likelihood alone (no distillation)
    steps: tuple[int, ...] = (1, 2, 4, 8)  # NFE at which students and flow maps are scored
    solvers: tuple[str, ...] = ("euler",)  # fixed-step solvers of the students
    grids: tuple[str, ...] = ("linear",)  # time grids of the students
    n_samples: int = 500  # samples per quality value
    curvature_steps: int = 32  # Euler steps of the trajectories whose straightness is measured
    curvature_samples: int = 200  # trajectories per curvature value
    nll_points: int = 200  # test points of the few-step likelihood table
    device: str = "auto"  # evaluation device
    spec_dir: str = ""  # folder of the spec file, set when it is read: recipes it names resolve from there first
    stage_options: dict = field(default_factory=dict)  # stage name -> settings of a stage added to the table


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline spec and apply `key=value` overrides."""
    path = Path(path)
    data = read_yaml_mapping(path, "pipeline", "recipes/digits/pipeline.yaml")
    data.setdefault("name", f"{path.parent.name}-pipeline")
    data["spec_dir"] = str(path.parent)
    spec = from_dict(PipelineConfig, apply_overrides(data, overrides or []))
    if not spec.teacher or not spec.student:
        raise ConfigError(f"pipeline {str(path)!r} needs a teacher and a student entry")
    if bool(spec.f2d2_u) != bool(spec.f2d2_joint):
        raise ConfigError("pipeline: set both f2d2_u and f2d2_joint, or neither")
    if not isinstance(spec.coupling_overrides, dict):
        raise ConfigError("pipeline coupling_overrides must map coupling names to lists of key=value overrides")
    unknown = sorted((set(spec.f2d2_on) | set(spec.coupling_overrides)) - set(spec.couplings))
    if unknown:
        raise ConfigError(f"pipeline f2d2_on / coupling_overrides name couplings it does not train: {', '.join(unknown)}")
    return spec


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
        return hashlib.sha256(json.dumps([keys, settings], sort_keys=True).encode()).hexdigest()[:10]

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
