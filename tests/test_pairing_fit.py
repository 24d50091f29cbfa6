"""The fit of a teacher's NFM pairs to N(0, I), checked against analytic values."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from nfm.pairing_fit import gaussian_fit_kl, pairing_fit
from nfm.teacher_pairs import TeacherHandle


class ScaleFlow(nn.Module):
    """z = (x - shift) / scale: an affine flow whose density of x~ = x + eta * eps is known in closed form."""

    def __init__(self, eta: float, shift: float, scale: float):
        super().__init__()
        self.eta = eta
        self.shift = nn.Parameter(torch.tensor(shift), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(scale), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.shift) / self.scale
        return z, torch.full((len(x),), -x[0].numel() * math.log(float(self.scale)), dtype=x.dtype)


def handle(flow: nn.Module) -> TeacherHandle:
    return TeacherHandle(flow, Path("teacher"), 0, "", "")


def test_gaussian_fit_kl_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40_000, 8, generator=gen, dtype=torch.float64)
    assert gaussian_fit_kl(z) < 1e-3
    # N(1, 4 I): KL per dimension (4 + 1 - 1 - log 4) / 2
    assert gaussian_fit_kl(1 + 2 * z) == pytest.approx((4 - math.log(4)) / 2, rel=0.02)


def test_gaussian_fit_kl_refuses_too_few_latents():
    with pytest.raises(ValueError, match="N > D"):
        gaussian_fit_kl(torch.randn(8, 8))


def test_pairing_fit_of_a_teacher_that_whitens_the_perturbation_exactly():
    """Images all zero, z = x~ / eta = eps': the latents are N(0, I) and the NLL per dimension is
    E[eps^2] / 2 + log(2 pi) / 2 + log(eta)."""
    eta = 0.3
    fit = pairing_fit(handle(ScaleFlow(eta, 0.0, eta)), torch.zeros(500, 1, 4, 4), draws=4, seed=0)
    assert fit["nll_nats_per_dim"] == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi) + math.log(eta), abs=0.01)
    assert fit["z_rms"] == pytest.approx(1.0, abs=0.01)
    assert fit["gaussian_kl_per_dim"] < 0.01
    assert (fit["images"], fit["draws"], fit["eta"], fit["perturbation"]) == (500, 4, eta, "gaussian")


def test_a_teacher_that_misses_the_scale_has_the_larger_nll_and_gap():
    """z = x~ / (2 eta) has variance 1/4: NLL and Gaussian-fit KL both rise by the closed-form gap
    KL(N(0, 1/4) || N(0, 1)) = (1/4 - 1 - log(1/4)) / 2 per dimension."""
    eta, images = 0.3, torch.zeros(500, 1, 4, 4)
    good = pairing_fit(handle(ScaleFlow(eta, 0.0, eta)), images)
    narrow = pairing_fit(handle(ScaleFlow(eta, 0.0, 2 * eta)), images)
    gap = (0.25 - 1 - math.log(0.25)) / 2
    assert narrow["nll_nats_per_dim"] - good["nll_nats_per_dim"] == pytest.approx(gap, abs=0.01)
    assert narrow["gaussian_kl_per_dim"] == pytest.approx(gap, abs=0.01)


def test_pairing_fit_uses_the_couplings_own_draws():
    """Same seed, same pairs: the figures repeat exactly; another seed gives other draws."""
    flow, images = ScaleFlow(0.2, 0.1, 0.5), torch.rand(50, 1, 4, 4)
    first, again = pairing_fit(handle(flow), images, seed=3), pairing_fit(handle(flow), images, seed=3)
    assert first == again
    assert pairing_fit(handle(flow), images, seed=4)["nll_nats_per_dim"] != first["nll_nats_per_dim"]
    with pytest.raises(ValueError, match="draws"):
        pairing_fit(handle(flow), images, draws=0)
