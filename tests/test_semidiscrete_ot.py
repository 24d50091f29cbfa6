"""Semidiscrete OT (SD-FM): tiled MIPS, the chi^2 estimator, the dual fit against a float64 reference, its
convergence check and progress report, saving, and the coupling built on it."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from nfm import couplings
from flowdistill.api import load_run
from nfm.couplings import SDOT_FILE, IndependentCoupling, SemidiscreteOTConfig, SemidiscreteOTCoupling
from nfm.mips import InnerProductSearch, mips
from nfm.semidiscrete_ot import (NotConvergedError, SemidiscretePotential, cell_barycentres, chi2_estimate,
                                 convergence_problem, evaluate_potential, fit_potential, level_sizes, load_potential,
                                 refine_potential, save_potential)
from shared.catalog import BuildContext
from shared.checkpoint import CheckpointError
from shared.config import RunConfig
from shared.data import Dataset
from shared.run_prepare import run_dir_of
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


@pytest.mark.parametrize("two_pass", [True, False], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 37), (37, 100), (1, 4), (3000, 0), (3000, 7)])
def test_tiled_mips_equals_float64_brute_force_argmax(n, chunk, two_pass):
    q, keys = torch.randn(700, 5, generator=gen(0)), torch.randn(n, 5, generator=gen(1))
    bias = torch.randn(n, generator=gen(2))
    search = InnerProductSearch(keys, chunk, two_pass)
    scores = q.double() @ keys.double().T + bias.double()
    for queries in (q, q[:3], q):  # the tile buffers are reused, and regrown for a larger batch
        best, arg = search(queries, bias)
        assert torch.equal(arg, scores[:len(queries)].argmax(1))
        assert torch.allclose(best.double(), scores[:len(queries)].max(1).values, atol=1e-5)
    assert torch.equal(mips(q, keys, bias, chunk)[1], arg)


@pytest.mark.parametrize("two_pass", [True, False], ids=["two-pass", "one-pass"])
def test_mips_breaks_exact_ties_at_the_first_index_like_argmax(two_pass):
    keys = torch.randint(-2, 3, (12, 3), generator=gen(0)).float().repeat(4, 1)  # every key 4 times, 12 apart
    q = torch.randint(-2, 3, (64, 3), generator=gen(1)).float()
    bias = torch.zeros(48)
    _, arg = InnerProductSearch(keys, 8, two_pass)(q, bias)
    assert torch.equal(arg, (q @ keys.T).argmax(1)) and (arg < 12).all()


def test_mips_rejects_mismatched_shapes():
    search = InnerProductSearch(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"queries must be \(B, 3\)"):
        search(torch.zeros(2, 4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        search(torch.zeros(2, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="non-empty"):
        InnerProductSearch(torch.zeros(0, 3))


def test_chi2_estimate_is_unbiased():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    exact = 4 * p.pow(2).sum().item() - 1
    draws = [chi2_estimate(torch.bincount(torch.multinomial(p, 10, True, generator=gen(s)), minlength=4), 10).item()
             for s in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(exact, abs=0.02)
    uniform = torch.bincount(torch.multinomial(torch.full((50,), 0.02), 20000, True, generator=gen(0)), minlength=50)
    assert abs(chi2_estimate(uniform, 20000).item()) < 0.02


def reference_fit(y: torch.Tensor, iters: int, batch: int, lr: float, seed: int) -> torch.Tensor:
    """The dual ascent written out in float64 with dense scores and torch.optim.Adam, on the same noise draws."""
    generator = gen(seed)
    g = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    step = lr * y.double().pow(2).sum(1).mean().sqrt().item()
    opt = torch.optim.Adam([g], lr=step)
    for it in range(iters):
        x0 = torch.randn(batch, y.shape[1], generator=generator).double()
        k = (x0 @ y.double().T + g.detach()).argmax(1)
        g.grad = torch.bincount(k, minlength=len(y)).double() / batch - 1.0 / len(y)  # -dD/dg
        opt.param_groups[0]["lr"] = step * 0.5 * (1 + math.cos(math.pi * it / iters))
        opt.step()
    return g.detach()


def test_fit_equals_the_float64_dense_reference_potential_and_assignments():
    y = points((50, 3), 2)
    potential = fit_potential(y, "fp", iters=40, batch=256, lr=0.05, progress=False, chi2_tol=math.inf)
    ref = reference_fit(y, 40, 256, 0.05, 0)
    assert torch.allclose(potential.g.double(), ref, atol=1e-4 * ref.abs().max().item())
    x0 = torch.randn(4000, 3, generator=gen(5))
    fast = mips(x0, y, potential.g)[1]
    exact = (x0.double() @ y.double().T + ref).argmax(1)
    assert (fast == exact).float().mean().item() > 0.999


def test_unconverged_fit_warns_with_its_numbers_or_refuses():
    y = points((64, 2))
    with pytest.warns(UserWarning, match=r"over 64 points has not converged \(chi\^2 of the assignments [0-9.]+ > "
                                         r"tolerance 0.05.*iters 1, batch 256.*raise method.coupling.iters"):
        potential = fit_potential(y, "fp", iters=1, batch=256, progress=False)
    assert potential.info["chi2"] > 0.05 and potential.info["iters"] == 1
    with pytest.raises(NotConvergedError, match="has not converged"):
        fit_potential(y, "fp", iters=1, batch=256, progress=False, on_unconverged="error")
    with pytest.raises(ValueError, match="on_unconverged must be one of warn, error"):
        fit_potential(y, "fp", iters=1, batch=256, progress=False, on_unconverged="ignore")


def test_convergence_criterion_needs_small_chi2_and_a_non_negative_w2():
    assert convergence_problem({"chi2": 0.01, "w2_half": 0.3}) == ""
    assert "W_2^2/2 estimate -0.2 < 0" in convergence_problem({"chi2": 0.01, "w2_half": -0.2})
    assert "> tolerance 0.01" in convergence_problem({"chi2": 0.02, "w2_half": 1.0}, chi2_tol=0.01)
    assert convergence_problem({"chi2": math.nan, "w2_half": math.nan}).count(";") == 1


def test_fit_reports_convergence_as_it_goes_with_bars_off(capsys):
    y = points((64, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_potential(y, "fp", iters=30, batch=256, lr=0.05, log_every=10, progress=False, log_seconds=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sdot fit over 64 points")]
    assert [line.split(":")[1].split()[0] for line in lines] == ["10/30", "20/30", "30/30"]
    assert all("it/s" in line and "chi2=" in line and "dual=" in line for line in lines)
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


def test_fit_reports_convergence_on_the_progress_bar(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_potential(points((64, 2)), "fp", iters=20, batch=256, lr=0.05, log_every=10, progress=True)
    err = capsys.readouterr().err
    assert "sdot fit over 64 points" in err and "20/20" in err and "chi2=" in err


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
    with pytest.warns(UserWarning, match="over 40 points has not converged"):  # 50 iterations are too few
        x, z = first.pairs(torch.empty(16, 2), gen(0))
    assert (couplings_dir(tmp_path / "r") / SDOT_FILE).is_file()

    def no_refit(*args, **kwargs):
        raise AssertionError("the saved potential should have been reused")

    monkeypatch.setattr(couplings, "fit_potential", no_refit)
    second = build_coupling(data)
    with pytest.warns(UserWarning, match="over 40 points has not converged"):  # the loaded potential is checked too
        x2, z2 = second.pairs(torch.empty(16, 2), gen(0))
    assert torch.equal(x, x2) and torch.equal(z, z2)
    other = Dataset("toy", y + 1, y[:4], None, None, None, "fp2")
    with pytest.raises(CheckpointError, match="fingerprint fp1, but this run's data has fingerprint fp2") as err:
        build_coupling(other).pairs(torch.empty(16, 2), gen(0))
    assert "set method.coupling.potential to another path" in str(err.value)  # the key a recipe can set


def exact_potential_1d(y: torch.Tensor) -> torch.Tensor:
    """The semidiscrete OT potential from N(0, 1) to uniform weights on sorted distinct 1D points y (N,).

    Cell k is the interval between the normal quantiles t_{k-1}, t_k of levels k / N; at the boundary t_k the
    scores x y_k + g_k and x y_{k+1} + g_{k+1} tie, so g_{k+1} = g_k - t_k (y_{k+1} - y_k). Centred to mean 0.
    """
    n = len(y)
    t = torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, n, dtype=torch.float64) / n)
    g = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.cumsum(t * (y[1:] - y[:-1]).double(), 0)])
    return g - g.mean()


def test_fit_finds_the_closed_form_potential_of_three_points_in_1d():
    y = torch.tensor([[-1.0], [0.0], [2.0]])
    potential = fit_potential(y, "fp", iters=400, batch=2048, lr=0.05, progress=False, levels=0)
    g = potential.g.double() - potential.g.double().mean()
    exact = exact_potential_1d(y[:, 0])  # (-0.431, 0, -0.861) up to the mean: quantiles -+0.431 of 1/3, 2/3
    assert torch.allclose(g, exact, atol=0.02) and potential.info["chi2"] < CHI2_MAX


def test_refining_an_exact_potential_returns_it_at_the_coarse_points():
    y = torch.sort(torch.randn(40, generator=gen(0))).values.unsqueeze(1)
    g = exact_potential_1d(y[:, 0]).float()
    centres, counts = cell_barycentres(g, y, gen(1), 40 * 200, batch=1024)
    assert (counts > 0).all()
    assert torch.allclose(refine_potential(g, y, y, centres, counts), g, atol=1e-5)


def test_coarse_to_fine_fit_converges_to_the_closed_form_potential_in_1d():
    n = 300
    y = (2 * torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)).unsqueeze(1)  # sorted
    exact = exact_potential_1d(y[:, 0])
    perm = torch.randperm(n, generator=gen(4))  # shuffled rows: the subsamples must not be the first points

    def error_and_chi2(levels: int) -> tuple[float, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            potential = fit_potential(y[perm], "fp", iters=600, batch=2048, lr=0.05, progress=False, levels=levels)
        g = potential.g.double()[torch.argsort(perm)]  # back to the sorted order
        return (g - g.mean() - exact).abs().max().item() / exact.abs().max().item(), potential.info["chi2"]

    error, chi2 = error_and_chi2(1)  # 100 then 300 points
    assert chi2 < CHI2_MAX and error < 0.1
    single_error, single_chi2 = error_and_chi2(0)  # one level, same finest-level iterations: far from it
    assert single_chi2 > 5 * chi2 and single_error > 2 * error


@pytest.mark.parametrize("levels", [1, 0])
def test_fit_is_deterministic_under_a_seed(levels):
    y = points((600, 2), 5)
    fit = dict(iters=40, batch=256, lr=0.05, progress=False, levels=levels)  # unconverged: a polish round runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, again = fit_potential(y, "fp", seed=3, **fit), fit_potential(y, "fp", seed=3, **fit)
        other = fit_potential(y, "fp", seed=4, **fit)
    assert torch.equal(first.g, again.g) and not torch.equal(first.g, other.g)
    assert first.info == {**again.info, "fit_seconds": first.info["fit_seconds"]}
    assert first.info["levels"] == levels and first.info["polish"] == 1
    assert len(first.history["iter"]) == 1 + levels + 1  # one window per level, one for the polish round


def test_polish_rounds_run_only_while_the_fit_is_unconverged():
    y = points((64, 2))
    with pytest.warns(UserWarning, match="has not converged"):
        unconverged = fit_potential(y, "fp", iters=8, batch=256, lr=0.05, progress=False, polish=2)
    assert unconverged.info["polish"] == 2 and unconverged.history["iter"][-1] == 8 + 2 * 2
    converged = fit_potential(y, "fp", seed=0, polish=2, **FIT)
    assert converged.info["polish"] == 0 and converged.info["chi2"] < CHI2_MAX


def test_level_sizes():
    assert level_sizes(20000, -1, factor=8) == [2500, 20000]
    assert level_sizes(1_280_000, -1, factor=8) == [2500, 20000, 160000, 1_280_000]
    assert level_sizes(20000, -1, factor=3) == [2222, 6666, 20000]
    assert level_sizes(1437, -1) == level_sizes(1437, 0) == [1437]
    assert level_sizes(100, 5, factor=8) == [12, 100]  # no level below 2 points
    auto = level_sizes(160_000, -1)
    assert auto[-1] == 160_000 and auto[0] <= 4096 < auto[1]
    with pytest.raises(ValueError, match="levels must be >= -1"):
        level_sizes(100, -2)
