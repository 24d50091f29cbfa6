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


TOY_TEACHER = "recipes/toy2d/teacher.yaml"
SMALL_TEACHER = ["model.width=32", "model.head_dim=16", "model.blocks=4", "data.n_train=1000", "data.n_test=200",
                 "train.batch_size=128", "train.progress=false", "train.sample_grid=false"]


@pytest.fixture(scope="session")
def train_tiny_teacher():
    """`train(root, name, steps=40, seed=0) -> run dir`: a small TarFlow teacher on 1000 eight-gaussians points."""
    from pathlib import Path

    from flowdistill.cli import main

    recipe = str(Path(__file__).resolve().parents[1] / TOY_TEACHER)

    def train(root: Path, name: str, steps: int = 40, seed: int = 0) -> Path:
        assert main(["train", recipe, f"out_dir={root}", f"name={name}", f"train.steps={steps}", f"seed={seed}",
                     *SMALL_TEACHER]) == 0
        return root / name

    return train


@pytest.fixture(scope="session")
def nf_teacher_run(tmp_path_factory, train_tiny_teacher):
    """One tiny trained TarFlow teacher run shared by the NFM coupling tests (never modified by them)."""
    return train_tiny_teacher(tmp_path_factory.mktemp("nf"), "teacher")
