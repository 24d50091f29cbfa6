"""Images kept as uint8: in memory, or in `.npy` shards on disk described by a JSON manifest.

A shard folder (written once by `flowdistill prepare-data`, see `shared.image_sources`) holds

    manifest.json        format, shape (C, H, W), count, levels, per-shard row counts and sha256
    images_00000.npy     uint8 (n_0, C, H, W), C-contiguous, one file per shard
    labels.npy           int64 (count,) class indices (only when the source had classes)

Every file is written through `shared.checkpoint.atomic_write_via` and the manifest last, so a folder
with a manifest is complete. An `ImageStore` reads rows of such a folder (or of an in-memory uint8
tensor) as uint8 batches; the float conversion x = (v + 0.5) / levels * 2 - 1 stays in one place,
`shared.data.image_to_model`, which this module (below `shared.data`) receives as an argument.

Resident memory stays flat while streaming: rows of a shard are read with positional reads
(`os.preadv`) straight into the batch's buffer, so what was read lives in the kernel's page cache,
shared and reclaimable, and never in the process's resident set (a memory map would keep every page
it touched, up to the size of the set).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from shared.checkpoint import atomic_write_text, atomic_write_via, sha256_file

MANIFEST = "manifest.json"
FORMAT = "flowdistill-image-shards"
LABELS = "labels.npy"
MATERIALIZE_LIMIT = 4 << 30  # bytes of float32 a streamed view may turn into one tensor (validation, test slices)
Convert = Callable[[Tensor, int], Tensor]  # uint8 levels (B, C, H, W), levels -> float32 (shared.data.image_to_model)


class StoreError(ValueError):
    """A shard folder, manifest or array that is missing, malformed or does not match its manifest."""


def shard_name(index: int) -> str:
    """File name of shard `index` inside a shard folder."""
    return f"images_{index:05d}.npy"


def _npy_header(path: Path) -> tuple[tuple[int, ...], int]:
    """Shape of the C-ordered uint8 array in an .npy file and the byte offset of its data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if dtype != np.uint8 or fortran or len(shape) != 4:
        raise StoreError(f"{str(path)!r} holds a {dtype} array of shape {shape}; expected C-ordered uint8 (n, C, H, W)")
    return tuple(shape), offset


class ImageStore:
    """uint8 images (N, C, H, W) with `levels` grey levels per channel and optional int64 labels (N,).

    Backed by an in-memory tensor or by memory-mapped shard files; `rows` (when set) selects and orders
    a subset of the backing rows, so splits are views that copy nothing. Picklable for DataLoader
    workers: shard files are reopened in each process.
    """

    def __init__(self, levels: int, shape: tuple[int, int, int], *, tensor: Tensor | None = None,
                 shards: list[tuple[Path, int]] | None = None, labels: Tensor | None = None,
                 rows: Tensor | None = None):
        if (tensor is None) == (shards is None):
            raise ValueError("an ImageStore is backed by either a tensor or shard files")
        self.levels, self.shape = int(levels), tuple(int(s) for s in shape)
        self.tensor = tensor
        self.shards = shards or []
        self.starts = np.cumsum([0] + [n for _, n in self.shards]) if shards else None
        self.total = len(tensor) if tensor is not None else int(self.starts[-1])
        self.labels = labels
        self.rows = rows
        self._files: list[tuple[int, int]] | None = None  # per shard: (file descriptor, data offset)

    @classmethod
    def from_tensor(cls, images: Tensor, levels: int, labels: Tensor | None = None) -> "ImageStore":
        """An in-memory store of uint8 images (N, C, H, W)."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise StoreError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        return cls(levels, tuple(images.shape[1:]), tensor=images.contiguous(), labels=labels)

    # ------------------------------------------------------------------ size and views

    def __len__(self) -> int:
        return self.total if self.rows is None else len(self.rows)

    @property
    def in_memory(self) -> bool:
        """Whether the images live in a tensor (else in memory-mapped shard files)."""
        return self.tensor is not None

    @property
    def row_bytes(self) -> int:
        """Bytes of one uint8 image."""
        return math.prod(self.shape)

    def subset(self, rows: Tensor) -> "ImageStore":
        """A view of rows `rows` (int64 (M,) indices into this store), sharing the backing data."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        base = rows if self.rows is None else self.rows[rows]
        view = ImageStore.__new__(ImageStore)
        view.__dict__.update(self.__dict__)
        view.rows, view._files = base, None
        return view

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = None
        return state

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_files", None) or []:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def _backing(self, rows: Tensor) -> np.ndarray:
        """Backing row numbers (int64 numpy) of this store's rows `rows`."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        base = rows if self.rows is None else self.rows[rows]
        return base.numpy()

    def gather(self, rows: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) of rows `rows` (int64 (B,)), in that order."""
        base = self._backing(rows)
        if self.tensor is not None:
            return self.tensor[torch.from_numpy(base)]
        if self._files is None:
            self._files = [(os.open(path, os.O_RDONLY), _npy_header(path)[1]) for path, _ in self.shards]
        out = np.empty((len(base), self.row_bytes), dtype=np.uint8)
        shard = np.searchsorted(self.starts, base, side="right") - 1
        size = self.row_bytes
        for k in np.unique(shard):
            fd, offset = self._files[k]
            picked = np.flatnonzero(shard == k)
            local = base[picked] - self.starts[k]
            order = np.argsort(local, kind="stable")  # read each shard in file order
            for i, row in zip(picked[order].tolist(), local[order].tolist()):
                if os.preadv(fd, [out[i].data], offset + row * size) != size:
                    raise StoreError(f"{str(self.shards[k][0])!r} ended before row {row}: the shard is cut short")
        return torch.from_numpy(out.reshape(len(base), *self.shape))

    def labels_at(self, rows: Tensor) -> Tensor | None:
        """int64 labels (B,) of rows `rows`, or None for unlabelled data."""
        return None if self.labels is None else self.labels[torch.from_numpy(self._backing(rows))]

    def all_images(self) -> Tensor:
        """Every image of the store as one uint8 tensor (N, C, H, W) in memory."""
        if self.tensor is not None and self.rows is None:
            return self.tensor
        return self.gather(torch.arange(len(self)))

    def all_labels(self) -> Tensor | None:
        """Every label (N,) int64, or None."""
        return None if self.labels is None else self.labels_at(torch.arange(len(self)))


