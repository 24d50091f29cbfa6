"""The Dataset type, the project's one image scaling convention, and the rule that splits data.

Images are stored as integer levels v in [0, levels - 1] and modelled as floats in [-1, 1] at the
centres of `levels` equal cells: x = (v + 0.5) / levels * 2 - 1. Adding uniform noise over a cell
(`dequantize`) turns the data into a continuous density on [-1, 1], and `bits_per_dim` converts a
per-sample NLL of that density into bits per dimension of the original integer data.

Finite data sets are split by one rule (`split_index`): a permutation drawn from a generator seeded with
`DataConfig.seed`, the last ceil(N * test_fraction) samples going to the test split. The named data sets
live in `shared.toy_data` (generated 2D densities) and `shared.data_sources` (files, and `load_dataset`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from shared.config import DataConfig
from shared.hashing import content_key, parts_key
from shared.image_store import StoredImages
from shared.tabular import Standardization


class DataError(ValueError):
    """A missing, unknown or malformed data set."""


@dataclass
class Dataset:
    """Train/test tensors of one data set plus what is needed to score and reproduce it."""

    name: str
    train: Tensor  # float32 (N, *shape): images (N, C, H, W) in [-1, 1], vectors (N, D)
    test: Tensor
    train_labels: Tensor | None  # int64 (N,) or None
    test_labels: Tensor | None
    levels: int | None  # quantisation levels of image data; None for continuous data
    fingerprint: str  # first 16 hex chars of sha256 over name, split sizes and train/test bytes
    meta: dict = field(default_factory=dict)
    val: Tensor | None = None  # validation split carved from the training data (model selection only)
    val_labels: Tensor | None = None
    log_density: Callable[[Tensor], Tensor] | None = None  # exact log p(x) (B,) nats/sample when the density is known
    standardization: Standardization | None = None  # tabular: model units z = (x - mean) / std of the file's x

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the train/test data before a validation split was carved (same for every val_fraction)."""
        return self.meta.get("fingerprint_before_validation", self.fingerprint)

    def fit_split(self) -> tuple[Tensor, Tensor | None]:
        """All non-test data (train plus validation) and its labels: what evaluation-only networks train on."""
        if self.val is None:
            return self.train, self.train_labels
        labels = None if self.train_labels is None else torch.cat([self.train_labels, self.val_labels])
        return torch.cat([self.train, self.val]), labels

    def to_user(self, x: Tensor) -> Tensor:
        """Model-space points (N, *shape) in the units of the user's data (tabular: mean + std * z, float64)."""
        return x if self.standardization is None else self.standardization.to_user(x)

    @property
    def units(self) -> str:
        """What the values (and log p) this data set reports are measured in."""
        if self.standardization is not None:  # name the file the statistics came from, not the file scored
            source = self.standardization.source or self.meta.get("source", "") or "the training file"
            return f"units of the data files (standardisation fitted on {source})"
        return "model scale [-1, 1] (dequantized)" if self.levels is not None else "data units"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.train.shape[1:])

    @property
    def kind(self) -> str:
        """Either "image" for (C, H, W) samples or "vector" for flat ones."""
        return "image" if len(self.shape) == 3 else "vector"

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one sample."""
        return math.prod(self.shape)


# ---------------------------------------------------------------- scaling convention


def image_to_model(levels_uint: Tensor, levels: int) -> Tensor:
    """Integer levels in [0, levels - 1] -> float32 in [-1, 1] at the cell centres."""
    return (levels_uint.float() + 0.5) / levels * 2 - 1


def model_to_image(x: Tensor, levels: int) -> Tensor:
    """Inverse of `image_to_model`, rounded and clamped to integer levels (for saving pictures)."""
    v = ((x.float() + 1) / 2 * levels - 0.5).round().clamp(0, levels - 1)
    return v.to(torch.uint8 if levels <= 256 else torch.int64)


def dequantize(x: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Spread cell-centred data uniformly over its cell of width 2 / levels."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (u - 0.5) * 2 / levels


def random_shift(x: Tensor, max_shift: int, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image (B, C, H, W) by integers (dy, dx) drawn uniformly from [-s, s]^2.

    Pixels shifted in take the lowest level (the background of digit-like data). One integer pair per
    image, drawn from `generator`; `max_shift = 0` returns `x` unchanged.
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    background = image_to_model(torch.zeros((), dtype=torch.long), levels).item()
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=background)
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=x.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def bits_per_dim(nll_nats: Tensor, dim: int, levels: int) -> Tensor:
    """Bits per dimension of integer data from the NLL (nats) of its dequantized [-1, 1] version.

    The log(levels / 2) term is the log-Jacobian per dimension of mapping [0, levels) onto [-1, 1].
    """
    return (nll_nats / dim + math.log(levels / 2)) / math.log(2)



# ---------------------------------------------------------------- assembling and splitting


def make_dataset(name: str, train: Tensor, test: Tensor, train_labels: Tensor | None = None,
                 test_labels: Tensor | None = None, levels: int | None = None, meta: dict | None = None) -> Dataset:
    """Assemble a `Dataset` of contiguous float32 CPU tensors (N, *shape) and fingerprint its contents."""
    train, test = train.float().contiguous(), test.float().contiguous()
    # the split sizes too: splits of one permutation cut at another place concatenate to the same bytes
    parts = [f"{name}/{len(train)}/{len(test)}".encode(), train.numpy().tobytes(), test.numpy().tobytes()]
    return Dataset(name, train, test, train_labels, test_labels, levels, parts_key(parts, 16), meta or {})


def split_index(n: int, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Seeded permutation of range(n); the last ceil(n * test_fraction) indices form the test split."""
    if n < 2:
        raise DataError(f"data set {cfg.name!r} has {n} sample(s); a train/test split needs at least 2")
    if not 0 < cfg.test_fraction < 1:
        raise DataError(f"data.test_fraction must lie in (0, 1), got {cfg.test_fraction}")
    n_test = min(max(math.ceil(n * cfg.test_fraction - 1e-9), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[: n - n_test], perm[n - n_test:]


def carve_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Move a seeded share of the training split into `dataset.val`; the test split is untouched.

    The last ceil(N_train * fraction) rows of a permutation seeded by `seed` (stream distinct from the
    train/test split) become the validation split, so it is disjoint from both other splits and fixed by
    the seed. The fingerprint covers the carve, so caches built on the larger train split are refused.
    """
    if fraction == 0:
        return dataset
    if not 0 < fraction < 1:
        raise DataError(f"data.val_fraction must lie in [0, 1), got {fraction}")
    n = len(dataset.train)
    n_val = math.ceil(n * fraction - 1e-9)
    if n_val >= n:
        raise DataError(f"data.val_fraction={fraction} leaves no training data ({n} training samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 1))
    keep, held = perm[: n - n_val].sort().values, perm[n - n_val:].sort().values
    labels = dataset.train_labels
    digest = content_key(f"{dataset.fingerprint}/val{fraction}/{seed}", 16)
    stored = isinstance(dataset.train, StoredImages)  # uint8 views split without a copy
    take = dataset.train.subset if stored else lambda rows: dataset.train[rows].contiguous()
    return dataclasses.replace(dataset, train=take(keep), val=take(held),
                               train_labels=None if labels is None else labels[keep],
                               val_labels=None if labels is None else labels[held], fingerprint=digest,
                               meta={**dataset.meta, "fingerprint_before_validation": dataset.fingerprint})
