"""shared.timing: calls made, the median of the timed calls, the result handed back; shared.machine: its keys."""
from __future__ import annotations

import os
import platform

import pytest
import torch

from shared import timing
from shared.machine import describe_machine

CPU = torch.device("cpu")


@pytest.fixture
def clock(monkeypatch):
    """A fake `time.perf_counter` for shared.timing that only moves when a test advances it (seconds)."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_median_seconds_makes_warmup_plus_repeats_calls():
    for warmup, repeats in ((1, 5), (0, 3), (3, 2)):
        calls = []
        timing.median_seconds(lambda: calls.append(1), CPU, repeats, warmup=warmup)
        assert len(calls) == warmup + repeats


def test_median_seconds_is_the_median_of_the_timed_calls_only(clock):
    durations = iter([100.0, 3.0, 1.0, 2.0])  # the first call is the untimed warm-up
    assert timing.median_seconds(lambda: clock(next(durations)), CPU, repeats=3) == 2.0
    durations = iter([4.0, 1.0, 10.0, 2.0])
    assert timing.median_seconds(lambda: clock(next(durations)), CPU, repeats=4, warmup=0) == 3.0


def test_timed_returns_the_call_seconds_and_the_functions_result(clock):
    def fn() -> dict:
        clock(0.25)
        return {"value": 7}

    assert timing.timed(fn, CPU) == (0.25, {"value": 7})


def test_median_of_measurements():
    assert timing.median([5.0, 1.0, 3.0]) == 3.0 and timing.median(iter([1.0, 2.0])) == 1.5


def test_describe_machine_has_the_keys_pipeline_reports_and_benchmarks_read():
    info = describe_machine(CPU)
    assert {"cpu", "cores", "torch", "python", "device", "threads"} <= set(info)  # pipeline evaluation and report
    assert {"torch_threads", "omp_num_threads"} <= set(info)  # benchmark JSON
    assert info["device"] == "cpu" and "gpu" not in info and "cuda" not in info
    assert info["threads"] == info["torch_threads"] == torch.get_num_threads()
    assert info["cores"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["python"] == platform.python_version() and info["cpu"]
