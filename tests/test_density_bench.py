"""The held-out mixture files and their scorer, the density step-time and student-speed benchmarks (tiny runs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.parametrize("covariance", ["isotropic", "full"])
def test_mixture_log_prob_matches_scipy_and_the_files_hold_what_make_says(tmp_path, bench_path, covariance):
    from bench.experiments.heldout_mixtures import draw_mixture, make, mixture_log_prob

    mix = draw_mixture(5, seed=3, covariance=covariance)
    k = len(mix["weights"])
    assert 3 <= k <= 8 and math.isclose(mix["weights"].sum().item(), 1.0, rel_tol=1e-12)
    x = torch.randn(50, 5, dtype=torch.float64)
    pdf = sum(w.item() * multivariate_normal(m.numpy(), (a @ a.T).numpy()).pdf(x.numpy())
              for w, m, a in zip(mix["weights"], mix["means"], mix["factors"]))
    np.testing.assert_allclose(mixture_log_prob(mix, x).numpy(), np.log(pdf), rtol=1e-10)
    if covariance == "isotropic":  # a scaled identity per component
        for a in mix["factors"]:
            assert torch.allclose(a, a[0, 0] * torch.eye(5, dtype=torch.float64)) and 0.25 <= a[0, 0] <= 0.8
    info = make(5, 3, tmp_path / "m", covariance=covariance)
    train, test = np.load(tmp_path / "m" / "train.npy"), np.load(tmp_path / "m" / "test.npy")
    assert train.shape == (20000, 5) and test.shape == (2000, 5) and train.dtype == np.float32
    logp = np.load(tmp_path / "m" / "test_logp.npy")
    np.testing.assert_allclose(logp, mixture_log_prob(mix, torch.from_numpy(test)).numpy())
    assert math.isclose(info["exact_test_nll"], -logp.mean()) and info["components"] == k
    # the sample's mean matches the mixture's (4 standard errors of the largest coordinate variance)
    mean = (mix["weights"][:, None] * mix["means"]).sum(0).numpy()
    assert np.abs(train.mean(0) - mean).max() < 4 * np.sqrt(train.var(0).max() / len(train))


def test_score_reports_gap_standard_error_and_mean_abs_error_of_every_logp_column(tmp_path, bench_path):
    from bench.experiments.heldout_mixtures import score

    mix_dir, run_dir = tmp_path / "m", tmp_path / "run"
    mix_dir.mkdir(), run_dir.mkdir()
    exact = np.array([-1.0, -2.0, -3.0, -4.0])
    np.save(mix_dir / "test_logp.npy", exact)
    # points 3, 0, 1 scored (in that order); K4 is exact - 0.5 everywhere, ref alternates +-0.2 around exact
    (run_dir / "f2d2-eval.csv").write_text("index,ref_logp_nats,K4_logp_nats,exact_logp_nats\n"
                                           "3,-3.8,-4.5,-4\n0,-1.2,-1.5,-1\n1,-1.8,-2.5,-2\n")
    result = score(mix_dir, run_dir)
    assert set(result["rows"]) == {"ref", "K4"} and result["n"] == 3 and result["n_test"] == 4
    assert math.isclose(result["exact_nll"], (4 + 1 + 2) / 3)
    k4, ref = result["rows"]["K4"], result["rows"]["ref"]
    assert math.isclose(k4["gap"], 0.5) and math.isclose(k4["gap_se"], 0.0, abs_tol=1e-12)
    assert math.isclose(k4["mean_abs_error"], 0.5)
    diffs = np.array([-0.2, 0.2, -0.2])  # exact - ref per point
    assert math.isclose(ref["gap"], diffs.mean()) and math.isclose(ref["mean_abs_error"], 0.2)
    assert math.isclose(ref["gap_se"], diffs.std(ddof=1) / math.sqrt(3))
    assert json.loads((run_dir / "heldout-score.json").read_text()) == result


def test_density_step_time_trains_each_recipe_of_the_chain_and_reports_its_cost(tmp_path, bench_path):
    from bench.benchmarks import density_step_time

    out = tmp_path / "d.json"
    payload = density_step_time.main(["--dims", "2,8", "--recipes", "fm,f2d2_u,tarflow_tabular", "--steps", "4",
                                      "--log-every", "1", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    skipped = payload["rows"][2]  # token_dim 4 does not divide d = 2: a row that says so
    assert (skipped["recipe"], skipped["dim"]) == ("tarflow_tabular", 2) and "must divide" in skipped["note"]
    rows = payload["rows"][3:]
    assert [r["recipe"] for r in rows] == ["fm", "f2d2_u", "tarflow_tabular"] and {r["dim"] for r in rows} == {8}
    assert [(r["recipe"], r["dim"]) for r in payload["rows"][:2]] == [("fm", 2), ("f2d2_u", 2)]
    assert payload["rows"][1]["teacher"] == rows[1]["teacher"] == "ensemble of 3"  # as the recipes chain it
    for row in rows:
        assert row["ms_per_step"] > 0 and row["params"] > 0 and row["intervals"] == 3
        assert math.isclose(row["recipe_minutes"], row["ms_per_step"] * row["recipe_steps"] / 60000)
    with pytest.raises(SystemExit, match="f2d2_u trains from fm"):
        density_step_time.main(["--recipes", "f2d2_u", "--out", str(out)])


def test_student_speed_times_both_sides_in_each_mode_and_derives_the_speed_ups(tmp_path, bench_path):
    from bench.benchmarks import student_speed

    out = tmp_path / "s.json"
    payload = student_speed.main(["--family", "digits", "--patch", "4", "--batch", "2", "--modes",
                                  "fp32,channels_last", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    rows = payload["rows"]
    assert {(r["side"], r["mode"]) for r in rows} == {("teacher", "fp32"), ("teacher", "bf16"),
                                                      ("student", "fp32"), ("student", "channels_last")}
    for summary in payload["summary"]:
        teacher = min(r["ms_per_sample"] for r in rows if r["side"] == "teacher" and r["batch"] == summary["batch"])
        assert math.isclose(summary["teacher_best_ms"], teacher)
        assert math.isclose(summary["speedup_nfe4"], teacher / (4 * summary["student_best_ms"]))
    with pytest.raises(SystemExit, match="--modes must include fp32"):
        student_speed.main(["--modes", "bf16", "--out", str(out)])


def test_table_gathers_each_mixtures_estimates_into_one_line(tmp_path, bench_path):
    from bench.experiments.heldout_mixtures import gather, main, markdown_table

    runs, mixtures = tmp_path / "runs", tmp_path / "mixtures"
    (mixtures / "heldout-a").mkdir(parents=True)
    (mixtures / "heldout-a" / "mixture.json").write_text(json.dumps({"dim": 4, "components": 3}))
    score = {"exact_nll": 5.0, "n": 10, "rows": {"logp": {"gap": 0.25, "gap_se": 0.01, "mean_abs_error": 0.5},
                                                   "K4": {"gap": -0.125, "gap_se": 0.02, "mean_abs_error": 0.4}}}
    for run in ("fm", "fm-ensemble", "f2d2_joint"):
        (runs / "a" / run).mkdir(parents=True)
        (runs / "a" / run / "heldout-score.json").write_text(json.dumps(score))
    (runs / "a" / "f2d2_joint" / "f2d2-eval.json").write_text(json.dumps({"grid": "geometric"}))
    with pytest.raises(KeyError):  # an F2D2 table without the K = 1 column is not silently dropped
        gather(runs, mixtures)
    score["rows"].update({f"K{k}": score["rows"]["K4"] for k in (1, 2, 8)})
    (runs / "a" / "f2d2_joint" / "heldout-score.json").write_text(json.dumps(score))
    rows = gather(runs, mixtures)
    assert [r["estimate"] for r in rows] == ["FM field, ODE (dopri5)", "3 FM fields averaged, ODE", "F2D2, K = 1",
                                            "F2D2, K = 2", "F2D2, K = 4", "F2D2, K = 8"]
    assert rows[0]["gap"] == rows[1]["gap"] == 0.25 and rows[4]["gap"] == -0.125 and rows[4]["grid"] == "geometric"
    line = markdown_table(rows).splitlines()[2]
    assert line == ("| a | 4 | 3 (isotropic) | 5.000 | +0.250 ± 0.010 | +0.250 ± 0.010 | -0.125 ± 0.020 | "
                    "-0.125 ± 0.020 | -0.125 ± 0.020 | -0.125 ± 0.020 | not run | geometric |")
    assert main(["table", str(runs), "--mixtures", str(mixtures), "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows


def test_seeds_reports_each_seeds_gap_their_mean_and_spread_for_estimates_every_seed_has(tmp_path, bench_path):
    from bench.experiments.heldout_mixtures import across_seeds, main, seeds_table

    mixtures = tmp_path / "mixtures"
    (mixtures / "heldout-a").mkdir(parents=True)
    (mixtures / "heldout-a" / "mixture.json").write_text(json.dumps({"dim": 16, "components": 8}))
    roots = []
    for seed, gap in enumerate((0.10, 0.20, 0.30)):
        root = tmp_path / f"seed{seed}"
        (root / "a" / "fm").mkdir(parents=True)
        rows = {"logp": {"gap": gap, "gap_se": 0.01, "mean_abs_error": 0.5}}
        (root / "a" / "fm" / "heldout-score.json").write_text(json.dumps({"exact_nll": 7.0, "n": 5, "rows": rows}))
        roots.append(root)
    (roots[0] / "a" / "tarflow").mkdir()  # only one seed has a TarFlow: it is left out, not averaged over one
    (roots[0] / "a" / "tarflow" / "heldout-score.json").write_text(
        json.dumps({"exact_nll": 7.0, "n": 5, "rows": {"logp": {"gap": 1.0, "gap_se": 0.1, "mean_abs_error": 1.0}}}))
    rows = across_seeds(roots, mixtures)
    assert [r["estimate"] for r in rows] == ["FM field, ODE (dopri5)"]
    row = rows[0]
    assert row["gaps"] == pytest.approx([0.1, 0.2, 0.3]) and row["mean"] == pytest.approx(0.2)
    assert row["seed_sd"] == pytest.approx(0.1) and row["mean_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert seeds_table(rows).splitlines()[2] == ("| a | 16 | 8 | FM field, ODE (dopri5) | +0.100 | +0.200 | +0.300 | "
                                                 "+0.200 ± 0.058 | 0.100 |")
    out = tmp_path / "s.json"
    assert main(["seeds", *map(str, roots), "--mixtures", str(mixtures), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == rows


@pytest.mark.parametrize("dim,covariance", [(2, "isotropic"), (3, "full")])
def test_the_mixtures_exact_field_has_the_mixtures_log_p_as_its_ode_likelihood(bench_path, dim, covariance):
    from bench.experiments.heldout_mixtures import draw_mixture, mixture_log_prob, mixture_velocity, sample_mixture
    from shared.likelihood import log_likelihood

    mix = draw_mixture(dim, seed=5, covariance=covariance)
    x = sample_mixture(mix, 40, torch.Generator().manual_seed(0))
    ode = log_likelihood(lambda xt, t: mixture_velocity(mix, xt, t), x, divergence="exact", rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(ode.logp.numpy(), mixture_log_prob(mix, x).numpy(), atol=2e-4)
    # at t = 1 the marginal is N(0, I), so the field is E[z - x | z] = z - mean of the data
    z = torch.randn(5, dim, dtype=torch.float64)
    data_mean = (mix["weights"][:, None] * mix["means"]).sum(0)
    torch.testing.assert_close(mixture_velocity(mix, z, torch.ones(5, dtype=torch.float64)), z - data_mean)


def test_field_gap_by_time_splices_the_exact_field_into_a_trained_one(tmp_path, bench_path):
    import flowdistill as fd
    from bench.experiments.field_gap_by_time import field_error_by_time, gap_by_time
    from bench.experiments.heldout_mixtures import make

    make(2, 7, tmp_path / "m", n_train=600)
    run_dir = fd.train(ROOT / "recipes/density/fm.yaml", [
        f"out_dir={tmp_path}", "name=fm", "data.name=tabular", f"data.path={tmp_path}/m/train.npy",
        f"data.test_path={tmp_path}/m/test.npy", "train.steps=60", "train.progress=false",
        "train.sample_grid=false", "train.ckpt_every=60"])
    run = fd.load_run(run_dir)
    result = gap_by_time(run, tmp_path / "m", n=30, cuts=[0.3])
    gaps = {row["field"]: row["gap"] for row in result["rows"]}
    assert list(gaps) == ["learned on [0, 1]", "analytic on [0, 1]", "analytic on [0, 0.3), learned after",
                          "learned on [0, 0.3), analytic after"]
    exact = np.load(tmp_path / "m" / "test_logp.npy")[:30].astype(np.float64)
    assert abs(gaps["analytic on [0, 1]"]) < 5e-3  # the exact field, in the run's standardised units
    assert gaps["learned on [0, 1]"] > 0.05  # 60 steps: far from the truth
    model_logp = fd.log_likelihood(run, run.dataset.test[:30]).double()
    std_logdet = torch.log(run.dataset.standardization.std).sum().item()  # log p_file = log p_std - sum log std
    assert math.isclose(gaps["learned on [0, 1]"], -(model_logp.numpy() - std_logdet - exact).mean(), abs_tol=1e-3)
    errors = field_error_by_time(run, tmp_path / "m", n=200, times=[0.2, 0.8])
    assert [row["t"] for row in errors] == [0.2, 0.8]
    assert all(row["train"] > 1e-3 and row["test"] > 1e-3 for row in errors)  # 60 steps: a rough field
    from types import SimpleNamespace

    from bench.experiments.heldout_mixtures import mixture_velocity, read_mixture, standardised
    st = run.dataset.standardization
    mix = standardised(read_mixture(tmp_path / "m"), st.mean.double(), st.std.double())
    exact_run = SimpleNamespace(dataset=run.dataset, model=lambda x, t: mixture_velocity(mix, x, t))
    assert all(row[s] < 1e-9 for row in field_error_by_time(exact_run, tmp_path / "m", 200, [0.2, 0.8])
               for s in ("train", "test"))
