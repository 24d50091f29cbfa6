"""uint8 storage and streaming: same batches as the in-memory path, sharding, ImageNet .npz, prepare-data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from flowdistill.api import resolve_config
from flowdistill.cli import main
from nfm.couplings import IndependentCoupling
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from shared.backbones import MLPConfig, build_mlp
from shared.config import ConfigError, DataConfig, TrainConfig
from shared.data import DataError, image_to_model
from shared.data_sources import load_dataset
from shared.image_sources import prepare_data
from shared.image_store import MANIFEST, ImageStore, ShardWriter, StoredImages, StoreError, open_shards, verify_shards
from shared.streaming import DeviceBatches, LoaderBatches
from shared.trainer import EpochSampler, Trainer


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as uint8 (1797, 1, 8, 8) with 17 levels, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images.astype(np.uint8))[:, None], torch.from_numpy(d.target).long()


def _write(folder, images: torch.Tensor, labels: torch.Tensor | None, levels: int, rows: int) -> None:
    writer = ShardWriter(folder, levels, rows)
    for start in range(0, len(images), 100):  # chunks that straddle shard boundaries
        writer.add(images[start:start + 100].numpy(), None if labels is None else labels[start:start + 100].numpy())
    writer.close({"source": "test"})


@pytest.fixture(scope="module")
def digit_stores(tmp_path_factory):
    """(float32 images, labels, in-memory store, memory-mapped store) of the digits (shards of 500 rows)."""
    images, labels = _digits()
    folder = tmp_path_factory.mktemp("digit_shards")
    _write(folder, images, labels, 17, 500)
    return image_to_model(images, 17), labels, ImageStore.from_tensor(images, 17, labels), open_shards(folder, True)


@pytest.mark.parametrize("world", [1, 2])
def test_uint8_and_memory_mapped_batches_equal_the_in_memory_path(digit_stores, world):
    floats, labels, memory, mapped = digit_stores
    steps = 2 * (len(floats) // (64 * world)) + 3  # into the third epoch
    for rank in range(world):
        sampler = EpochSampler(len(floats), 64, 7, rank, world)
        device = DeviceBatches(memory, 64, 7, rank, world, "cpu")
        for workers in (0, 2):
            loader = LoaderBatches(mapped, 64, 7, rank, world, "cpu", steps, workers=workers)
            for step in list(range(steps)) if workers == 0 else [0, 1, steps - 1]:
                idx = sampler.indices(step)
                for source in (device, loader):
                    x, y = source.batch(step)
                    assert torch.equal(x, floats[idx]) and torch.equal(y, labels[idx]), (rank, workers, step)


def test_sharding_gives_disjoint_complete_coverage_across_two_processes():
    n, batch, world = 640, 32, 2
    store = ImageStore.from_tensor(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), 2, torch.arange(n))  # label = row
    per_epoch = n // (batch * world)
    seen = {}
    for rank in range(world):
        source = LoaderBatches(store, batch, 3, rank, world, "cpu", steps=2 * per_epoch, workers=0)
        rows = [source.batch(step)[1] for step in range(2 * per_epoch)]
        for step, r in enumerate(rows):
            assert torch.equal(r, EpochSampler(n, batch, 3, rank, world).indices(step))
        seen[rank] = [torch.cat(rows[:per_epoch]), torch.cat(rows[per_epoch:])]
    for epoch in range(2):
        a, b = seen[0][epoch], seen[1][epoch]
        assert not set(a.tolist()) & set(b.tolist())  # disjoint
        assert sorted(a.tolist() + b.tolist()) == list(range(n))  # complete
    assert not torch.equal(seen[0][0], seen[0][1])  # a fresh permutation per epoch


def test_a_loader_restarted_mid_run_continues_the_same_batches(digit_stores):
    floats, _, _, mapped = digit_stores
    loader = LoaderBatches(mapped, 64, 0, 0, 1, "cpu", steps=40, workers=0)
    first = [loader.batch(s)[0] for s in range(10)]
    again = LoaderBatches(mapped, 64, 0, 0, 1, "cpu", steps=40, workers=0)
    assert torch.equal(again.batch(7)[0], first[7]) and torch.equal(again.batch(8)[0], first[8])


def _train(data, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=32, depth=2, time_dim=16), (1, 8, 8))
    cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=2, log_every=4, ckpt_every=1000,
                      progress=False, ema_decay=0.9)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, 0, model, FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling()), data, tmp,
                          Accelerator(cpu=True))
        trainer.fit()
    return [p.detach().clone() for p in trainer.raw_model.parameters()]


def test_training_on_uint8_or_streamed_data_is_bit_identical_to_the_in_memory_path(digit_stores):
    floats, labels, memory, mapped = digit_stores
    reference = _train((floats, labels))
    for source in (DeviceBatches(memory, 32, 0, 0, 1, "cpu"), LoaderBatches(mapped, 32, 0, 0, 1, "cpu", 12, 0)):
        assert all(torch.equal(a, b) for a, b in zip(reference, _train(source)))


def test_the_shards_data_set_trains_alike_from_every_storage(tmp_path):
    images, labels = _digits()
    _write(tmp_path / "shards", images[:600], labels[:600], 17, 250)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: mlp, hidden: 32, depth: 2, time_dim: 16}\nmethod: {name: fm}\n")
    losses = {}
    for storage in ("memory", "uint8", "stream"):
        assert main(["train", str(recipe), f"out_dir={tmp_path}", f"name={storage}", "data.name=shards",
                     f"data.path={tmp_path / 'shards'}", f"data.storage={storage}", "data.workers=0",
                     "data.val_fraction=0.1", "train.eval_every=5", "train.steps=10", "train.batch_size=32",
                     "train.log_every=5", "train.progress=false", "train.sample_grid=false"]) == 0
        lines = (tmp_path / storage / "metrics.jsonl").read_text().splitlines()
        losses[storage] = [(r["loss"], r["val_loss"]) for r in map(json.loads, lines)]
    assert len(losses["memory"]) == 2 and losses["memory"] == losses["uint8"] == losses["stream"]


def test_stored_views_split_without_copies_and_convert_on_access(digit_stores, tmp_path):
    floats, _, _, mapped = digit_stores
    view = StoredImages(mapped, image_to_model)
    assert view.shape == floats.shape and len(view) == len(floats)
    rows = torch.tensor([5, 0, 1796, 3])
    assert torch.equal(view[rows], floats[rows]) and torch.equal(view[2], floats[2])
    assert torch.equal(view[10:20], floats[10:20]) and torch.equal(view.subset(rows)[1:3], floats[[0, 1796]])
    assert torch.equal(view.to("cpu"), floats)


def test_imagenet_npz_loader_reads_small_files(tmp_path):
    rng = np.random.default_rng(0)
    side = 8
    folder = tmp_path / "Imagenet8_train_npz"
    folder.mkdir()
    parts = []
    for k, n in ((1, 30), (2, 20)):  # natural order: batch_2 before batch_10 (only 1, 2 here)
        data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        np.savez(folder / f"train_data_batch_{k}.npz", data=data, labels=labels.tolist(), mean=data.mean(0))
        parts.append((data, labels))
    val = rng.integers(0, 256, (10, 3 * side * side), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=val, labels=list(range(1, 11)))
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    cfg = DataConfig(name="imagenet_npz", path=str(folder), test_path=str(tmp_path / "val_data.npz"))
    ds = load_dataset(cfg)
    assert ds.shape == (3, side, side) and len(ds.train) == 50 and len(ds.test) == 10 and ds.levels == 256
    chw = torch.from_numpy(data).reshape(50, 3, side, side)  # rows are CHW: channel-major planes
    assert ds.train[7, 2, 3, 5] == image_to_model(torch.tensor(int(data[7, 2 * 64 + 3 * 8 + 5])), 256)
    assert torch.equal(ds.train, image_to_model(chw, 256))
    assert torch.equal(ds.train_labels, torch.from_numpy(labels - 1)) and ds.test_labels.tolist() == list(range(10))
    stored = load_dataset(DataConfig(name="imagenet_npz", path=str(folder), test_path=cfg.test_path, storage="uint8"))
    assert isinstance(stored.train, StoredImages) and torch.equal(stored.train[:], ds.train)
    assert stored.fingerprint == ds.fingerprint
    split = load_dataset(DataConfig(name="imagenet_npz", path=str(folder / "train_data_batch_1.npz")))
    assert len(split.train) + len(split.test) == 30
    with pytest.raises(DataError, match="prepare-data"):
        load_dataset(DataConfig(name="imagenet_npz", path=str(folder), storage="stream"))
    np.savez(tmp_path / "bad.npz", data=np.zeros((4, 100), np.uint8), labels=[1, 2, 3, 4])
    with pytest.raises(DataError, match="not 3 x H x H"):
        load_dataset(DataConfig(name="imagenet_npz", path=str(tmp_path / "bad.npz")))


def test_prepare_data_round_trips_a_folder_of_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    expected, classes = [], []
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(7):
            array = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "src" / cls / f"{i:02d}.png")
            expected.append(array.transpose(2, 0, 1))
            classes.append(cls)
    out = tmp_path / "shards"
    assert main(["prepare-data", str(tmp_path / "src"), str(out), "--shard-mb", "0.0005"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["count"] == 14 and manifest["shape"] == [3, 6, 6] and manifest["levels"] == 256
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 4, 2] and manifest["meta"]["classes"] == ["cat", "dog"]
    verify_shards(out)
    store = open_shards(out)
    assert np.array_equal(store.gather(torch.arange(14)).numpy(), np.stack(expected))
    assert store.all_labels().tolist() == [["cat", "dog"].index(c) for c in classes]
    assert main(["prepare-data", str(tmp_path / "src"), str(out)]) == 2  # refused: already there
    prepare_data(tmp_path / "src", out, image_size=4, overwrite=True)  # smaller images: fewer, stale shards go
    assert open_shards(out).shape == (3, 4, 4) and len(list(out.glob("images_*.npy"))) == 1
    shard = out / "images_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00" if shard.read_bytes()[-1] else shard.read_bytes()[:-1] + b"\x01")
    with pytest.raises(StoreError, match="sha256"):
        verify_shards(out)


def test_bad_storage_settings_are_refused_with_the_key_and_what_is_expected():
    recipe = Path(__file__).resolve().parents[1] / "recipes/digits/fm_mlp.yaml"
    with pytest.raises(ConfigError, match=r"data.storage='disk' is out of range: expected one of memory, uint8"):
        resolve_config(recipe, ["data.storage=disk"])
    with pytest.raises(ConfigError, match=r"data.workers=-1 is out of range: expected an integer >= 0"):
        resolve_config(recipe, ["data.workers=-1"])
    with pytest.raises(DataError, match="data.storage=uint8 keeps uint8 data sets .* not 'digits'"):
        load_dataset(DataConfig(name="digits", storage="uint8"))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(name="shards"))
    with pytest.raises(StoreError, match="no manifest.json|has no manifest"):
        open_shards("/nonexistent-folder")
