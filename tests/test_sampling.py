"""Tests for shared.sampling: time grids, solver orders of accuracy, NFE accounting, a Gaussian flow."""
from __future__ import annotations

import math

import pytest
import torch

from gaussian_reference import GaussianVelocity
from shared.sampling import ADAPTIVE_SOLVERS, FIXED_SOLVERS, GRIDS, CountingField, sample, time_grid

RATE = 1.0  # a in the linear test field v = a * x


def linear_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = a x; from t = 1 to t = 0 the exact solution is x(0) = x(1) exp(-a)."""
    return RATE * x


def time_dependent_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = (1/2 + t) x, so solvers must evaluate at the right times; x(0) = x(1) exp(-1)."""
    return (0.5 + t.reshape(-1, *([1] * (x.dim() - 1)))) * x


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Counter:
    """Counts calls to a wrapped field, independently of the sampler's own counter."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, **extras):
        self.calls += 1
        return self.fn(x, t, **extras)


@pytest.mark.parametrize("kind", GRIDS)
def test_time_grid_endpoints_and_monotone(kind):
    grid = time_grid(10, kind)
    assert grid.shape == (11,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


def test_time_grid_values():
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(time_grid(4, "quadratic"), torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0]))


def test_time_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="linear, quadratic"):
        time_grid(4, "cosine")


def test_counting_field_broadcasts_scalar_time():
    seen = []
    field = CountingField(lambda x, t, scale: seen.append(t) or scale * x, scale=2.0)
    x = torch.ones(3, 2)
    torch.testing.assert_close(field(x, 0.5), 2 * x)
    field(x, torch.full((3,), 0.25))
    assert field.nfe == 2
    torch.testing.assert_close(seen[0], torch.full((3,), 0.5))
    torch.testing.assert_close(seen[1], torch.full((3,), 0.25))


def _observed_orders(field, decay: float, solver: str) -> list[float]:
    """log2 of successive error ratios as the number of steps doubles through 8, 16, 32, 64."""
    noise = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    exact = noise * math.exp(-decay)
    errors = [(sample(field, noise, steps=n, solver=solver).samples - exact).abs().max().item()
              for n in (8, 16, 32, 64)]
    return [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]


@pytest.mark.parametrize("field, decay", [(linear_field, RATE), (time_dependent_field, 1.0)])
@pytest.mark.parametrize("solver, low, high", [("euler", 0.9, 1.1), ("heun", 1.9, 2.1)])
def test_fixed_solver_order(field, decay, solver, low, high):
    orders = _observed_orders(field, decay, solver)
    assert all(low <= p <= high for p in orders), orders


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("heun", 2)])
def test_fixed_solver_nfe(solver, per_step):
    counter = Counter(linear_field)
    result = sample(counter, torch.randn(4, 3), steps=7, solver=solver, grid="quadratic")
    assert result.nfe == per_step * 7 == counter.calls


def test_adaptive_nfe_is_counted_and_accurate():
    counter = Counter(linear_field)
    noise = torch.randn(5, 3, dtype=torch.float64)
    result = sample(counter, noise, solver="dopri5", rtol=1e-8, atol=1e-8)
    assert result.nfe == counter.calls > 0
    assert (result.samples - noise * math.exp(-RATE)).abs().max().item() < 1e-4


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_every_adaptive_solver_runs(solver):
    noise = torch.randn(2, 3, dtype=torch.float64)
    result = sample(linear_field, noise, solver=solver, rtol=1e-6, atol=1e-6)
    assert result.nfe > 0
    assert (result.samples - noise * math.exp(-RATE)).abs().max().item() < 1e-5


def test_gaussian_flow_reaches_data_distribution():
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.5], dtype=torch.float64)
    s = torch.tensor([0.5], dtype=torch.float64)
    n = 20000
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x = sample(GaussianVelocity(mu, s), noise, solver="dopri5").samples
    # The optimal flow of a diagonal Gaussian is the affine map z -> mu + s z.
    torch.testing.assert_close(x, mu + s * noise, rtol=0, atol=1e-3)
    assert torch.all((x.mean(0) - mu).abs() < 5 * s / math.sqrt(n))
    assert torch.all((x.std(0) - s).abs() < 5 * s / math.sqrt(2 * n))


def test_unknown_solver_lists_choices():
    with pytest.raises(ValueError) as err:
        sample(linear_field, torch.randn(2, 2), solver="rk45")
    for name in FIXED_SOLVERS + ADAPTIVE_SOLVERS:
        assert name in str(err.value)


@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_image_shaped_noise_and_trajectory(solver):
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = sample(linear_field, noise, steps=64, solver=solver, return_trajectory=True)
    assert result.samples.shape == noise.shape
    assert result.trajectory.shape == (65, *noise.shape)
    torch.testing.assert_close(result.trajectory[0], noise)
    torch.testing.assert_close(result.trajectory[-1], result.samples)
    torch.testing.assert_close(result.samples, noise * math.exp(-RATE), rtol=0.05, atol=0.05)


def test_extras_reach_the_model():
    result = sample(lambda x, t, scale: scale * x, torch.ones(2, 2), steps=4, scale=0.0)
    torch.testing.assert_close(result.samples, torch.ones(2, 2))
    assert result.trajectory is None


def test_timed_sampling_leaves_out_the_warmup_and_keeps_the_seeded_samples(monkeypatch):
    """The untimed warm-up sees the first noise rows; the clock counts only the n timed rows; samples are unchanged."""
    from types import SimpleNamespace

    from shared import evaluate

    clock = [0.0]
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])
    run = SimpleNamespace(model=torch.nn.Linear(1, 1), dataset=SimpleNamespace(shape=(3,)), sampler=SimpleNamespace(
        prior_sample=lambda n, shape, device, gen: torch.randn(n, *shape, generator=gen)))
    calls = []

    def sample_fn(noise):
        calls.append(len(noise))
        clock[0] += len(noise)  # one clock unit per sample
        return SimpleNamespace(samples=2 * noise, nfe=1)

    timed = evaluate.generate_with(run, 12, sample_fn, seed=5, batch_size=5, warmup=4)
    plain = evaluate.generate_with(run, 12, sample_fn, seed=5, batch_size=5, warmup=0)
    assert calls == [4, 5, 5, 2, 5, 5, 2]
    assert timed.seconds == 12 and plain.seconds == 12
    assert torch.equal(timed.x, plain.x)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(timed.x, 2 * torch.cat([torch.randn(k, 3, generator=gen) for k in (5, 5, 2)]))
