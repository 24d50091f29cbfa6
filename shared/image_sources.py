"""Image sources kept as uint8: downsampled-ImageNet `.npz` files, shard folders, and `prepare-data`.

Downsampled ImageNet (Imagenet64_train_npz, Imagenet32_train_npz, ...) ships as `.npz` files with
`data` uint8 (N, 3 * H * W), each row an image in CHW order, and `labels` (N,) 1-based classes
(1..1000); here they become uint8 (N, 3, H, H) and 0-based labels. `prepare_data` converts a folder
of images (class subfolders give labels, as torchvision's ImageFolder) or such `.npz` files once into
a shard folder (`shared.image_store`), which trains with `data.name=shards data.storage=stream`.

The splits follow `shared.data`'s rule: a separate test source (`data.test_path`: the official
validation file or folder) or else the seeded permutation passed in as `split`.
"""
from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from shared.config import DataConfig
from shared.hashing import content_key, parts_key
from shared.image_store import LABELS, MANIFEST, ImageStore, ShardWriter, StoreError, open_shards, read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
Split = Callable[[int], tuple[Tensor, Tensor]]  # n -> (train rows, test rows), the seeded rule of shared.data


def _natural_key(path: Path) -> list[Any]:
    """Sort key that puts train_data_batch_2 before train_data_batch_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def npz_files(path: str | Path) -> list[Path]:
    """The .npz files named by `path`: the file itself, or every .npz in the folder (natural order)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.npz"), key=_natural_key) if path.is_dir() else []
    if not files:
        raise StoreError(f"{str(path)!r} is neither an .npz file nor a folder holding .npz files "
                         "(downsampled ImageNet: train_data_batch_*.npz, val_data.npz)")
    return files


def _npz_rows(path: Path) -> tuple[int, int]:
    """(N, 3 * H * W) of the `data` array of a downsampled-ImageNet .npz, read from its header only."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("data.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (KeyError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise StoreError(f"{str(path)!r} is not a downsampled-ImageNet .npz with a `data` array: {err}") from None
    if dtype != np.uint8 or len(shape) != 2:
        raise StoreError(f"{str(path)!r}: `data` is {dtype} {shape}; expected uint8 (N, 3 * H * W)")
    return int(shape[0]), int(shape[1])


def _side(width: int, path: Path) -> int:
    """Image side H of rows of 3 * H * H values."""
    side = math.isqrt(width // 3)
    if 3 * side * side != width:
        raise StoreError(f"{str(path)!r}: rows of {width} values are not 3 x H x H RGB images")
    return side


def read_imagenet_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet file: uint8 images (N, 3, H, H) and int64 0-based labels (N,)."""
    n, width = _npz_rows(path)
    side = _side(width, path)
    with np.load(path, allow_pickle=False) as archive:
        if "labels" not in archive.files:
            raise StoreError(f"{str(path)!r} has no `labels` array (keys: {', '.join(archive.files)})")
        data, labels = archive["data"], np.asarray(archive["labels"]).astype(np.int64).reshape(-1)
    if len(labels) != n:
        raise StoreError(f"{str(path)!r} holds {n} images but {len(labels)} labels")
    if n and labels.min() < 1:
        raise StoreError(f"{str(path)!r}: labels start at {labels.min()}; downsampled ImageNet labels are 1-based")
    return data.reshape(n, 3, side, side), labels - 1


def load_imagenet_npz(path: str | Path) -> ImageStore:
    """Every file named by `path` in one in-memory uint8 store (preallocated: no second copy)."""
    files = npz_files(path)
    sizes = [_npz_rows(f) for f in files]
    if len({w for _, w in sizes}) > 1:
        raise StoreError(f"the .npz files under {str(path)!r} hold images of different sizes: {sorted(set(sizes))}")
    side = _side(sizes[0][1], files[0])
    images = torch.empty((sum(n for n, _ in sizes), 3, side, side), dtype=torch.uint8)
    labels = torch.empty(len(images), dtype=torch.int64)
    start = 0
    for f, (n, _) in zip(files, sizes):
        data, lab = read_imagenet_npz(f)
        images[start:start + n] = torch.from_numpy(data)
        labels[start:start + n] = torch.from_numpy(lab)
        start += n
    return ImageStore.from_tensor(images, 256, labels)


