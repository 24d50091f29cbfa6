"""The run directory's layout: every path inside a run, which weights to load, and the metrics log.

    <run>/
        config.yaml          resolved config, written before the first step
        metrics.jsonl        one JSON line per log interval (and per validation pass)
        checkpoints/         step_XXXXXXXX/ folders and `latest` (see shared.checkpoint)
        checkpoints/best/    the evaluation weights with the lowest validation loss (when validated)
        samples/             outputs of `flowdistill sample`
        couplings/           precomputed coupling caches keyed by their settings
        tracking/            Accelerate tracker logs (TensorBoard) when train.trackers is set
        standardization.json tabular data: the column mean/std the model's units are defined by
        eval.json, nll-<split>.json/.csv/-calibration.png, nll-file-<stem>.json/.csv
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
SAMPLES = "samples"
COUPLINGS = "couplings"
TRACKING = "tracking"
STANDARDIZATION = "standardization.json"
WEIGHT_CHOICES = ("auto", "best", "ema", "model")


def config_path(run_dir: str | Path) -> Path:
    """The run's resolved `config.yaml`."""
    return Path(run_dir) / CONFIG


def checkpoints_dir(run_dir: str | Path) -> Path:
    """Folder of the run's resumable checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def best_dir(run_dir: str | Path) -> Path:
    """Folder of the best-on-validation weights (a checkpoint root holding one checkpoint)."""
    return Path(run_dir) / CHECKPOINTS / BEST


def metrics_path(run_dir: str | Path) -> Path:
    """The run's JSONL metrics log."""
    return Path(run_dir) / METRICS


def samples_dir(run_dir: str | Path) -> Path:
    """Where `flowdistill sample` writes pictures and arrays."""
    return Path(run_dir) / SAMPLES


def standardization_path(run_dir: str | Path) -> Path:
    """The tabular run's saved standardisation (`shared.tabular.Standardization`), written when training starts."""
    return Path(run_dir) / STANDARDIZATION


def tracking_dir(run_dir: str | Path) -> Path:
    """Where Accelerate's trackers (TensorBoard) write."""
    return Path(run_dir) / TRACKING


def couplings_dir(run_dir: str | Path) -> Path:
    """Where coupling caches computed from this run (as a teacher) live."""
    return Path(run_dir) / COUPLINGS


def weights_file(ckpt: Path, best: Path | None, choice: str) -> Path:
    """The weights file that `choice` names among a checkpoint folder `ckpt` and a best-weights folder.

    `auto` takes the best-on-validation weights when they exist, else the EMA weights, else the raw ones;
    `best` requires validation weights; `ema` falls back to the raw weights when EMA was off.
    """
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {choice!r}")
    if choice in ("auto", "best") and best is not None:
        return best / "model.safetensors"
    if choice == "best":
        raise FileNotFoundError(f"no best-on-validation weights under {ckpt.parent}: the run was trained "
                                "without validation (set data.val_fraction > 0 and train.eval_every > 0)")
    if choice in ("auto", "ema") and (ckpt / "ema.safetensors").is_file():
        return ckpt / "ema.safetensors"
    return ckpt / "model.safetensors"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of a run's metrics log; a torn last line (an interrupted write) is dropped with a warning."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line ({err})", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({err}); repair or delete that line") from None
    return records
