"""User tabular data: (N, D) arrays read from .npy, .npz or .csv files, and the standardisation a run keeps.

A tabular run models the standardised vectors z = (x - mean) / std (column mean and population std of
the training rows, std at least 1e-8). The statistics are written into the run directory when training
starts (`shared.rundir.standardization_path`, JSON, atomically) and read back whenever the run is loaded,
so moving or editing the data file afterwards does not change the conversion. Log densities are
reported in the units of the user's file by the change of variables

    log p_user(x) = log p_std((x - mean) / std) - sum_d log std_d        (nats per sample),

and samples are returned as x = mean + std * z.
"""
from __future__ import annotations

import json
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from shared.checkpoint import atomic_write_text
from shared.config import DataConfig

TABULAR_SUFFIXES = (".npy", ".npz", ".csv")
MIN_STD = 1e-8  # floor of a column's std (a constant column)


class TabularError(ValueError):
    """A tabular file or a saved standardisation that cannot be used."""


def _is_number(text: str) -> bool:
    """Whether a CSV field parses as a float (a first row with any other field is a header)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def require_regular_file(path: Path) -> None:
    """Refuse a data path that is not a regular file (a pipe or device would block or never end), without opening it."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
        raise TabularError(f"{str(path)!r} is {kind}, not a regular file; data must be a .npy, .npz or .csv file")


def read_array(path: Path) -> np.ndarray:
    """The numeric array stored in a .npy, .npz or .csv file (a CSV header row is skipped; a UTF-8 byte-order
    mark is not part of the first field)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if "x" not in keys and len(keys) != 1:
                raise TabularError(f"{str(path)!r} holds arrays {keys}; store the data under key 'x' or alone")
            return archive["x" if "x" in keys else keys[0]]
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig") as fh:
            header = not all(_is_number(field) for field in fh.readline().split(","))
        return np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float64, encoding="utf-8-sig")
    raise TabularError(f"{str(path)!r}: unsupported file type; use one of {', '.join(TABULAR_SUFFIXES)}")


def read_table(path: Path, min_rows: int = 2) -> Tensor:
    """The (N, D) float64 table of a .npy/.npz/.csv file, in the file's units; N >= min_rows, D >= 1, finite."""
    try:
        require_regular_file(path)
        array = read_array(path)
    except TabularError:
        raise
    except (ValueError, OSError, EOFError) as err:  # EOFError: an empty or cut-short .npy
        raise TabularError(f"cannot read {str(path)!r} as numbers: {err}") from err
    if array.ndim != 2 or array.shape[0] < min_rows or array.shape[1] < 1:
        raise TabularError(f"{str(path)!r} holds an array of shape {array.shape}; expected a 2-D array (N, D) "
                           f"with N >= {min_rows} samples and D >= 1 columns")
    if np.iscomplexobj(array):
        raise TabularError(f"{str(path)!r} holds complex values ({array.dtype}); expected real numbers "
                           "(store real and imaginary parts as separate columns)")
    if not np.issubdtype(array.dtype, np.number):
        raise TabularError(f"{str(path)!r} holds {array.dtype} values; expected numbers")
    data = torch.from_numpy(array.astype(np.float64))
    if not torch.isfinite(data).all():
        raise TabularError(f"{str(path)!r} contains NaN or infinite values")
    return data


