"""F2D2's few-step log p is a normalised density at the map Shortcut training converges to.

No training: the map is built as the fixed point of the training targets (`f2d2.fixed_point`) on an
exact velocity field, so each jump of size 2^-k is the composition its targets ask for, down to
the finest level. Its few-step log p is then compared with the exact log-density of the data, for an
analytic Gaussian (where D cannot depend on x) and a 2D Gaussian mixture (where it does). The former
finest-level rule, two Euler half steps, sat above the exact density by ~0.03 nats on the Gaussian;
the test holds the current rule to a tenth of that and shows the Euler rule fails it.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from f2d2.fixed_point import ConvergedShortcutMap, euler_half_step_targets, exact_tangent
from f2d2.flowmap import FlowMapSampler, few_step_log_likelihood, few_step_sample, untrained_jumps
from f2d2.losses import F2D2Config, dyadic_pairs, validate
from gaussian_reference import GaussianVelocity, gaussian_log_density
from shared.densities import KNOWN_DENSITIES
from shared.sampling import time_grid

LEVELS = 6


def _gap(map_fn, x: Tensor, exact: Tensor, steps: int) -> tuple[float, float]:
    """Mean of model log p - exact log p (nats) and its paired standard error."""
    diff = few_step_log_likelihood(map_fn, x, steps).logp - exact
    return diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()


def test_converged_map_is_normalised_on_a_sharp_gaussian():
    mean, std = torch.tensor([0.3, -0.2]), torch.tensor([0.15, 0.15])
    x = (mean + std * torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))).double()
    exact = gaussian_log_density(x, mean, std)
    tangent = exact_tangent(GaussianVelocity(mean, std))
    for steps in (1, 4):
        gap, _ = _gap(ConvergedShortcutMap(tangent, LEVELS), x, exact, steps)
        assert abs(gap) < 0.003, (steps, gap)
    euler_gap, se = _gap(ConvergedShortcutMap(tangent, LEVELS, euler_half_step_targets), x, exact, 4)
    assert euler_gap > 0.02 and euler_gap > 10 * se, "the Euler rule's bias is what this test exists to catch"


def test_converged_map_is_normalised_on_a_2d_mixture_and_its_samples_follow_it():
    gmm = KNOWN_DENSITIES["gmm2"]
    x = gmm.sample(1500, torch.Generator().manual_seed(1)).double()
    exact = gmm.log_prob(x)
    tangent = exact_tangent(gmm.velocity)
    gap, se = _gap(ConvergedShortcutMap(tangent, LEVELS), x, exact, 2)
    assert abs(gap) < 0.01 and abs(gap) < max(3 * se, 0.003), (gap, se)
    euler_gap, _ = _gap(ConvergedShortcutMap(tangent, LEVELS, euler_half_step_targets), x, exact, 2)
    assert euler_gap > 2 * abs(gap) + 0.01
    # the sampling direction: the log p the map assigns to its own samples matches the density at them
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result, logp = few_step_sample(ConvergedShortcutMap(tangent, LEVELS), noise, 2)
    assert (logp - gmm.log_prob(result.samples)).abs().mean().item() < 0.02


def test_every_accepted_grid_asks_only_for_jumps_training_produces():
    t, s, _ = dyadic_pairs(200_000, LEVELS, torch.device("cpu"), torch.Generator().manual_seed(0))
    trained = {(round(a, 9), round(b, 9)) for a, b in zip(torch.minimum(t, s).tolist(), torch.maximum(t, s).tolist())}
    sampler = FlowMapSampler(4, trained_levels=LEVELS)
    accepted = 0
    for grid in ("linear", "quadratic", "geometric"):
        for steps in range(1, 10):
            times = time_grid(steps, grid, dtype=torch.float64).flip(0).tolist()
            jumps = {(round(a, 9), round(b, 9)) for a, b in zip(times[:-1], times[1:])}
            if untrained_jumps(steps, grid, LEVELS):
                assert not jumps <= trained, (grid, steps)
                with pytest.raises(ValueError, match="Shortcut training never produced"):
                    sampler.check_grid(steps, grid)
            else:
                assert jumps <= trained, (grid, steps, jumps - trained)
                sampler.check_grid(steps, grid)
                accepted += 1
    assert accepted == 4 + 7 + 1  # linear K = 1, 2, 4, 8; geometric K = 1..7; quadratic only K = 1
    FlowMapSampler(4, trained_levels=None).check_grid(3, "quadratic")  # MeanFlow trains every (t, s)


def test_a_shortcut_config_whose_nll_steps_need_untrained_jumps_is_refused():
    with pytest.raises(ValueError, match="method.nll_steps: the linear grid with K = 3"):
        validate(F2D2Config(div_source="self", nll_steps=3))
    validate(F2D2Config(div_source="self", nll_steps=3, variant="meanflow"))
