"""Tests for shared.metrics: W2 against closed forms and brute force, FD against its closed form,
the cached classifier extractor, the local-only Inception extractor and sample_quality."""
from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from shared import metrics
from shared.data import Dataset


def halves_dataset(n_train: int = 400, n_test: int = 300, channels: int = 1, seed: int = 0) -> Dataset:
    """Two classes of noisy 8x8 images: bright left half (label 0) or bright right half (label 1)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.full((n, channels, 8, 8), -0.6)
        x[y == 0, :, :, :4] = 0.6
        x[y == 1, :, :, 4:] = 0.6
        return (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y

    train, train_labels = split(n_train)
    test, test_labels = split(n_test)
    data = Dataset("halves", train, test, train_labels, test_labels, None, f"halves{channels}-{seed}")
    assert data.shape == (channels, 8, 8) and data.kind == "image" and data.dim == channels * 64
    return data


def vector_dataset(n: int = 300) -> Dataset:
    g = torch.Generator().manual_seed(1)
    data = Dataset("gauss", torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), None, None, None, "gauss")
    assert data.shape == (2,) and data.kind == "vector" and data.dim == 2
    return data


@pytest.fixture(scope="module")
def trained():
    data = halves_dataset()
    model, acc = metrics.train_classifier(data, steps=100, batch_size=64)
    return data, model, acc


# --- wasserstein2 ---------------------------------------------------------------------------------

def test_w2_of_a_shift_is_its_length():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -1.2, 0.5])
    assert metrics.wasserstein2(x, x + shift) == pytest.approx(shift.norm().item(), rel=1e-6)
    assert metrics.wasserstein2(x, x) == pytest.approx(0.0, abs=1e-7)


def test_w2_matches_brute_force_assignment():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 4, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(50, 4, generator=g, dtype=torch.float64)
    cost = torch.cdist(a, b).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    assert metrics.wasserstein2(a, b) == pytest.approx(math.sqrt(cost[rows, cols].mean()), rel=1e-9)


def test_w2_subsampling_is_deterministic_for_a_generator():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(600, 2, generator=g), torch.randn(600, 2, generator=g) + 1.0

    def w2(seed: int) -> float:
        return metrics.wasserstein2(a, b, max_points=100, generator=torch.Generator().manual_seed(seed))

    assert w2(7) == w2(7)
    assert w2(7) != w2(8)


# --- frechet_distance -----------------------------------------------------------------------------

def exact_moments(n: int, mean: torch.Tensor, var: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly `mean` and sample covariance exactly diag(var)."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return mean + z * var.sqrt()


def test_fd_matches_closed_form_for_diagonal_gaussians():
    d = 6
    mu1, mu2 = torch.linspace(-1, 1, d, dtype=torch.float64), torch.linspace(0, 2, d, dtype=torch.float64).flip(0)
    s1, s2 = torch.linspace(0.5, 2, d, dtype=torch.float64), torch.linspace(3, 0.2, d, dtype=torch.float64)
    a, b = exact_moments(500, mu1, s1, 0), exact_moments(700, mu2, s2, 1)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    assert metrics.frechet_distance(a, b.numpy()) == pytest.approx(expected.item(), rel=1e-8)


def test_fd_of_identical_features_is_zero():
    feats = torch.randn(400, 32, generator=torch.Generator().manual_seed(3)) @ torch.randn(32, 32)
    scale = np.trace(np.cov(feats.double().numpy(), rowvar=False))
    assert abs(metrics.frechet_distance(feats, feats)) <= 1e-6 * scale


def test_small_fd_statistics_run_on_one_blas_thread_and_large_ones_keep_the_library_setting(monkeypatch):
    """Idle OpenBLAS workers spin after a call and slow the torch sampling timed next; small statistics use none."""
    from cleanfid import fid as cleanfid_fid
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    exact = cleanfid_fid.frechet_distance

    def recording(*stats):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return exact(*stats)

    monkeypatch.setattr(cleanfid_fid, "frechet_distance", recording)
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(100, 32, generator=gen)
    large = torch.randn(100, metrics.THREADED_BLAS_FROM_DIM, generator=gen)
    with threadpool_limits(2, user_api="blas"):
        metrics.frechet_distance(small, small + 1)
        metrics.frechet_distance(large, large + 1)
        after = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert seen[0] == {1}
    assert seen[1] == {2} and after == {2}  # the library's setting inside the large call and restored after


# --- classifier extractor -------------------------------------------------------------------------

def test_classifier_learns_the_toy_task(trained):
    data, model, acc = trained
    assert acc > 0.95
    assert model.name == "classifier-halves"
    assert model(data.test[:5]).shape == (5, 128)


def test_classifier_training_is_deterministic_for_a_seed():
    data = halves_dataset(n_train=100, n_test=20)
    a, _ = metrics.train_classifier(data, steps=5, seed=3)
    b, _ = metrics.train_classifier(data, steps=5, seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_classifier_features_caches_and_recovers_from_corruption(trained, tmp_path, monkeypatch):
    data, model, acc = trained
    monkeypatch.setenv("FLOWDISTILL_CACHE", str(tmp_path))
    calls = []

    def fake_train(dataset, **kwargs):
        calls.append(dataset.name)
        return model, acc

    monkeypatch.setattr(metrics, "train_classifier", fake_train)
    first = metrics.classifier_features(data)
    weights = tmp_path / "classifiers" / f"halves-{data.fingerprint}.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file() and calls == ["halves"]

    def refuse(dataset, **kwargs):
        raise AssertionError("should load from the cache")

    monkeypatch.setattr(metrics, "train_classifier", refuse)
    loaded = metrics.classifier_features(data)
    assert loaded is not first and loaded.test_accuracy == pytest.approx(acc)
    assert torch.allclose(loaded(data.test), first(data.test))

    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(metrics, "train_classifier", fake_train)
    with pytest.warns(UserWarning, match="retraining"):
        metrics.classifier_features(data)
    assert calls == ["halves", "halves"]
    monkeypatch.setattr(metrics, "train_classifier", refuse)
    metrics.classifier_features(data)


def test_classifier_needs_labels():
    data = halves_dataset(n_train=20, n_test=10)
    data.train_labels = None
    with pytest.raises(ValueError, match="needs labels"):
        metrics.classifier_features(data)


def test_fd_on_classifier_features_ranks_real_above_noise(trained):
    data, model, _ = trained
    subset = metrics.sample_quality(data.test[:150], data, extractor=model)
    noise = metrics.sample_quality(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1,
                                   data, extractor=model)
    assert subset["metric"] == "fd" and subset["extractor"] == "classifier-halves"
    assert 0 <= subset["value"] < noise["value"]


def test_reference_features_are_computed_once_per_extractor(trained):
    data, model, _ = trained
    seen = []

    class Counting:
        name = "counting"

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(len(images))
            return model(images)

    extractor = Counting()
    first = metrics.sample_quality(data.test[:200], data, extractor=extractor)
    second = metrics.sample_quality(data.test[:200], data, extractor=extractor)
    assert first == second and first["extractor"] == "counting"
    assert sum(seen) == 200 + len(data.test) + 200


# --- Inception extractor and the choice of extractor ----------------------------------------------

def test_inception_without_weights_explains_the_env_var(monkeypatch):
    monkeypatch.delenv("FLOWDISTILL_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match="FLOWDISTILL_INCEPTION"):
        metrics.InceptionFeatures()


class _FakeInceptionLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2048)


class _FakeInception(nn.Module):
    """Stands in for clean-fid's torchscript file: pool features = the mean normalised pixel."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_loads_local_weights_and_feeds_clean_fid_pixels(tmp_path, monkeypatch):
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    monkeypatch.setenv("FLOWDISTILL_INCEPTION", str(tmp_path / "inception-2015-12-05.pt"))
    images = torch.tensor([-1.0, 0.0, 0.5]).reshape(3, 1, 1, 1).expand(3, 1, 8, 8)
    feats = metrics.InceptionFeatures()(images)
    expected = ((images[:, 0, 0, 0] + 1) * 127.5 - 128) / 128
    assert feats.shape == (3, 2048)
    assert torch.allclose(feats[:, 0], expected, atol=1e-4)
    assert metrics.feature_extractor(halves_dataset(n_train=10, n_test=10, channels=3)).name == "inception-clean-fid"


