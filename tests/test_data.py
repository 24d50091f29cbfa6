"""Data sets, splits and the [-1, 1] image scaling convention (all offline, CPU)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import DataConfig
from shared.data import DataError, bits_per_dim, dequantize, image_to_model, model_to_image
from shared.data_sources import DATASETS, load_dataset

TOYS = ["8gaussians", "moons", "checkerboard", "spirals"]


# ---------------------------------------------------------------- 2D toys


@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_scale_and_seeding(name):
    cfg = DataConfig(name=name, n_train=3000, n_test=500, seed=1)
    ds = load_dataset(cfg)
    assert ds.train.shape == (3000, 2) and ds.test.shape == (500, 2)
    assert ds.train.dtype == torch.float32 and ds.kind == "vector" and ds.dim == 2
    assert ds.levels is None and ds.train_labels is None and ds.test_labels is None
    assert 0.8 < ds.train.std().item() < 1.25
    again = load_dataset(cfg)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.test, again.test)
    assert ds.fingerprint == again.fingerprint and len(ds.fingerprint) == 16
    other = load_dataset(DataConfig(name=name, n_train=3000, n_test=500, seed=2))
    assert not torch.equal(ds.train, other.train) and ds.fingerprint != other.fingerprint
    assert not torch.equal(ds.train[:500], ds.test)
    # the test split does not depend on how many training points were drawn
    assert torch.equal(load_dataset(DataConfig(name=name, n_train=10, n_test=500, seed=1)).test, ds.test)


def test_checkerboard_support_and_uniformity():
    ds = load_dataset(DataConfig(name="checkerboard", n_train=16000, n_test=10))
    assert torch.all(ds.log_density(ds.train) == -math.log(8.0))  # every point on the board
    x = ds.train
    assert x.min() >= -2 and x.max() < 2
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = Counter(map(tuple, cells.tolist()))
    assert len(counts) == 8
    assert all(abs(c - 2000) < 200 for c in counts.values())


# ---------------------------------------------------------------- scaling convention


def test_scaling_round_trip_and_cell_centres():
    for levels in (2, 17, 256):
        v = torch.arange(levels)
        x = image_to_model(v, levels)
        assert x.dtype == torch.float32
        assert torch.allclose(x[0], torch.tensor(-1 + 1 / levels)) and torch.allclose(x[-1], torch.tensor(1 - 1 / levels))
        assert torch.equal(model_to_image(x, levels).long(), v)
    assert model_to_image(torch.tensor([-5.0, 5.0]), 256).tolist() == [0, 255]
    assert model_to_image(torch.zeros(1), 256).dtype == torch.uint8
    assert model_to_image(torch.zeros(1), 1024).dtype == torch.int64


def test_dequantize_stays_in_cell_and_is_centred():
    levels = 17
    x = image_to_model(torch.arange(levels).repeat(4000), levels)
    y = dequantize(x, levels, torch.Generator().manual_seed(0))
    offset = (y - x) * levels / 2  # in units of one cell
    assert offset.min() >= -0.5 and offset.max() < 0.5
    assert abs(offset.mean().item()) < 0.01
    assert abs(offset.var().item() - 1 / 12) < 0.005
    z = dequantize(x, levels, torch.Generator().manual_seed(1))
    assert not torch.equal(y, z)
    assert torch.equal(y, dequantize(x, levels, torch.Generator().manual_seed(0)))


def test_bits_per_dim_of_uniform_model_is_log2_levels():
    dim = 12
    for levels in (2, 17, 256):
        nll = torch.full((5,), dim * math.log(2.0))  # density 2^-D on [-1, 1]^D
        assert torch.allclose(bits_per_dim(nll, dim, levels), torch.full((5,), math.log2(levels)))
    # hand computation: nll 3000 nats over 3072 dims at 256 levels
    expected = (3000 / 3072 + math.log(128)) / math.log(2)
    assert bits_per_dim(torch.tensor([3000.0]), 3072, 256).item() == pytest.approx(expected)
    assert expected == pytest.approx(8.40891, abs=1e-4)


# ---------------------------------------------------------------- digits and MNIST


def _rows(images, labels) -> Counter:
    """Multiset of (pixel bytes, label) pairs, to compare splits with the source data."""
    return Counter((bytes(np.asarray(i).reshape(-1).tolist()), int(l)) for i, l in zip(images, labels))


def test_digits_split_and_range():
    from sklearn.datasets import load_digits

    ds = load_dataset(DataConfig(name="digits"))
    assert ds.train.shape == (1437, 1, 8, 8) and ds.test.shape == (360, 1, 8, 8)
    assert ds.levels == 17 and ds.kind == "image" and ds.dim == 64
    assert ds.train.min() >= -1 and ds.train.max() <= 1
    assert ds.train_labels.dtype == torch.int64 and ds.train_labels.shape == (1437,)
    assert torch.equal(image_to_model(model_to_image(ds.train, 17), 17), ds.train)
    # train + test is exactly the original data set (a partition), labels travelling with images
    ref = load_digits()
    ours = _rows(model_to_image(ds.train, 17), ds.train_labels) + _rows(model_to_image(ds.test, 17), ds.test_labels)
    assert ours == _rows(ref.images.astype(np.uint8), ref.target)
    again = load_dataset(DataConfig(name="digits"))
    assert torch.equal(again.test, ds.test) and again.fingerprint == ds.fingerprint
    other = load_dataset(DataConfig(name="digits", seed=1))
    assert not torch.equal(other.test, ds.test)
    # the same permutation cut elsewhere: other splits, so another fingerprint (caches and teachers tell them apart)
    wider = load_dataset(DataConfig(name="digits", test_fraction=0.3))
    assert len(wider.test) == 540 and wider.fingerprint != ds.fingerprint


def test_mnist_shapes_and_split():
    ds = load_dataset(DataConfig(name="mnist"))
    assert ds.train.shape == (4000, 1, 28, 28) and ds.test.shape == (1000, 1, 28, 28)
    assert ds.levels == 256 and ds.train.min() >= -1 and ds.train.max() <= 1
    assert set(ds.test_labels.tolist()) == set(range(10))


# ---------------------------------------------------------------- tabular


def _tabular(path, **kwargs):
    return load_dataset(DataConfig(name="tabular", path=str(path), **kwargs))


def test_tabular_npy_npz_standardised(tmp_path):
    data = np.random.default_rng(0).normal(3.0, 5.0, size=(200, 3))
    np.save(tmp_path / "x.npy", data)
    ds = _tabular(tmp_path / "x.npy")
    assert ds.train.shape == (160, 3) and ds.test.shape == (40, 3) and ds.dim == 3
    assert ds.levels is None and ds.train.dtype == torch.float32
    assert torch.allclose(ds.train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(ds.train.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    assert ds.meta["mean"] == pytest.approx(data.mean(0), abs=1.5) and len(ds.meta["std"]) == 3
    np.savez(tmp_path / "one.npz", whatever=data)
    np.savez(tmp_path / "keyed.npz", x=data, y=np.zeros(200))
    for name in ("one.npz", "keyed.npz"):
        assert torch.equal(_tabular(tmp_path / name).train, ds.train)


def test_tabular_csv_with_and_without_header(tmp_path):
    data = np.arange(40, dtype=float).reshape(10, 4) ** 1.5
    np.savetxt(tmp_path / "plain.csv", data, delimiter=",")
    np.savetxt(tmp_path / "head.csv", data, delimiter=",", header="a,b,c,d", comments="")
    plain, head = _tabular(tmp_path / "plain.csv"), _tabular(tmp_path / "head.csv")
    assert plain.train.shape == (8, 4) and plain.test.shape == (2, 4)
    assert torch.allclose(plain.train, head.train) and torch.allclose(plain.test, head.test)
    assert plain.meta["std"] == pytest.approx(head.meta["std"])


@pytest.mark.parametrize("array, fragment", [
    (np.zeros(10), "(10,)"),
    (np.zeros((4, 3, 2)), "(4, 3, 2)"),
    (np.zeros((1, 3)), "(1, 3)"),
    (np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0]]), "NaN"),
])
def test_tabular_bad_arrays(tmp_path, array, fragment):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError) as err:
        _tabular(tmp_path / "bad.npy")
    assert fragment in str(err.value)
    if fragment.startswith("("):
        assert "(N, D)" in str(err.value)


def test_tabular_npz_ambiguous_and_missing(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.ones((3, 2)))
    with pytest.raises(DataError, match=r"\['a', 'b'\]"):
        _tabular(tmp_path / "two.npz")
    missing = tmp_path / "nowhere.npy"
    with pytest.raises(DataError) as err:
        _tabular(missing)
    assert str(missing) in str(err.value) and "data.path" in str(err.value) and "(N, D)" in str(err.value)
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(name="tabular"))


# ---------------------------------------------------------------- image folders


def _png(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_imagefolder_classes_shape_range(tmp_path):
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png", (4, 4), (255, 0, 0))
        _png(tmp_path / "dog" / f"{i}.png", (4, 4), (0, 0, 255))
    ds = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), test_fraction=0.5))
    assert ds.train.shape == (3, 3, 4, 4) and ds.test.shape == (3, 3, 4, 4) and ds.levels == 256
    assert ds.train.min() >= -1 and ds.train.max() <= 1
    assert ds.meta["classes"] == ["cat", "dog"]
    for x, labels in ((ds.train, ds.train_labels), (ds.test, ds.test_labels)):
        red = model_to_image(x, 256)[:, 0, 0, 0] == 255
        assert torch.equal(red, labels == 0)


def test_imagefolder_flat_grey_and_sizes(tmp_path):
    _png(tmp_path / "a.png", (4, 4), 10, "L")
    _png(tmp_path / "b.png", (6, 5), 200, "L")
    cfg = DataConfig(name="imagefolder", path=str(tmp_path), test_fraction=0.5)
    with pytest.raises(DataError) as err:
        load_dataset(cfg)
    assert "b.png" in str(err.value) and "6x5" in str(err.value) and "4x4" in str(err.value)
    cfg.image_size = 3
    ds = load_dataset(cfg)
    assert ds.train.shape == (1, 1, 3, 3) and ds.train_labels is None
    assert sorted(model_to_image(torch.cat([ds.train, ds.test]), 256)[:, 0, 0, 0].tolist()) == [10, 200]


def test_imagefolder_empty_or_missing(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "absent")))


def test_single_image_cannot_be_split(tmp_path):
    _png(tmp_path / "only.png", (4, 4), (1, 2, 3))
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_from_local_folder(fake_cifar10):
    root, batches = fake_cifar10
    ds = load_dataset(DataConfig(name="cifar10", path=str(root)))
    assert ds.train.shape == (10, 3, 32, 32) and ds.test.shape == (3, 3, 32, 32) and ds.levels == 256
    expected = torch.from_numpy(batches["test_batch"]["data"]).reshape(3, 3, 32, 32)
    assert torch.equal(model_to_image(ds.test, 256), expected)
    assert ds.test_labels.tolist() == batches["test_batch"]["labels"]
    assert ds.meta["classes"][0] == "class0"


def test_cifar10_missing_data_says_how_to_fix(tmp_path):
    for path in ("", str(tmp_path)):
        with pytest.raises(DataError) as err:
            load_dataset(DataConfig(name="cifar10", path=path))
        assert "data.download=true" in str(err.value) and "data.path" in str(err.value)


# ---------------------------------------------------------------- names


def test_unknown_name_lists_choices():
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="imagenet"))
    assert "imagenet" in str(err.value) and ", ".join(sorted(DATASETS)) in str(err.value)


def test_validation_split_is_disjoint_from_test_fixed_by_the_seed_and_carved_from_train():
    from shared.config import DataConfig
    from shared.data_sources import load_dataset

    full = load_dataset(DataConfig(name="digits"))
    carved = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    again = load_dataset(DataConfig(name="digits", val_fraction=0.1))
    other = load_dataset(DataConfig(name="digits", val_fraction=0.1, seed=1))
    assert torch.equal(carved.test, full.test)  # the test split is untouched
    assert len(carved.val) == math.ceil(len(full.train) * 0.1) and len(carved.train) + len(carved.val) == len(full.train)
    assert torch.equal(carved.val, again.val) and not torch.equal(carved.val, other.val[: len(carved.val)])
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    assert rows(carved.val) | rows(carved.train) == rows(full.train)
    assert not (rows(carved.val) & rows(full.test)) or rows(full.train) & rows(full.test)  # duplicates aside
    assert carved.fingerprint != full.fingerprint and len(carved.val_labels) == len(carved.val)


def test_random_shift_translates_images_with_background_padding():
    from shared.data import image_to_model, random_shift

    levels = 17
    x = image_to_model(torch.arange(2 * 8 * 8).reshape(2, 1, 8, 8) % levels, levels)
    g = torch.Generator().manual_seed(0)
    shifted = random_shift(x, 1, levels, g)
    background = image_to_model(torch.zeros(()), levels)
    for b in range(2):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(shifted[b, :, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)],
                                  x[b, :, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)])]
        assert matches, "every image is a translate of its input"
        dy, dx = matches[0]
        if dy or dx:
            border = torch.ones(8, 8, dtype=torch.bool)
            border[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = False
            assert torch.all(shifted[b, 0][border] == background)
    assert torch.equal(random_shift(x, 0, levels, g), x)


@pytest.mark.parametrize("name", ["gmm2", "gmm8", "gmm32"])
def test_gaussian_mixture_log_density_matches_torch_distributions(name):
    from torch import distributions as D

    from shared.densities import KNOWN_DENSITIES

    gmm = KNOWN_DENSITIES[name]
    reference = D.MixtureSameFamily(D.Categorical(probs=gmm.weights),
                                    D.Independent(D.Normal(gmm.means, gmm.stds[:, None].expand_as(gmm.means)), 1))
    ds = load_dataset(DataConfig(name=name, n_train=4000, n_test=300))
    x = ds.test.double()
    torch.testing.assert_close(ds.log_density(x), reference.log_prob(x), atol=1e-9, rtol=0)
    assert ds.shape == (gmm.dim,) and len(set(gmm.weights.tolist())) == len(gmm.weights)  # unequal weights
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert (ds.train.double().mean(0) - mean).abs().max() < 0.15  # samples follow the density


def test_banana_density_integrates_to_one_and_matches_its_samples():
    from shared.densities import Banana

    banana = Banana()
    grid = torch.linspace(-9, 9, 721, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    cell = (grid[1] - grid[0]) ** 2
    mass = (banana.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp() * cell).sum()
    assert mass.item() == pytest.approx(1.0, abs=2e-3)
    ds = load_dataset(DataConfig(name="banana", n_train=20000, n_test=100))
    assert ds.train[:, 0].std().item() == pytest.approx(1.5, rel=0.03)
    assert ds.train[:, 1].mean().item() == pytest.approx(0.0, abs=0.03)  # E[b (x1^2 - a^2)] = 0
