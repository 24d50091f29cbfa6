"""Glow: exact log-determinants (float64 brute force), invertibility, a normalised density, training and NFM use."""
from __future__ import annotations

import math

import pytest
import torch

from flowdistill.cli import main
from nfm.glow import Glow, GlowConfig, squeeze, unsqueeze


def perturbed(flow: Glow, scale: float = 0.1, seed: int = 0) -> Glow:
    """The flow with every parameter moved off its identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def inputs(n: int, shape: tuple[int, ...], cfg: GlowConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian test data, or uniform on [-0.99, 0.99] for a Glow whose logit map needs data in [-1, 1]."""
    if cfg.logit_alpha:
        return (torch.rand(n, *shape, dtype=dtype) * 2 - 1) * 0.99
    return torch.randn(n, *shape, dtype=dtype)


@pytest.mark.parametrize("shape,cfg", [((1, 8, 8), GlowConfig(levels=2, steps=2, hidden=16)),
                                       ((3, 4, 4), GlowConfig(levels=1, steps=3, hidden=8)),
                                       ((2, 8, 4), GlowConfig(levels=2, steps=1, hidden=8)),
                                       ((5,), GlowConfig(levels=1, steps=4, hidden=8)),
                                       ((1, 4, 4), GlowConfig(levels=2, steps=2, hidden=8, logit_alpha=0.05))])
def test_log_determinant_equals_the_brute_force_jacobian_in_float64(shape, cfg):
    torch.manual_seed(0)
    flow = perturbed(Glow(cfg, shape)).double()
    x = inputs(1, shape, cfg, torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow.encode(v.reshape(1, *shape))[0].reshape(-1),
                                             x.reshape(-1))
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(flow.encode(x)[1].item(), abs=1e-9)


@pytest.mark.parametrize("shape,cfg", [((1, 8, 8), GlowConfig(levels=3, steps=2, hidden=16)),
                                       ((1, 28, 28), GlowConfig(levels=2, steps=2, hidden=16)),
                                       ((2,), GlowConfig(levels=1, steps=4, hidden=16)),
                                       ((1, 28, 28), GlowConfig(levels=2, steps=2, hidden=16, logit_alpha=0.001))])
def test_decode_inverts_encode_in_float32(shape, cfg):
    torch.manual_seed(1)
    flow = perturbed(Glow(cfg, shape), 0.05)
    x = inputs(16, shape, cfg)
    z, _ = flow.encode(x)
    assert z.shape == x.shape
    assert (flow.decode(z) - x).abs().max().item() < 1e-4
    assert (flow.encode(flow.decode(z))[0] - z).abs().max().item() < 1e-4


def test_with_identity_steps_the_latent_is_the_input_reassembled(monkeypatch):
    from nfm.glow import AffineCoupling

    monkeypatch.setattr(AffineCoupling, "_params", lambda self, xa: (torch.zeros_like(xa), torch.ones_like(xa)))
    flow = Glow(GlowConfig(levels=2, steps=2, hidden=8), (1, 8, 8))
    for steps in flow.levels:  # ActNorm and split priors start at the identity; set the 1x1 convs to it too
        for step in steps:
            conv = step.layers[1]
            with torch.no_grad():
                conv.lower.zero_(), conv.upper.zero_(), conv.log_s.zero_()
                conv.perm.copy_(torch.eye(len(conv.perm))), conv.sign.fill_(1.0)
    x = torch.randn(3, 1, 8, 8)
    z, logdet = flow.encode(x)
    assert torch.allclose(z, x, atol=1e-6) and torch.allclose(logdet, torch.zeros(3), atol=1e-6)
    y = torch.randn(3, 4, 6, 6)
    assert torch.equal(unsqueeze(squeeze(y)), y)


def test_the_density_of_a_2d_glow_integrates_to_one():
    torch.manual_seed(2)
    flow = perturbed(Glow(GlowConfig(levels=1, steps=4, hidden=16), (2,)), 0.05).double()
    grid = torch.linspace(-10, 10, 801, dtype=torch.float64)  # holds all but ~1e-5 of this flow's mass
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    z, logdet = flow.encode(points)
    logp = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) + logdet
    mass = (logp.exp() * (grid[1] - grid[0]) ** 2).sum().item()
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_logit_map_glow_density_integrates_to_one_on_its_domain_and_refuses_bad_input():
    a = 0.05
    torch.manual_seed(3)
    flow = perturbed(Glow(GlowConfig(levels=1, steps=3, hidden=16, logit_alpha=a), (2,)), 0.05).double()
    edge = 1 + 2 * a / (1 - 2 * a)  # the logit map is a bijection from (-edge, edge) onto the real line
    n = 801
    grid = torch.linspace(-edge, edge, n, dtype=torch.float64)[1:-1]
    points = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        z, logdet = flow.encode(points)
        back = flow.decode(flow.encode(points[::97])[0])
    logp = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) + logdet
    assert (logp.exp().sum() * (2 * edge / (n - 1)) ** 2).item() == pytest.approx(1.0, abs=0.005)
    torch.testing.assert_close(back, points[::97], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"glow with model.logit_alpha 0.05 needs data in \[-1, 1\]"):
        flow.encode(torch.tensor([[0.0, 1.2]], dtype=torch.float64))
    for bad, match in [(dict(logit_alpha=0.5), "must lie in"), (dict(logit_alpha=0.05, eta=0.1), "needs eta 0")]:
        with pytest.raises(ValueError, match=match):
            Glow(GlowConfig(**bad), (2,))


def test_glow_trains_as_a_teacher_and_pairs_nfm_students(tmp_path, capsys):
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "toy2d"
    small = ["data.n_train=2000", "data.n_test=300", "train.batch_size=128", "train.progress=false",
             "train.sample_grid=false", "train.log_every=50", "train.ckpt_every=100"]
    assert main(["train", str(recipes / "glow_teacher.yaml"), f"out_dir={tmp_path}", "name=glow",
                 "train.steps=150", "model.steps=3", "model.hidden=16", *small]) == 0
    metrics = [line for line in (tmp_path / "glow" / "metrics.jsonl").read_text().splitlines()]
    assert float(metrics[-1].split('"loss": ')[1].split(",")[0]) < float(metrics[0].split('"loss": ')[1].split(",")[0])
    capsys.readouterr()
    assert main(["nll", str(tmp_path / "glow"), "--device", "cpu"]) == 0
    assert "exact (flow) divergence" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "glow"), "--n", "100", "--device", "cpu"]) == 0
    assert main(["train", str(recipes / "fm_nf_teacher.yaml"), f"out_dir={tmp_path}", "name=student",
                 f"method.coupling.teacher={tmp_path / 'glow'}", "train.steps=20", *small]) == 0
