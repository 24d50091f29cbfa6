"""Which device computes: a `--device` name resolved, and whether processes run on the CPU only."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch.device(name)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(name)!r} is not a device: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} is not available ({torch.cuda.device_count()} CUDA device(s) here); "
                         "use auto or cpu")
    return device


def cpu_only() -> bool:
    """Whether no CUDA device is visible: Accelerate is then asked for CPU processes, so a multi-process
    launch talks through gloo."""
    return not torch.cuda.is_available()