# ---------------------------------------------------------------- data sets of shared.data_sources


def _open_source(name: str, path: str, storage: str) -> tuple[ImageStore, list[str], dict[str, Any]]:
    """The store of one source, the strings its identity is hashed from, and its meta data."""
    root = Path(path).expanduser()
    if name == "imagenet_npz":
        if storage == "stream":
            raise StoreError(f"data.storage=stream reads memory-mapped shards; an .npz cannot be mapped: convert "
                             f"{str(root)!r} once with `flowdistill prepare-data {root} <folder>` and train with "
                             "data.name=shards data.path=<folder>, or use data.storage=uint8")
        store = load_imagenet_npz(root)
        digest = parts_key([store.tensor.numpy().tobytes(), store.labels.numpy().tobytes()], 64)
        return store, [digest], {"source": str(root)}
    manifest = read_manifest(root)
    store = open_shards(root)
    if storage != "stream":
        store = ImageStore.from_tensor(store.all_images(), store.levels, store.labels)
    identity = [e["sha256"] for e in manifest["shards"]] + [(manifest.get("labels") or {}).get("sha256", "")]
    return store, identity, {"source": str(root), **manifest.get("meta", {})}


def read_stored(cfg: DataConfig, split: Split) -> tuple[ImageStore, ImageStore, str, dict[str, Any]]:
    """Train and test uint8 stores of `cfg` (data sets `shards` and `imagenet_npz`), their fingerprint and meta.

    The test split is `data.test_path` when set, else the seeded share `split` draws. `data.storage`:
    stream keeps shards memory-mapped; memory and uint8 read the images into memory as uint8.
    """
    what = "a shard folder written by `flowdistill prepare-data`" if cfg.name == "shards" else \
        "a downsampled-ImageNet .npz file or a folder of them"
    if not cfg.path or not Path(cfg.path).expanduser().exists():
        raise StoreError(f"data set {cfg.name!r} needs data.path=... set to {what}"
                         + (f"; {cfg.path!r} does not exist" if cfg.path else ""))
    store, identity, meta = _open_source(cfg.name, cfg.path, cfg.storage)
    if cfg.image_size and cfg.image_size != store.shape[-1]:
        raise StoreError(f"data.image_size={cfg.image_size} but {cfg.path!r} holds {store.shape[-1]}x"
                         f"{store.shape[-1]} images; stored images are not resized (set data.image_size=0 or "
                         "prepare the data at that size)")
    if cfg.test_path:
        test, test_identity, _ = _open_source(cfg.name, cfg.test_path, cfg.storage)
        if test.shape != store.shape or test.levels != store.levels:
            raise StoreError(f"data.test_path={cfg.test_path!r} holds images {test.shape} with {test.levels} levels; "
                             f"data.path holds {store.shape} with {store.levels}")
        identity += ["test"] + test_identity
        train = store
    else:
        rows_train, rows_test = split(len(store))
        train, test = store.subset(rows_train), store.subset(rows_test)
        identity += [f"split/{cfg.seed}/{cfg.test_fraction}"]
    return train, test, content_key("/".join([cfg.name] + identity), 16), meta