def test_auto_extractor_picks_the_classifier_for_grey_data(trained, tmp_path, monkeypatch):
    data, model, acc = trained
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    monkeypatch.setenv("FLOWDISTILL_INCEPTION", str(tmp_path))
    monkeypatch.setenv("FLOWDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "train_classifier", lambda dataset, **kwargs: (model, acc))
    assert metrics.feature_extractor(data, "auto").name == "classifier-halves"
    with pytest.raises(ValueError, match="choices"):
        metrics.feature_extractor(data, "vgg")


def test_vectors_have_no_feature_extractor():
    with pytest.raises(ValueError, match="vectors"):
        metrics.feature_extractor(vector_dataset())


# --- sample_quality -------------------------------------------------------------------------------

def test_sample_quality_on_vectors_is_w2_and_falls_as_samples_approach_the_data():
    data = vector_dataset()
    fresh = torch.randn(300, 2, generator=torch.Generator().manual_seed(5))
    results = [metrics.sample_quality(fresh + shift, data) for shift in (3.0, 1.0, 0.0)]
    assert all(r["metric"] == "w2" and r["extractor"] is None for r in results)
    values = [r["value"] for r in results]
    assert values[0] > values[1] > values[2]
    assert values[0] == pytest.approx(3.0 * math.sqrt(2), rel=0.1)
    with pytest.raises(ValueError, match="shape"):
        metrics.sample_quality(torch.zeros(10, 3), data)


def test_feature_identity_tells_retrained_classifiers_apart():
    from shared.metrics import ClassifierFeatures, feature_identity

    torch.manual_seed(0)
    first = ClassifierFeatures(1, 10, name="classifier-digits")
    same = ClassifierFeatures(1, 10, name="classifier-digits")
    same.load_state_dict(first.state_dict())
    other = ClassifierFeatures(1, 10, name="classifier-digits")  # another draw: a retrained net
    assert feature_identity(first) == feature_identity(same) and feature_identity(first).startswith("classifier-digits-")
    assert feature_identity(first) != feature_identity(other)
    with torch.no_grad():
        same.head.bias.add_(1e-3)  # any weight counts, the head too
    assert feature_identity(first) != feature_identity(same)
    assert feature_identity(None) == "wasserstein2"
