"""DiT backbone: shapes and features, second time, a training step, jvp vs finite differences, F2D2, recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from f2d2.flowmap import FlowMapConfig, FlowMapDiT, build_flowmap
from f2d2.losses import F2D2, F2D2Config
from flowdistill.cli import main
from nfm.couplings import IndependentCoupling
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from shared.dit import DiTConfig, TimeDiT, build_dit

ROOT = Path(__file__).resolve().parents[1]
TINY = DiTConfig(patch=2, depth=2, heads=2, head_dim=8)


def _digits(n: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:n]).float()[:, None]
    return (images + 0.5) / 17 * 2 - 1


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with every weight moved off DiT's zero init (so derivatives are not trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_shapes_features_and_zero_init():
    model = build_dit(TINY, (1, 8, 8))
    x, t = _digits(4), torch.rand(4)
    out, features = model(x, t, return_features=True)
    assert out.shape == x.shape and features.shape == (4, model.feature_dim) == (4, 16)
    assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero and a zero output layer: the zero field
    assert torch.equal(model(x, t), out)
    with pytest.raises(ValueError, match="no second time"):
        model(x, t, t)


def test_second_time_starts_without_effect_and_is_trainable():
    model = _perturbed(TimeDiT(DiTConfig(patch=2, depth=2, heads=2, head_dim=8, second_time=True), (1, 8, 8)))
    torch.nn.init.zeros_(model.s_embed.linear_2.weight)
    torch.nn.init.zeros_(model.s_embed.linear_2.bias)
    x, t = _digits(4), torch.rand(4)
    assert torch.allclose(model(x, t, torch.zeros(4)), model(x, t, torch.ones(4)))
    with pytest.raises(ValueError, match="needs a second time"):
        model(x, t)
    model(x, t, torch.rand(4)).pow(2).sum().backward()
    assert model.s_embed.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad,match", [({"patch": 3}, "must divide the image side"),
                                       ({"heads": 1, "head_dim": 6}, "multiple of 4"), ({"depth": 0}, "depth")])
def test_configs_that_do_not_fit_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        build_dit(DiTConfig(**{**TINY.__dict__, **bad}), (1, 8, 8))


def test_dit_trains_a_flow_matching_step_on_tiny_digits():
    torch.manual_seed(0)
    model = build_dit(TINY, (1, 8, 8))
    loss_fn = FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for step in range(3):
        loss, _ = loss_fn(model, (_digits(),), torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed), "every parameter (time MLP included) receives gradient within three steps"


def test_jvp_equals_finite_differences():
    model = _perturbed(TimeDiT(DiTConfig(patch=2, depth=2, heads=2, head_dim=8, second_time=True), (1, 8, 8)))
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    x = _digits(3).double()
    t, s = torch.rand(3, generator=g).double(), torch.rand(3, generator=g).double()
    v = torch.randn(x.shape, generator=g).double()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        def fx(y):
            return model(y, t, s)
        _, jv = torch.func.jvp(fx, (x,), (v,))
        eps = 1e-5
        assert torch.allclose(jv, (fx(x + eps * v) - fx(x - eps * v)) / (2 * eps), atol=1e-8, rtol=1e-6)
        # along (x, t, s) with tangents (v, 1, 0), as MeanFlow's total derivative; diffusers computes the
        # sinusoidal features of 1000 t in float32 (frequencies up to 1 rad per unit), so the step must be
        # small against 1 / 1000 yet above float32 rounding, hence eps = 1e-5 and the coarser tolerance
        def fts(y, tt, ss):
            return model(y, tt, ss)
        _, jt = torch.func.jvp(fts, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        eps = 1e-5
        fd = (fts(x + eps * v, t + eps, s) - fts(x - eps * v, t - eps, s)) / (2 * eps)
        assert (jt - fd).abs().max() < 2e-2 * jt.abs().max()


def test_meanflow_f2d2_loss_runs_its_jvp_through_a_dit_flow_map():
    torch.manual_seed(0)
    cfg = FlowMapConfig(backbone=TINY, time_scale=0.01, head_hidden=16, head_time_dim=16)
    model = build_flowmap(cfg, (1, 8, 8))
    assert isinstance(model, FlowMapDiT)
    _perturbed(model)
    loss_fn = F2D2(F2D2Config(variant="meanflow", div_source="self", divergence="hutchinson", d_weight=1.0), 64)
    loss, logs = loss_fn(model, (_digits(8),), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and {"u_meanflow", "d_meanflow"} <= set(logs)
    assert model.div_head.net[-1].weight.grad.abs().sum() > 0
    assert model.s_embed.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe,overrides", [
    ("recipes/digits/fm_dit.yaml", []),
    ("recipes/cifar10/fm_dit.yaml", []),
    ("recipes/digits/f2d2_meanflow.yaml", ["model.backbone={name: dit, patch: 2, depth: 2, heads: 2, head_dim: 8}"]),
])
def test_recipes_with_the_dit_pass_a_dry_run(recipe, overrides, capsys):
    assert main(["train", str(ROOT / recipe), "--dry-run", *overrides]) == 0
    assert "name: dit" in capsys.readouterr().out


def test_the_digits_dit_recipe_trains_and_samples(tmp_path):
    assert main(["train", str(ROOT / "recipes/digits/fm_dit.yaml"), f"out_dir={tmp_path}", "name=dit",
                 "train.steps=4", "train.log_every=2", "train.progress=false", "eval.steps=[2]"]) == 0
    assert list((tmp_path / "dit" / "samples").glob("*.png"))


@pytest.mark.gpu
def test_dit_bf16_step_and_float32_math_jvp_on_cuda():
    device = torch.device("cuda")
    model = _perturbed(build_dit(DiTConfig(patch=2, depth=4, heads=4, head_dim=32, second_time=True), (3, 32, 32)))
    model = model.to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    t, s = torch.rand(16, device=device), torch.rand(16, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, s).float().pow(2).mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out, jv = torch.func.jvp(lambda y: model(y, t, s), (x,), (torch.ones_like(x),))
        fd = (model(x + 1e-2, t, s) - model(x - 1e-2, t, s)) / 2e-2
    assert (jv - fd).abs().max() < 1e-2 * jv.abs().max() + 1e-4
