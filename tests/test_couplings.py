"""Couplings: minibatch OT against scipy's assignment solver, its entropic variant, FM training with each source,
and NFM-OT (teacher latents re-paired with fresh Gaussian noise)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from accelerate import Accelerator
from scipy.optimize import linear_sum_assignment

from flowdistill.api import load_run, resolve_config
from flowdistill.components import CATALOG, COUPLINGS
from nfm.couplings import (IndependentConfig, IndependentCoupling, MinibatchOTConfig, MinibatchOTCoupling,
                           SemidiscreteOTConfig, SemidiscreteOTCoupling, exact_assignment, squared_costs)
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from nfm.teacher_coupling import NFTeacherCoupling, NFTeacherOTCoupling
from shared.backbones import MLPConfig, build_mlp
from shared.catalog import BuildContext
from shared.config import DataConfig, RunConfig, TrainConfig
from shared.data_sources import load_dataset
from shared.run import build_loss
from shared.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "recipes" / "toy2d" / "fm_independent.yaml"

SHAPES = [(16, 2), (12, 1, 4, 4), (9, 3, 2, 2)]
DATA_ONLY_COUPLINGS = ["independent", "minibatch_ot", "semidiscrete_ot"]  # nf_teacher: test_nf_coupling.py; NFM-OT below


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return 0.5 * torch.randn(shape, generator=gen(1000 + seed)) + 1.0


def total_cost(x: torch.Tensor, z: torch.Tensor) -> float:
    return (x - z).reshape(len(x), -1).pow(2).sum().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_minibatch_ot_permutes_the_independent_noise_and_lowers_the_cost(shape):
    ot_coupling, gaps = MinibatchOTCoupling(), []
    for seed in range(10):
        x = batch(shape, seed)
        z_ind = IndependentCoupling()(x, gen(seed))
        z_ot = ot_coupling(x, gen(seed))
        index = ot_coupling.assign(x, z_ind)
        assert sorted(index.tolist()) == list(range(len(x)))
        assert torch.equal(z_ot, z_ind[index])
        gaps.append(total_cost(x, z_ind) - total_cost(x, z_ot))
        assert gaps[-1] >= -1e-9
    assert np.mean(gaps) > 0


@pytest.mark.parametrize("n", [2, 5, 8, 33])
def test_exact_assignment_matches_scipy_linear_sum_assignment(n):
    for seed in range(5):
        x, z = batch((n, 3), seed), torch.randn(n, 3, generator=gen(seed))
        cost = squared_costs(x, z)
        perm = exact_assignment(cost)
        assert np.array_equal(perm, linear_sum_assignment(cost)[1])
        assert np.allclose(cost, ((x[:, None].double() - z[None].double()) ** 2).sum(-1).numpy())


def test_exact_assignment_falls_back_when_the_plan_is_not_a_permutation(monkeypatch):
    assert sorted(exact_assignment(np.ones((5, 5))).tolist()) == list(range(5))  # all costs tied
    cost = squared_costs(batch((6, 2), 0), torch.randn(6, 2, generator=gen(0)))
    reference = linear_sum_assignment(cost)[1]
    stopped = (np.eye(6)[np.roll(reference, 1)] / 6, {"result_code": 2})  # a permutation, but not optimal
    for plan in [(np.full(cost.shape, 1.0 / cost.size), {"result_code": 1}), stopped]:
        monkeypatch.setattr(ot, "emd", lambda a, b, m, plan=plan, **kw: plan)  # nfm.couplings imports ot lazily
        assert np.array_equal(exact_assignment(cost), reference)


def test_sinkhorn_approaches_the_exact_cost_as_reg_shrinks():
    x = batch((32, 2), 0)
    costs = {}
    for reg in (1.0, 0.02):
        coupling = MinibatchOTCoupling(reg)
        costs[reg] = np.mean([total_cost(x, coupling(x, gen(s))) for s in range(4)])
    exact = np.mean([total_cost(x, MinibatchOTCoupling()(x, gen(s))) for s in range(4)])
    independent = np.mean([total_cost(x, IndependentCoupling()(x, gen(s))) for s in range(4)])
    assert exact <= costs[0.02] <= exact * 1.1
    assert costs[0.02] < costs[1.0] < independent
    with pytest.raises(ValueError, match="method.coupling.reg must be >= 0"):
        MinibatchOTCoupling(-1.0)
    with pytest.raises(ValueError, match="method.coupling.reg must be >= 0"):
        MinibatchOTCoupling.from_config(MinibatchOTConfig(reg=-1.0))


@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_minibatch_ot_is_deterministic_for_a_seeded_generator(reg):
    x, coupling = batch((10, 1, 3, 3), 0), MinibatchOTCoupling(reg)
    z = coupling(x, gen(5))
    assert z.shape == x.shape and z.dtype == x.dtype
    assert torch.equal(z, coupling(x, gen(5)))
    assert not torch.equal(z, coupling(x, gen(6)))


def test_build_coupling_reads_options_and_lists_choices(tmp_path):
    assert set(COUPLINGS) == {"independent", "minibatch_ot", "semidiscrete_ot", "nf_teacher", "nf_teacher_ot"}
    assert CATALOG.nested["method.coupling"] is COUPLINGS
    assert COUPLINGS["minibatch_ot"].config is MinibatchOTConfig
    assert MinibatchOTCoupling.from_config(MinibatchOTConfig(reg=0.1)).reg == 0.1
    cfg = resolve_config(TOY, ["method.coupling.name=minibatch_ot", "method.coupling.reg=0.1", f"out_dir={tmp_path}",
                               "data.n_train=64", "data.n_test=16"])
    coupling = build_loss(cfg, load_dataset(cfg.data), CATALOG).coupling
    assert isinstance(coupling, MinibatchOTCoupling) and coupling.reg == 0.1
    with pytest.raises(ValueError, match="choices: independent, minibatch_ot, nf_teacher, nf_teacher_ot, semidiscrete_ot"):
        resolve_config(TOY, ["method.coupling.name=nope"])
    with pytest.raises(ValueError, match="needs the training data set"):
        SemidiscreteOTCoupling.from_config(SemidiscreteOTConfig())
    with pytest.raises(NotImplementedError, match="pairs"):
        SemidiscreteOTCoupling(torch.zeros(4, 2), "f")(torch.zeros(4, 2))


COUPLING_CONFIGS = {  # name -> the coupling section of a small FM run (the SD-OT potential lands in tmp_path)
    "independent": lambda tmp: IndependentConfig(),
    "minibatch_ot": lambda tmp: MinibatchOTConfig(),
    "semidiscrete_ot": lambda tmp: SemidiscreteOTConfig(potential=str(tmp / "sdot.safetensors"), iters=200,
                                                        batch=1024, lr=0.05),
}


@pytest.mark.parametrize("name", DATA_ONLY_COUPLINGS)
def test_fm_loss_trains_with_every_data_only_coupling(name, tmp_path):
    data_cfg = DataConfig(name="8gaussians", n_train=512, n_test=64)
    dataset = load_dataset(data_cfg)
    potential = tmp_path / "sdot.safetensors"
    train = TrainConfig(steps=80, batch_size=128, lr=3e-3, warmup_steps=5, log_every=20, ckpt_every=1000,
                        progress=False, ema_decay=0.0)
    run_cfg = RunConfig(name="run", out_dir=str(tmp_path), data=data_cfg, model=MLPConfig(hidden=64, depth=2, time_dim=16),
                        method=FlowMatchingConfig(coupling=COUPLING_CONFIGS[name](tmp_path)), train=train)
    loss = build_loss(run_cfg, dataset, CATALOG)
    assert isinstance(loss, FlowMatchingLoss) and loss.coupling.name == name
    torch.manual_seed(0)
    model = build_mlp(run_cfg.model, dataset.shape)
    Trainer(train, 0, model, loss, (dataset.train,), tmp_path / "run", Accelerator(cpu=True)).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert potential.is_file() == (name == "semidiscrete_ot")


# ---------------------------------------------------------------- NFM-OT (teacher: tests/conftest.py)


def _nf_coupling(teacher: Path, tmp_path: Path, name: str, *overrides: str) -> NFTeacherCoupling:
    """The `name` coupling (nf_teacher or nf_teacher_ot) of a small student of the suite's tiny teacher (a pytest session-scoped fixture)."""
    cfg = resolve_config(ROOT / "recipes" / "toy2d" / "fm_nf_teacher.yaml",
                         [f"out_dir={tmp_path}", "data.n_train=1000", "data.n_test=200", f"method.coupling.name={name}",
                          f"method.coupling.teacher={teacher}", "method.coupling.draws=3", *overrides])
    ctx = BuildContext(cfg, load_dataset(cfg.data), tmp_path / cfg.name, load_run, CATALOG.nested)
    return COUPLINGS[name].build(cfg.method.coupling, ctx)


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, t.reshape(len(t), -1).tolist()))


