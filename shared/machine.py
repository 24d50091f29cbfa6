"""What a measurement ran on: CPU model, cores, threads, load, Python, torch and GPU, as one flat dict."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows (processor, else architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """The machine and software behind a measurement on `device`, JSON-ready.

    Keys: cpu (model name), cores (logical CPUs), threads and torch_threads (both torch's intra-op thread count:
    the pipeline's reports read the first, the benchmarks' JSON the second), omp_num_threads (the environment
    variable, "" when unset), python, torch, device; load_avg_1m (1-minute load average) where the OS reports one;
    on CUDA gpu (device name) and cuda (toolkit version torch was built with).
    """
    threads = torch.get_num_threads()
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
