"""The ODE reference log p is a property of the point, not of its batch: per-sample step control
(shared.adaptive_ode), the convergence check, and the exact flow of a 2D Gaussian mixture."""
from __future__ import annotations

import pytest
import torch

from gaussian_reference import GaussianVelocity, MixtureVelocity, gaussian_log_density
from shared.adaptive_ode import odeint_per_sample
from shared.densities import KNOWN_DENSITIES
from shared.likelihood import CONVERGED_NATS, log_likelihood, refinement_change


@pytest.fixture(scope="module")
def mixture():
    gmm = KNOWN_DENSITIES["gmm2"]
    x = gmm.sample(24, torch.Generator().manual_seed(3)).double()
    return MixtureVelocity(gmm), gmm, x


def test_same_point_same_reference_whatever_the_batch(mixture):
    field, _, x = mixture
    whole = log_likelihood(field, x).logp
    halves = torch.cat([log_likelihood(field, part).logp for part in x.split(12)])
    alone = torch.cat([log_likelihood(field, x[i:i + 1]).logp for i in range(4)])
    # the first four points among 20 strangers far out in the tails (which need many small steps)
    strangers = torch.cat([x[:4], 3.5 * torch.randn(20, 2, generator=torch.Generator().manual_seed(1),
                                                    dtype=torch.float64)])
    among_strangers = log_likelihood(field, strangers).logp[:4]
    shuffled = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    reordered = torch.empty_like(whole)
    reordered[shuffled] = log_likelihood(field, x[shuffled]).logp
    for other in (halves, reordered):
        torch.testing.assert_close(other, whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(alone, whole[:4], rtol=0, atol=1e-10)
    torch.testing.assert_close(among_strangers, whole[:4], rtol=0, atol=1e-10)


def test_float32_reference_is_batch_independent_to_1e4_nats(mixture):
    field, _, x = mixture
    f32 = lambda y, t: field(y, t).float()  # noqa: E731  a float32 network's rounding
    whole = log_likelihood(f32, x.float()).logp
    pieces = torch.cat([log_likelihood(f32, part).logp for part in x.float().split(5)])
    assert (pieces - whole).abs().max() < 1e-4


def test_convergence_check_holds_on_a_2d_mixture_and_matches_the_exact_density(mixture):
    field, gmm, x = mixture
    result, change = refinement_change(field, x)
    assert change.shape == (24,) and change.max() < CONVERGED_NATS
    torch.testing.assert_close(result.logp, gmm.log_prob(x), rtol=0, atol=2e-3)
    _, coarse = refinement_change(field, x, method="rk4", steps=2)  # a grid far too coarse is caught
    assert coarse.max() > CONVERGED_NATS
    fixed, fine = refinement_change(field, x[:6], method="rk4", steps=64)
    assert fine.max() < CONVERGED_NATS
    torch.testing.assert_close(fixed.logp, gmm.log_prob(x[:6]), rtol=0, atol=5e-3)


def test_per_sample_solver_integrates_each_sample_as_torchdiffeq_does_alone():
    from torchdiffeq import odeint

    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    s = torch.tensor([0.3, 2.0], dtype=torch.float64)
    field = GaussianVelocity(mu, s)
    x = mu + s * torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (z,) = odeint_per_sample(lambda t, parts, index: [field(parts[0], t)], [x], method="bosh3", rtol=1e-6, atol=1e-6)
    for i in range(len(x)):
        times = torch.tensor([0.0, 1.0], dtype=torch.float64)
        alone = odeint(lambda t, y: field(y, t.expand(1)), x[i:i + 1], times, method="bosh3", rtol=1e-6, atol=1e-6,
                       options=dict(step_t=times))[-1]
        torch.testing.assert_close(z[i:i + 1], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(z, (x - mu) / s, rtol=0, atol=1e-4)  # the flow whitens the data


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "adaptive_heun"])
def test_every_adaptive_solver_keeps_its_name_and_accuracy(method):
    mu = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    x = mu + s * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = log_likelihood(GaussianVelocity(mu, s), x, method=method, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.logp, gaussian_log_density(x, mu, s), rtol=0, atol=1e-3)


def test_per_sample_extras_and_probes_follow_their_samples():
    mu, s = torch.zeros(2, dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    field = GaussianVelocity(mu, s)
    seen = []

    def conditioned(y, t, scale):
        seen.append(len(scale) == len(y))
        return field(y, t) * scale[:, None]

    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scale = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(log_likelihood(conditioned, x, scale=scale).logp, log_likelihood(field, x).logp,
                               rtol=0, atol=1e-10)
    assert all(seen)
    gen = torch.Generator().manual_seed(0)
    hutch = log_likelihood(field, x, divergence="hutchinson", generator=gen).logp
    torch.testing.assert_close(hutch, gaussian_log_density(x, mu, s), rtol=0, atol=1e-3)  # linear field: exact


def test_a_diverging_sample_is_an_error_not_a_hang():
    with pytest.raises((RuntimeError, FloatingPointError)):
        odeint_per_sample(lambda t, parts, index: [parts[0] ** 2], [torch.ones(2, 1, dtype=torch.float64) * 2],
                          max_steps=200)
