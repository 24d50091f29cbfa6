"""Couplings: minibatch OT against scipy's assignment solver, its entropic variant, and FM training with each source."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scipy.optimize import linear_sum_assignment

from nfm import couplings
from nfm.couplings import (COUPLINGS, IndependentCoupling, MinibatchOTCoupling, SemidiscreteOTCoupling, build_coupling,
                           exact_assignment, squared_costs)
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from shared import registry
from shared.backbones import MLPConfig, build_mlp
from shared.config import DataConfig, TrainConfig
from shared.data import load_dataset
from shared.trainer import Trainer

SHAPES = [(16, 2), (12, 1, 4, 4), (9, 3, 2, 2)]
DATA_ONLY_COUPLINGS = ["independent", "minibatch_ot", "semidiscrete_ot"]  # nf_teacher: tests/test_nf_coupling.py


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
        monkeypatch.setattr(couplings.ot, "emd", lambda a, b, m, plan=plan, **kw: plan)
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
    with pytest.raises(ValueError, match="ot_reg"):
        MinibatchOTCoupling(-1.0)


@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_minibatch_ot_is_deterministic_for_a_seeded_generator(reg):
    x, coupling = batch((10, 1, 3, 3), 0), MinibatchOTCoupling(reg)
    z = coupling(x, gen(5))
    assert z.shape == x.shape and z.dtype == x.dtype
    assert torch.equal(z, coupling(x, gen(5)))
    assert not torch.equal(z, coupling(x, gen(6)))


def test_build_coupling_reads_options_and_lists_choices():
    registry.load_plugins()
    assert set(COUPLINGS) == {"independent", "minibatch_ot", "semidiscrete_ot", "nf_teacher"}
    assert build_coupling("minibatch_ot", FlowMatchingConfig(ot_reg=0.1)).reg == 0.1
    with pytest.raises(ValueError, match="choices: independent, minibatch_ot, nf_teacher, semidiscrete_ot"):
        build_coupling("nope", FlowMatchingConfig())
    with pytest.raises(ValueError, match="needs the training data set"):
        build_coupling("semidiscrete_ot", FlowMatchingConfig())
    with pytest.raises(NotImplementedError, match="pairs"):
        SemidiscreteOTCoupling(torch.zeros(4, 2), "f")(torch.zeros(4, 2))


@pytest.mark.parametrize("name", DATA_ONLY_COUPLINGS)
def test_fm_loss_trains_with_every_data_only_coupling(name, tmp_path):
    dataset = load_dataset(DataConfig(name="8gaussians", n_train=512, n_test=64))
    potential = tmp_path / "sdot.safetensors"
    cfg = FlowMatchingConfig(coupling=name, sdot_potential=str(potential), sdot_iters=200, sdot_batch=1024,
                             sdot_lr=0.05)
    loss = FlowMatchingLoss(cfg, dataset)
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=64, depth=2, time_dim=16), dataset.shape)
    train = TrainConfig(steps=80, batch_size=128, lr=3e-3, warmup_steps=5, log_every=20, ckpt_every=1000,
                        progress=False, ema_decay=0.0)
    Trainer(train, 0, model, loss, (dataset.train,), tmp_path / "run", Accelerator(cpu=True)).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert potential.is_file() == (name == "semidiscrete_ot")
