"""TarFlow against independent references: brute-force Jacobians, inversion, causality, normalisation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from nfm.tarflow import KVCache, TarFlow, TarFlowConfig, encode_batched
from shared.paths import standard_normal_logprob

INVERSE_ATOL = 1e-4  # max |decode(encode(x)) - x| in fp32
CACHE_ATOL = 1e-5  # max |cached - uncached decode| in fp32

CASES = [  # (data shape, config overrides): vectors of scalar and pair tokens, grey and colour patches
    ((3,), dict(token_dim=1)),
    ((4,), dict(token_dim=2)),
    ((1, 4, 4), dict(patch=2)),
    ((1, 8, 8), dict(patch=2, blocks=4)),
    ((2, 4, 6), dict(patch=2, num_classes=3)),
    ((3,), dict(token_dim=1, transform="spline", spline_bins=5, spline_bound=1.5)),
    ((1, 4, 4), dict(patch=2, transform="spline", spline_bins=4, spline_bound=1.0, num_classes=3)),
    ((1, 4, 4), dict(patch=2, logit_alpha=0.05)),
    ((3,), dict(token_dim=1, logit_alpha=0.01, transform="spline", spline_bins=4, spline_bound=3.0)),
    ((8,), dict(token_dim=2, blocks=4, interleave=True)),
    ((12,), dict(token_dim=3, blocks=4, interleave=True, transform="spline", spline_bins=4, spline_bound=2.0)),
]


def inputs(n: int, shape: tuple[int, ...], kw: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test data: Gaussian, or uniform on [-0.99, 0.99] for a flow whose logit map needs data in [-1, 1]."""
    if kw.get("logit_alpha"):
        return (torch.rand(n, *shape, dtype=dtype) * 2 - 1) * 0.99
    return torch.randn(n, *shape, dtype=dtype)


def make(shape: tuple[int, ...], scale: float = 0.1, seed: int = 0, **kw) -> TarFlow:
    """A small TarFlow in eval mode whose zero-initialised outputs are replaced by random ones (not the identity)."""
    torch.manual_seed(seed)
    base = dict(width=16, head_dim=8, blocks=3, layers=2, mlp_ratio=2, eta=0.0)
    base.update(kw)
    flow = TarFlow(TarFlowConfig(**base), shape).eval()
    with torch.no_grad():
        for block in flow.blocks:
            block.out.weight.normal_(0, scale)
            block.out.bias.normal_(0, scale)
            block.first.normal_(0, scale)
    return flow


def labels_for(flow: TarFlow, n: int) -> torch.Tensor | None:
    return torch.arange(n) % flow.num_classes if flow.num_classes else None


def test_fresh_model_is_identity_and_registered():
    from flowdistill.components import MODELS

    assert MODELS["tarflow"].config is TarFlowConfig
    flow = MODELS["tarflow"].build(TarFlowConfig(width=32, head_dim=16), (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    z, logdet = flow(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(5))
    assert flow.n_tokens == 16 and flow.token_dim == 4 and flow.decode_passes == 4 * 15


@pytest.mark.parametrize("shape,kw", CASES)
def test_logdet_matches_bruteforce_jacobian(shape, kw):
    flow = make(shape, **kw).double()
    x = inputs(2, shape, kw, torch.float64)
    y = labels_for(flow, 2)
    z, logdet = flow.encode(x, y)
    assert z.shape == x.shape and logdet.shape == (2,) and logdet.dtype == torch.float64
    assert logdet.abs().max() > 0.1  # the test is not about an identity map
    for i in range(2):
        yi = None if y is None else y[i:i + 1]
        jac = jacobian(lambda v: flow.encode(v[None], yi)[0][0], x[i]).reshape(x[i].numel(), -1)
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape,kw", CASES)
def test_decode_inverts_encode_and_cache_matches_uncached(shape, kw):
    flow = make(shape, **kw)
    x = inputs(8, shape, kw)
    y = labels_for(flow, 8)
    z, _ = flow.encode(x, y)
    cached, uncached = flow.decode(z, y), flow.decode(z, y, use_cache=False)
    assert (cached - x).abs().max() < INVERSE_ATOL
    assert (cached - uncached).abs().max() < CACHE_ATOL


def test_one_block_is_causal_and_triangular():
    flow = make((6,), token_dim=1, blocks=2).double()
    for block in flow.blocks:
        x = torch.randn(1, 6, 1, dtype=torch.float64)
        order = torch.arange(6).flip(0) if block.flip else torch.arange(6)
        jac = jacobian(lambda v: block(v)[0], x).reshape(6, 6)[order][:, order]  # in the block's token order
        below = torch.tril_indices(6, 6, -1)
        assert torch.equal(jac.triu(1), torch.zeros_like(jac)), "z_i depends on a later token"
        assert jac[below[0], below[1]].abs().min() > 0, "z_i ignores an earlier token"
        torch.testing.assert_close(jac.diagonal().log().sum(), block(x)[1][0])
        for j in range(6):  # perturb the j-th token of the block's order: outputs before it stay put
            x2 = x.clone()
            x2[0, order[j]] += 1.0
            dz = (block(x2)[0] - block(x)[0]).abs()[0, order, 0]
            assert torch.equal(dz[:j], torch.zeros(j, dtype=dz.dtype))
            assert (dz[j:] > 0).all()


def test_interleaved_blocks_let_coordinates_of_one_token_condition_on_each_other():
    """D = 8 as N = 4 tokens of k = 2: a plain block never lets coordinates 2i and 2i + 1 (one token) depend on
    each other, a regrouping block (token j = coordinates j, j + 4) never j and j + 4, but it links 0 and 1;
    the composed flow's Jacobian is dense, and every block's log-det equals its brute-force Jacobian's."""
    flow = make((8,), token_dim=2, blocks=4, interleave=True).double()
    assert [b.regroup for b in flow.blocks] == [False, False, True, True]
    x = torch.randn(1, 4, 2, dtype=torch.float64)
    for block in flow.blocks:
        jac = jacobian(lambda v: block(v)[0], x).reshape(8, 8)
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], block(x)[1][0])
        if block.regroup:  # coordinates j and j + 4 share a token: neither depends on the other
            assert all(jac[j, j + 4] == 0 and jac[j + 4, j] == 0 for j in range(4))
            assert jac[0, 1] != 0 or jac[1, 0] != 0  # 0 and 1 sit in different tokens here
        else:  # coordinates 2i and 2i + 1 share a token
            assert all(jac[2 * i, 2 * i + 1] == 0 and jac[2 * i + 1, 2 * i] == 0 for i in range(4))
    full = jacobian(lambda v: flow.encode(v)[0], x.reshape(1, 8)).reshape(8, 8)
    assert (full.abs() > 0).all()
    plain = make((8,), token_dim=2, blocks=4).double()
    assert not any(b.regroup for b in plain.blocks)


