"""`flowdistill compare`: a CI-sized 2D comparison end to end, its aggregation, and spec errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flowdistill.cli import main
from flowdistill.compare import entry_config, load_spec, run_comparison
from flowdistill.scoring import aggregate, reach_table
from shared.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "recipes" / "toy2d"
SMALL_DATA = ["data.n_train=1000", "data.n_test=300", "train.progress=false", "train.sample_grid=false"]
COUPLINGS = ["independent", "minibatch_ot", "semidiscrete_ot", "nfm"]


def _spec(root: Path) -> Path:
    out = root / "runs"
    teacher = " ".join([str(TOY / "teacher.yaml"), f"out_dir={out}", "name=teacher", "train.steps=60",
                        "model.width=32", "model.head_dim=16", "model.blocks=4", "train.batch_size=128", *SMALL_DATA])
    students = [f"{TOY / 'fm_independent.yaml'} name=independent",
                f"{TOY / 'fm_minibatch_ot.yaml'} name=minibatch_ot",
                f"{TOY / 'fm_semidiscrete_ot.yaml'} name=semidiscrete_ot method.coupling.iters=200",
                f"{TOY / 'fm_nf_teacher.yaml'} name=nfm method.coupling.teacher={out / 'teacher'}"]
    spec = {"name": "cmp", "out_dir": str(root / "out"), "teachers": [teacher], "students": students,
            "common": [f"out_dir={out}", "train.steps=150", "train.batch_size=256", "model.hidden=64",
                       "train.log_every=50", *SMALL_DATA],
            "seeds": [0, 1], "steps": [1, 4], "solvers": ["euler"], "grids": ["linear", "quadratic"],
            "n_samples": 300, "curvature_steps": 16, "curvature_samples": 200}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    spec = _spec(root)
    assert main(["compare", str(spec)]) == 0
    return root, spec


def test_compare_writes_report_tables_and_figures(comparison):
    root, _ = comparison
    out = root / "out" / "cmp"
    for name in ("comparison.md", "results.json", "quality_vs_nfe.png", "loss_curves.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    cells = {(r["student"], r["grid"], r["steps"]) for r in results["rows"]}
    assert cells == {(s, g, n) for s in COUPLINGS for g in ("linear", "quadratic") for n in (1, 4)}
    assert all(r["seeds"] == 2 and r["metric"] == "w2" and r["mean"] > 0 for r in results["rows"])
    assert [t["name"] for t in results["teachers"]] == ["teacher"] and results["teachers"][0]["nfe"] > 1
    report = (out / "comparison.md").read_text()
    for label in COUPLINGS:
        assert f"| {label} |" in report
    assert "Teachers (autoregressive sampling)" in report and "NFE to reach" in report
    for label in COUPLINGS:
        for seed in (0, 1):
            assert (root / "runs" / f"{label}-s{seed}" / "compare-eval.json").is_file()


def test_paths_of_ot_couplings_are_straighter_than_independent(comparison):
    root, _ = comparison
    per_seed = json.loads((root / "out" / "cmp" / "results.json").read_text())["per_seed"]
    curvature = {k: max(r["curvature"] for r in v) for k, v in per_seed.items()}
    assert curvature["minibatch_ot"] < 0.5 * min(r["curvature"] for r in per_seed["independent"])
    assert curvature["semidiscrete_ot"] < 0.5 * min(r["curvature"] for r in per_seed["independent"])


def test_rerun_reuses_trained_runs_and_cached_evaluations(comparison):
    root, spec = comparison
    runs = sorted((root / "runs").glob("*/compare-eval.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    ckpts = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/checkpoints/*")}
    assert main(["compare", str(spec), "name=again"]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/checkpoints/*")} == ckpts
    first = json.loads((root / "out" / "cmp" / "results.json").read_text())["rows"]
    again = json.loads((root / "out" / "again" / "results.json").read_text())["rows"]
    assert first == again
    # fewer step counts than were evaluated: the cached rows are reused, not recomputed and not overwritten
    assert main(["compare", str(spec), "name=fewer", "steps=[4]"]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    fewer = json.loads((root / "out" / "fewer" / "results.json").read_text())["rows"]
    assert fewer == [r for r in first if r["steps"] == 4] and fewer


def test_an_added_solver_evaluates_only_the_cells_the_cache_lacks(comparison, monkeypatch):
    import flowdistill.scoring as scoring

    root, spec = comparison
    calls, real = [], scoring.quality_vs_steps

    def spy(run, steps, solver, grid, *args, **kwargs):
        calls.append((solver, grid, tuple(steps)))
        return real(run, steps, solver, grid, *args, **kwargs)

    monkeypatch.setattr(scoring, "quality_vs_steps", spy)
    assert main(["compare", str(spec), "name=heun", "solvers=[euler,heun]"]) == 0
    assert sorted(set(calls)) == [("heun", "linear", (1, 4)), ("heun", "quadratic", (1, 4))]
    assert len(calls) == 2 * 2 * len(COUPLINGS)  # two grids, two seeds per coupling, nothing for Euler
    first = json.loads((root / "out" / "cmp" / "results.json").read_text())["rows"]
    both = json.loads((root / "out" / "heun" / "results.json").read_text())["rows"]
    assert [r for r in both if r["solver"] == "euler"] == first
    assert {r["solver"] for r in both} == {"euler", "heun"}
    # the cache now holds both solvers: asking for either again computes nothing
    calls.clear()
    assert main(["compare", str(spec), "name=heun_only", "solvers=[heun]", "steps=[4]"]) == 0
    assert calls == []


def test_scores_of_another_feature_space_are_measured_again_and_curvature_is_kept(comparison, monkeypatch):
    """A retrained FD classifier is another feature space: cached quality rows measured in the old one must not
    sit in one table with rows of the new one. Curvature does not depend on the features and is kept."""
    import flowdistill.compare as compare
    import flowdistill.scoring as scoring

    root, spec = comparison
    calls, curvatures = [], []
    real_quality, real_curvature = scoring.quality_vs_steps, scoring.curvature
    monkeypatch.setattr(scoring, "quality_vs_steps",
                        lambda run, steps, solver, grid, *a, **k: calls.append(grid) or real_quality(run, steps, solver,
                                                                                                      grid, *a, **k))
    monkeypatch.setattr(scoring, "curvature", lambda *a, **k: curvatures.append(1) or real_curvature(*a, **k))
    for module in (compare, scoring):
        monkeypatch.setattr(module, "feature_identity", lambda extractor: "retrained-classifier")
    assert main(["compare", str(spec), "name=refeatured"]) == 0
    assert json.loads((root / "out" / "refeatured" / "results.json").read_text())["features"] == "retrained-classifier"
    assert len(calls) == 2 * 2 * len(COUPLINGS) and curvatures == []  # every quality cell again, no curvature
    saved = json.loads((root / "runs" / "nfm-s0" / "compare-eval.json").read_text())
    assert saved["key"]["features"] == "retrained-classifier"
    first = json.loads((root / "out" / "cmp" / "results.json").read_text())["rows"]
    again = json.loads((root / "out" / "refeatured" / "results.json").read_text())["rows"]
    def values(rows):
        return [(r["student"], r["grid"], r["steps"], r["mean"], r["std"]) for r in rows]

    assert values(again) == values(first)  # the same samples in the same (monkeypatched) features: same values
    monkeypatch.undo()  # the vector features again: measured once more, then served from the cache
    assert main(["compare", str(spec), "name=restored"]) == 0
    assert json.loads((root / "runs" / "nfm-s0" / "compare-eval.json").read_text())["key"]["features"] == "wasserstein2"


def test_dry_run_lists_every_run_with_its_state_and_trains_nothing(tmp_path, comparison, capsys):
    root, spec = comparison
    capsys.readouterr()
    assert main(["compare", str(spec), "--dry-run", "seeds=[0,1,2]"]) == 0
    out = capsys.readouterr().out
    assert out.count("| finished |") == 1 + 4 * 2  # the teacher and the two trained seeds of each coupling
    assert out.count("| to train |") == 4  # seed 2 of each coupling
    assert "4 of 13 runs to train or resume" in out
    assert not (root / "runs" / "independent-s2").exists()
    fresh = _spec(tmp_path)
    assert main(["compare", str(fresh), "--dry-run"]) == 0
    assert "9 of 9 runs to train or resume" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_aggregate_and_reach_table_pick_the_fewest_nfe_under_threshold():
    def row(steps, value, seconds=1.0):
        return {"solver": "euler", "grid": "linear", "steps": steps, "nfe": steps, "metric": "w2", "value": value,
                "seconds": seconds, "n": 100}

    students = {"a": [{"rows": [row(1, 0.9), row(4, 0.3)]}, {"rows": [row(1, 0.7), row(4, 0.1)]}],
                "b": [{"rows": [row(1, 0.5), row(4, 0.4)]}]}
    rows = aggregate(students)
    a1 = next(r for r in rows if r["student"] == "a" and r["steps"] == 1)
    assert a1["mean"] == pytest.approx(0.8) and a1["std"] == pytest.approx(0.1414, abs=1e-3) and a1["seeds"] == 2
    reach = {r["student"]: r for r in reach_table(rows, 0.45, teacher_seconds=1.0)}
    assert reach["a"]["nfe"] == 4 and reach["b"]["nfe"] == 4
    assert reach["a"]["speedup_vs_teacher"] == pytest.approx(100.0)
    reach = {r["student"]: r for r in reach_table(rows, 0.05, teacher_seconds=None)}
    assert reach["a"]["nfe"] == "not reached" and reach["a"]["quality"] == pytest.approx(0.2)


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/**/compare*.yaml")), ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_every_comparison_spec_resolves_to_valid_runs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec(path)
    teachers = [entry_config(e) for e in spec.teachers]
    students = [entry_config(e, spec.common) for e in spec.students]
    assert len({c.name for c in teachers + students}) == len(teachers) + len(students)
    assert {c.data.name for c in students} == {path.parent.name.replace("toy2d", "8gaussians")}
    assert {c.train.steps for c in students} == {students[0].train.steps}  # one budget for every coupling
    nfm = [cfg for cfg in students if cfg.method.coupling.name in ("nf_teacher", "nf_teacher_ot")]
    assert nfm  # every comparison has NFM students, each reading one of the spec's teachers
    for cfg in nfm:
        assert cfg.method.coupling.teacher in {f"{t.out_dir}/{t.name}" for t in teachers}


def test_spec_errors_are_specific(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("teachers: []\n")
    with pytest.raises(ConfigError, match="lists no students"):
        load_spec(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("students: [x]\nsolvers: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="empty entry"):
        entry_config("  ")
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "comparison spec" in capsys.readouterr().err
    spec = {"name": "mixed", "out_dir": str(tmp_path), "seeds": [0],
            "students": [f"{TOY / 'fm_independent.yaml'} out_dir={tmp_path}",
                         f"{TOY / 'fm_independent.yaml'} out_dir={tmp_path} name=other data.name=moons"]}
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="same data set"):
        run_comparison(load_spec(tmp_path / "mixed.yaml"))
    assert not list(tmp_path.glob("*/checkpoints"))  # refused before training anything


def test_compare_on_a_known_density_scores_every_likelihood_against_it(tmp_path):
    out = tmp_path / "runs"
    data = ["data.name=gmm2", *SMALL_DATA]
    teacher = " ".join([str(TOY / "teacher.yaml"), f"out_dir={out}", "name=teacher", "train.steps=40",
                        "model.width=32", "model.head_dim=16", "model.blocks=4", "train.batch_size=128", *data])
    spec = {"name": "cmp", "out_dir": str(tmp_path / "out"), "teachers": [teacher],
            "students": [f"{TOY / 'fm_independent.yaml'} name=independent"],
            "common": [f"out_dir={out}", "train.steps=80", "train.batch_size=256", "model.hidden=32", *data],
            "seeds": [0], "steps": [2], "solvers": ["euler"], "grids": ["linear"], "n_samples": 200,
            "curvature_steps": 4, "curvature_samples": 50}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["compare", str(tmp_path / "spec.yaml")]) == 0
    result = json.loads((tmp_path / "out" / "cmp" / "results.json").read_text())
    rows = {r["model"]: r for r in result["likelihood_vs_exact"]}
    assert set(rows) == {"teacher", "independent"} and rows["teacher"]["likelihood"] == "exact (flow)"
    for r in rows.values():  # gap and error are measured, and an error bounds the gap it averages
        assert r["exact_nll"] == pytest.approx(rows["teacher"]["exact_nll"]) and r["mean_abs_error"] >= abs(r["gap"]) - 1e-9
    assert (tmp_path / "out" / "cmp" / "likelihood_calibration.png").stat().st_size > 0
    assert "## Likelihood against the exact density" in (tmp_path / "out" / "cmp" / "comparison.md").read_text()
