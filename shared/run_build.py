"""A run's parts rebuilt from its config and directory: model, sampler, evaluation weights, standardisation.

Every builder takes the application's `Catalog` (`shared.catalog`), so no model or method is known here by
name. The training loss, which may load other runs (a teacher), is built by `shared.run.build_loss`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from shared.catalog import Catalog
from shared.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, read_manifest, verify_checkpoint
from shared.config import RunConfig
from shared.data import Dataset
from shared.rundir import (PACKED_WEIGHTS, STANDARDIZATION, best_dir, checkpoints_dir, config_path,
                           standardization_path, weights_file)
from shared.tabular import Standardization


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
        hint = ""
        if source_state and all(k.startswith("members.") for k in source_state):
            hint = ("; it is an ensemble of velocity fields (shared.ensemble): initialise from one of its member runs, "
                    "listed in its imported.json, and keep the ensemble as method.teacher")
        raise CheckpointError(f"train.init_from={source}: no tensor of that run fits this model{hint}")
    model.load_state_dict(matched, strict=False)
    return sorted(set(target) - set(matched))


def evaluation_weights(run_dir: str | Path, choice: str = "auto") -> tuple[Path, int]:
    """The verified weights file of a run's evaluation model and its step (see `shared.rundir.weights_file`).

    Only the checkpoint the weights come from is hashed (every file of it); the other one, latest or best,
    is only asked its step."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).is_file():  # a packed run (shipped or exported): one verified weights file
        return run_dir / PACKED_WEIGHTS, int(verify_checkpoint(run_dir)["step"])
    ckpt = latest_checkpoint(checkpoints_dir(run_dir))
    if ckpt is None:
        raise CheckpointError(f"run {run_dir} has no checkpoint yet; train it first")
    best = latest_checkpoint(best_dir(run_dir))
    path = weights_file(ckpt, best, choice)
    return path, int(verify_checkpoint(path.parent)["step"])


def weights_sha256(path: Path) -> str:
    """The sha256 of a verified weights file, as its checkpoint's manifest records it (no second hash)."""
    return read_manifest(path.parent)["files"][path.name]["sha256"]


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

