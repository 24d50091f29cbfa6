"""Semidiscrete OT (SD-FM): chunked MIPS, the chi^2 estimator, the dual fit, saving, and the coupling built on it."""
from __future__ import annotations

import pytest
import torch

from nfm import couplings
from flowdistill.api import load_run
from nfm.couplings import SDOT_FILE, IndependentCoupling, SemidiscreteOTConfig, SemidiscreteOTCoupling
from nfm.semidiscrete_ot import (SemidiscretePotential, chi2_estimate, evaluate_potential, fit_potential,
                                 load_potential, mips, save_potential)
from shared.catalog import BuildContext
from shared.checkpoint import CheckpointError
from shared.config import RunConfig
from shared.data import Dataset
from shared.run import run_dir_of
from shared.rundir import couplings_dir

CHI2_MAX = 0.05  # fitted potentials below must reach this non-uniformity (the SD-FM paper's saturation level)
FIT = dict(iters=300, batch=1024, lr=0.05, progress=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def points(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Gaussian rows with norms spread over a factor 5, so that g = 0 assigns the noise far from uniformly."""
    scale = torch.linspace(0.3, 1.5, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return scale * torch.randn(shape, generator=gen(seed)) + 0.3


@pytest.fixture(scope="module", params=[(64, 2), (32, 1, 8, 8)], ids=["2d", "8x8"])
def fitted(request) -> tuple[torch.Tensor, SemidiscretePotential]:
    y = points(request.param)
    return y, fit_potential(y, "fp", seed=0, **FIT)


@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 37), (37, 100), (1, 4)])
def test_chunked_mips_equals_brute_force_argmax(n, chunk):
    q, keys = torch.randn(50, 5, generator=gen(0)), torch.randn(n, 5, generator=gen(1))
    bias = torch.randn(n, generator=gen(2))
    best, arg = mips(q, keys, bias, chunk)
    scores = q @ keys.T + bias
    assert torch.equal(arg, scores.argmax(1))
    assert torch.allclose(best, scores.max(1).values, atol=1e-5)


def test_chi2_estimate_is_unbiased():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    exact = 4 * p.pow(2).sum().item() - 1
    draws = [chi2_estimate(torch.bincount(torch.multinomial(p, 10, True, generator=gen(s)), minlength=4), 10).item()
             for s in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(exact, abs=0.02)
    uniform = torch.bincount(torch.multinomial(torch.full((50,), 0.02), 20000, True, generator=gen(0)), minlength=50)
    assert abs(chi2_estimate(uniform, 20000).item()) < 0.02


def test_fit_raises_the_dual_and_brings_chi2_below_threshold(fitted):
    y, potential = fitted
    start = evaluate_potential(torch.zeros(len(y)), y, gen(7), batches=10, batch=1024)
    end = evaluate_potential(potential.g, y, gen(7), batches=10, batch=1024)
    assert end["dual"] > start["dual"] + 0.05
    assert start["chi2"] > 0.5 and end["chi2"] < CHI2_MAX and potential.info["chi2"] < CHI2_MAX
    assert potential.history["chi2"][-1] < potential.history["chi2"][0]
    assert set(potential.history) == {"iter", "dual", "chi2"} and potential.history["iter"][-1] == FIT["iters"]


def test_sdfm_uses_every_data_point_with_roughly_uniform_frequency(fitted):
    y, potential = fitted
    coupling = SemidiscreteOTCoupling(y, "fp")
    coupling.potential = potential
    counts = torch.zeros(len(y))
    for seed in range(50):
        data, _ = coupling.pairs(torch.empty(len(y) * 8, *y.shape[1:]), gen(seed))
        _, k = mips(data.reshape(len(data), -1), y.reshape(len(y), -1), -y.reshape(len(y), -1).pow(2).sum(1) / 2)
        counts += torch.bincount(k, minlength=len(y))
    mean = counts.mean().item()
    assert mean == 400 and (counts - mean).abs().max().item() < 0.3 * mean


def test_sdfm_pairs_cost_less_than_independent_pairs(fitted):
    y, potential = fitted
    coupling = SemidiscreteOTCoupling(y, "fp")
    coupling.potential = potential
    x, z = coupling.pairs(torch.empty(2048, *y.shape[1:]), gen(0))
    assert x.shape == z.shape == (2048, *y.shape[1:])
    assert (x.reshape(len(x), 1, -1) == y.reshape(1, len(y), -1)).all(-1).any(1).all()
    z_ind = IndependentCoupling()(x, gen(1))
    assert (x - z).pow(2).sum() < 0.9 * (x - z_ind).pow(2).sum()
    again = coupling.pairs(torch.empty(2048, *y.shape[1:]), gen(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], z)


def test_save_load_round_trip_and_refusals(fitted, tmp_path):
    y, potential = fitted
    path = tmp_path / "p.safetensors"
    save_potential(path, potential)
    back = load_potential(path, "fp", len(y))
    assert torch.equal(back.g, potential.g) and back.fingerprint == "fp"
    assert back.info == pytest.approx(potential.info)
    assert all(torch.equal(back.history[k], potential.history[k]) for k in potential.history)
    with pytest.raises(CheckpointError, match="fitted on data with fingerprint fp, but this run's data has "
                                              "fingerprint other"):
        load_potential(path, "other")
    with pytest.raises(CheckpointError, match="train points"):
        load_potential(path, "fp", len(y) + 1)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_potential(path)


def test_coupling_fits_once_saves_in_the_run_dir_and_reuses_the_potential(tmp_path, monkeypatch):
    y = points((40, 2), 1)
    data = Dataset("toy", y, y[:4], None, None, None, "fp1")
    run_cfg = RunConfig(name="r", out_dir=str(tmp_path))
    cfg = SemidiscreteOTConfig(iters=50, batch=256, lr=0.05)

    def build_coupling(dataset: Dataset) -> SemidiscreteOTCoupling:
        return SemidiscreteOTCoupling.from_config(cfg, BuildContext(run_cfg, dataset, run_dir_of(run_cfg), load_run))

    first = build_coupling(data)
    x, z = first.pairs(torch.empty(16, 2), gen(0))
    assert (couplings_dir(tmp_path / "r") / SDOT_FILE).is_file()

    def no_refit(*args, **kwargs):
        raise AssertionError("the saved potential should have been reused")

    monkeypatch.setattr(couplings, "fit_potential", no_refit)
    second = build_coupling(data)
    x2, z2 = second.pairs(torch.empty(16, 2), gen(0))
    assert torch.equal(x, x2) and torch.equal(z, z2)
    other = Dataset("toy", y + 1, y[:4], None, None, None, "fp2")
    with pytest.raises(CheckpointError, match="fingerprint fp1, but this run's data has fingerprint fp2") as err:
        build_coupling(other).pairs(torch.empty(16, 2), gen(0))
    assert "set method.coupling.potential to another path" in str(err.value)  # the key a recipe can set
