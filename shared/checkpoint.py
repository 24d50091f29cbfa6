"""Checkpoints: safetensors weights + optimizer state + a manifest of hashes, written atomically.

Layout of one checkpoint (a folder `checkpoints/step_XXXXXXXX/` inside a run directory):
    model.safetensors   raw weights            ema.safetensors   EMA weights (when EMA is on)
    optimizer.pt        optimizer state dict, loaded with `weights_only=True` (no code runs)
    trainer.json        step and trainer bookkeeping
    manifest.json       sha256 and size of every file above, checked before anything is loaded
The folder is written under a temporary name and renamed into place; `checkpoints/latest`
(also replaced atomically) names the newest complete checkpoint. Before a write, the free space of
the disk is checked against the checkpoint's estimated size, so a full disk is a clear error that
keeps the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: temporary files are judged by age alone
    fcntl = None

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


FREE_SPACE_MARGIN = 1 << 20  # bytes kept free beyond a checkpoint's estimate (manifest, trainer.json, metadata)
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # `atomic_write_via`'s temporaries (tempfile.mkstemp)
STALE_SECONDS = 1.0  # a temporary file untouched this long, and not locked, was left by a killed write
SWEPT: set[Path] = set()  # folders this process has removed stale temporary files from (`atomic_write_via`)


def nearest_existing(path: str | Path) -> Path:
    """`path` itself when it exists, else its nearest existing ancestor (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse a folder that cannot be created or written (a file in the way, read-only, no permission)."""
    folder = Path(folder)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise CheckpointError(f"{what}: {existing} is a file, not a folder; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what}: cannot write in {existing} (read-only or no permission); "
                              "choose a writable folder")


def check_output_file(path: Path, what: str) -> None:
    """Refuse an output file path that is a folder, or whose folder cannot be created or written."""
    if path.is_dir():
        raise CheckpointError(f"{what}: {path} is a folder; pass a file path such as {path / 'samples.png'}")
    check_writable(path.parent, what)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor in a (nested) dict, list or tuple of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def estimate_checkpoint_bytes(model: nn.Module, copies: int) -> int:
    """Size of a checkpoint holding `copies` tensors the size of the model's state (weights, EMA, optimizer moments)."""
    return copies * tensor_bytes(model.state_dict()) + FREE_SPACE_MARGIN


def require_free_space(folder: str | Path, needed: int, what: str = "checkpoint") -> None:
    """Refuse to write `needed` bytes under `folder` when its disk has less free space than that."""
    existing = nearest_existing(folder)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CheckpointError(f"not enough free disk space for the next {what} in {existing}: "
                              f"{free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed; "
                              "free some space or set out_dir=<a folder on another disk>")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see either the old or the new content, never a torn one."""
    atomic_write_bytes(path, text.encode())


def default_file_mode() -> int:
    """Permissions a plain `open(..., "w")` would give (mkstemp's files are private by default)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write bytes so that readers see either the old or the new file (see `atomic_write_via`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(payload)

    atomic_write_via(path, write)


def atomic_write_via(path: str | Path, write: Callable[[str], None]) -> None:
    """Let `write(tmp_path)` fill a temporary file next to `path`, fsync it, rename it into place, fsync the folder.

    A crash leaves either the old file or the new one, never a torn one; the temporary file is removed
    on any error, and one that a kill left behind is removed by the next process that writes into the same
    folder (`remove_stale_temporaries`, at its first write there). The result gets the permissions a plain `open(path, "w")` would give.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.absolute() not in SWEPT:  # once per folder and process: a cache folder takes thousands of writes
        remove_stale_temporaries(path.parent)
        SWEPT.add(path.parent.absolute())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: the file is in use, not stale
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, older_than: float = STALE_SECONDS) -> list[str]:
    """Delete the temporary files of killed atomic writes in `folder` (`.<name>.<8 chars>.tmp`, unchanged for
    `older_than` seconds and not locked by a write in progress); returns their names."""
    removed = []
    for path in folder.glob(".*.tmp"):
        if not TEMP_NAME.fullmatch(path.name):
            continue
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and time.time() - path.stat().st_mtime > older_than \
                    and not being_written(path):
                path.unlink()
                removed.append(path.name)
    return sorted(removed)


def being_written(path: Path) -> bool:
    """Whether another open file holds the lock `atomic_write_via` takes on its temporary file."""
    if fcntl is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def disk_full(err: BaseException) -> bool:
    """Whether an error is the file system reporting no space (or quota) left."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def explain_disk_full(what: str, remedy: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into one CheckpointError naming the file and `remedy`."""
    try:
        yield
    except OSError as err:
        if not disk_full(err):
            raise
        where = f" ({err.filename})" if err.filename else ""
        raise CheckpointError(f"no space left on the disk while writing {what}{where}; free some space, then "
                              f"{remedy}") from err


@contextlib.contextmanager
def removed_on_error(folder: Path) -> Iterator[None]:
    """Remove `folder` when the block fails and the folder did not exist before it (no half-written outputs)."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_written_atomically(out: str | Path, purpose: str = "write") -> Iterator[Path]:
    """Build a folder in a hidden temporary sibling (yielded) and rename it to `out` when the block succeeds:
    `out` is either absent, or the old folder, or the complete new one, never half written. Every file is
    fsynced before the rename; an existing `out` is replaced only then. On any error the temporary is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{purpose}."))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """`{name: {"sha256", "bytes"}}` of every file in `folder`, names sorted: the `files` of a manifest that
    `verify_checkpoint` checks (written last, after every file it lists)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a model's tensors (shared storage is split for safetensors)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(ckpt_root: str | Path, step: int, model: nn.Module, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, trainer_state: dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write `ckpt_root/step_<step>/` durably, point `latest` at it and prune old checkpoints.

    Every file is fsynced in a temporary folder, which is renamed into place (folder fsynced too); a
    checkpoint of the same step that already exists (a resumed finished run) is moved aside first and
    removed only after the new one is in place, so a crash never leaves the run without a good checkpoint.
    A disk without room for the checkpoint, or a write that fails, is a `CheckpointError`.
    """
    root = Path(ckpt_root)
    name = f"step_{step:08d}"
    weights = state_dict_for_saving(model)
    ema_weights = None if ema is None else state_dict_for_saving(ema)
    opt_state = None if optimizer is None else optimizer.state_dict()
    require_free_space(root, tensor_bytes([weights, ema_weights, opt_state]) + FREE_SPACE_MARGIN,
                       f"checkpoint (step {step})")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / "ema.safetensors"), metadata={"step": str(step)})
        if opt_state is not None:
            torch.save(opt_state, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **(trainer_state or {})}))
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": file_manifest(tmp)}, indent=1))
        for f in tmp.iterdir():
            os.chmod(f, default_file_mode())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode() | 0o111)
        fsync_dir(tmp)
        final = root / name
        aside = root / f".{name}.previous"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk, a failing device
        shutil.rmtree(tmp, ignore_errors=True)
        previous = root / f".{name}.previous"
        if previous.is_dir() and not (root / name).exists():
            os.replace(previous, root / name)  # the checkpoint this write was replacing
        kept = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else "none yet"
        raise CheckpointError(f"cannot write checkpoint {root / name}: {err}; the last good checkpoint "
                              f"({kept}) is kept") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    shutil.rmtree(aside, ignore_errors=True)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_temporaries(ckpt_root: str | Path) -> list[str]:
    """Delete the hidden temporaries of checkpoint writes that a kill interrupted; returns their names.

    These are `.step_X.*` folders and `.latest.*.tmp` files (a kill inside the pointer's atomic write).
    A `.step_X.previous` folder whose `step_X` is missing is the last good checkpoint of an interrupted
    replace: it is moved back instead of deleted.
    """
    root = Path(ckpt_root)
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.glob(".step_*")):
        if path.name.endswith(".previous") and not (root / path.name[1:-len(".previous")]).exists():
            os.replace(path, root / path.name[1:-len(".previous")])
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    for path in sorted(root.glob(f".{LATEST}.*.tmp")):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def inside_folder(folder: Path, name: str) -> bool:
    """Whether a file name a manifest lists stays inside `folder` (not absolute, no `..`, no symlink leading out)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return (folder / name).resolve().is_relative_to(folder.resolve())


def contained_file(folder: Path, name: str, where: str, remedy: str) -> Path:
    """`folder / name` for a file name a manifest lists; a name leading outside `folder` is a CheckpointError
    (`where` names the manifest, `remedy` says what to do)."""
    if not inside_folder(folder, name):
        raise CheckpointError(f"{where} names {name!r}, which is outside {folder}; refusing to read it: {remedy}")
    return folder / name


def complete_checkpoint(path: Path) -> bool:
    """Whether a checkpoint folder has a readable manifest and every file it lists, inside it, at the listed size
    (the cheap check; `verify_checkpoint` compares hashes)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return all(inside_folder(path, name) and (path / name).stat().st_size == info["bytes"]
                   for name, info in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint folder named by `latest`, or None when the run has none yet.

    When `latest` names a folder that is missing or incomplete, the newest complete `step_*` checkpoint is
    used instead, with a warning; with none to fall back on, a missing one is a CheckpointError and an
    incomplete one is returned (for `verify_checkpoint` to name what is wrong with it).
    """
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    exists = bool(name) and Path(name).name == name and path.is_dir()
    if exists and complete_checkpoint(path):
        return path
    problem = "which is incomplete or damaged" if exists else "which does not exist"
    fallback = next((p for p in sorted(root.glob("step_*"), reverse=True) if p != path and complete_checkpoint(p)), None)
    if fallback is not None:
        warnings.warn(f"{pointer} names {name}, {problem}; using {fallback.name}, the newest complete checkpoint")
        return fallback
    if exists:
        return path
    raise CheckpointError(f"{pointer} names {name}, {problem}, and no other complete checkpoint is there: the run "
                          "directory is incomplete; train it again with --overwrite")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest (its step and every file's size and sha256), read without hashing the files."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["files"].items()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not a flowdistill checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({err}); the checkpoint is corrupt") from None
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        f = contained_file(path, name, f"checkpoint {path}: {MANIFEST}", "the checkpoint is corrupt or was edited")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} listed in the manifest is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated or corrupt ({size} bytes, manifest says {info['bytes']})")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 differs from the manifest)")
    return manifest


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> None:
    """Load safetensors weights into `model`, with a clear error for a bad file or a shape mismatch."""
    path = Path(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err} (file corrupt or truncated?)") from None
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"weights {path} do not fit the model built from the run's config: {err}") from None


def load_checkpoint(path: str | Path, model: nn.Module, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify then load a checkpoint into the given objects; returns the trainer state (with `step`)."""
    path = Path(path)
    verify_checkpoint(path)
    load_weights(path / "model.safetensors", model)
    if ema is not None:
        load_weights(path / ("ema.safetensors" if (path / "ema.safetensors").is_file() else "model.safetensors"), ema)
    if optimizer is not None:
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    return json.loads((path / "trainer.json").read_text())
