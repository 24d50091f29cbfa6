"""A run directory before training: the config it is given, the checks a resume must pass, and what a failed start leaves.

`resolve_config` reads a recipe or an existing run's saved config (upgraded to today's keys and following the
run when its folder moved); `prepare_run_dir` creates the folder or refuses to mix two runs in one; a start
that fails before its first checkpoint is removed again (`discard_attempt`), putting back the run that
`--overwrite` had moved aside (`replaced_dir`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from shared.catalog import Catalog
from shared.checkpoint import LATEST, atomic_write_text, latest_checkpoint, verify_checkpoint
from shared.config import (ConfigError, RunConfig, apply_overrides, build_run_config, dump_yaml, flatten, load_recipe,
                           read_yaml_mapping, to_dict)
from shared.rundir import CHECKPOINTS, CONFIG, METRICS, STANDARDIZATION, TRACKING, checkpoints_dir, config_path

RESUMABLE_CHANGES = {"train.steps", "train.progress", "train.log_every", "train.ckpt_every", "train.sample_grid",
                     "data.storage", "data.workers"}  # every storage gives the same batches (shared.streaming)
# keys newer than some saved configs: absent there means this value
ADDED_KEYS = {"data.test_path": "", "method.coupling.weights": "auto", "data.max_train_rows": 0,
              "data.max_test_rows": 0}
OLD_ROW_CAPS = {"n_train": ("max_train_rows", 20000), "n_test": ("max_test_rows", 5000)}  # key: (new key, old default)


def upgrade_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config mapping in today's keys, so an older run loads the data it was trained on.

    Before data.max_train_rows / data.max_test_rows, a tabular run capped its rows with data.n_train /
    data.n_test set away from their defaults (20000, 5000); a saved tabular config without the new keys gets
    them from those values. Anything else is returned unchanged.
    """
    section = data.get("data")
    if not isinstance(section, dict) or section.get("name") != "tabular":
        return data
    section = dict(section)
    for old, (new, default) in OLD_ROW_CAPS.items():
        if new not in section and old in section and section[old] != default:
            section[new] = section[old]
    return {**data, "data": section}


def run_dir_of(cfg: RunConfig) -> Path:
    """Where a config's run lives."""
    return Path(cfg.out_dir) / cfg.name


def resolve_config(source: str | Path, overrides: list[str], catalog: Catalog) -> RunConfig:
    """A config from a recipe file or from an existing run directory's `config.yaml`."""
    source = Path(source)
    if not source.is_dir():
        return load_recipe(source, overrides, catalog.config_choices())
    if not config_path(source).is_file():
        raise ConfigError(f"{source} is a folder without {CONFIG}: pass a recipe file, or a run directory "
                          "written by `flowdistill train`")
    saved = upgrade_saved_config(read_yaml_mapping(config_path(source), "run config", str(config_path(source))))
    cfg = build_run_config(apply_overrides(saved, overrides), catalog.config_choices())
    saved_out_dir = cfg.out_dir
    cfg.out_dir, cfg.name = str(source.parent), source.name  # the folder given, wherever the run has moved
    follow_move(cfg, saved_out_dir)
    return cfg


def follow_move(cfg: RunConfig, saved_out_dir: str) -> None:
    """Point the path settings that moved together with the run (an input run next to it) at their new place:
    those whose saved path is gone while the same place relative to the run's new out_dir exists."""
    if os.path.abspath(saved_out_dir or ".") == os.path.abspath(cfg.out_dir):
        return
    for key, value in flatten(to_dict(cfg)).items():
        if key == "out_dir" or not isinstance(value, str) or "/" not in value or Path(value).exists():
            continue
        moved = Path(os.path.normpath(Path(cfg.out_dir) / os.path.relpath(value, saved_out_dir or ".")))
        if moved.exists():
            *sections, name = key.split(".")
            section = cfg
            for part in sections:
                section = getattr(section, part)
            setattr(section, name, str(moved))


ATTEMPT_FILES = {CONFIG, METRICS, CHECKPOINTS, TRACKING, STANDARDIZATION}  # a run that never reached a checkpoint


def unfinished_attempt(run_dir: Path) -> bool:
    """Whether a run directory holds only a failed or killed start: no checkpoint and nothing made from one."""
    ckpts = checkpoints_dir(run_dir)
    return (run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= ATTEMPT_FILES
            and not (ckpts / LATEST).exists() and not any(ckpts.glob("step_*"))
            and not any(ckpts.glob(".step_*.previous")))


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool = False) -> Path:
    """Create the run directory and write `config.yaml`; refuse to mix two different runs in one folder."""
    run_dir = run_dir_of(cfg)
    saved_path = config_path(run_dir)
    if saved_path.is_file() and not overwrite:
        unfinished = unfinished_attempt(run_dir)
        if not resume and unfinished:
            raise ConfigError(f"run directory {run_dir} exists but has no checkpoint (a start that was killed); "
                              "pass --resume to start it again with its config, --overwrite to replace it "
                              "(nothing is lost), or name=<new name> for a new run")
        if not resume:
            raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                              f"--overwrite to start over, or name=<new name> for a new run")
        saved = flatten(upgrade_saved_config(read_yaml_mapping(saved_path, "run config", str(saved_path))))
        new = flatten(to_dict(cfg))
        identity = {"name", "out_dir"}  # where the run lives, not what it trains
        changed = sorted(k for k in set(saved) | set(new)
                         if saved.get(k, ADDED_KEYS.get(k)) != new.get(k) and k not in RESUMABLE_CHANGES | identity
                         and not moved_with_run(k, saved, new))
        if changed:
            raise ConfigError(f"cannot resume {run_dir}: config differs in {', '.join(changed)} "
                              f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume)"
                              + ("; it has no checkpoint yet, so --overwrite loses nothing" if unfinished else ""))
    elif overwrite and run_dir.exists():
        aside = replaced_dir(run_dir)
        if aside.exists() and unfinished_attempt(run_dir):
            shutil.rmtree(run_dir)  # a failed earlier --overwrite: the run it replaces stays aside
        else:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(run_dir, aside)  # removed once the new run has its first checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_path, dump_yaml(cfg))
    return run_dir


def moved_with_run(key: str, saved: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a path setting (a teacher run, a run to start from) differs on resume only because it moved together
    with the run: it lies at the same place relative to the run's out_dir in the saved and the new config."""
    old_value, new_value = saved.get(key), new.get(key)
    if not all(isinstance(v, str) and "/" in v for v in (old_value, new_value)):
        return False
    return (os.path.relpath(old_value, saved.get("out_dir") or ".")
            == os.path.relpath(new_value, new.get("out_dir") or "."))


def replaced_dir(run_dir: Path) -> Path:
    """Where `--overwrite` keeps the previous run until the new one has written its first checkpoint."""
    return run_dir.parent / f".{run_dir.name}.replaced"


def discard_attempt(run_dir: Path) -> None:
    """Remove the folder of a start that failed before its first checkpoint; put back the run it was replacing."""
    shutil.rmtree(run_dir, ignore_errors=True)
    aside = replaced_dir(run_dir)
    if aside.is_dir() and not run_dir.exists():
        os.replace(aside, run_dir)


def finished_step(cfg: RunConfig) -> int:
    """Step of a run's latest checkpoint (0 when it has none)."""
    ckpt = latest_checkpoint(checkpoints_dir(run_dir_of(cfg)))
    return 0 if ckpt is None else int(verify_checkpoint(ckpt)["step"])
