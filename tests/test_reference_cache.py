"""The reference-likelihood cache and f2d2-eval's grid choice, on tiny runs of the density recipes.

An ODE solve is counted by wrapping `shared.likelihood.odeint_per_sample` (every adaptive ODE likelihood
goes through it): a cached reference must not call it again.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import flowdistill.f2d2_eval as f2d2_eval
import shared.likelihood as likelihood
from flowdistill.api import load_run
from flowdistill.cli import main
from shared.evaluate import score_split
from shared.likelihood import LikelihoodResult
from shared.reference_cache import cache_dir

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "density"
TINY = ["data.n_train=600", "data.n_test=60", "train.batch_size=64", "train.progress=false",
        "train.sample_grid=false", "train.log_every=10", "train.ckpt_every=1000", "train.warmup_steps=0"]
SMALL_FM = ["model.hidden=32", "model.depth=2", "model.time_dim=8"]
SMALL_MAP = ["model.backbone.hidden=32", "model.backbone.depth=2", "model.backbone.time_dim=8",
             "model.head_hidden=16", "model.head_time_dim=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("refcache")
    teacher = out / "fm"
    assert main(["train", str(RECIPES / "fm.yaml"), f"out_dir={out}", "name=fm", "train.steps=20", *SMALL_FM,
                 *TINY]) == 0
    assert main(["train", str(RECIPES / "f2d2_joint.yaml"), f"out_dir={out}", "name=f2d2", "train.steps=5",
                 f"method.teacher={teacher}", f"train.init_from={teacher}", *SMALL_MAP, *TINY]) == 0
    return teacher, out / "f2d2"


@pytest.fixture
def solves(monkeypatch) -> list[int]:
    """Number of ODE solves (batches integrated) since the test started, as a one-item list."""
    count = [0]
    original = likelihood.odeint_per_sample

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(likelihood, "odeint_per_sample", counted)
    return count


def _clear(run_dir: Path) -> None:
    for f in cache_dir(run_dir).glob("reference-*.safetensors"):
        f.unlink()


def test_a_second_score_reads_the_cache_and_every_key_part_recomputes(runs, solves):
    teacher, _ = runs
    _clear(teacher)
    run = load_run(teacher)
    first, cols = score_split(run, "test", 20, "exact")
    assert solves[0] == 1 and not first["cached"]
    assert len(list(cache_dir(teacher).glob("reference-*.safetensors"))) == 1
    second, cols2 = score_split(run, "test", 20, "exact", batch_size=7)  # exact: batching is not in the key
    assert solves[0] == 1 and second["cached"]
    assert torch.equal(cols["logp_nats"], cols2["logp_nats"]) and torch.equal(cols["nfe"], cols2["nfe"])
    assert second["seconds"] == pytest.approx(first["seconds"])  # the cost of computing it, not of reading it
    score_split(run, "test", 21, "exact")  # other points
    assert solves[0] == 2
    score_split(run, "val", 20, "exact")  # another split
    assert solves[0] == 3
    score_split(run, "test", 20, "hutchinson")  # another divergence
    assert solves[0] == 4
    score_split(run, "test", 20, "hutchinson")
    assert solves[0] == 4
    score_split(run, "test", 20, "hutchinson", seed=1)  # other probes
    assert solves[0] == 5
    with torch.no_grad():
        next(run.model.parameters()).add_(1e-3)  # other weights
    score_split(run, "test", 20, "exact")
    assert solves[0] == 6
    score_split(load_run(teacher), "test", 20, "exact", cache=False)  # the cache can be bypassed
    assert solves[0] == 7


def test_a_damaged_cache_file_is_recomputed_with_a_warning(runs, solves):
    teacher, _ = runs
    _clear(teacher)
    run = load_run(teacher)
    good, _ = score_split(run, "test", 12, "exact")
    (path,) = cache_dir(teacher).glob("reference-*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # torn
    with pytest.warns(UserWarning, match="is damaged"):
        again, _ = score_split(run, "test", 12, "exact")
    assert solves[0] == 2 and not again["cached"] and again["nll_nats"] == pytest.approx(good["nll_nats"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is whole again
        third, _ = score_split(run, "test", 12, "exact")
    assert solves[0] == 2 and third["cached"]


def test_nll_reports_nfe_per_point_and_f2d2_eval_reuses_the_teachers_reference(runs, solves, capsys):
    teacher, f2d2 = runs
    _clear(teacher)
    assert main(["nll", str(teacher), "--n", "16", "--divergence", "exact"]) == 0
    out = capsys.readouterr().out
    res = json.loads((teacher / "nll-test.json").read_text())
    assert res["nfe_min"] <= res["nfe_mean"] <= res["nfe_max"] and res["nfe_min"] > 10
    assert "NFE per point" in out and solves[0] == 1
    per_point = (teacher / "nll-test.csv").read_text().splitlines()
    header = per_point[0].split(",")
    assert header[:2] == ["index", "logp_nats"] and header[-1] == "nfe"
    assert all(int(line.split(",")[-1]) >= res["nfe_min"] for line in per_point[1:])
    assert main(["nll", str(teacher), "--n", "16", "--divergence", "exact"]) == 0
    assert "read from the reference cache" in capsys.readouterr().out and solves[0] == 1
    # f2d2-eval's reference is the teacher's ODE likelihood of the same test points: read, not integrated
    assert main(["f2d2-eval", str(f2d2), "--steps", "1,2", "--n", "16", "--n-samples", "50", "--grid", "linear",
                 "--divergence", "exact"]) == 0
    result = json.loads((f2d2 / "f2d2-eval-linear.json").read_text())
    # the reference is read; the only solves are its convergence check's: two, on its first points
    assert solves[0] == 1 + 2 and result["reference_cached"]
    assert result["reference_convergence"]["points"] == 8
    assert result["rows"][0]["ref_nll"] == pytest.approx(res["nll_nats"], abs=1e-9)
    assert result["reference_nfe_mean"] == pytest.approx(res["nfe_mean"])
    assert result["grid_choice"]["chosen_by"] == "given"  # --grid: no choice, no validation reference


def _fake_few_step(offsets: dict[str, float]):
    """A few-step likelihood that is the teacher's reference plus a fixed offset per grid."""
    teacher_ref: dict[str, object] = {}

    def fake(model, x, steps, grid="linear"):
        ref = teacher_ref["run"]
        logp = ref.sampler.log_likelihood(ref.model, x, "exact").logp
        return LikelihoodResult(logp + offsets[grid], steps, x)

    return fake, teacher_ref