def test_attention_is_causal_in_the_parallel_pass():
    flow = make((1, 8, 8), patch=2)
    block = flow.blocks[0]
    x = torch.randn(2, 16, 4)
    out = block.outputs(x, None)
    for j in (0, 5, 15):
        x2 = x.clone()
        x2[:, j] += 1.0
        out2 = block.outputs(x2, None)
        assert torch.equal(out2[:, :j], out[:, :j])
        assert (out2[:, j:] - out[:, j:]).abs().amax(-1).min() > 0


def test_kv_cache_step_equals_parallel_outputs():
    flow = make((1, 4, 4), patch=2, num_classes=2)
    block, x, y = flow.blocks[1], torch.randn(3, 4, 4), torch.tensor([0, 1, 2])
    cache = KVCache(len(block.layers), 4)
    steps = torch.cat([block.step(x[:, i:i + 1], i, cache, y, 0.0) for i in range(4)], 1)
    torch.testing.assert_close(steps, block.outputs(x, y), rtol=0, atol=1e-6)


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_2d_density_integrates_to_one(transform):
    torch.manual_seed(0)
    flow = TarFlow(TarFlowConfig(width=16, head_dim=8, blocks=4, layers=1, mlp_ratio=2, eta=0.0,
                                 transform=transform, spline_bound=2.0), (2,)).eval().double()
    with torch.no_grad():
        for block in flow.blocks:
            block.out.weight.normal_(0, 0.075)
            block.first.normal_(0, 0.3 if transform == "spline" else 0.0)
        x = torch.randn(2000, 2, dtype=torch.float64)
        z, logdet = flow.encode(x)
        assert (z - x).abs().mean() > 0.2 and logdet.std() > 0.1  # a non-trivial, non-Gaussian density
        side, n = 8.0, 641  # fine enough for the spline's sharper peaks
        grid = torch.linspace(-side, side, n, dtype=torch.float64)
        pts = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        z, logdet = flow.encode(pts)
        density = (standard_normal_logprob(z) + logdet).exp()
    mass = density.sum().item() * (2 * side / (n - 1)) ** 2
    assert abs(mass - 1) < 0.005


def test_guidance_zero_matches_conditional_and_guided_decode_inverts_guided_encode():
    flow = make((1, 4, 4), patch=2, num_classes=3)
    z, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = flow.decode(z, y)
    guided_zero = flow.decode(z, y, guidance=1e-30)  # runs the two-branch [conditional; null] path with weight ~0
    torch.testing.assert_close(guided_zero, plain, rtol=0, atol=1e-6)
    x = torch.randn(6, 1, 4, 4)
    zg, _ = flow.encode(x, y, guidance=1.5)
    z0, _ = flow.encode(x, y)
    assert (zg - z0).abs().max() > 1e-2  # guidance changes the map
    assert (flow.decode(zg, y, guidance=1.5) - x).abs().max() < INVERSE_ATOL
    assert (flow.decode(zg, y, guidance=1.5, use_cache=False) - x).abs().max() < INVERSE_ATOL


