"""Streamed training data: images/s and resident memory of data.storage=stream as the shard set grows.

For each size, a synthetic uint8 image set (uniform noise, C x S x S, random labels) is written as
memory-mapped shards with `shared.image_store.ShardWriter` into a temporary folder, opened as the `shards`
data set with data.storage=stream, and read through the trainer's batch source (`shared.streaming.batch_source`,
DataLoader workers) for a fixed number of batches, each converted to float32 on the device as in training.
Memory is the resident set of the training process plus its workers (from /proc: the RSS sum counts pages
shared between them once per process, the PSS sum splits them, and PSS is split again into anonymous memory
and mapped file pages), sampled after the warm-up batches (start), every few batches (peak) and after the
last batch (end). The temporary folder is deleted afterwards.

Run from the repository root:
    python -m bench.benchmarks.bench_streaming [--device cpu|cuda] [--sizes-gb 0.25,2] [--batch 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import report, setup
from shared.config import DataConfig
from shared.data_sources import load_dataset
from shared.image_store import ShardWriter
from shared.streaming import batch_source
from shared.timing import sync

MB = 2 ** 20
COLUMNS = {"size_gb": "set GB", "images": "images", "shards": "shards", "batch": "batch", "workers": "workers",
           "timed_batches": "timed batches", "images_per_s": "images/s", "mb_per_s": "MB/s",
           "rss_start_mb": "RSS start MB", "rss_peak_mb": "RSS peak MB", "pss_start_mb": "PSS start MB",
           "pss_end_mb": "PSS end MB", "pss_peak_mb": "PSS peak MB", "anon_start_mb": "anon PSS start MB",
           "anon_peak_mb": "anon PSS peak MB", "file_peak_mb": "file PSS peak MB", "write_s": "write s"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where batches are converted (auto: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--sizes-gb", default="0.25,2", help="comma-separated image-set sizes in GiB")
    parser.add_argument("--image-size", type=int, default=64, help="square side S of the images")
    parser.add_argument("--channels", type=int, default=3, help="channels C of the images")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="MiB per shard file")
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: read in this process)")
    parser.add_argument("--batches", type=int, default=400, help="batches read per size, warm-up included")
    parser.add_argument("--warmup", type=int, default=20, help="batches before the timing and the start sample")
    parser.add_argument("--repeats", type=int, default=5,
                        help="the timed batches are split into this many segments; the median rate is reported")
    parser.add_argument("--sample-every", type=int, default=10, help="batches between two memory samples")
    parser.add_argument("--tmp", default="", help="folder for the temporary shard sets (default: the system's)")
    parser.add_argument("--out", default="", help="JSON output (default: bench/results/bench_streaming-<device>.json)")
    args = parser.parse_args(argv)
    if args.batches <= args.warmup or args.repeats < 1 or args.batches - args.warmup < args.repeats:
        parser.error(f"--batches ({args.batches}) must exceed --warmup ({args.warmup}) by at least --repeats "
                     f"({args.repeats})")
    return args


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (the DataLoader workers), from /proc/<pid>/stat."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


SMAPS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file"}  # smaps_rollup line -> key


def _smaps_mb(pid: int) -> dict[str, float]:
    """RSS, PSS and PSS of anonymous and of file-backed pages of one process in MiB; zeros if it ended."""
    values = dict.fromkeys(SMAPS.values(), 0.0)
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, *rest = line.split()
            if key in SMAPS:
                values[SMAPS[key]] = float(rest[0]) / 1024  # kB
    except OSError:
        pass
    return values


def memory_mb() -> dict[str, float]:
    """`SMAPS` sizes (MiB) summed over this process and its children, and the number of processes counted."""
    pids = [os.getpid(), *_children(os.getpid())]
    sizes = [_smaps_mb(pid) for pid in pids]
    return {**{k: sum(s[k] for s in sizes) for k in SMAPS.values()}, "processes": len(pids)}


def write_set(folder: Path, images: int, shape: tuple[int, int, int], shard_mb: float, seed: int) -> int:
    """Write `images` uniform-noise uint8 images of `shape` with labels as shards; returns the shard count."""
    row = math.prod(shape)
    writer = ShardWriter(folder, 256, max(1, int(shard_mb * MB) // row))
    rng = np.random.default_rng(seed)
    chunk = max(1, (64 * MB) // row)
    for start in range(0, images, chunk):
        n = min(chunk, images - start)
        writer.add(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 1000, n, dtype=np.int64))
    return len(writer.close({"source": "bench_streaming synthetic noise"})["shards"])


def stream(folder: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Read `args.batches` batches of the shard set through the trainer's stream batch source."""
    dataset = load_dataset(DataConfig(name="shards", path=str(folder), storage="stream", test_fraction=0.01,
                                      workers=args.workers))
    if len(dataset.train) < args.batch:
        raise SystemExit(f"the set holds {len(dataset.train)} training images, fewer than one batch of "
                         f"{args.batch}: raise --sizes-gb or lower --batch")
    source = batch_source(dataset, "stream", args.batch, 0, 0, 1, device, args.batches, args.workers)
    timed = args.batches - args.warmup
    bounds = [args.warmup + round(i * timed / args.repeats) for i in range(args.repeats + 1)]
    marks: dict[int, float] = {}
    peak = dict.fromkeys(SMAPS.values(), 0.0)
    start: dict[str, float] = {}
    try:
        for step in range(args.batches):
            if step in bounds:
                sync(device)
                marks[step] = time.perf_counter()
            if step == args.warmup:
                start = memory_mb()
            x = source.batch(step)[0]
            if step % args.sample_every == 0:
                sample = memory_mb()
                peak = {k: max(peak[k], sample[k]) for k in peak}
        sync(device)
        marks[args.batches] = time.perf_counter()
        end = memory_mb()
    finally:
        source.close()
    peak = {k: max(peak[k], start[k], end[k]) for k in peak}
    rates = [args.batch * (b - a) / (marks[b] - marks[a]) for a, b in zip(bounds, bounds[1:])]
    rate = statistics.median(rates)
    memory = {f"{k}_{when}_mb": sample[k] for when, sample in (("start", start), ("end", end), ("peak", peak))
              for k in SMAPS.values()}
    return {"train_images": len(dataset.train), "image_shape": list(x.shape[1:]), "timed_batches": timed,
            "images_per_s": rate, "images_per_s_per_repeat": rates,
            "mb_per_s": rate * math.prod(dataset.train.shape[1:]) / MB, **memory, "processes": end["processes"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark for every size, print a Markdown table and write JSON."""
    args = parse_args(argv)
    device = setup(args)
    shape = (args.channels, args.image_size, args.image_size)
    sizes = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    parent = Path(args.tmp) if args.tmp else Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    need = 1.05 * max(sizes) * 2 ** 30 + 256 * MB
    if free < need:
        raise SystemExit(f"{parent} has {free / 2 ** 30:.2f} GiB free; the largest set needs {need / 2 ** 30:.2f} "
                         "GiB: pass --tmp on a larger disk or lower --sizes-gb")
    rows = []
    for size in sizes:
        images = max(2, int(size * 2 ** 30) // math.prod(shape))
        folder = Path(tempfile.mkdtemp(prefix="bench_streaming-", dir=parent))
        try:
            t0 = time.perf_counter()
            shards = write_set(folder, images, shape, args.shard_mb, seed=0)
            write_s = time.perf_counter() - t0
            row = {"size_gb": size, "images": images, "shards": shards, "batch": args.batch,
                   "workers": args.workers, "write_s": write_s, **stream(folder, args, device)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    notes = [f"synthetic uint8 noise images {'x'.join(map(str, shape))}, shards of {args.shard_mb:g} MiB written "
             "by ShardWriter into a temporary folder (deleted after each size); the files are freshly written, so "
             "reads mostly hit the page cache",
             f"{args.batches} batches per size through shared.streaming.batch_source(storage=stream), "
             f"{args.warmup} warm-up; images/s: median over {args.repeats} segments of the timed batches, each batch "
             "converted to float32 on the device",
             "memory: the training process plus its DataLoader workers, from /proc/<pid>/smaps_rollup; RSS counts "
             "pages shared between processes in each of them, PSS splits them; anon = heap (batches, Python), file = "
             "mapped shard pages (clean, reclaimable); start = after the warm-up, peak = max over samples every "
             f"{args.sample_every} batches, end = after the last batch"]
    return report("bench_streaming", args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
