"""Maximum-likelihood self-guidance: the objective is the model's one-step log-likelihood and one step raises it."""
from __future__ import annotations

import torch

from shared.backbones import MLPConfig
from f2d2.flowmap import FlowMapConfig, build_flowmap, few_step_sample
from gaussian_reference import GaussianFlowMap, gaussian_log_density
from f2d2.guidance import guide_noise, guided_sample, one_step_log_likelihood

MEAN = torch.tensor([0.5, -1.0])
STD = torch.tensor([0.3, 1.5])


def test_objective_is_the_log_density_of_the_one_step_sample():
    fmap = GaussianFlowMap(MEAN, STD)
    z = torch.randn(16, 2, dtype=torch.float64)
    sample = few_step_sample(fmap, z, 1)[0].samples
    torch.testing.assert_close(one_step_log_likelihood(fmap, z), gaussian_log_density(sample, MEAN, STD))


def test_one_adam_step_raises_the_objective_and_is_counted():
    fmap = GaussianFlowMap(MEAN, STD)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guided, nfe = guide_noise(fmap, z, lr=0.1)
    assert nfe == 2
    gain = one_step_log_likelihood(fmap, guided) - one_step_log_likelihood(fmap, z)
    assert (gain > 0).float().mean() > 0.9
    # Adam's first step moves each coordinate by lr towards the mode of N(mean, std^2), here z -> 0
    torch.testing.assert_close((guided - z).abs(), torch.full_like(z, 0.1), atol=1e-6, rtol=0)
    result = guided_sample(fmap, z, steps=4, lr=0.1, iterations=3)
    assert result.nfe == 4 + 6


def test_guidance_through_a_network_leaves_its_parameters_untouched():
    torch.manual_seed(0)
    model = build_flowmap(FlowMapConfig(backbone=MLPConfig(hidden=16, depth=2, time_dim=8), head_hidden=8, head_time_dim=8), (2,))
    for p in model.div_head.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    z = torch.randn(64, 2)
    guided, _ = guide_noise(model, z, lr=0.05)
    assert one_step_log_likelihood(model, guided).mean() > one_step_log_likelihood(model, z).mean()
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(model.parameters(), before))
