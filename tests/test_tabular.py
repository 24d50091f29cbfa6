"""Tabular user data in the user's units: saved standardisation, log-density Jacobian, samples, test files.

The Jacobian is checked against a known density: a "model" that is exactly N(0, I) in standardised units
is exactly N(mean, diag std^2) in the file's units, so its per-sample log p must equal that Gaussian's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdistill.api import load_run
from flowdistill.cli import main
from shared.config import DataConfig
from shared.data import DataError
from shared.data_sources import load_dataset
from shared.evaluate import score_points
from shared.paths import standard_normal_logprob
from shared.run import Run
from shared.likelihood import LikelihoodResult
from shared.tabular import Standardization, TabularError

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes/toy2d/fm_independent.yaml")
TINY = ["model.hidden=32", "model.depth=2", "train.steps=30", "train.batch_size=64", "train.progress=false",
        "train.sample_grid=false", "train.ckpt_every=30", "eval.nll_samples=50"]
MEAN, STD = np.array([100.0, -3.0]), np.array([20.0, 0.5])


def _file(path: Path, n: int = 400, seed: int = 0) -> Path:
    x = MEAN + STD * np.random.default_rng(seed).standard_normal((n, 2))
    np.save(path, x)
    return path


class StandardNormal:
    """A sampler whose model density is exactly N(0, I) in the run's (standardised) units."""

    exact_likelihood = True

    def log_likelihood(self, model, x, divergence="exact", generator=None):
        return LikelihoodResult(standard_normal_logprob(x.double()), 1, x)


def test_standardisation_round_trips_bit_for_bit_and_rejects_damage(tmp_path):
    stats = Standardization.fit(torch.tensor(MEAN + STD * np.random.default_rng(1).standard_normal((50, 2))))
    back = Standardization.load(stats.save(tmp_path / "s.json"))
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
    assert back.log_jacobian == pytest.approx(-math.log(stats.std.prod().item()))
    (tmp_path / "bad.json").write_text(json.dumps({"mean": [0.0, 1.0], "std": [1.0, -2.0]}))
    with pytest.raises(TabularError, match="does not hold a standardisation"):
        Standardization.load(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text("{\"mean\": [0.0")
    with pytest.raises(TabularError, match="cannot read the saved standardisation"):
        Standardization.load(tmp_path / "cut.json")


def test_log_p_in_file_units_equals_the_known_gaussian_density(tmp_path):
    """log p_user = log p_std - sum log std, checked against N(mean, diag std^2) evaluated directly."""
    dataset = load_dataset(DataConfig(name="tabular", path=str(_file(tmp_path / "x.npy"))))
    std = dataset.standardization
    run = Run(tmp_path, None, dataset, torch.nn.Linear(1, 1), StandardNormal(), 0)
    summary, columns = score_points(run, dataset.test, torch.Generator(), label="test")
    x = std.to_user(dataset.test)
    exact = torch.distributions.Normal(std.mean, std.std).log_prob(x).sum(1)
    torch.testing.assert_close(columns["logp_nats"], exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(columns["logp_standardised_nats"], standard_normal_logprob(dataset.test.double()))
    assert summary["log_jacobian_nats"] == pytest.approx(-float(std.std.log().sum()))
    assert "units of the data file" in summary["units"]


def test_a_test_file_is_used_whole_whatever_the_toy_sample_counts_say(tmp_path):
    """The density recipes set data.n_test (points generated for toy sets); a user's test file keeps every row."""
    train, test = _file(tmp_path / "train.npy", 300, 0), _file(tmp_path / "test.npy", 70, 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing is said
        ds = load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(test), n_train=120, n_test=9))
        loose = load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(test), max_test_rows=500))
    assert (len(ds.train), len(ds.test)) == (300, 70) and len(loose.test) == 70
    assert "standardisation fitted on" in ds.units and "train.npy" in ds.units