@dataclass(frozen=True)
class Standardization:
    """Column statistics of a tabular run: z = (x - mean) / std, mean and std (D,) float64 in file units."""

    mean: Tensor
    std: Tensor
    source: str = ""  # the training file the statistics were computed from (for the record only)

    @classmethod
    def fit(cls, train: Tensor, source: str = "") -> Standardization:
        """Column mean and population std (floored at 1e-8) of training rows (N, D) in file units."""
        train = train.double()
        return cls(train.mean(0), train.std(0, unbiased=False).clamp_min(MIN_STD), source)

    @property
    def dim(self) -> int:
        """Number of columns D."""
        return len(self.mean)

    @property
    def log_jacobian(self) -> float:
        """log |det dz/dx| = -sum_d log std_d (nats per sample): what turns log p_std into log p_user."""
        return -float(self.std.log().sum())

    def to_model(self, x: Tensor) -> Tensor:
        """File units (N, D) -> standardised z = (x - mean) / std, float64."""
        return (x.double().cpu() - self.mean) / self.std

    def to_user(self, z: Tensor) -> Tensor:
        """Standardised (N, D) -> file units x = mean + std * z, float64 on the CPU."""
        return z.detach().double().cpu() * self.std + self.mean

    def logp_to_user(self, logp: Tensor) -> Tensor:
        """log p_user(x) = log p_std(z) - sum_d log std_d, (N,) nats per sample."""
        return logp + self.log_jacobian

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON atomically (floats written exactly, so a reload is bit-identical)."""
        payload = {"mean": self.mean.tolist(), "std": self.std.tolist(), "source": self.source,
                   "log_jacobian_nats": self.log_jacobian,
                   "convention": "z = (x - mean) / std; log p_user(x) = log p_std(z) - sum(log std)"}
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Standardization:
        """Read statistics written by `save`; a damaged file is a TabularError naming it."""
        try:
            payload = json.loads(Path(path).read_text())
            mean = torch.tensor(payload["mean"], dtype=torch.float64)
            std = torch.tensor(payload["std"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TabularError(f"cannot read the saved standardisation {str(path)!r}: {err}") from err
        if mean.dim() != 1 or mean.shape != std.shape or not bool((std > 0).all()) or not all(
                math.isfinite(v) for v in mean.tolist() + std.tolist()):
            raise TabularError(f"{str(path)!r} does not hold a standardisation (mean and std of one length, std > 0)")
        return cls(mean, std, str(payload.get("source", "")))


def warn_dropped_rows(rows: dict[str, int], caps: dict[str, int | None], sources: dict[str, str]) -> None:
    """Warn for each split whose cap (data.max_<split>_rows) keeps fewer rows than the file holds."""
    for split, cap in caps.items():
        if cap is not None and cap < rows[split]:
            warnings.warn(f"data.max_{split}_rows={cap} keeps {cap} of the {rows[split]} {split} rows of "
                          f"{sources[split]}; set data.max_{split}_rows=0 to use them all", stacklevel=3)


def load_tables(cfg: DataConfig, path: Path | None, split: Callable[[int], tuple[Tensor, Tensor]],
                standardization: Standardization | None = None) -> tuple[Tensor, Tensor, Standardization, dict]:
    """Standardised train and test tables (N, D) float64 of a tabular config, their statistics and metadata.

    The test rows are data.test_path when given (all of `path` is then training data), else the rows
    `split(N)` picks (the seeded data.test_fraction split). z = (x - mean) / std with `standardization` (a
    run's saved statistics) or the training rows' own statistics. data.n_train / data.n_test, when set away
    from their defaults (which mean the whole file), keep at most that many rows of each split (the first of
    the seeded split; of a test file, its first rows). `path` None (a run whose file moved away) gives
    empty tables with the saved statistics.
    """
    caps = {"train": cfg.max_train_rows or None, "test": cfg.max_test_rows or None}
    if path is None:
        if standardization is None:
            raise TabularError("tabular data needs data.path")
        empty = torch.zeros(0, standardization.dim, dtype=torch.float64)
        meta = {"source": cfg.path, "missing": f"data.path {cfg.path!r} no longer exists",
                "mean": standardization.mean.tolist(), "std": standardization.std.tolist()}
        return empty, empty, standardization, meta
    data = read_table(path)
    if cfg.test_path:
        test_file = Path(cfg.test_path).expanduser()
        if not test_file.exists():
            raise TabularError(f"data.test_path {cfg.test_path!r} does not exist; set it to a .npy, .npz or .csv "
                               "file with the columns of data.path")
        train, test = data, read_table(test_file, min_rows=1)
        if test.shape[1] != train.shape[1]:
            raise TabularError(f"data.test_path {cfg.test_path!r} has {test.shape[1]} columns but data.path "
                               f"{cfg.path!r} has {train.shape[1]}")
    else:
        tr, te = split(len(data))
        train, test = data[tr], data[te]
    rows = {"train": len(train), "test": len(test)}
    warn_dropped_rows(rows, caps, {"train": str(path), "test": cfg.test_path or f"{path} (test split)"})
    train, test = train[:caps["train"]], test[:caps["test"]]
    stats = standardization or Standardization.fit(train, str(path))
    if stats.dim != train.shape[1]:
        raise TabularError(f"{str(path)!r} has {train.shape[1]} columns but the run's saved standardisation has "
                           f"{stats.dim}: the data file changed since training")
    meta = {"source": str(path), "mean": stats.mean.tolist(), "std": stats.std.tolist(),
            "rows_used": {"train": len(train), "test": len(test)}, "rows_available": rows}
    if cfg.test_path:
        meta["test_source"] = cfg.test_path
    return stats.to_model(train), stats.to_model(test), stats, meta
