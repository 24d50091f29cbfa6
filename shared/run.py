"""Runs: train the run a config describes, and rebuild a finished run from its directory.

The run directory's layout lives in `shared.rundir`. Every function that builds components takes the
application's `Catalog` (`shared.catalog`), so this module knows no model or method by name. Training
validates data, model and loss before the run directory is touched; loading a run builds its sampler
only, never its loss, so a student's teachers are not loaded to sample or score it.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from shared.catalog import BuildContext, Catalog
from shared.checkpoint import (LATEST, MANIFEST, CheckpointError, atomic_write_text, check_writable, estimate_checkpoint_bytes,
                               latest_checkpoint, load_weights, remove_temporaries, require_free_space,
                               verify_checkpoint)
from shared.config import (ConfigError, RunConfig, apply_overrides, build_run_config, dump_yaml, flatten, load_recipe,
                           read_yaml_mapping, to_dict)
from shared.data import Dataset, dequantize, random_shift
from shared.data_sources import load_dataset
from shared.rundir import (CHECKPOINTS, CONFIG, METRICS, PACKED_WEIGHTS, STANDARDIZATION, TRACKING, best_dir, checkpoints_dir,
                           config_path, read_metrics, run_lock, standardization_path, tracking_dir, weights_file)
from shared.tabular import Standardization

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


@dataclass
class Run:
    """A trained (or training) run: its directory, config, data, model and method."""

    dir: Path
    config: RunConfig
    dataset: Dataset
    model: nn.Module
    sampler: Any  # shared.method.Sampler: prior_sample, sample, log_likelihood
    step: int


def build_model(cfg: RunConfig, dataset: Dataset, catalog: Catalog) -> nn.Module:
    """Instantiate the model named by `cfg.model.name` for the data's per-sample shape (seeded)."""
    torch.manual_seed(cfg.seed)
    return catalog.models[cfg.model.name].build(cfg.model, dataset.shape)


def init_from_run(model: nn.Module, source: str | Path) -> list[str]:
    """Copy the matching weights of another run's latest checkpoint (EMA if present) into `model`.

    Used for staged training (e.g. a flow map started from a flow-matching teacher). Tensors whose
    name and shape match are copied; the names left at their fresh initialisation are returned.
    """
    if not config_path(source).is_file():
        raise CheckpointError(f"train.init_from={source}: no checkpoint there (not a run directory written by "
                              "`flowdistill train`)")
    source_state = load_file(str(evaluation_weights(source)[0]))
    target = model.state_dict()
    matched = {k: v for k, v in source_state.items() if k in target and target[k].shape == v.shape}
    if not matched:
        raise CheckpointError(f"train.init_from={source}: no tensor of that run fits this model")
    model.load_state_dict(matched, strict=False)
    return sorted(set(target) - set(matched))


def evaluation_weights(run_dir: str | Path, choice: str = "auto") -> tuple[Path, int]:
    """The verified weights file of a run's evaluation model and its step (see `shared.rundir.weights_file`)."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).is_file():  # a packed run (shipped or exported): one verified weights file
        return run_dir / PACKED_WEIGHTS, int(verify_checkpoint(run_dir)["step"])
    ckpt = latest_checkpoint(checkpoints_dir(run_dir))
    if ckpt is None:
        raise CheckpointError(f"run {run_dir} has no checkpoint yet; train it first")
    steps = {ckpt: verify_checkpoint(ckpt)["step"]}
    best = latest_checkpoint(best_dir(run_dir))
    if best is not None:
        steps[best] = verify_checkpoint(best)["step"]
    path = weights_file(ckpt, best, choice)
    return path, int(steps[path.parent])


def build_loss(cfg: RunConfig, dataset: Dataset, catalog: Catalog) -> Callable:
    """The training loss of `cfg.method` (it may load the runs the method depends on, e.g. a teacher)."""
    ctx = BuildContext(cfg, dataset, run_dir_of(cfg), partial(load_run, catalog=catalog), catalog.nested)
    return catalog.methods[cfg.method.name].build(cfg.method, ctx)


def build_sampler(cfg: RunConfig, dataset: Dataset, catalog: Catalog) -> Any:
    """The sampler and likelihood of `cfg.method`'s model (loads no other run)."""
    return catalog.methods[cfg.method.name].sampler(cfg.method, cfg, dataset)