def test_a_run_saved_before_the_row_caps_keeps_its_rows(tmp_path):
    """An older tabular run capped rows with data.n_train / data.n_test: loading it keeps those caps."""
    from shared.run_prepare import upgrade_saved_config

    old = {"name": "r", "data": {"name": "tabular", "n_train": 120, "n_test": 5000}}
    new = upgrade_saved_config(old)
    assert new["data"]["max_train_rows"] == 120 and "max_test_rows" not in new["data"]  # 5000 was the default
    assert "max_train_rows" not in old["data"]  # the input is not changed
    today = {"name": "r", "data": {"name": "tabular", "n_train": 120, "max_train_rows": 0}}
    assert upgrade_saved_config(today) == today
    toy = {"name": "r", "data": {"name": "gmm2", "n_train": 120}}
    assert upgrade_saved_config(toy) == toy


def test_test_path_and_row_caps_are_honoured(tmp_path):
    train, test = _file(tmp_path / "train.npy", 300, 0), _file(tmp_path / "test.npy", 70, 1)
    ds = load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(test)))
    assert (len(ds.train), len(ds.test)) == (300, 70)
    torch.testing.assert_close(ds.to_user(ds.test), torch.from_numpy(np.load(test)))
    with pytest.warns(UserWarning) as caught:
        capped = load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(test), max_train_rows=120,
                                         max_test_rows=9))
    assert (len(capped.train), len(capped.test)) == (120, 9)
    said = [str(w.message) for w in caught]
    assert any("data.max_test_rows=9 keeps 9 of the 70 test rows of" in m and "test.npy" in m for m in said)
    assert any("data.max_train_rows=120 keeps 120 of the 300 train rows" in m for m in said)
    assert capped.meta["rows_used"] == {"train": 120, "test": 9}
    assert capped.meta["rows_available"] == {"train": 300, "test": 70}
    np.save(tmp_path / "three.npy", np.zeros((5, 3)))
    with pytest.raises(DataError, match="has 3 columns but data.path"):
        load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(tmp_path / "three.npy")))
    with pytest.raises(DataError, match="data.test_path .* does not exist"):
        load_dataset(DataConfig(name="tabular", path=str(train), test_path=str(tmp_path / "none.npy")))


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab")
    data = _file(root / "data.npy")
    assert main(["train", RECIPE, f"out_dir={root}", "name=run", "data.name=tabular", f"data.path={data}", *TINY]) == 0
    return root / "run", data


def test_run_keeps_its_standardisation_when_the_file_moves(tabular_run, tmp_path):
    run_dir, data = tabular_run
    saved = json.loads((run_dir / "standardization.json").read_text())
    before = load_run(run_dir).dataset.standardization
    assert saved["mean"] == before.mean.tolist()
    moved = tmp_path / "moved.npy"
    moved.write_bytes(data.read_bytes())
    data.unlink()
    try:
        after = load_run(run_dir)
        assert torch.equal(after.dataset.standardization.std, before.std)
        with pytest.raises(ValueError, match="no longer exists"):
            from shared.evaluate import score_split
            score_split(after, "test")
        assert main(["nll", str(run_dir), "--data", str(moved), "--n", "40"]) == 0
    finally:
        data.write_bytes(moved.read_bytes())
    rows = (run_dir / "nll-file-moved.csv").read_text().splitlines()
    assert len(rows) == 41 and rows[0].startswith("index,logp_nats")
    summary = json.loads((run_dir / "nll-file-moved.json").read_text())
    assert summary["n"] == 40 and "units of the data file" in summary["units"]


def test_samples_are_written_in_file_units(tabular_run, tmp_path):
    run_dir, _ = tabular_run
    out = tmp_path / "s.png"
    assert main(["sample", str(run_dir), "--n", "300", "--steps", "4", "--out", str(out)]) == 0
    with np.load(out.with_suffix(".npz")) as f:
        samples = f["samples"]
    assert abs(samples[:, 0].mean() - MEAN[0]) < 8.0  # file units: ~100 (standardised would be ~0)
    assert 5.0 < samples[:, 0].std() < 40.0


def test_nll_data_refuses_a_file_of_another_width(tabular_run, tmp_path, capsys):
    run_dir, _ = tabular_run
    np.save(tmp_path / "wide.npy", np.zeros((10, 5)))
    assert main(["nll", str(run_dir), "--data", str(tmp_path / "wide.npy")]) == 2
    assert "has 5 columns; the run models vectors of 2" in capsys.readouterr().err
