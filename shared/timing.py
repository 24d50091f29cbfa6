"""Wall-clock timing of device work: a CUDA synchronisation, one timed call and the median of repeated calls.

Times are seconds of `time.perf_counter`. On CUDA the clock starts and stops only after the queued kernels have
finished, so a call's time includes the device work it launched; on the CPU the synchronisation is a no-op.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable, TypeVar

import torch

Result = TypeVar("Result")


def sync(device: torch.device) -> None:
    """Wait for the CUDA work queued on `device`; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Result], device: torch.device) -> tuple[float, Result]:
    """(wall seconds of one call `fn()` including the device work it queued, fn's return value)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: Iterable[float]) -> float:
    """Median of repeated measurements, in their own unit."""
    return float(statistics.median(list(values)))


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` timed calls of `fn()` after `warmup` untimed ones (warmup + repeats calls
    in all), each timed call including the device work it queued."""
    for _ in range(warmup):
        fn()
    return median(timed(fn, device)[0] for _ in range(repeats))