class StoredImages:
    """A float32 view (N, C, H, W) of an `ImageStore`: indexing converts only the rows it returns.

    Stands in for `Dataset.train`/`test` when a data set stays uint8 (`data.storage` uint8 or stream):
    `len`, `shape`, `x[i]`, `x[a:b]` and `x[index_tensor]` work like on a tensor; turning the whole view
    into a tensor (`.to(device)`, `.float()`, `np.asarray`) is refused beyond `MATERIALIZE_LIMIT` bytes.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, store: ImageStore, convert: Convert):
        self.store, self.convert = store, convert

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.store), *self.store.shape))

    def dim(self) -> int:
        return 4

    def subset(self, rows: Tensor) -> "StoredImages":
        """A view of rows `rows` (int64 (M,)), sharing the backing data."""
        return StoredImages(self.store.subset(rows), self.convert)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, int):
            return self[torch.tensor([key])][0]
        if isinstance(key, slice):
            key = torch.arange(len(self))[key]
        return self.convert(self.store.gather(torch.as_tensor(key, dtype=torch.int64)), self.store.levels)

    def materialize(self) -> Tensor:
        """Every image as one float32 tensor (N, C, H, W); refused when it would exceed MATERIALIZE_LIMIT."""
        need = len(self) * self.store.row_bytes * 4
        if need > MATERIALIZE_LIMIT:
            raise StoreError(f"this use needs the whole split as float32 ({need / 2**30:.1f} GiB), more than "
                             f"{MATERIALIZE_LIMIT / 2**30:.0f} GiB; it is kept as uint8 (data.storage) to stream it")
        return self[:]

    def to(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.materialize().to(*args, **kwargs)

    def float(self) -> Tensor:
        return self.materialize()

    def contiguous(self) -> Tensor:
        return self.materialize()

    def numpy(self) -> np.ndarray:
        return self.materialize().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


# ---------------------------------------------------------------- shard folders


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write one .npy file atomically (readers see the old file or the whole new one)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    atomic_write_via(path, write)


class ShardWriter:
    """Collects uint8 images (and labels) chunk by chunk and writes them as shards of `shard_rows` rows.

    `add(images, labels)` with images uint8 (b, C, H, W); `close(meta)` writes the last shard, the labels
    and then the manifest, and returns the manifest. Only `shard_rows` images are held at a time.
    """

    def __init__(self, folder: str | Path, levels: int, shard_rows: int):
        if shard_rows < 1:
            raise StoreError(f"shard size must be at least 1 image, got {shard_rows}")
        self.folder, self.levels, self.shard_rows = Path(folder), int(levels), int(shard_rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape: tuple[int, ...] | None = None
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.labels: list[np.ndarray] = []
        self.labelled: bool | None = None  # whether the chunks come with labels (set by the first chunk)
        self.entries: list[dict[str, Any]] = []

    def add(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append uint8 images (b, C, H, W) and their int64 labels (b,) (None: unlabelled)."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise StoreError(f"expected uint8 images (b, C, H, W), got {images.dtype} {images.shape}")
        if self.shape is None:
            self.shape = images.shape[1:]
        elif images.shape[1:] != self.shape:
            raise StoreError(f"images of shape {images.shape[1:]} after images of shape {self.shape}; "
                             "all images of a shard folder have one shape (resize them)")
        if self.labelled is None:
            self.labelled = labels is not None
        elif self.labelled != (labels is not None):
            raise StoreError("labels for some chunks of images but not for others: give labels for all or none")
        if labels is not None:
            self.labels.append(np.asarray(labels, dtype=np.int64).reshape(-1))
        self.pending.append(images)
        self.pending_rows += len(images)
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending images as the next shard."""
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        shard, rest = block[:rows], block[rows:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        path = self.folder / shard_name(len(self.entries))
        _save_npy(path, shard)
        self.entries.append({"file": path.name, "count": int(len(shard)), "sha256": sha256_file(path)})

    def close(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the last shard, the labels and the manifest; return the manifest."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        count = sum(e["count"] for e in self.entries)
        if not count:
            raise StoreError("no images were written")
        manifest: dict[str, Any] = {"format": FORMAT, "version": 1, "shape": list(self.shape), "count": count,
                                    "levels": self.levels, "dtype": "uint8", "shards": self.entries, "labels": None,
                                    "meta": meta or {}}
        if self.labels:
            labels = np.concatenate(self.labels)
            if len(labels) != count:
                raise StoreError(f"{len(labels)} labels for {count} images: give labels for every chunk or none")
            _save_npy(self.folder / LABELS, labels)
            manifest["labels"] = {"file": LABELS, "sha256": sha256_file(self.folder / LABELS)}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder, checked for the fields and the files it names."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise StoreError(f"{str(folder)!r} has no {MANIFEST}: not a shard folder written by `flowdistill prepare-data`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{str(path)!r} is not a {FORMAT} manifest")
    missing = [k for k in ("shape", "count", "levels", "shards") if k not in manifest]
    if missing:
        raise StoreError(f"{str(path)!r} lacks {', '.join(missing)}")
    if sum(e["count"] for e in manifest["shards"]) != manifest["count"]:
        raise StoreError(f"{str(path)!r}: the shard counts do not add up to count={manifest['count']}")
    for entry in manifest["shards"] + ([manifest["labels"]] if manifest.get("labels") else []):
        if not (folder / entry["file"]).is_file():
            raise StoreError(f"{str(folder / entry['file'])!r} named in {MANIFEST} is missing")
    return manifest


def verify_shards(folder: str | Path) -> None:
    """Recompute every file's sha256 and compare it with the manifest (reads the whole folder once)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for entry in manifest["shards"] + ([manifest["labels"]] if manifest.get("labels") else []):
        if sha256_file(folder / entry["file"]) != entry["sha256"]:
            raise StoreError(f"{str(folder / entry['file'])!r} does not match the sha256 in {MANIFEST} "
                             "(changed or damaged since prepare-data wrote it)")


def open_shards(folder: str | Path, verify: bool = False) -> ImageStore:
    """The memory-mapped store of a shard folder (labels loaded into memory); `verify` checks every sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_shards(folder)
    shape = tuple(manifest["shape"])
    shards = []
    for entry in manifest["shards"]:
        found, _ = _npy_header(folder / entry["file"])
        if found != (entry["count"], *shape):
            raise StoreError(f"{str(folder / entry['file'])!r} holds {found}; the manifest says "
                             f"{(entry['count'], *shape)}")
        shards.append((folder / entry["file"], int(entry["count"])))
    labels = None
    if manifest.get("labels"):
        labels = torch.from_numpy(np.load(folder / manifest["labels"]["file"], allow_pickle=False).astype(np.int64))
        if len(labels) != manifest["count"]:
            raise StoreError(f"{str(folder / LABELS)!r} holds {len(labels)} labels for {manifest['count']} images")
    return ImageStore(int(manifest["levels"]), shape, shards=shards, labels=labels)
