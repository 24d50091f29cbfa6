"""Training batches from uint8 images: held whole on the device, or read by DataLoader workers.

The trainer's in-memory path (`shared.trainer.EpochSampler` over float32 tensors) stays the path of the
small bundled sets. A data set kept as uint8 (`data.storage`, see `shared.image_store`) gives the
trainer a batch source instead, with `batch(step) -> (x, labels?)` on the training device:

    uint8   `DeviceBatches`: the uint8 images sit on the device (a quarter of float32); each batch is
            gathered and converted there with `shared.data.image_to_model`.
    stream  `LoaderBatches`: a torch DataLoader whose workers read rows from memory-mapped shards; the
            per-process share is Accelerate's `BatchSamplerShard` over the global batches.

Both draw the very rows `EpochSampler` would draw for (seed, step, process), so every storage gives
the same batches, and a resumed run (any storage) repeats the uninterrupted one: process r at step k
gets global batch k * world + r of the epoch's seeded permutation.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from accelerate.data_loader import BatchSamplerShard
from torch import Tensor
from torch.utils.data import DataLoader

from shared.data import Dataset, image_to_model
from shared.image_store import ImageStore, StoredImages
from shared.trainer import Batch, EpochSampler

STORAGES = ("memory", "uint8", "stream")  # data.storage choices (shared.config)


class DeviceBatches:
    """data.storage=uint8: the store's images and labels moved to `device` once, batches converted there."""

    def __init__(self, store: ImageStore, batch_size: int, seed: int, rank: int, world: int,
                 device: torch.device | str):
        self.device, self.levels = torch.device(device), store.levels
        self.images = store.all_images().to(self.device)
        labels = store.all_labels()
        self.labels = None if labels is None else labels.to(self.device)
        self.sampler = EpochSampler(len(store), batch_size, seed, rank, world)

    def batch(self, step: int) -> Batch:
        """(x float32 (B, C, H, W) in [-1, 1], labels (B,) if any) of this process at `step`."""
        idx = self.sampler.indices(step).to(self.device, non_blocking=True)
        x = image_to_model(self.images[idx], self.levels)
        return (x,) if self.labels is None else (x, self.labels[idx])


class GlobalBatches:
    """Every process's batches from step `start` to `steps`, in the order k * world + r (a batch sampler).

    Global batch k * world + r is what `EpochSampler(rank=r)` gives at step k; Accelerate's
    `BatchSamplerShard` then hands batch j to process j % world.
    """

    drop_last = True

    def __init__(self, n: int, batch_size: int, seed: int, world: int, start: int, steps: int):
        self.batch_size, self.world, self.start, self.steps = batch_size, world, start, steps
        self.samplers = [EpochSampler(n, batch_size, seed, r, world) for r in range(world)]

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            for sampler in self.samplers:
                yield sampler.indices(step).tolist()


class StoreRows(torch.utils.data.Dataset):
    """Map-style dataset over an ImageStore whose `__getitems__` reads a whole batch: (uint8 images, labels?)."""

    def __init__(self, store: ImageStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, row: int) -> tuple[Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([row]))

    def __getitems__(self, rows: list[int]) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(rows, dtype=torch.int64)
        labels = self.store.labels_at(idx)
        images = self.store.gather(idx)
        return (images,) if labels is None else (images, labels)


def _keep_batch(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """collate_fn: `StoreRows.__getitems__` already returns the batch."""
    return batch


class LoaderBatches:
    """data.storage=stream: DataLoader workers read uint8 rows; the device converts them to [-1, 1].

    The loader is (re)started at the first step asked for, so a resumed run continues the same batches.
    `workers` = 0 reads in the training process.
    """

    def __init__(self, store: ImageStore, batch_size: int, seed: int, rank: int, world: int,
                 device: torch.device | str, steps: int, workers: int = 4, prefetch: int = 4):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.rank, self.world, self.steps = rank, world, steps
        self.device, self.workers, self.prefetch = torch.device(device), workers, prefetch
        EpochSampler(len(store), batch_size, seed, rank, world)  # refuses a split smaller than one global batch
        self._iter: Iterator | None = None
        self._next = -1

    def loader(self, start: int) -> DataLoader:
        """The DataLoader of this process's batches from step `start` on."""
        shard = BatchSamplerShard(GlobalBatches(len(self.store), self.batch_size, self.seed, self.world, start,
                                                self.steps), num_processes=self.world, process_index=self.rank)
        extra: dict[str, Any] = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        return DataLoader(StoreRows(self.store), batch_sampler=shard, num_workers=self.workers,
                          collate_fn=_keep_batch, pin_memory=self.device.type == "cuda", **extra)

    def batch(self, step: int) -> Batch:
        """(x float32 (B, C, H, W) in [-1, 1], labels (B,) if any) of this process at `step`."""
        if self._iter is None or step != self._next:
            self._iter, self._next = iter(self.loader(step)), step
        parts = next(self._iter)
        self._next += 1
        x = image_to_model(parts[0].to(self.device, non_blocking=True), self.store.levels)
        return (x, *(p.to(self.device, non_blocking=True) for p in parts[1:]))

    def close(self) -> None:
        """Stop the workers."""
        self._iter = None


def batch_source(dataset: Dataset, storage: str, batch_size: int, seed: int, rank: int, world: int,
                 device: torch.device | str, steps: int, workers: int) -> DeviceBatches | LoaderBatches:
    """The trainer's batch source for a data set kept as uint8 (`dataset.train` a `StoredImages` view)."""
    if not isinstance(dataset.train, StoredImages):
        raise ValueError(f"data.storage={storage} needs a data set kept as uint8 (shards, imagenet_npz)")
    store = dataset.train.store
    if storage == "uint8":
        return DeviceBatches(store, batch_size, seed, rank, world, device)
    return LoaderBatches(store, batch_size, seed, rank, world, device, steps, workers)
