"""Shared pytest fixtures: an isolated feature cache and a CUDA skip marker."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Classifier caches go to a per-session temporary folder unless CI provides one."""
    import os

    if "FLOWDISTILL_CACHE" not in os.environ:
        monkeypatch.setenv("FLOWDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_configure(config):
    """One intra-op thread: the tests' models are tiny, and extra threads only contend on small CI machines."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