def require_same_data(source: str | Path, fingerprint: str, dataset: Dataset, what: str) -> None:
    """Refuse a run (teacher, reference) trained on other data than `dataset`; `what` names the setting.

    `fingerprint` is the other run's `Dataset.base_fingerprint`: a validation split carved from the same
    training data does not make it other data.
    """
    if fingerprint != dataset.base_fingerprint:
        raise ValueError(f"{what}={source} was trained on other data (fingerprint {fingerprint}) than this run's "
                         f"{dataset.name!r} data ({dataset.base_fingerprint}): use the same data.* settings as "
                         "that run")


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


def check_dequantize(cfg: RunConfig, levels: int | None) -> int | None:
    """The quantisation levels the trainer dequantizes with when `data.dequantize` is set (else None).

    Refused for continuous data and for methods that draw their own data noise (the method config's
    `data_noise()` names it), since the two would stack.
    """
    if not cfg.data.dequantize:
        return None
    if levels is None:
        raise ValueError(f"data.dequantize needs quantised image data; {cfg.data.name!r} is continuous")
    own = cfg.method.data_noise() if hasattr(cfg.method, "data_noise") else ""
    if own:
        raise ValueError(f"method {cfg.method.name!r} draws its own data noise ({own}); data.dequantize does not apply")
    return levels


def data_noise(shift: int, dequantize_levels: int | None, levels: int | None
               ) -> Callable[[tuple, torch.Generator], tuple] | None:
    """The per-step data transform: random shifts (images) then uniform dequantization, or None."""
    if shift and levels is None:
        raise ValueError(f"data.shift={shift} needs image data")
    if not shift and dequantize_levels is None:
        return None

    def transform(batch: tuple, generator: torch.Generator) -> tuple:
        x = random_shift(batch[0], shift, levels, generator)
        if dequantize_levels is not None:
            x = dequantize(x, dequantize_levels, generator)
        return (x, *batch[1:])

    return transform