# ---------------------------------------------------------------- prepare-data


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_chunks(root: Path, image_size: int, chunk: int = 1024) -> tuple[list[str] | None, Iterator[tuple]]:
    """Class names (None without class subfolders) and an iterator of (uint8 (b, C, H, W), labels (b,) | None).

    Greyscale when every image is ("1", "L", "LA"), else RGB; `image_size` > 0 resizes (bicubic) to a
    square side, 0 requires every image to have the first one's size.
    """
    from PIL import Image, UnidentifiedImageError

    files = image_files(root)
    if not files:
        raise StoreError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(root)!r}")
    modes = set()
    for f in files:
        try:
            with Image.open(f) as img:
                modes.add(img.mode)
        except (OSError, UnidentifiedImageError) as err:
            raise StoreError(f"cannot read image {str(f)!r}: {err}") from None
    mode = "L" if modes <= {"1", "L", "LA"} else "RGB"
    relative = [f.relative_to(root).parts for f in files]
    classes = sorted({p[0] for p in relative}) if all(len(p) > 1 for p in relative) else None

    def chunks() -> Iterator[tuple]:
        size = None
        for start in range(0, len(files), chunk):
            arrays, labels = [], []
            for f, parts in zip(files[start:start + chunk], relative[start:start + chunk]):
                with Image.open(f) as img:
                    picture = img.convert(mode)
                if image_size > 0:
                    picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
                size = size or picture.size
                if picture.size != size:
                    raise StoreError(f"image {str(f)!r} is {picture.size[0]}x{picture.size[1]} but {str(files[0])!r} "
                                     f"is {size[0]}x{size[1]}; pass --image-size to resize all")
                arrays.append(np.asarray(picture, dtype=np.uint8).reshape(size[1], size[0], -1).transpose(2, 0, 1))
                if classes is not None:
                    labels.append(classes.index(parts[0]))
            yield np.stack(arrays), (np.asarray(labels, dtype=np.int64) if classes is not None else None)

    return classes, chunks()


def prepare_data(source: str | Path, out: str | Path, fmt: str = "auto", image_size: int = 0,
                 shard_mb: float = 256.0, overwrite: bool = False) -> dict[str, Any]:
    """Convert a folder of images (`fmt=folder`) or downsampled-ImageNet .npz files (`imagenet_npz`) into a
    shard folder `out` of uint8 shards of about `shard_mb` MiB each; returns the manifest.

    `fmt=auto` picks imagenet_npz for an .npz file or a folder of .npz files, else folder.
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.exists():
        raise StoreError(f"{str(source)!r} does not exist: give a folder of images or downsampled-ImageNet .npz files")
    if fmt == "auto":
        fmt = "imagenet_npz" if source.suffix == ".npz" or (source.is_dir() and any(source.glob("*.npz"))) else "folder"
    if fmt not in ("folder", "imagenet_npz"):
        raise StoreError(f"--format {fmt!r}: expected auto, folder or imagenet_npz")
    if shard_mb <= 0:
        raise StoreError(f"--shard-mb must be > 0, got {shard_mb}")
    if (out / MANIFEST).exists():
        if not overwrite:
            raise StoreError(f"{str(out)!r} already holds a shard folder; pass --overwrite to replace it")
        (out / MANIFEST).unlink()  # the folder is incomplete from now on until the new manifest is written
    meta: dict[str, Any] = {"source": str(source), "format": fmt}
    if fmt == "folder":
        classes, chunks = folder_chunks(source, image_size)
        if classes is not None:
            meta["classes"] = classes
    else:
        if image_size:
            raise StoreError("--image-size does not apply to .npz sources (their images are not resized)")
        chunks = (read_imagenet_npz(f) for f in npz_files(source))
    writer = None
    for images, labels in chunks:
        if writer is None:
            row = math.prod(images.shape[1:])
            writer = ShardWriter(out, 256, max(1, int(shard_mb * 2**20) // row))
        for start in range(0, len(images), writer.shard_rows):
            writer.add(images[start:start + writer.shard_rows],
                       None if labels is None else labels[start:start + writer.shard_rows])
    manifest = writer.close(meta)
    keep = {e["file"] for e in manifest["shards"]} | {LABELS if manifest["labels"] else ""}
    for stale in list(out.glob("images_*.npy")) + ([out / LABELS] if not manifest["labels"] else []):
        if stale.name not in keep:  # left by an earlier, larger conversion into the same folder
            stale.unlink(missing_ok=True)
    return manifest
