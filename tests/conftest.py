"""Shared pytest fixtures: an isolated feature cache, a CUDA skip marker, tiny teachers and a fake CIFAR-10."""
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
                 "train.batch_size=128", "train.progress=false", "train.sample_grid=false",
                 "model.transform=affine", "data.val_fraction=0", "train.eval_every=0"]  # tiny, affine, no val split


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


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """`(root, batches)`: a CIFAR-10 folder in torchvision's layout with 10 random train and 3 test images.

    The files cannot match the real archive's md5 sums, so torchvision's integrity check is reduced to
    an existence check for the test's duration. `batches[name]` holds each file's `data` and `labels`.
    """
    import os
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return folder.parent, batches
