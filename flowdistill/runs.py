"""Planned runs: a recipe entry parsed once into its resolved config, its key, its status and its inputs.

Every orchestrator (`flowdistill compare`, `flowdistill run`, the experiment drivers under `bench/`) plans
its training runs here and trains them with `ensure_trained`, so "train unless finished, else resume" and
"parse a `recipe key=value ...` entry" are written once. Runs read by other runs (a teacher, a start) are
wired in as run objects, not formatted into override strings, and what a run reads is answered by its
components' own `run_dependencies()`.

    entry     "recipes/toy2d/fm_independent.yaml train.steps=500 seed=1"  (a recipe, then key=value overrides)
    key       10 hex chars of sha256 over the resolved config, without its name, folder and logging keys
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

from flowdistill.api import load_run, resolve_config, train
from flowdistill.components import CATALOG
from flowdistill.pipeline_files import root_relative
from flowdistill.recipes import resolve_recipe
from shared.catalog import NAMED_RUN_PREFIX
from shared.config import ConfigError, RunConfig, flatten, to_dict
from shared.hashing import content_key
from shared.rundir import config_path
from shared.run_prepare import finished_step, run_dir_of

UNKEYED = ("name", "out_dir", "train.progress", "train.sample_grid", "train.log_every", "train.ckpt_every")


def parse_entry(entry: str, where: str = "entry") -> tuple[str, list[str]]:
    """A `recipe key=value ...` entry as (recipe reference, overrides); an empty entry is a ConfigError naming `where`."""
    parts = shlex.split(entry)
    if not parts:
        raise ConfigError(f"empty {where}: expected a recipe path followed by key=value overrides")
    return parts[0], parts[1:]


def config_key(cfg: RunConfig, root: Path | None = None) -> str:
    """10 hex chars of sha256 over the resolved config without its name, folder and logging settings; paths
    inside the folder `root` count relative to it (a moved or copied pipeline keeps its keys)."""
    flat = {k: v if root is None else root_relative(v, root) for k, v in flatten(to_dict(cfg)).items()}
    for k in UNKEYED:
        flat.pop(k, None)
    return content_key(json.dumps(flat, sort_keys=True, default=str), 10)


def ensure_trained(cfg: RunConfig) -> Path:
    """Train a run unless its checkpoint already reached `train.steps`; resume an unfinished one.

    A student whose coupling reads a precomputed teacher-pair cache gets the cache extracted first.
    """
    if finished_step(cfg) >= cfg.train.steps:
        return run_dir_of(cfg)
    if getattr(getattr(cfg.method, "coupling", None), "mode", "") == "precomputed":
        from nfm.coupling_cache import extract

        extract(cfg, load_run)
    return train(cfg, resume=config_path(run_dir_of(cfg)).is_file())


def dependencies(cfg: RunConfig) -> dict[str, str]:
    """The runs a config reads, by role (`teacher`, `nf_teacher`), from its method's own `run_dependencies()`."""
    return {role: ref for role, ref in cfg.method.run_dependencies().items() if ref}


@dataclass
class PlannedRun:
    """One training run: its stage, label, resolved config (named `<label>-<key>`) and role in the stage."""

    stage: str
    label: str
    config: RunConfig
    key: str
    role: dict[str, str] = field(default_factory=dict)  # e.g. {"coupling": "nf_teacher", "seed": "0"}

    @property
    def dir(self) -> Path:
        return run_dir_of(self.config)

    @property
    def ref(self) -> str:
        """How other runs' configs name this run: its folder."""
        return str(self.dir)

    def dependencies(self) -> dict[str, str]:
        """The runs this one reads, by role (see `dependencies`)."""
        return dependencies(self.config)

    def status(self) -> str:
        """`done`, `partial (step k/N)` or `to run`."""
        step = finished_step(self.config) if self.dir.is_dir() else 0
        if step >= self.config.train.steps:
            return "done"
        return f"partial (step {step}/{self.config.train.steps})" if step else "to run"

    def ensure_trained(self) -> Path:
        """Train, resume or reuse this run (`ensure_trained`)."""
        return ensure_trained(self.config)


@dataclass
class ReadyRun:
    """A finished run used as it is, never trained here: a packed run shipped with the package
    (`pretrained:<name>`) or a run folder trained, imported or saved elsewhere (`flowdistill import`,
    `flowdistill.save_teacher`)."""

    ref: str  # pretrained:<name>, or the folder's absolute path
    dir: Path  # its folder
    key: str  # the sha256 of its evaluation weights' manifest, first 10 hex chars: what a key that reads it covers
    stage: str = "teacher"
    label: str = "teacher"
    role: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, ref: str) -> "ReadyRun":
        """The run `ref` names; a folder without verified weights is a ConfigError saying what it lacks."""
        from shared.checkpoint import MANIFEST, CheckpointError, sha256_file
        from shared.run_build import evaluation_weights

        shipped = ref.startswith(NAMED_RUN_PREFIX)
        folder = CATALOG.resolve_run(ref) if shipped else Path(ref).absolute()
        try:
            weights, _ = evaluation_weights(folder)
        except (CheckpointError, OSError) as err:
            remedy = ("reinstall flowdistill (a damaged install?)" if shipped else
                      "name a finished run folder (config.yaml and checkpoints), or a recipe to train")
            raise ConfigError(f"run {ref!r} cannot be used as it is: {err}; {remedy}") from err
        return cls(ref if shipped else str(folder), folder, sha256_file(weights.parent / MANIFEST)[:10])

    @staticmethod
    def named_by(entry: str) -> bool:
        """Whether an entry names a ready run (`pretrained:<name>` or an existing folder) rather than a recipe."""
        return entry.startswith(NAMED_RUN_PREFIX) or Path(entry).is_dir()

    @property
    def config(self) -> RunConfig:
        return resolve_config(self.dir)

    def dependencies(self) -> dict[str, str]:
        return {}

    def status(self) -> str:
        return f"shipped ({self.ref})" if self.ref.startswith(NAMED_RUN_PREFIX) else f"given ({self.ref})"


RunSource = Union[PlannedRun, ReadyRun]


def wire(cfg: RunConfig, key: str, source: RunSource) -> None:
    """Set the dotted config key `key` (e.g. `method.coupling.teacher`, `train.init_from`) to the run `source`."""
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part, None)
    if node is None or not hasattr(node, last):
        raise ConfigError(f"cannot wire {source.ref} into {key}: the config ({cfg.method.name} method) has no such key")
    setattr(node, last, source.ref)


def plan_run(stage: str, label: str, entry: str, *, overrides: Sequence[str] = (),
             inputs: Mapping[str, RunSource] | None = None, root: Path, recipe_dir: str | Path | None = None,
             role: Mapping[str, str] | None = None) -> PlannedRun:
    """The run of `entry` with `overrides` applied and the runs `inputs` wired into their keys, named
    `<label>-<key>` under `root / "runs"`; its key counts paths inside `root` relative to it."""
    recipe, entry_overrides = parse_entry(entry, f"{stage} entry")
    cfg = resolve_config(resolve_recipe(recipe, recipe_dir), [*entry_overrides, *overrides])
    for key, source in (inputs or {}).items():
        wire(cfg, key, source)
    run_key = config_key(cfg, root)
    cfg.name, cfg.out_dir = f"{label}-{run_key}", str(root / "runs")
    return PlannedRun(stage, label, cfg, run_key, dict(role or {}))
