"""flowdistill: distil generative flows (NF teachers, NFM students, F2D2 flow maps).

The public API (`train`, `load_run`, `sample`, `log_likelihood`, `resolve_config`, `save_teacher`) lives in
`flowdistill.api` and is imported on first use, so `flowdistill --help` does not import torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Run", "RunConfig", "load_run", "log_likelihood", "resolve_config", "resolve_device", "sample",
           "save_teacher", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flowdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'flowdistill' has no attribute {name!r}")
