"""End to end on the checkerboard: teacher FM -> joint F2D2 through the CLI, then few-step likelihood and f2d2-eval.

Tolerances (CI budget: a 128-wide teacher trained 1500 steps, the map 800 steps; about 35 s of CPU):
- distillation: mean per-sample |log p_4 - log p_ref| < 0.15 nats against the teacher's ODE likelihood
  (measured 0.08; with the recipes' budget 0.06);
- analytic density 1/8 on the support: mean |log p_4 - log(1/8)| < 0.6 nats on points at least 0.2 from
  every square edge (measured 0.44; recipes 0.24) and < 0.8 nats on all test points (measured 0.63; recipes
  0.54). A smooth teacher cannot follow the density's jumps, so the error grows towards the edges and
  the teacher's own reference is off by as much (measured 0.43 on the same interior points).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from f2d2.flowmap import few_step_log_likelihood
from flowdistill.api import load_run
from flowdistill.cli import main
from flowdistill.f2d2_eval import reference_fn, score

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "toy2d"
COMMON = ["data.n_train=8000", "data.n_test=1000", "train.batch_size=256", "train.progress=false",
          "train.sample_grid=false", "train.log_every=100"]
DISTILL_TOL, INTERIOR_TOL, ALL_TOL = 0.15, 0.6, 0.8


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("f2d2")
    teacher = out / "teacher"
    assert main(["train", str(ROOT / "fm_teacher_checkerboard.yaml"), f"out_dir={out}", "name=teacher",
                 "train.steps=1500", "train.lr=0.003", "model.hidden=128", *COMMON]) == 0
    assert main(["train", str(ROOT / "f2d2_joint_checkerboard.yaml"), f"out_dir={out}", "name=f2d2", "train.steps=800",
                 f"method.teacher={teacher}", f"train.init_from={teacher}", "model.backbone.hidden=128", *COMMON]) == 0
    return teacher, out / "f2d2"


def test_checkerboard_k_step_likelihood_matches_teacher_and_approaches_analytic(runs):
    run = load_run(runs[1])
    x = run.dataset.test[:300]
    _, ref_fn = reference_fn(run, "exact")
    ref = score(ref_fn, x, torch.Generator(), 300)["logp"]
    logp = few_step_log_likelihood(run.model, x, 4).logp.double()
    assert (logp - ref).abs().mean().item() < DISTILL_TOL
    analytic = run.dataset.log_density(x)
    assert torch.all(analytic == -math.log(8))  # every test point lies on the board
    edge = torch.minimum(x - x.floor(), x.ceil() - x).min(1).values
    interior = edge >= 0.2
    assert interior.sum() > 50
    assert (logp[interior] - analytic[interior]).abs().mean().item() < INTERIOR_TOL
    assert (logp - analytic).abs().mean().item() < ALL_TOL


def test_f2d2_eval_prints_and_writes_the_table(runs, capsys):
    teacher, run = runs
    assert main(["f2d2-eval", str(run), "--steps", "1,4", "--n", "200", "--n-samples", "500", "--guidance-steps", "1",
                 "--nf-teacher", str(teacher), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| K | nfe | nll | ref_nll | mae |" in out and "guided_quality" in out
    result = json.loads((run / "f2d2-eval.json").read_text())
    rows = result["rows"]
    assert [r["K"] for r in rows] == [1, 4] and [r["nfe"] for r in rows] == [1, 4]
    assert [r["guided_nfe"] for r in rows] == [3, 6]
    assert result["reference"] == "teacher teacher" and result["divergence"] == "exact" and result["n"] == 200
    for r in rows:
        assert r["mae"] < r["naive_mae"] and r["speedup"] > 10 and r["metric"] == "w2"
        # the same ODE likelihood passed as the "NF teacher" reproduces the reference gap exactly
        assert r["nf_mae"] == pytest.approx(r["mae"], abs=1e-6) and r["ref_nf_mae"] < 1e-6
    assert (run / "f2d2-eval.png").stat().st_size > 1000
    check = result["reference_convergence"]  # the teacher's ODE, solved again at half the tolerances
    assert check["points"] == 8 and 0 <= check["mean_nats"] <= check["max_nats"]
    assert check["mean_nats"] < check["tolerance_nats"]


def test_the_reference_check_catches_a_field_the_solver_cannot_resolve(runs):
    """The convergence check measures the reference's own ODE: under a field that stretches space 100-fold
    back and forth, log p moves when the tolerances are halved; under the trained teacher it does not."""
    from flowdistill.f2d2_eval import reference_convergence

    run = load_run(runs[1])
    x = run.dataset.test[:8]
    assert reference_convergence(run, x, "exact")["mean_nats"] < 0.005
    teacher = run.config.method.teacher
    run.config.method.teacher = ""  # the map's own tangent u(x, t, t) as the reference

    class Wiggly(torch.nn.Module):
        def forward(self, y, t, s):
            return 100.0 * y * torch.sin(20 * t).view(-1, 1), torch.zeros(len(y))

    run.model = Wiggly()
    check = reference_convergence(run, x, "exact")
    run.config.method.teacher = teacher
    assert check["mean_nats"] > check["tolerance_nats"]


def test_f2d2_eval_rejects_other_runs(runs, capsys):
    assert main(["f2d2-eval", str(runs[0]), "--device", "cpu"]) == 2
    assert "needs an f2d2 run" in capsys.readouterr().err


def test_f2d2_eval_on_digits_reports_bits_per_dim_like_the_reference_nll(tmp_path):
    """Image data: the reference bits/dim equal `flowdistill nll` of the teacher on the same dequantized points."""
    digits = ROOT.parent / "digits"
    tiny = ["train.batch_size=64", "train.progress=false", "train.sample_grid=false", "train.log_every=50"]
    mlp = ["model.hidden=64", "model.depth=2", "model.time_dim=16"]
    teacher = tmp_path / "fm"
    assert main(["train", str(digits / "fm_mlp.yaml"), f"out_dir={tmp_path}", "name=fm", "train.steps=100",
                 *mlp, *tiny]) == 0
    assert main(["train", str(digits / "f2d2_joint_mlp.yaml"), f"out_dir={tmp_path}", "name=f2d2", "train.steps=30",
                 f"method.teacher={teacher}", f"train.init_from={teacher}", "model.head_hidden=16",
                 *[f"model.backbone.{m.split('.', 1)[1]}" for m in mlp], *tiny]) == 0
    assert main(["nll", str(teacher), "--n", "40", "--divergence", "exact", "--device", "cpu"]) == 0
    ref_bpd = json.loads((teacher / "nll-test.json").read_text())["bits_per_dim"]
    assert main(["f2d2-eval", str(tmp_path / "f2d2"), "--steps", "1,4", "--n", "40", "--n-samples", "100",
                 "--grid", "linear", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "f2d2" / "f2d2-eval-linear.json").read_text())["rows"]
    per_dim = 64 * math.log(2)
    for r in rows:
        assert r["ref_bpd"] == pytest.approx(ref_bpd, abs=1e-6)
        assert r["bpd"] - r["ref_bpd"] == pytest.approx((r["nll"] - r["ref_nll"]) / per_dim, abs=1e-9)
        assert r["mae_bpd"] == pytest.approx(r["mae"] / per_dim) and r["mae_bpd"] >= abs(r["bpd"] - r["ref_bpd"]) - 1e-9
        assert r["metric"] != "w2" and math.isfinite(r["quality"])
    per_sample = (tmp_path / "f2d2" / "f2d2-eval-linear.csv").read_text().splitlines()
    assert len(per_sample) == 41 and per_sample[0].split(",")[:4] == ["index", "ref_logp_nats", "K1_logp_nats",
                                                                      "K4_logp_nats"]
    assert main(["f2d2-eval", str(tmp_path / "f2d2"), "--steps", "1,4", "--n", "40", "--n-samples", "100",
                 "--grid", "geometric", "--device", "cpu"]) == 0
    geo = json.loads((tmp_path / "f2d2" / "f2d2-eval-geometric.json").read_text())
    assert geo["grid"] == "geometric" and geo["rows"][0]["nll"] == pytest.approx(rows[0]["nll"], abs=1e-9)  # K = 1
    assert geo["rows"][1]["nll"] != pytest.approx(rows[1]["nll"], abs=1e-6)  # K = 4 jumps elsewhere
    # a Shortcut map never trained the quadratic grid's 0.25 -> 0.5625 jump: refused, not scored
    assert main(["f2d2-eval", str(tmp_path / "f2d2"), "--steps", "4", "--n", "40", "--grid", "quadratic",
                 "--device", "cpu"]) == 2
    assert not (tmp_path / "f2d2" / "f2d2-eval-quadratic.json").exists()
