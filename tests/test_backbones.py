"""Shapes, time conditioning, errors and trainability of the shared backbones."""
from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from shared.backbones import MLPConfig, UNetConfig, build_mlp, build_unet, timestep_embedding


def small_unet(**kw) -> UNetConfig:
    """A two-level UNet small enough for CPU tests."""
    base = dict(channels=(16, 32), attention=(False, True), norm_groups=8)
    base.update(kw)
    return UNetConfig(**base)


def make(kind: str, second_time: bool = False, shape: tuple[int, ...] | None = None, **kw):
    """A seeded model plus its data shape."""
    torch.manual_seed(0)
    if kind == "mlp":
        shape = shape or (3,)
        return build_mlp(MLPConfig(hidden=48, depth=2, time_dim=16, second_time=second_time, **kw), shape), shape
    shape = shape or (1, 8, 8)
    return build_unet(small_unet(second_time=second_time, **kw), shape), shape


def batch(shape: tuple[int, ...], b: int = 4):
    """Random x, t and s for a batch of b."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, *shape, generator=g), torch.rand(b, generator=g), torch.rand(b, generator=g)


def test_timestep_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0, :8], torch.ones(8)) and torch.allclose(emb[0, 8:], torch.zeros(8))
    assert not torch.allclose(emb[1], emb[2])
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


@pytest.mark.parametrize(
    "kind,shape",
    [("mlp", (2,)), ("mlp", (5,)), ("unet", (1, 8, 8)), ("unet", (1, 28, 28)), ("unet", (3, 16, 16))],
)
def test_output_and_feature_shapes(kind, shape):
    model, shape = make(kind, shape=shape)
    x, t, _ = batch(shape, b=3)
    out = model(x, t)
    assert out.shape == x.shape
    out2, feats = model(x, t, return_features=True)
    assert torch.allclose(out, out2)
    assert feats.shape == (3, model.feature_dim) and feats.requires_grad
    assert model.feature_dim == (48 if kind == "mlp" else 32)


def test_unet_features_are_pooled_mid_block():
    model, shape = make("unet")
    x, t, _ = batch(shape)
    seen = []
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    _, feats = model(x, t, return_features=True)
    handle.remove()
    assert seen[0].shape == (4, 32, 4, 4)
    assert torch.allclose(feats, seen[0].mean(dim=(2, 3)))
    assert model._mid is None and not model._capture


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_time_changes_output(kind):
    model, shape = make(kind)
    x, t, _ = batch(shape)
    assert not torch.allclose(model(x, t), model(x, (t + 0.3) % 1.0), atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_second_time(kind):
    model, shape = make(kind, second_time=True)
    x, t, s = batch(shape)
    assert model(x, t, s).shape == x.shape
    assert not torch.allclose(model(x, t, s), model(x, t, (s + 0.3) % 1.0), atol=1e-5)
    with pytest.raises(ValueError, match="needs a second time"):
        model(x, t)
    plain, _ = make(kind)
    with pytest.raises(ValueError, match="no second time"):
        plain(x, t, s)


def test_mlp_on_images_equals_the_mlp_on_flattened_vectors():
    torch.manual_seed(0)
    cfg = MLPConfig(hidden=32, depth=2, time_dim=16)
    on_images, on_vectors = build_mlp(cfg, (1, 8, 8)), build_mlp(cfg, (64,))
    on_vectors.load_state_dict(on_images.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    out, features = on_images(x, t, return_features=True)
    assert out.shape == x.shape and features.shape == (3, 32)
    torch.testing.assert_close(out.flatten(1), on_vectors(x.flatten(1), t))


def test_build_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"non-empty data shape.*\(\)"):
        build_mlp(MLPConfig(), ())
    with pytest.raises(ValueError, match=r"square images.*\(4,\)"):
        build_unet(small_unet(), (4,))
    with pytest.raises(ValueError, match=r"square images.*\(1, 8, 6\)"):
        build_unet(small_unet(), (1, 8, 6))
    with pytest.raises(ValueError, match=r"side 10 must be divisible by .* = 4"):
        build_unet(small_unet(channels=(16, 32, 32), attention=(False, False, True)), (1, 10, 10))
    with pytest.raises(ValueError, match="one entry per level"):
        build_unet(small_unet(attention=(True,)), (1, 8, 8))
    with pytest.raises(ValueError, match="norm_groups 8"):
        build_unet(small_unet(channels=(12, 32)), (1, 8, 8))
    with pytest.raises(ValueError, match="attention_head_dim 32"):
        build_unet(small_unet(attention=(True, True)), (1, 8, 8))


def test_digits_sized_unet_with_three_levels():
    model = build_unet(UNetConfig(channels=(16, 32, 32), norm_groups=8), (1, 8, 8))
    x, t, _ = batch((1, 8, 8))
    assert model(x, t).shape == x.shape


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradient_step_reduces_mse(kind):
    model, shape = make(kind)
    x, t, _ = batch(shape, b=8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = (model(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind,kw", [("mlp", {"layer_norm": True}), ("mlp", {"dropout": 0.3}),
                                     ("unet", {"dropout": 0.5})])
def test_eval_mode_is_deterministic(kind, kw):
    model, shape = make(kind, **kw)
    x, t, _ = batch(shape)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))


def test_time_embed_scale_slows_every_time_feature_by_the_same_factor():
    from shared.backbones import timestep_embedding

    t = torch.rand(6)
    torch.testing.assert_close(timestep_embedding(t, 16, scale=30.0), timestep_embedding(t * 0.03, 16))
    slow, fast = make("mlp", time_embed_scale=30.0)[0], make("mlp")[0]  # same seed, same weights
    x, t, _ = batch((3,))
    with torch.no_grad():
        torch.testing.assert_close(slow(x, t), fast(x, t * 0.03))


def test_mlp_dropout_acts_in_training_only_and_its_range_is_checked():
    model, shape = make("mlp", dropout=0.5)
    x, t, _ = batch(shape)
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
    with pytest.raises(ValueError, match=r"model.dropout=1.0 is out of range"):
        make("mlp", dropout=1.0)


def test_unet_supports_forward_mode_ad():
    model, shape = make("unet", second_time=True, attention=(False, True))
    x, t, s = batch(shape)
    v = torch.randn_like(x)
    _, tangent = jvp(lambda xx, tt: model(xx, tt, s), (x, t), (v, torch.ones_like(t)))
    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
    out = model(xr, tr, s)
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (xr, tr), g)
    assert torch.allclose((tangent * g).sum(), (gx * v).sum() + gt.sum(), rtol=1e-3, atol=1e-3)


def test_component_table_has_models():
    from flowdistill.components import MODELS

    assert {"mlp", "unet"} <= set(MODELS)
    assert MODELS["mlp"].config is MLPConfig and MODELS["mlp"].build is build_mlp
    assert MODELS["unet"].config is UNetConfig and MODELS["unet"].build is build_unet
