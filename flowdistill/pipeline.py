"""`flowdistill run PIPELINE`: one data set through teacher, couplings, students, F2D2, evaluation, report.

Stages, in order (each a plain call of what the single commands use):

    teacher     the normalizing-flow teacher (`train`)
    couplings   its NFM pairs, precomputed once for every NFM student (`couplings`)
    students    the same student with each coupling, at equal budget, once per seed (`train`)
    f2d2        F2D2 flow maps (u stage, then joint stage) on chosen students (`train`)
    compact     a compact flow distilled from the teacher (method `nf_kd`) and its undistilled twin; with
                `compact_nfm`, also the NFM student paired by the compact flow (`train`)
    evaluate    quality vs NFE, curvature, teacher sampling, few-step NLL, the distillation table
                (`eval`, `f2d2-eval`, `bench/nfkd_compare.py`)
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
from typing import Callable

from flowdistill.api import resolve_config
from flowdistill.components import CATALOG, needs_teacher
from flowdistill.flow_scores import LIKELIHOOD_ONLY, UNDISTILLED
from flowdistill.pipeline_files import evaluation_outputs, json_damage, read_stage_json, root_relative
from flowdistill.recipes import resolve_recipe
from shared.catalog import NAMED_RUN_PREFIX
from shared.config import ConfigError, RunConfig, apply_overrides, flatten, from_dict, read_yaml_mapping, to_dict
from shared.run_prepare import finished_step, run_dir_of

STAGES = ("teacher", "couplings", "students", "f2d2", "compact", "evaluate", "report")
COMPACT_NFM = "nf_teacher_compact"  # the student label of NFM pairs from the distilled compact flow
TRAINED = ("teacher", "students", "f2d2", "compact")  # the stages that train runs
UNKEYED = ("name", "out_dir", "train.progress", "train.sample_grid", "train.log_every", "train.ckpt_every")


@dataclass
class PipelineConfig:
    """What a pipeline trains and how it scores it (`recipes/<data>/pipeline.yaml`)."""

    name: str = ""  # output folder `<out_dir>/<name>` (default: the file's parent folder + "-pipeline")
    out_dir: str = "runs"  # parent of the pipeline folder
    teacher: str = ""  # "pretrained:<name>" (a shipped teacher, `flowdistill pretrained`), or "recipe [key=value ...]"
    #                    of the normalizing-flow teacher to train
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


@dataclass
class PlannedRun:
    """One training run of a stage: its label, resolved config and key."""

    stage: str
    label: str
    config: RunConfig
    key: str
    role: dict[str, str] = field(default_factory=dict)  # e.g. {"coupling": "nf_teacher", "seed": "0"}

    @property
    def dir(self) -> Path:
        return run_dir_of(self.config)

    def status(self) -> str:
        """`done`, `partial (step k/N)` or `to run`."""
        step = finished_step(self.config) if self.dir.is_dir() else 0
        if step >= self.config.train.steps:
            return "done"
        return f"partial (step {step}/{self.config.train.steps})" if step else "to run"


@dataclass
class ShippedRun:
    """A packed run shipped with the package (`pretrained:<name>`), used as the teacher instead of training one."""

    ref: str  # pretrained:<name>
    dir: Path  # its folder
    key: str  # the sha256 of its manifest, first 10 hex chars: what the evaluation key covers
    stage: str = "teacher"
    label: str = "teacher"
    role: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, ref: str) -> "ShippedRun":
        from shared.checkpoint import MANIFEST, sha256_file

        folder = CATALOG.resolve_run(ref)
        if not (folder / MANIFEST).is_file():
            raise ConfigError(f"pipeline teacher {ref!r}: the shipped folder {folder} has no {MANIFEST} (a damaged "
                              "install?); reinstall flowdistill or name a teacher recipe instead")
        return cls(ref, folder, sha256_file(folder / MANIFEST)[:10])

    @property
    def config(self) -> RunConfig:
        return resolve_config(self.dir)

    def status(self) -> str:
        return f"shipped ({self.ref})"


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
    unknown = sorted(set(spec.f2d2_on) - set(spec.couplings)) + sorted(set(spec.coupling_overrides) - set(spec.couplings))
    if unknown:
        raise ConfigError(f"pipeline f2d2_on / coupling_overrides name couplings it does not train: {', '.join(unknown)}")
    return spec


def config_key(cfg: RunConfig, root: Path | None = None) -> str:
    """10 hex chars of sha256 over the resolved config without its name, folder and logging settings; paths
    inside the pipeline folder `root` count relative to it (a moved or copied pipeline keeps its keys)."""
    flat = {k: v if root is None else root_relative(v, root) for k, v in flatten(to_dict(cfg)).items()}
    for k in UNKEYED:
        flat.pop(k, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Pipeline:
    """The planned runs of every stage of one spec; `run` executes the selected stages in order."""

    def __init__(self, spec: PipelineConfig):
        self.spec = spec
        self.root = Path(spec.out_dir) / spec.name
        self.runs_dir = self.root / "runs"
        shipped = spec.teacher.strip().startswith(NAMED_RUN_PREFIX)
        self.teacher: PlannedRun | ShippedRun = (ShippedRun.of(spec.teacher.strip()) if shipped
                                                 else self._plan("teacher", "teacher", spec.teacher, []))
        self.students = [self._plan("students", f"{c}-s{seed}", spec.student, self._coupling_overrides(c) +
                                    [f"seed={seed}"], {"coupling": c, "seed": str(seed)})
                         for c in spec.couplings for seed in spec.seeds]
        self.f2d2: list[PlannedRun] = []
        if spec.f2d2_u:
            for c in spec.f2d2_on:
                base = next(r for r in self.students if r.role == {"coupling": c, "seed": str(spec.seeds[0])})
                u = self._plan("f2d2", f"f2d2_u-{c}", spec.f2d2_u,
                               [f"method.teacher={base.dir}", f"train.init_from={base.dir}"], {"on": c, "part": "u"})
                joint = self._plan("f2d2", f"f2d2-{c}", spec.f2d2_joint,
                                   [f"method.teacher={base.dir}", f"train.init_from={u.dir}"], {"on": c, "part": "joint"})
                self.f2d2 += [u, joint]
                self._check_f2d2_steps(joint.config)
        self.compact = [run for seed in (spec.seeds if spec.compact else ()) for run in self._plan_compact(seed)]

    def _check_f2d2_steps(self, cfg: RunConfig) -> None:
        """Refuse, before anything trains, NFE the joint map cannot be scored at (untrained Shortcut jumps)."""
        from f2d2.flowmap import untrained_jumps

        if cfg.method.variant != "shortcut":
            return
        bad = [k for k in self.spec.steps if untrained_jumps(k, "linear", cfg.method.levels)]
        if bad:
            raise ConfigError(f"pipeline steps {bad}: a Shortcut F2D2 map with method.levels={cfg.method.levels} is "
                              f"scored on the linear grid with K a power of two up to {2 ** cfg.method.levels}; "
                              "drop those steps or use a meanflow f2d2 recipe")

    def _plan_compact(self, seed: int) -> list[PlannedRun]:
        """The distilled compact flow of one seed and its undistilled twin (same recipe, NLL weight 1)."""
        parts = shlex.split(self.spec.compact)
        method = resolve_config(self._recipe(parts[0]), parts[1:]).method.name
        if method != "nf_kd":
            raise ConfigError(f"pipeline compact: {parts[0]!r} has method {method!r}; the compact stage needs "
                              "method nf_kd (e.g. recipes/digits/tarflow_student_kd.yaml)")
        common = [f"method.teacher={self.teacher_ref}", f"seed={seed}"]
        start = [f"train.init_from={self.teacher_ref}"] if self.spec.compact_init else []
        distilled = self._plan("compact", f"compact_distilled-s{seed}", self.spec.compact, [*common, *start],
                               {"variant": "distilled", "seed": str(seed)})
        undistilled = self._plan("compact", f"compact_undistilled-s{seed}", self.spec.compact,
                                 [*common, *UNDISTILLED], {"variant": "undistilled", "seed": str(seed)})
        controls = [self._plan("compact", f"compact_init_only-s{seed}", self.spec.compact,
                               [*common, *start, *LIKELIHOOD_ONLY], {"variant": "init_only", "seed": str(seed)})
                    ] if self.spec.compact_init else []
        if not self.spec.compact_nfm:
            return [distilled, undistilled, *controls]
        pairs = ["method.coupling.name=nf_teacher", f"method.coupling.teacher={distilled.dir}",
                 "method.coupling.mode=online", *self._extra_overrides("nf_teacher"), f"seed={seed}"]
        nfm = self._plan("compact", f"{COMPACT_NFM}-s{seed}", self.spec.student, pairs,
                         {"coupling": COMPACT_NFM, "seed": str(seed)})
        return [distilled, undistilled, *controls, nfm]

    @property
    def teacher_ref(self) -> str:
        """How the teacher is named in its students' configs: `pretrained:<name>`, or the trained run's folder."""
        return self.teacher.ref if isinstance(self.teacher, ShippedRun) else str(self.teacher.dir)

    def _coupling_overrides(self, coupling: str) -> list[str]:
        out = [f"method.coupling.name={coupling}"]
        if needs_teacher(coupling):
            out += [f"method.coupling.teacher={self.teacher_ref}", f"method.coupling.mode={self.spec.coupling_mode}"]
        return out + self._extra_overrides(coupling)

    def _extra_overrides(self, coupling: str) -> list[str]:
        """The spec's `coupling_overrides` of one coupling as a list of key=value strings."""
        extra = self.spec.coupling_overrides.get(coupling, [])
        return shlex.split(extra) if isinstance(extra, str) else list(extra)

    def coupling_students(self) -> list[PlannedRun]:
        """Every flow-matching student scored on quality vs NFE: one per coupling and seed (compact NFM included)."""
        return self.students + [r for r in self.compact if "coupling" in r.role]

    def _plan(self, stage: str, label: str, entry: str, extra: list[str], role: dict[str, str] | None = None
              ) -> PlannedRun:
        parts = shlex.split(entry)
        cfg = resolve_config(self._recipe(parts[0]), [*parts[1:], *extra])
        key = config_key(cfg, self.root)
        cfg.name, cfg.out_dir = f"{label}-{key}", str(self.runs_dir)
        return PlannedRun(stage, label, cfg, key, role or {})

    def _recipe(self, reference: str) -> Path:
        """A recipe named by the spec, resolved from the spec's folder first (`flowdistill.recipes`)."""
        return resolve_recipe(reference, self.spec.spec_dir or None)

    # ------------------------------------------------------------------ plan and selection

    def runs_of(self, stage: str) -> list[PlannedRun]:
        """The training runs a stage consists of (none for couplings, evaluate, report)."""
        trained_teacher = [] if isinstance(self.teacher, ShippedRun) else [self.teacher]
        return {"teacher": trained_teacher, "students": self.students, "f2d2": self.f2d2,
                "compact": self.compact}.get(stage, [])

    def trained_runs(self) -> list[PlannedRun]:
        """Every training run of the pipeline, stage by stage."""
        return [r for stage in TRAINED for r in self.runs_of(stage)]

    def evaluation_key(self) -> str:
        """Key of the evaluation: every run's key plus the scoring settings."""
        keys = [r.key for r in self.trained_runs()]
        if isinstance(self.teacher, ShippedRun):  # not trained here: its weights' manifest stands for it
            keys.insert(0, self.teacher.key)
        settings = {k: v for k, v in to_dict(self.spec).items() if k not in ("name", "out_dir", "device", "spec_dir")}
        return hashlib.sha256(json.dumps([keys, settings], sort_keys=True).encode()).hexdigest()[:10]

    def evaluation_path(self) -> Path:
        return self.root / f"evaluation-{self.evaluation_key()}.json"

    def stage_status(self, stage: str) -> str:
        """One line: what is done and what would run."""
        if stage == "couplings":
            nf = [r for r in self.students if needs_teacher(r.role["coupling"])]
            if not nf or self.spec.coupling_mode != "precomputed":
                return "nothing to precompute"
            from nfm.coupling_cache import MANIFEST, cache_dir_of

            root = cache_dir_of(nf[0].config.method.coupling)
            return "done" if (root / MANIFEST).is_file() else f"to run ({root})"
        if stage == "evaluate":
            damage = json_damage(self.evaluation_path())
            if damage:
                return f"to run ({self.evaluation_path()} is damaged: {damage}; it is recomputed)"
            return "done" if self.evaluation_path().is_file() else "to run"
        if stage == "report":
            if self.stage_status("evaluate") != "done":
                return "to run (after evaluate)"
            return "done" if (self.root / "report" / "report.html").is_file() else "to run"
        runs = self.runs_of(stage)
        if stage == "teacher" and isinstance(self.teacher, ShippedRun):
            return self.teacher.status()
        if not runs:
            return "nothing to train"
        done = sum(r.status() == "done" for r in runs)
        return f"{done}/{len(runs)} runs done"

    def has_work(self, stage: str) -> bool:
        """Whether running `stage` now would train, extract or score anything (a reused stage does not)."""
        if stage in ("couplings", "evaluate"):
            return self.stage_status(stage).startswith("to run")
        return any(r.status() != "done" for r in self.runs_of(stage))

    def plan(self) -> str:
        """The stages, what is already done and what would run, one line per stage and per run."""
        lines = [f"pipeline {self.spec.name} -> {self.root}"]
        for i, stage in enumerate(STAGES, 1):
            lines.append(f"  {i}/{len(STAGES)} {stage}: {self.stage_status(stage)}")
            for r in self.runs_of(stage):
                lines.append(f"      {r.label:<28} {r.status():<26} {r.dir}")
        return "\n".join(lines)