def test_guidance_and_null_labels_validation():
    flow = make((1, 4, 4), patch=2)
    with pytest.raises(ValueError, match="class-conditional"):
        flow.decode(torch.randn(2, 1, 4, 4), guidance=1.0)
    cond = make((1, 4, 4), patch=2, num_classes=3)
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(cond.encode(x)[0], cond.encode(x, torch.tensor([3, 3]))[0])  # y=None is the null class
    with pytest.raises(TypeError):
        cond(x, torch.rand(2))  # models are not called with a time: labels are keyword-only


@pytest.mark.parametrize("shape,kw,match", [
    ((1, 8, 6), dict(patch=4), "patch 4 must divide the image height 8 and width 6"),
    ((5,), dict(token_dim=2), "token_dim 2 must divide the vector size 5"),
    ((4,), dict(width=24, head_dim=16), "head_dim 16 must divide width 24"),
    ((2, 3), dict(), "images .* or vectors"),
    ((1, 4, 4), dict(patch=2, interleave=True), "interleave regroups the coordinates of vectors"),
])
def test_bad_shapes_are_rejected(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        TarFlow(TarFlowConfig(**kw), shape)


def test_encode_batched_fp32_and_bf16():
    flow = make((1, 8, 8), patch=2, scale=0.05)
    x = torch.randn(70, 1, 8, 8)
    z, logdet = flow.encode(x)
    zb, logdet_b = encode_batched(flow, x, batch_size=32)
    torch.testing.assert_close(zb, z.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logdet_b, logdet.detach(), rtol=0, atol=1e-4)
    z16, logdet16 = encode_batched(flow, x, batch_size=32, dtype=torch.bfloat16)
    assert z16.dtype == torch.float32 and logdet16.dtype == torch.float32
    assert (z16 - zb).abs().max() < 0.1 and (logdet16 - logdet_b).abs().max() < 0.05 * 64
    assert math.isfinite(logdet16.sum().item())


def test_fresh_spline_model_is_identity_and_bad_transforms_are_refused():
    flow = TarFlow(TarFlowConfig(width=16, head_dim=8, transform="spline", spline_bins=6), (4,))
    x = 3 * torch.randn(7, 4)  # inside and outside the spline's interval [-4, 4]
    z, logdet = flow(x)
    assert torch.allclose(z, x, atol=1e-5) and logdet.abs().max() < 1e-5
    assert flow.blocks[0].out.out_features == (3 * 6 + 1) * 1
    with pytest.raises(ValueError, match="transform must be one of"):
        TarFlow(TarFlowConfig(transform="mixture"), (4,))
    with pytest.raises(ValueError, match="spline_bins 1 must be >= 2"):
        TarFlow(TarFlowConfig(transform="spline", spline_bins=1), (4,))


def test_logit_map_density_integrates_to_one_on_its_domain_and_refuses_data_outside():
    torch.manual_seed(0)
    a = 0.05
    flow = TarFlow(TarFlowConfig(width=16, head_dim=8, blocks=2, layers=1, mlp_ratio=2, eta=0.0, logit_alpha=a),
                   (2,)).eval().double()
    with torch.no_grad():
        for block in flow.blocks:
            block.out.weight.normal_(0, 0.075)
        edge = 1 + 2 * a / (1 - 2 * a)  # the logit map is a bijection from (-edge, edge) onto the real line
        n = 801
        grid = torch.linspace(-edge, edge, n, dtype=torch.float64)[1:-1]
        pts = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        z, logdet = flow.encode(pts)
        density = (standard_normal_logprob(z) + logdet).exp()
        x = flow.decode(flow.encode(pts[::97])[0])
    mass = density.sum().item() * (2 * edge / (n - 1)) ** 2
    assert abs(mass - 1) < 0.005
    torch.testing.assert_close(x, pts[::97], rtol=0, atol=1e-9)
    fresh = TarFlow(TarFlowConfig(width=16, head_dim=8, blocks=1, layers=1, eta=0.0, logit_alpha=a), (2,))
    v, ld = fresh.encode(torch.tensor([[0.0, 0.5]]))
    assert abs(ld.item()) > 0.1 and torch.allclose(v, torch.logit(a + (1 - 2 * a) * torch.tensor([[0.5, 0.75]])))
    with pytest.raises(ValueError, match=r"logit_alpha 0.05 needs data in \[-1, 1\]"):
        fresh.encode(torch.tensor([[0.0, 1.2]]))
    for bad, match in [(dict(logit_alpha=0.5), "must lie in"), (dict(logit_alpha=0.05, eta=0.1), "needs eta 0")]:
        with pytest.raises(ValueError, match=match):
            TarFlow(TarFlowConfig(**{"eta": 0.0, **bad}), (2,))
