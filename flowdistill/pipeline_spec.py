"""The spec of the main job (`recipes/<data>/pipeline.yaml`): what a pipeline trains and how it scores it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping


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