def select_stages(only: list[str] | None = None, start: str | None = None, until: str | None = None) -> list[str]:
    """The stages to run: `only` (a list), or the range `start`..`until` (inclusive) of STAGES."""
    for name in [*(only or []), start, until]:
        if name is not None and name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if only:
        return [s for s in STAGES if s in only]
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --until {until}")
    return list(STAGES[first:last + 1])


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
    """Run the selected stages in order; returns seconds per stage (all processes take part in training)."""
    import torch
    from accelerate import PartialState

    from flowdistill.api import load_run, train
    from flowdistill.pipeline_eval import evaluate_pipeline
    from flowdistill.report import write_report
    from nfm.coupling_cache import extract

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk through gloo
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        t0, worked = time.perf_counter(), pipeline.has_work(stage)
        log = log if state.is_main_process else (lambda text: None)
        log(f"[stage {i}/{len(stages)}] {stage}: {pipeline.stage_status(stage)} "
            f"(elapsed {time.perf_counter() - t_all:.0f} s)")
        if stage == "couplings":
            nf = [r for r in pipeline.students if needs_teacher(r.role["coupling"])]
            if nf and pipeline.spec.coupling_mode == "precomputed":
                extract(nf[0].config, load_run)
        elif stage == "evaluate":
            if state.is_main_process and pipeline.stage_status(stage) != "done":
                figures = pipeline.root / f"figures-{pipeline.evaluation_key()}"
                with evaluation_outputs(figures, command or "flowdistill run"):
                    evaluate_pipeline(pipeline)
            state.wait_for_everyone()
        elif stage == "report":
            if state.is_main_process:
                log(f"wrote {write_report(pipeline, command)}")
            state.wait_for_everyone()
        else:
            for j, planned in enumerate(pipeline.runs_of(stage), 1):
                status = planned.status()
                log(f"  run {j}/{len(pipeline.runs_of(stage))} {planned.label}: {status}")
                if status != "done":
                    train(planned.config, resume=planned.dir.is_dir() and (planned.dir / "config.yaml").is_file())
        seconds[stage] = time.perf_counter() - t0
        if state.is_main_process and worked:
            record_timing(pipeline, stage, seconds[stage])
    return seconds
