"""Tests for shared.likelihood: closed-form Gaussian densities, divergence estimators, NFE, argument checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gaussian_reference import GaussianVelocity, gaussian_log_density
from shared.likelihood import (DIVERGENCES, PROBES, choose_divergence, divergence_exact, divergence_hutchinson,
                               log_likelihood, make_probe)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TimeMLP(nn.Module):
    """A small nonlinear velocity field on flat (B, D) inputs, conditioned on t."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def mlp_field(dim: int) -> TimeMLP:
    """A float64 TimeMLP in eval mode, as evaluation code would pass it."""
    return TimeMLP(dim).double().eval()


class Counter:
    """Counts calls to a wrapped field, independently of the solver's own counter."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, **extras):
        self.calls += 1
        return self.fn(x, t, **extras)


def test_gaussian_closed_form_with_exact_divergence():
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    x = mu + s * torch.randn(6, 3, dtype=torch.float64) * 1.5
    result = log_likelihood(GaussianVelocity(mu, s), x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(result.logp, gaussian_log_density(x, mu, s), rtol=0, atol=1e-4)
    # The noise endpoint of this flow is the whitened data point.
    torch.testing.assert_close(result.z, (x - mu) / s, rtol=0, atol=1e-4)


def test_exact_divergence_matches_jacobian_trace():
    model = mlp_field(5)
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    v, div = divergence_exact(model, x, t)
    torch.testing.assert_close(v, model(x, t))
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda xi: model(xi[None], t[i:i + 1])[0], x[i])
        torch.testing.assert_close(div[i], torch.trace(jac))


def test_exact_divergence_of_input_independent_field_is_zero():
    x = torch.randn(3, 2)
    v, div = divergence_exact(lambda y, t: torch.ones_like(y).detach(), x, torch.zeros(3))
    torch.testing.assert_close(div, torch.zeros(3))


@pytest.mark.parametrize("kind", PROBES)
def test_hutchinson_is_unbiased(kind):
    model = mlp_field(4)
    n = 4000
    x = torch.randn(1, 4, dtype=torch.float64).expand(n, 4)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    probe = make_probe(x, kind)
    _, estimates = divergence_hutchinson(model, x, t, probe)
    _, exact = divergence_exact(model, x[:1], t[:1])
    assert estimates.std() > 0  # the check below would be vacuous for a noiseless estimator
    assert abs(estimates.mean() - exact[0]) < 4 * estimates.std() / math.sqrt(n)


def test_make_probe_distributions():
    like = torch.empty(50000, dtype=torch.float64)
    rademacher = make_probe(like, "rademacher")
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}
    gaussian = make_probe(like, "gaussian", generator=torch.Generator().manual_seed(1))
    assert gaussian.dtype == torch.float64
    assert abs(gaussian.mean()) < 0.02 and abs(gaussian.std() - 1) < 0.02
    with pytest.raises(ValueError, match="rademacher, gaussian"):
        make_probe(like, "sphere")


@pytest.mark.parametrize("kind", PROBES)
def test_hutchinson_log_likelihood_averages_to_exact(kind):
    model = mlp_field(3)
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = log_likelihood(model, x, method="rk4", steps=10).logp
    runs = torch.stack([log_likelihood(model, x, divergence="hutchinson", probe=kind, method="rk4", steps=10,
                                       generator=torch.Generator().manual_seed(seed)).logp
                        for seed in range(40)])
    assert runs.std(0).min() > 0
    assert torch.all((runs.mean(0) - exact).abs() < 5 * runs.std(0) / math.sqrt(len(runs)))


def test_generator_makes_hutchinson_reproducible():
    model = mlp_field(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    runs = [log_likelihood(model, x, divergence="hutchinson", method="rk4", steps=4,
                           generator=torch.Generator().manual_seed(seed)).logp for seed in (7, 7, 8)]
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_image_shaped_input(divergence):
    mu = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 4, 4)
    s = torch.linspace(0.5, 2, 16, dtype=torch.float64).reshape(1, 4, 4)
    x = mu + s * torch.randn(3, 1, 4, 4, dtype=torch.float64)
    # A diagonal Jacobian makes the Rademacher estimate exact, so both must hit the closed form.
    result = log_likelihood(GaussianVelocity(mu, s), x, divergence=divergence, rtol=1e-8, atol=1e-8)
    assert result.logp.shape == (3,) and result.z.shape == x.shape
    torch.testing.assert_close(result.logp, gaussian_log_density(x, mu, s), rtol=0, atol=1e-4)


@pytest.mark.parametrize("divergence, method, steps, per_step", [
    ("exact", "dopri5", None, None), ("hutchinson", "dopri5", None, None),
    ("exact", "euler", 5, 1), ("hutchinson", "rk4", 5, 4)])
def test_nfe_counts_model_calls(divergence, method, steps, per_step):
    counter = Counter(mlp_field(3))
    result = log_likelihood(counter, torch.randn(2, 3, dtype=torch.float64), divergence=divergence,
                            method=method, steps=steps)
    assert result.nfe == counter.calls > 0
    if per_step is not None:
        assert result.nfe == per_step * steps


def test_runs_under_no_grad_and_keeps_eval_mode():
    model = mlp_field(3)
    extras_seen = []
    with torch.no_grad():
        result = log_likelihood(lambda x, t, tag: extras_seen.append(tag) or model(x, t),
                                torch.randn(2, 3, dtype=torch.float64), tag="cond")
    assert not model.training
    assert not result.logp.requires_grad
    assert extras_seen and set(extras_seen) == {"cond"}


def test_choose_divergence():
    assert choose_divergence("auto", 64) == "exact"
    assert choose_divergence("auto", 65) == "hutchinson"
    assert choose_divergence("exact", 3072) == "exact"
    assert choose_divergence("hutchinson", 2) == "hutchinson"
    with pytest.raises(ValueError, match="auto, exact, hutchinson"):
        choose_divergence("trace", 2)


def test_bad_arguments_list_choices():
    x = torch.randn(2, 3)
    field = lambda y, t: -y  # noqa: E731
    with pytest.raises(ValueError, match="auto, exact, hutchinson"):
        log_likelihood(field, x, divergence="trace")
    with pytest.raises(ValueError, match="rademacher, gaussian"):
        log_likelihood(field, x, divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="dopri5"):
        log_likelihood(field, x, method="rk45")
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(field, x, method="rk4")
