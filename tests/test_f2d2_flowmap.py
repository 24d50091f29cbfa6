"""Flow-map model and few-step estimators: exact on Gaussian data, jvp identity, teacher initialisation."""
from __future__ import annotations

import pytest
import torch

from f2d2.flowmap import FlowMapConfig, build_flowmap, few_step_log_likelihood, few_step_sample, naive_log_likelihood
from gaussian_reference import GaussianFlowMap, GaussianVelocity, gaussian_log_density
from shared.backbones import MLPConfig, TimeUNet, UNetConfig, build_mlp
from shared.likelihood import divergence_exact

MEAN = torch.tensor([0.5, -1.0, 2.0])
STD = torch.tensor([0.3, 1.5, 0.05])  # one sharp dimension: its divergence is large near the data


def _data(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MEAN + STD * torch.randn(n, 3, generator=g)).double()


@pytest.mark.parametrize("grid", ["linear", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_few_step_likelihood_of_the_exact_map_is_the_analytic_density(steps, grid):
    x = _data()
    res = few_step_log_likelihood(GaussianFlowMap(MEAN, STD), x, steps, grid)
    assert res.nfe == steps
    torch.testing.assert_close(res.logp, gaussian_log_density(x, MEAN, STD), atol=1e-9, rtol=0)


@pytest.mark.parametrize("steps", [1, 4])
def test_few_step_sample_lands_on_the_data_with_its_log_density(steps):
    noise = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result, logp = few_step_sample(GaussianFlowMap(MEAN, STD), noise, steps)
    assert result.nfe == steps
    torch.testing.assert_close(result.samples, (MEAN + STD * noise).double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(logp, gaussian_log_density(result.samples, MEAN, STD), atol=1e-9, rtol=0)


def test_naive_estimate_without_d_is_off_at_few_steps_and_converges():
    x = _data()
    exact = gaussian_log_density(x, MEAN, STD)
    err = {k: (naive_log_likelihood(GaussianFlowMap(MEAN, STD), x, k).logp - exact).abs().mean().item()
           for k in (1, 8, 256)}
    assert err[1] > 5.0 and err[1] > err[8] > err[256]
    assert err[256] < 0.1


def test_tangent_of_the_exact_map_is_the_velocity_and_minus_its_divergence():
    x, t = _data(16), torch.rand(16, dtype=torch.float64)
    u, d = GaussianFlowMap(MEAN, STD)(x, t, t)
    v, div = divergence_exact(GaussianVelocity(MEAN, STD), x, t)
    torch.testing.assert_close(u, v)
    torch.testing.assert_close(d, -div)


def test_jvp_gives_the_eulerian_identity_of_the_exact_map():
    x = _data(16)
    g = torch.Generator().manual_seed(2)
    t, s = torch.rand(16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    fmap, v = GaussianFlowMap(MEAN, STD), GaussianVelocity(MEAN, STD)(x, t)
    (u, d), (du, dd) = torch.func.jvp(fmap, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    torch.testing.assert_close(u, v + (s - t)[:, None] * du)
    _, div = divergence_exact(GaussianVelocity(MEAN, STD), x, t)
    torch.testing.assert_close(d, -div + (s - t) * dd)
    h = 1e-6  # the total derivative is the derivative along the trajectory through (x, t)
    fwd = fmap(x + h * v, t + h, s)
    bwd = fmap(x - h * v, t - h, s)
    torch.testing.assert_close(du, (fwd[0] - bwd[0]) / (2 * h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dd, (fwd[1] - bwd[1]) / (2 * h), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape,embed", [((2,), 1000.0), ((1, 4, 4), 1000.0), ((2,), 30.0)])
def test_mlp_flow_map_starts_as_its_teacher_with_a_zero_head(shape, embed):
    torch.manual_seed(0)
    backbone = MLPConfig(hidden=32, depth=2, time_dim=16, time_embed_scale=embed)
    teacher = build_mlp(backbone, shape)
    fmap = build_flowmap(FlowMapConfig(backbone=backbone, head_hidden=8, head_time_dim=16), shape)
    target = fmap.state_dict()
    matched = {k: v for k, v in teacher.state_dict().items() if k in target and target[k].shape == v.shape}
    assert set(matched) == set(teacher.state_dict())  # what train.init_from copies: every teacher tensor
    fmap.load_state_dict(matched, strict=False)
    x, t, s = torch.randn(8, *shape), torch.rand(8), torch.rand(8)
    u, d = fmap(x, t, s)
    torch.testing.assert_close(u, teacher(x, t))
    assert d.shape == (8,) and torch.all(d == 0) and fmap.div_scale == float(x[0].numel())


def test_unet_flow_map_inits_from_teacher_and_supports_jvp():
    cfg = dict(channels=(16, 32), attention=(False, True), attention_head_dim=16, norm_groups=8)
    torch.manual_seed(0)
    teacher = TimeUNet(UNetConfig(**cfg), (1, 8, 8))
    fmap = build_flowmap(FlowMapConfig(backbone=UNetConfig(**cfg), head_hidden=8, div_scale=10.0), (1, 8, 8))
    target = fmap.state_dict()
    fmap.load_state_dict({k: v for k, v in teacher.state_dict().items() if target[k].shape == v.shape}, strict=False)
    x, t, s = torch.randn(3, 1, 8, 8), torch.rand(3), torch.rand(3)
    with torch.no_grad():
        torch.testing.assert_close(fmap(x, t, s)[0], teacher(x, t), atol=1e-5, rtol=1e-5)
        for p in fmap.div_head.parameters():
            p.normal_(0, 0.1)
        dx = torch.randn_like(x)
        (u, d), (du, dd) = torch.func.jvp(fmap, (x, t, s), (dx, torch.zeros_like(t), torch.zeros_like(s)))
        h = 1e-2
        up, dp = fmap(x + h * dx, t, s)
        um, dm = fmap(x - h * dx, t, s)
    assert du.shape == x.shape and dd.shape == (3,)
    assert torch.allclose(du, (up - um) / (2 * h), atol=2e-2 * du.abs().max().item())
    assert torch.allclose(dd, (dp - dm) / (2 * h), atol=2e-2 * dd.abs().max().item() + 1e-6)


def test_flowmap_config_errors():
    with pytest.raises(ValueError, match="backbone"):
        build_flowmap(FlowMapConfig(backbone="resnet"), (2,))
    with pytest.raises(ValueError, match="div_scale"):
        build_flowmap(FlowMapConfig(div_scale=-1.0), (2,))
    with pytest.raises(ValueError, match="time_scale"):
        build_flowmap(FlowMapConfig(time_scale=0.0), (2,))
