"""The run directory's layout: every path inside a run, which weights to load, and the metrics log.

    <run>/
        config.yaml          resolved config, written before the first step
        metrics.jsonl        one JSON line per log interval (and per validation pass)
        checkpoints/         step_XXXXXXXX/ folders and `latest` (see shared.checkpoint)
        checkpoints/best/    the evaluation weights with the lowest validation loss (when validated)
        samples/             outputs of `flowdistill sample`
        couplings/           precomputed coupling caches keyed by their settings
        cache/               reference likelihoods keyed by weights, points and solver (shared.reference_cache)
        tracking/            Accelerate tracker logs (TensorBoard) when train.trackers is set
        standardization.json tabular data: the column mean/std the model's units are defined by
        eval.json, nll-<split>.json/.csv/-calibration.png, nll-file-<stem>.json/.csv
    <out_dir>/.<run>.lock    held while the run is trained (`run_lock`), removed afterwards

A packed run (shipped pretrained, or exported) is a folder of config.yaml, model.safetensors (its
evaluation weights), manifest.json (sha256 of every file, verified on load) and a README.md model card.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
SAMPLES = "samples"
COUPLINGS = "couplings"
TRACKING = "tracking"
STANDARDIZATION = "standardization.json"
PACKED_WEIGHTS = "model.safetensors"  # the one weights file of a packed run
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


class RunInUseError(OSError):
    """The run directory (or another locked folder) is being written by another process."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of a run (or a coupling cache), beside its folder so that `--overwrite` may replace the
    folder under the lock."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


RESUME_REMEDY = contextvars.ContextVar("resume_remedy", default="continue with --resume")


def resume_remedy() -> str:
    """How the user continues an interrupted or refused run here: `continue with --resume`, or what a caller
    that trains runs itself (a pipeline) set with `resumed_by`."""
    return RESUME_REMEDY.get()


@contextlib.contextmanager
def resumed_by(remedy: str) -> Iterator[None]:
    """Within the block, messages about continuing a run name `remedy` (e.g. "rerun `flowdistill run ...`")."""
    token = RESUME_REMEDY.set(remedy)
    try:
        yield
    finally:
        RESUME_REMEDY.reset(token)


@contextlib.contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold a run's lock while it is trained, so that a second trainer of the same run (a second `--resume`, a
    comparison reaching a run trained elsewhere) is refused instead of interleaving its checkpoints and metrics
    (see `folder_lock`)."""
    busy = (f"run {run_dir} is being trained by another process (it holds {lock_path(run_dir)}); wait for it to "
            f"finish or stop it, then {resume_remedy()}")
    with folder_lock(run_dir, busy, enabled):
        yield


@contextlib.contextmanager
def folder_lock(folder: str | Path, busy: str, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of a folder (a run, a coupling cache) while one process writes it; `busy` is the message
    of the RunInUseError a second process gets.

    An exclusive, non-blocking `flock` on `lock_path`: the system drops it when its process dies, so a killed
    writer leaves no stale lock. The holder deletes the file on release; a process that locked a file deleted
    meanwhile notices (another inode at the path) and locks the new one. `enabled=False` (the other processes
    of a multi-process launch) and platforms without `fcntl` take no lock.
    """
    if not enabled or fcntl is None:
        yield
        return
    path = lock_path(folder)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(busy) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in made:  # innermost first: the out_dir a run that failed early never used
            with contextlib.suppress(OSError):
                folder.rmdir()


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