def test_f2d2_eval_chooses_the_grid_that_agrees_best_with_the_reference_on_val(runs, monkeypatch, capsys):
    teacher, f2d2 = runs
    fake, holder = _fake_few_step({"linear": 0.05, "geometric": -0.01, "quadratic": 0.0})
    holder["run"] = load_run(teacher)
    monkeypatch.setattr(f2d2_eval, "few_step_log_likelihood", fake)
    assert main(["f2d2-eval", str(f2d2), "--steps", "1,2,4", "--n", "12", "--n-samples", "50",
                 "--divergence", "exact"]) == 0
    out = capsys.readouterr().out
    assert "grid: geometric (chosen on val: mean |few-step - ODE| 0.010 vs linear 0.050 nats)" in out
    result = json.loads((f2d2 / "f2d2-eval.json").read_text())
    choice = result["grid"], result["grid_choice"]
    assert choice[0] == "geometric" and choice[1]["chosen_by"] == "validation" and choice[1]["split"] == "val"
    # quadratic asks for jumps a Shortcut map never trained at K = 2: not a candidate
    assert set(choice[1]["scores"]) == {"linear", "geometric"} and choice[1]["n"] == 12


def test_grid_choice_on_a_real_map_is_the_smallest_disagreement(runs):
    _, f2d2 = runs
    run = load_run(f2d2)
    choice = f2d2_eval.choose_grid(run, [2, 4], 10, "exact")
    scores = choice["scores"]
    assert choice["grid"] == min(scores, key=scores.get) and len(scores) == 2
    x, gen = f2d2_eval.evaluation_points(run, "val", 10, 0)
    _, ref = f2d2_eval.reference_scores(run, x, gen, "exact", 500, "val")
    again = f2d2_eval.grid_disagreement(run, x, ref.logp, [2, 4], choice["grid"], 500)
    assert again == pytest.approx(scores[choice["grid"]], rel=1e-9) and again > 0


def test_grid_is_not_chosen_without_a_validation_split(runs, monkeypatch):
    _, f2d2 = runs
    run = load_run(f2d2)
    monkeypatch.setattr(run.dataset, "val", None)
    choice = f2d2_eval.choose_grid(run, [1, 2], 10, "exact")
    assert choice["grid"] == "linear" and choice["chosen_by"] == "default" and "no validation split" in choice["reason"]
    only = f2d2_eval.choose_grid(run, [3], 10, "exact")  # K = 3: only the geometric grid is dyadic
    assert only["grid"] == "geometric" and only["chosen_by"] == "only valid grid"
    with pytest.raises(ValueError, match="no time grid"):
        f2d2_eval.choose_grid(run, [9], 10, "exact")  # levels 7: the geometric grid reaches K = 8


def test_flow_map_samples_are_named_by_their_jumps(runs):
    _, f2d2 = runs
    assert main(["sample", str(f2d2), "--n", "20", "--steps", "4", "--grid", "geometric"]) == 0
    import numpy as np

    with np.load(f2d2 / "samples" / "jumps4-geometric.npz") as saved:
        assert int(saved["nfe"]) == 4 and saved["samples"].shape == (20, 2)
    assert not list((f2d2 / "samples").glob("steps*"))
