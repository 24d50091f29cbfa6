"""Runs: train the run a config describes, and rebuild a finished run from its directory.

The run directory's layout lives in `shared.rundir`, its preparation and resume checks in
`shared.run_prepare`, and the builders of its parts in `shared.run_build`. Training validates data,
model and loss before the run directory is touched; loading a run builds its sampler only, never its
loss, so a student's teachers are not loaded to sample or score it.
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from shared.catalog import BuildContext, Catalog
from shared.checkpoint import (CheckpointError, check_writable, estimate_checkpoint_bytes, latest_checkpoint,
                               load_weights, remove_temporaries, require_free_space, verify_checkpoint)
from shared.config import ConfigError, RunConfig, build_run_config, flatten, read_yaml_mapping, to_dict
from shared.data import Dataset, dequantize, random_shift
from shared.data_sources import load_dataset
from shared.device import cpu_only
from shared.run_build import (build_model, build_sampler, evaluation_weights, init_from_run, saved_standardization,
                              weights_sha256)
from shared.run_prepare import (discard_attempt, prepare_run_dir, replaced_dir, run_dir_of, unfinished_attempt,
                                upgrade_saved_config)
from shared.rundir import best_dir, checkpoints_dir, config_path, read_metrics, run_lock, standardization_path, tracking_dir


@dataclass
class Run:
    """A trained (or training) run: its directory, config, data, model and method."""

    dir: Path
    config: RunConfig
    dataset: Dataset
    model: nn.Module
    sampler: Any  # shared.method.Sampler: prior_sample, sample, log_likelihood
    step: int
    weights_sha256: str = ""  # sha256 of the weights file loaded (from its verified checkpoint's manifest)


def build_loss(cfg: RunConfig, dataset: Dataset, catalog: Catalog) -> Callable:
    """The training loss of `cfg.method` (it may load the runs the method depends on, e.g. a teacher)."""
    ctx = BuildContext(cfg, dataset, run_dir_of(cfg), partial(load_run, catalog=catalog), catalog.nested)
    return catalog.methods[cfg.method.name].build(cfg.method, ctx)


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
    accelerator = make_accelerator(cfg.train.mixed_precision, cpu=cpu_only(),
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
    return Run(run_dir, cfg, dataset, model, build_sampler(cfg, dataset, catalog), step, weights_sha256(path))
