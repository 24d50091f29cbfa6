"""Ensembles of velocity fields: the averaged field, its divergence and likelihood, `flowdistill ensemble`'s run
directory and refusals, and an F2D2 map distilling an ensemble."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdistill as fd
from flowdistill.cli import main
from flowdistill.components import CATALOG
from flowdistill.ensemble_runs import gather_ensemble
from shared.backbones import MLPConfig
from shared.ensemble import EnsembleConfig
from shared.likelihood import divergence_exact, log_likelihood

ROOT = Path(__file__).resolve().parents[1]
FM = ROOT / "recipes/density/fm.yaml"
SHORT = ["train.steps=20", "train.batch_size=64", "train.ckpt_every=20", "train.progress=false",
         "train.sample_grid=false"]
TINY = ["model.hidden=16", "model.depth=2", "model.time_dim=8", *SHORT]


def build(size: int = 3, dim: int = 2) -> torch.nn.Module:
    cfg = EnsembleConfig(size=size, member=MLPConfig(hidden=16, depth=2, time_dim=8))
    return CATALOG.models["ensemble"].build(cfg, (dim,))


def test_the_ensemble_averages_its_members_fields_and_divergences():
    torch.manual_seed(0)
    model = build().double()
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    members = [m(x, t) for m in model.members]
    torch.testing.assert_close(model(x, t), sum(members) / 3)
    assert not torch.allclose(members[0], members[1])  # members start apart (their own initialisation)
    _, div = divergence_exact(model, x, t)
    jac = [torch.autograd.functional.jacobian(lambda y, m=m, i=i: m(y[None], t[i:i + 1])[0], x[i])
           for i in range(5) for m in model.members]
    brute = torch.tensor([sum(torch.trace(jac[i * 3 + k]) for k in range(3)) / 3 for i in range(5)],
                         dtype=torch.float64)
    torch.testing.assert_close(div, brute)


def test_the_ensemble_refuses_a_second_time_a_single_member_and_an_unknown_member():
    model = build(2)
    with pytest.raises(ValueError, match="no second time"):
        model(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="at least 2 members"):
        build(1)
    with pytest.raises(ValueError, match="model.member must be one of mlp, unet, dit"):
        CATALOG.models["ensemble"].build(EnsembleConfig(member=EnsembleConfig()), (2,))


def test_identical_members_give_the_member_s_own_likelihood():
    torch.manual_seed(1)
    model = build(2).double()
    model.members[1].load_state_dict(model.members[0].state_dict())
    x = torch.randn(4, 2, dtype=torch.float64)
    ens = log_likelihood(model, x, divergence="exact")
    one = log_likelihood(model.members[0], x, divergence="exact")
    torch.testing.assert_close(ens.logp, one.logp)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny FM fields on one tabular file, seeds 0, 1 and 0 again (for the identical-weights refusal)."""
    root = tmp_path_factory.mktemp("ensemble")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", (rng.normal(size=(400, 2)) * [3.0, 0.5] + [10.0, -2.0]).astype(np.float32))
    np.save(root / "test.npy", (rng.normal(size=(50, 2)) * [3.0, 0.5] + [10.0, -2.0]).astype(np.float32))
    data = ["data.name=tabular", f"data.path={root}/train.npy", f"data.test_path={root}/test.npy"]
    runs = [fd.train(FM, [f"out_dir={root}", f"name={name}", f"seed={seed}", *data, *TINY])
            for name, seed in (("fm-0", 0), ("fm-1", 1), ("fm-same", 0))]
    wide = fd.train(FM, [f"out_dir={root}", "name=fm-wide", "seed=2", *data, *TINY, "model.hidden=24"])
    return root, runs, wide, data


def test_gather_writes_a_run_every_command_reads_as_the_average_field(members):
    root, (a, b, _), _, _ = members
    out = gather_ensemble([a, b], root / "ens")
    run = fd.load_run(out)
    assert run.config.model.name == "ensemble" and run.config.model.size == 2
    assert run.config.model.member.hidden == 16 and run.config.data.path.endswith("train.npy")
    first, second = fd.load_run(a), fd.load_run(b)
    x, t = torch.randn(6, 2), torch.rand(6)
    torch.testing.assert_close(run.model(x, t), (first.model(x, t) + second.model(x, t)) / 2)
    provenance = json.loads((out / "imported.json").read_text())
    assert [m["sha256"] for m in provenance["members"]] == [first.weights_sha256, second.weights_sha256]
    assert (out / "standardization.json").read_text() == (Path(a) / "standardization.json").read_text()
    # the file's units: the same standardisation, so the same log-Jacobian as each member
    assert run.dataset.standardization.log_jacobian == first.dataset.standardization.log_jacobian
    logp = fd.log_likelihood(run, run.dataset.test[:8]).double()
    direct = log_likelihood(run.model, run.dataset.test[:8], divergence="exact").logp.double()
    torch.testing.assert_close(logp, direct, atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match="already exists"):
        gather_ensemble([a, b], root / "ens")


def test_gather_refuses_what_is_not_an_ensemble_before_writing(members):
    root, (a, b, same), wide, data = members
    cases = [([a], "at least 2"), ([a, a], "given more than once"), ([a, same], "identical weights"),
             ([a, wide], r"different models \(model.hidden: 16 vs 24\)")]
    for runs, message in cases:
        with pytest.raises(ValueError, match=message):
            gather_ensemble(runs, root / "refused")
        assert not (root / "refused").exists()
    with pytest.raises(ValueError, match="is one of the member runs"):
        gather_ensemble([a, b], a)
    other = fd.train(FM, [f"out_dir={root}", "name=fm-other", "seed=3", "data.name=gmm2", "data.n_train=300",
                          "data.n_test=50", *TINY])
    with pytest.raises(ValueError, match="trained on different data"):
        gather_ensemble([a, other], root / "refused")
    flow = fd.train(ROOT / "recipes/density/tarflow.yaml", [f"out_dir={root}", "name=flow", *data, *SHORT,
                                                            "model.width=16", "model.blocks=2", "model.head_dim=8"])
    with pytest.raises(ValueError, match="model.name=tarflow and method.name=nll"):
        gather_ensemble([a, flow], root / "refused")
    assert not (root / "refused").exists()


def test_f2d2_distils_an_ensemble_initialised_from_a_member(members, capsys):
    root, (a, b, _), _, data = members
    assert main(["ensemble", str(a), str(b), "--out", str(root / "teacher")]) == 0
    assert "wrote ensemble run" in capsys.readouterr().out
    f2d2 = ROOT / "recipes/density/f2d2_u.yaml"
    common = [f"out_dir={root}", *data, *SHORT, f"method.teacher={root}/teacher", "model.backbone.hidden=16",
              "model.backbone.depth=2", "model.backbone.time_dim=8"]
    run_dir = fd.train(f2d2, [*common, "name=map", f"train.init_from={a}"])
    run = fd.load_run(run_dir)
    x, t = torch.randn(4, 2), torch.rand(4)
    teacher = fd.load_run(root / "teacher")
    assert run.model.div_head is not None and torch.isfinite(run.model(x, t, t)[0]).all()
    assert not torch.allclose(run.model(x, t, t)[0], teacher.model(x, t))  # trained a few steps towards it
    with pytest.raises(Exception, match="initialise from one of its member runs"):
        fd.train(f2d2, [*common, "name=map-refused", f"train.init_from={root}/teacher"])
