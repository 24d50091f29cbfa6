"""F2D2 losses: zero at the true map of Gaussian data, analytic divergence targets, dyadic pairs, validation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from f2d2.flowmap import FlowMapConfig, build_flowmap
from gaussian_reference import GaussianFlowMap, GaussianVelocity
from f2d2.flowmap import FlowMapSampler
from f2d2.losses import F2D2, F2D2Config, build_f2d2_loss, build_f2d2_sampler, check_f2d2, dyadic_pairs
from shared.backbones import UNetConfig
from shared.catalog import BuildContext
from shared.config import RunConfig

MEAN = torch.tensor([0.5, -1.0, 2.0])
STD = torch.tensor([0.3, 1.5, 0.05])


def _batch(n: int = 256) -> tuple[torch.Tensor]:
    return (MEAN + STD * torch.randn(n, 3, generator=torch.Generator().manual_seed(0)),)


def _method(**kw) -> F2D2:
    return F2D2(F2D2Config(teacher="analytic", **kw), 3, teacher=GaussianVelocity(MEAN, STD))


class _Perturbed(GaussianFlowMap):
    """The exact map with D off by 5% or u off by 0.05 (what the losses must notice)."""

    def __init__(self, what: str):
        super().__init__(MEAN, STD)
        self.what = what

    def forward(self, x, t, s):
        u, d = super().forward(x, t, s)
        return (u + 0.05, d) if self.what == "u" else (u, 1.05 * d)


# Shortcut: two Euler half steps close the recursion on the finest level, exact only as 2^-levels -> 0.
@pytest.mark.parametrize("variant,levels", [("shortcut", 20), ("meanflow", 6)])
@pytest.mark.parametrize("div_source,divergence", [("teacher", "exact"), ("teacher", "hutchinson"), ("self", "exact")])
def test_losses_vanish_at_the_true_map_and_see_perturbations(variant, levels, div_source, divergence):
    method = _method(variant=variant, levels=levels, div_source=div_source, divergence=divergence)
    gen = torch.Generator().manual_seed(3)
    loss, logs = method(GaussianFlowMap(MEAN, STD), _batch(), gen)
    assert loss.item() < 1e-8, logs
    assert any(k.startswith("d_") for k in logs) and any(k.startswith("u_") for k in logs)
    for what in ("u", "d"):
        bad, logs = method(_Perturbed(what), _batch(), torch.Generator().manual_seed(3))
        assert bad.item() > 1e-4, (what, logs)


def test_shortcut_finest_level_error_shrinks_with_levels():
    losses = [_method(levels=L)(GaussianFlowMap(MEAN, STD), _batch(), torch.Generator().manual_seed(0))[0].item()
              for L in (4, 8, 16)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("divergence,probe", [("exact", "rademacher"), ("hutchinson", "rademacher")])
def test_divergence_targets_equal_the_analytic_ones(divergence, probe):
    method = _method(divergence=divergence, probe=probe)
    x = _batch(64)[0]
    t = torch.rand(64, generator=torch.Generator().manual_seed(1))
    v, negdiv = method.tangent_targets(GaussianFlowMap(MEAN, STD), x, x, x, t, torch.Generator(), need_div=True)
    analytic = -GaussianVelocity(MEAN, STD).rate(t).sum(1).float()
    torch.testing.assert_close(negdiv, analytic, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(v, GaussianVelocity(MEAN, STD)(x, t))
    torch.testing.assert_close(negdiv, GaussianFlowMap(MEAN, STD)(x, t, t)[1], atol=1e-4, rtol=1e-5)


def test_gaussian_probe_divergence_target_is_unbiased():
    method = _method(divergence="hutchinson", probe="gaussian")
    x = _batch(1)[0].expand(4000, 3).contiguous()
    t = torch.full((4000,), 0.3)
    _, negdiv = method.tangent_targets(GaussianFlowMap(MEAN, STD), x, x, x, t, torch.Generator().manual_seed(0), True)
    analytic = -GaussianVelocity(MEAN, STD).rate(t[:1]).sum().item()
    assert abs(negdiv.mean().item() - analytic) < 4 * negdiv.std().item() / 4000**0.5
    assert negdiv.std().item() > 0.1


def test_dyadic_pairs_are_grid_jumps_in_both_directions():
    t, s, fine = dyadic_pairs(4000, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    size = (s - t).abs()
    assert set(size.unique().tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert torch.all((t >= 0) & (t <= 1) & (s >= 0) & (s <= 1))
    assert torch.allclose(torch.remainder(torch.minimum(t, s), size), torch.zeros_like(t))
    assert (s > t).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(fine, size == 0.125)


@pytest.mark.parametrize("variant", ["shortcut", "meanflow"])
def test_unet_losses_backpropagate_and_u_stage_leaves_the_head_alone(variant):
    torch.manual_seed(0)
    cfg = FlowMapConfig(backbone=UNetConfig(channels=(16, 32), attention=(False, True), attention_head_dim=16,
                                            norm_groups=8), head_hidden=8)
    model = build_flowmap(cfg, (1, 8, 8))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    for d_weight in (1.0, 0.0):
        method = F2D2(F2D2Config(variant=variant, div_source="self", divergence="hutchinson", d_weight=d_weight,
                                 levels=2), 64)
        model.zero_grad()
        loss, logs = method(model, (x,), torch.Generator().manual_seed(0))
        loss.backward()
        head = model.div_head.net[-1].weight.grad
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        assert (head.abs().sum() > 0) == (d_weight > 0), logs
        assert any(k.startswith("d_") for k in logs) == (d_weight > 0)


def _refused_teacher_load(run_dir, **kw):
    raise AssertionError(f"no teacher run should be loaded (asked for {run_dir})")


def build_f2d2(cfg: F2D2Config, run_cfg: RunConfig, data) -> F2D2:
    """The f2d2 loss for `run_cfg` on `data` (a teacher-free config never loads a run)."""
    return build_f2d2_loss(cfg, BuildContext(run_cfg, data, Path("unused"), _refused_teacher_load))


@pytest.mark.parametrize("cfg, model, match", [
    (F2D2Config(), FlowMapConfig(), "needs method.teacher"),
    (F2D2Config(variant="lsd", div_source="self"), FlowMapConfig(), "variant"),
    (F2D2Config(div_source="self", boot_fraction=1.0), FlowMapConfig(), "boot_fraction"),
    (F2D2Config(div_source="self"), type("M", (), {"name": "mlp"})(), "model.name: flowmap"),
])
def test_builder_validates_the_recipe(cfg, model, match):
    run_cfg = RunConfig(model=model)
    data = type("D", (), {"dim": 2, "fingerprint": "x", "base_fingerprint": "x"})()
    with pytest.raises(ValueError, match=match):
        check_f2d2(cfg, run_cfg)
    with pytest.raises(ValueError, match=match):  # the loss (training) ...
        build_f2d2(cfg, run_cfg, data)
    with pytest.raises(ValueError, match=match):  # ... and the sampler (loading a run) both check
        build_f2d2_sampler(cfg, run_cfg, data)


def test_builders_of_a_valid_recipe():
    run_cfg = RunConfig(model=FlowMapConfig())
    data = type("D", (), {"dim": 2, "fingerprint": "x", "base_fingerprint": "x"})()
    assert build_f2d2(F2D2Config(div_source="self"), run_cfg, data).div_kind == "exact"
    sampler = build_f2d2_sampler(F2D2Config(div_source="self", nll_steps=8), run_cfg, data)
    assert isinstance(sampler, FlowMapSampler) and sampler.nll_steps == 8 and not sampler.exact_likelihood
    assert sampler.trained_levels == 6


def test_a_map_initialised_from_its_teacher_must_embed_time_as_the_teacher(tmp_path):
    from f2d2.losses import check_init_embeds_time_as_teacher
    from shared.backbones import MLPConfig

    teacher = str(tmp_path / "fm")
    run_cfg = RunConfig(model=FlowMapConfig(backbone=MLPConfig(time_embed_scale=1000.0)))
    run_cfg.train.init_from = teacher
    with pytest.raises(ValueError, match=r"model.time_embed_scale is 30.*set model.backbone.time_embed_scale=30"):
        check_init_embeds_time_as_teacher(teacher, MLPConfig(time_embed_scale=30.0), run_cfg)
    check_init_embeds_time_as_teacher(teacher, MLPConfig(time_embed_scale=1000.0), run_cfg)  # the same: fine
    run_cfg.train.init_from = str(tmp_path / "f2d2_u")  # resumed from another map: not the teacher's weights
    check_init_embeds_time_as_teacher(teacher, MLPConfig(time_embed_scale=30.0), run_cfg)