@pytest.mark.parametrize("draws", ["3", "0"])
def test_nfm_ot_permutes_a_fresh_gaussian_batch_against_the_teacher_latents(nf_teacher_run, tmp_path, draws):
    ot_coupling = _nf_coupling(nf_teacher_run, tmp_path, "nf_teacher_ot", f"method.coupling.draws={draws}")
    plain = _nf_coupling(nf_teacher_run, tmp_path, "nf_teacher", f"method.coupling.draws={draws}")
    assert type(ot_coupling) is NFTeacherOTCoupling and type(plain) is NFTeacherCoupling
    x_batch = torch.zeros(48, 2)
    gaps = []
    for seed in range(6):
        x_ot, eps_paired = ot_coupling.pairs(x_batch, gen(seed))
        # the same generator state: the teacher part (addresses, eps'), then the Gaussian batch NFM-OT draws
        g = gen(seed)
        x_plain, z = plain.pairs(x_batch, g)
        eps = torch.randn(z.shape, dtype=z.dtype, generator=g)
        assert torch.equal(x_ot, x_plain)  # the data rows are plain NFM's
        assert eps_paired.shape == z.shape == x_batch.shape and eps_paired.dtype == x_batch.dtype
        assert _rows(eps_paired) == _rows(eps)  # exactly a permutation of the fresh N(0, I) batch
        assert not torch.equal(eps_paired, z)  # not the teacher latents themselves
        ot_cost, identity_cost = total_cost(z, eps_paired), total_cost(z, eps)
        assert ot_cost <= identity_cost + 1e-9
        optimum = squared_costs(z, eps)
        rows, cols = linear_sum_assignment(optimum)
        assert ot_cost == pytest.approx(optimum[rows, cols].sum(), rel=1e-6)  # the optimal pairing
        gaps.append(identity_cost - ot_cost)
    assert np.mean(gaps) > 0
    assert ot_coupling.sigma == pytest.approx(plain.sigma)


def test_training_fits_the_sdot_potential_before_the_first_step(tmp_path, capsys):
    """The fit is reported between the run header and training, and its cost stays out of the step timer."""
    from flowdistill.cli import main

    recipe = ROOT / "recipes" / "toy2d" / "fm_semidiscrete_ot.yaml"
    assert main(["train", str(recipe), f"out_dir={tmp_path}", "name=sd", "data.n_train=600", "data.n_test=50",
                 "train.steps=20", "train.log_every=10", "train.progress=false", "train.sample_grid=false",
                 "model.hidden=16", "method.coupling.iters=1500", "method.coupling.batch=512",
                 "method.coupling.chi2_tol=100"]) == 0
    out = capsys.readouterr().out
    assert out.index("run ") < out.index("sdot potential over 600 points") < out.index("finished at step 20")
    first, second = (json.loads(line) for line in (tmp_path / "sd" / "metrics.jsonl").read_text().splitlines()[:2])
    assert first["samples_per_s"] > 0.2 * second["samples_per_s"], (first, second)  # the fit is not in step 1
