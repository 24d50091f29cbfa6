"""Models trained elsewhere become run directories that every command reads unchanged.

`import_ml_tarflow` turns an apple/ml-tarflow checkpoint into a teacher run (`model.name: tarflow`,
`method.name: nll`): `config.yaml`, a verified safetensors checkpoint (`shared.checkpoint`) and
`imported.json`, which records where the weights came from. The run directory is written in a hidden
sibling folder and renamed into place, so a failed import leaves nothing behind; everything that can
be refused (file, checkpoint shape, data) is checked before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from flowdistill.components import CATALOG
from nfm.ml_tarflow import MLTarFlowShape, convert_state_dict, read_checkpoint, tarflow_config
from shared.checkpoint import atomic_write_text, check_writable, save_checkpoint, sha256_file
from shared.config import ConfigError, RunConfig, apply_overrides, build_run_config, dump_yaml, to_dict
from shared.data import Dataset, load_dataset
from shared.rundir import checkpoints_dir, config_path

IMPORTED = "imported.json"  # the provenance of an imported run's weights


def teacher_config(out: str | Path, model: Any, method: Any, overrides: Sequence[str]) -> RunConfig:
    """The run config of a teacher written to `out`: `model`, `method` and the data named by `data.*` overrides."""
    out = Path(out)
    if not any(o.split("=", 1)[0] == "data.name" for o in overrides):
        raise ConfigError("name the data the model was trained on, e.g. data.name=digits (data.* overrides): "
                          "sampling, nll and NFM pairs read it from the run")
    if out.name in ("", ".", ".."):
        raise ConfigError(f"the run directory to write must be a new folder name, got {str(out)!r}")
    raw = {"name": out.name, "out_dir": str(out.parent), "model": to_dict(model), "method": to_dict(method)}
    return build_run_config(apply_overrides(raw, list(overrides)), CATALOG.config_choices())


def check_data(dataset: Dataset, shape: tuple[int, ...], num_classes: int, what: str) -> None:
    """Refuse data whose per-sample shape is not `shape`, or whose labels a conditional model has no class for."""
    if tuple(dataset.shape) != tuple(shape):
        raise ValueError(f"{what} models samples of shape {tuple(shape)}, but data {dataset.name!r} has samples of "
                         f"shape {tuple(dataset.shape)}: choose data.* settings of that shape")
    if num_classes:
        if dataset.train_labels is None:
            raise ValueError(f"{what} is class-conditional ({num_classes} classes) but data {dataset.name!r} has "
                             "no labels")
        top = int(dataset.train_labels.max())
        if top >= num_classes:
            raise ValueError(f"{what} has {num_classes} classes but the labels of data {dataset.name!r} reach {top}")


def write_run(cfg: RunConfig, model: nn.Module, provenance: dict[str, Any], overwrite: bool = False) -> Path:
    """Write `<out_dir>/<name>/` (config.yaml, a step-0 checkpoint of `model`, imported.json) all at once."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if run_dir.exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already exists; pass --overwrite to replace it")
    check_writable(run_dir.parent, f"run directory {run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{cfg.name}.import."))
    try:
        atomic_write_text(config_path(tmp), dump_yaml(cfg))
        save_checkpoint(checkpoints_dir(tmp), 0, model)
        atomic_write_text(tmp / IMPORTED, json.dumps(provenance, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def import_ml_tarflow(checkpoint: str | Path, shape: MLTarFlowShape, noise_std: float, out: str | Path,
                      overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write an ml-tarflow checkpoint as a TarFlow teacher run at `out`; returns the run directory.

    `shape` holds the numbers of ml-tarflow's file name (e.g. afhq_model_8_768_8_8_0.07.pth: patch 8,
    width 768, 8 blocks of 8 layers, noise_std 0.07); `overrides` are `data.*` (and other) key=value
    settings of the run, `data.name` required. Data and checkpoint are checked before anything is written.
    """
    if noise_std < 0:
        raise ValueError(f"--noise-std must be >= 0, got {noise_std}")
    state = read_checkpoint(checkpoint)
    weights = convert_state_dict(state, shape, f"checkpoint {str(checkpoint)!r}")  # refuses a foreign or misshapen checkpoint, naming the keys
    cfg = teacher_config(out, tarflow_config(shape, noise_std), CATALOG.methods["nll"].config(), overrides)
    dataset = load_dataset(cfg.data)
    image = (shape.in_channels, shape.img_size, shape.img_size)
    check_data(dataset, image, shape.num_classes, f"ml-tarflow checkpoint {str(checkpoint)!r}")
    model = build_with_weights(cfg, dataset, weights)
    provenance = {"format": "ml-tarflow", "file": str(Path(checkpoint).resolve()),
                  "sha256": sha256_file(Path(checkpoint)), "shape": to_dict(shape), "noise_std": noise_std}
    return write_run(cfg, model, provenance, overwrite)


def build_with_weights(cfg: RunConfig, dataset: Dataset, weights: dict[str, Tensor]) -> nn.Module:
    """The model `cfg` names for `dataset`, with `weights` loaded strictly, its sampler checked against the data."""
    CATALOG.methods[cfg.method.name].sampler(cfg.method, cfg, dataset)  # refuses settings the method cannot use
    model = CATALOG.models[cfg.model.name].build(cfg.model, dataset.shape)
    model.load_state_dict(weights, strict=True)
    return model