def train_run(cfg: RunConfig, catalog: Catalog, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the run a config describes in `<out_dir>/<name>/` (all Accelerate processes take part).

    Data, model, loss and trainer are built (and so validated), and the folder's writability and free
    disk space for a checkpoint checked, before the run directory is created or replaced. A command that
    fails before the first checkpoint removes the folder it created (`--overwrite`: puts the old run back).
    The main process holds the run's lock (`shared.rundir.run_lock`) throughout: a run being trained by
    another process is refused before anything in it is touched.
    """
    from shared.trainer import make_accelerator

    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    check_writable(run_dir_of(cfg), f"out_dir={cfg.out_dir}")
    # Without CUDA, ask Accelerate for CPU processes so that a multi-process launch uses gloo.
    accelerator = make_accelerator(cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                                   log_with=list(cfg.train.trackers) or None,
                                   project_dir=str(tracking_dir(run_dir_of(cfg))))
    with run_lock(run_dir_of(cfg), accelerator.is_main_process):
        return _train_locked(cfg, catalog, accelerator, resume, overwrite)


def _train_locked(cfg: RunConfig, catalog: Catalog, accelerator: Any, resume: bool, overwrite: bool) -> Path:
    """`train_run` once the run's lock is held: build and check everything, then write and train."""
    from shared.trainer import Trainer

    dataset = load_dataset(cfg.data, saved_standardization(run_dir_of(cfg), cfg) if resume else None)
    levels = check_dequantize(cfg, dataset.levels)
    transform = data_noise(cfg.data.shift, levels, dataset.levels)
    model = build_model(cfg, dataset, catalog)
    if resume and accelerator.is_main_process:  # put back a checkpoint that a kill left moved aside
        for root in (checkpoints_dir(run_dir_of(cfg)), best_dir(run_dir_of(cfg))):
            for name in remove_temporaries(root):
                accelerator.print(f"removed {root / name}, left by an interrupted checkpoint write")
    accelerator.wait_for_everyone()
    resuming = resume and latest_checkpoint(checkpoints_dir(run_dir_of(cfg))) is not None
    if cfg.train.init_from and not resuming:  # a resume without a checkpoint yet starts like a fresh run
        fresh = init_from_run(model, catalog.resolve_run(cfg.train.init_from))
        accelerator.print(f"initialised from {cfg.train.init_from}; newly initialised: {', '.join(fresh) or 'none'}")
    method = build_loss(cfg, dataset, catalog)
    run_dir = run_dir_of(cfg)
    data = (dataset.train,) if dataset.train_labels is None else (dataset.train, dataset.train_labels)
    if cfg.data.storage != "memory":  # uint8 data: batches gathered on the device or read by DataLoader workers
        from shared.streaming import batch_source

        data = batch_source(dataset, cfg.data.storage, cfg.train.batch_size, cfg.seed, accelerator.process_index,
                            accelerator.num_processes, accelerator.device, cfg.train.steps, cfg.data.workers)
    val = None
    if dataset.val is not None:
        val = (dataset.val,) if dataset.val_labels is None else (dataset.val, dataset.val_labels)
    trainer = Trainer(cfg.train, cfg.seed, model, method, data, run_dir, accelerator,
                      batch_transform=transform, val_data=val)
    copies = 3 + (cfg.train.ema_decay > 0) + bool(cfg.train.eval_every)  # weights, AdamW moments, EMA, best
    require_free_space(run_dir, estimate_checkpoint_bytes(model, copies))
    if resuming:  # a damaged checkpoint or metrics log is refused before config.yaml is rewritten
        verify_checkpoint(latest_checkpoint(checkpoints_dir(run_dir)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line: the resume itself warns once
            read_metrics(run_dir)
    created = overwrite or not run_dir.exists()
    if accelerator.is_main_process:
        prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        if dataset.standardization is not None:  # the units of the model, kept with it (shared.tabular)
            dataset.standardization.save(standardization_path(run_dir))
    accelerator.wait_for_everyone()
    try:
        if cfg.train.trackers:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in flatten(to_dict(cfg)).items()}
            accelerator.init_trackers(cfg.name, config=hparams)
        accelerator.print(f"run {run_dir}: {cfg.model.name} ({sum(p.numel() for p in model.parameters()):,} params), "
                          f"method {cfg.method.name}, data {dataset.name} {tuple(dataset.train.shape)}, "
                          f"{accelerator.num_processes} process(es) on {accelerator.device}")
        if resume and trainer.resume():
            accelerator.print(f"resumed at step {trainer.step}")
        if hasattr(method, "prepare"):  # one-off set-up (an OT fit) before the loop and its ETA start
            method.prepare(accelerator.device)
        aside = replaced_dir(run_dir)
        if accelerator.is_main_process and aside.exists():
            trainer.after_checkpoint.append(lambda: shutil.rmtree(aside, ignore_errors=True))
        record = trainer.fit()
    except Exception:
        if accelerator.is_main_process and created and unfinished_attempt(run_dir):
            discard_attempt(run_dir)
        raise
    if cfg.train.trackers:
        accelerator.end_training()
    accelerator.print(f"finished at step {trainer.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                                     if isinstance(v, float)))
    return run_dir


def load_run(run_dir: str | Path, catalog: Catalog, weights: str = "auto", device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model from its saved config and load its evaluation weights.

    `weights`: `auto` (best-on-validation if the run validated, else EMA, else raw), `best`, `ema`, `model`.
    """
    run_dir = catalog.resolve_run(run_dir)
    saved = config_path(run_dir)
    if not saved.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {saved.name}); "
                              "pass the folder `flowdistill train` created")
    try:
        cfg = build_run_config(upgrade_saved_config(read_yaml_mapping(saved, "run config", str(saved))),
                               catalog.config_choices())
    except ConfigError as err:  # name the file, once
        raise ConfigError(str(err) if str(saved) in str(err) else f"run config {str(saved)!r}: {err}") from None
    path, step = evaluation_weights(run_dir, weights)
    dataset = load_dataset(cfg.data, saved_standardization(run_dir, cfg))
    model = build_model(cfg, dataset, catalog)
    load_weights(path, model)
    model.to(device).eval()
    return Run(run_dir, cfg, dataset, model, build_sampler(cfg, dataset, catalog), step)


def saved_standardization(run_dir: str | Path, cfg: RunConfig) -> Standardization | None:
    """A tabular run's standardisation as saved at training time (None for other data, or a run saved without it)."""
    path = standardization_path(run_dir)
    if cfg.data.name != "tabular":
        return None
    if not path.is_file():
        if config_path(run_dir).is_file() and latest_checkpoint(checkpoints_dir(run_dir)) is not None:
            warnings.warn(f"{run_dir} has no {STANDARDIZATION} (trained before it was saved): its standardisation is "
                          f"recomputed from data.path {cfg.data.path!r}", stacklevel=2)
        return None
    return Standardization.load(path)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch.device(name)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(name)!r} is not a device: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} is not available ({torch.cuda.device_count()} CUDA device(s) here); "
                         "use auto or cpu")
    return device
