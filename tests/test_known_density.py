"""bench.experiments.known_density end to end on tiny runs: grid chosen on validation, every row scored on test."""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench.experiments.known_density import main as table_main
from flowdistill.cli import main

DENSITY = Path(__file__).resolve().parents[1] / "recipes" / "density"
SMALL = ["data.n_train=1000", "data.n_test=200", "train.progress=false", "train.sample_grid=false",
         "train.log_every=10", "train.ckpt_every=1000"]


def test_known_density_table_scores_each_likelihood_against_the_exact_density(tmp_path):
    runs = tmp_path / "runs"
    fm = runs / "d-fm"
    assert main(["train", str(DENSITY / "fm.yaml"), f"out_dir={runs}", "name=d-fm", "train.steps=60",
                 "model.hidden=32", "model.depth=2", *SMALL]) == 0
    assert main(["train", str(DENSITY / "f2d2_joint.yaml"), f"out_dir={runs}", "name=d-f2d2_joint",
                 "train.steps=20", f"method.teacher={fm}", f"train.init_from={fm}", "model.backbone.hidden=32",
                 "model.backbone.depth=2", "model.head_hidden=16", *SMALL]) == 0
    assert main(["train", str(DENSITY / "tarflow.yaml"), f"out_dir={runs}", "name=d-flow", "train.steps=20",
                 "train.eval_every=10", "model.width=32", "model.blocks=2", "model.layers=1", "model.head_dim=16",
                 *SMALL]) == 0
    assert table_main(["--data", "gmm2", "--prefix", "d", "--runs", str(runs), "--out", str(tmp_path),
                       "--tarflow-run", "d-flow"]) == 0  # a run not named <prefix>-tarflow
    result = json.loads((tmp_path / "gmm2.json").read_text())
    assert result["grid"] in ("linear", "geometric") and result["grid_chosen_on"] == "val"
    assert set(result["val_mean_abs_error_K4"]) == {"linear", "geometric"}  # levels 7: geometric reaches K = 8
    assert result["split"] == "test" and result["n"] == 200
    assert result["runs"] == {"f2d2": "d-f2d2_joint", "teacher": str(fm), "tarflow": "d-flow"}
    methods = [r["method"] for r in result["rows"]]
    assert methods[0].startswith("TarFlow") and methods[1].startswith("ODE reference")
    assert sum(m.startswith("F2D2 K =") for m in methods) == 4 and sum(m.startswith("naive") for m in methods) == 4
    exact = result["rows"][0]["exact_nll"]
    for r in result["rows"]:
        assert r["exact_nll"] == exact and math.isfinite(r["gap"])
        assert r["gap"] == r["nll"] - r["exact_nll"] or abs(r["gap"] - (r["nll"] - r["exact_nll"])) < 1e-9
        if math.isfinite(r["mean_abs_error"]):
            assert r["mean_abs_error"] >= abs(r["gap"]) - 1e-9
