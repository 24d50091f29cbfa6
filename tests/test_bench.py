"""Benchmarks: each script runs end to end with tiny settings on CPU and writes its JSON (no timing checks)."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from flowdistill.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """Run `bench.benchmarks.<module>.main` on CPU with one repeat, importing `bench` from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))

    def run(module: str, out: Path, *args: str) -> dict:
        payload = importlib.import_module(f"bench.benchmarks.{module}").main(
            ["--device", "cpu", "--repeats", "1", "--out", str(out), *args])
        assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
        return payload

    return run


def _positive(row: dict, keys: list[str]) -> None:
    for key in keys:
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def _check_machine(payload: dict) -> None:
    for key in ("cpu", "cores", "torch_threads", "torch", "device"):
        assert key in payload["machine"]
    assert payload["machine"]["device"] == "cpu"


def test_bench_train_writes_rates_and_overhead_for_each_case_and_ema_setting(tmp_path, bench):
    payload = bench("bench_train", tmp_path / "train.json", "--cases", "toy,digits", "--steps", "2",
                     "--log-every", "1", "--batch", "8")
    assert payload["bench"] == "train"
    _check_machine(payload)
    rows = payload["rows"]
    expected = [("toy", 0.999), ("toy", 0.0), ("digits", 0.999), ("digits", 0.0)]
    assert [(r["case"], r["ema_decay"]) for r in rows] == expected
    for row in rows:
        _positive(row, ["bare_steps_per_s", "trainer_steps_per_s", "bare_samples_per_s", "trainer_samples_per_s"])
        assert math.isfinite(row["overhead_pct"]) and len(row["overhead_pct_per_repeat"]) == 1
        assert row["batch"] == 8 and row["timed_steps"] == 2


def test_bench_sample_reports_samples_and_nfe_per_second_with_the_solvers_nfe(tmp_path, bench):
    payload = bench("bench_sample", tmp_path / "sample.json", "--cases", "toy,digits", "--steps", "1,2",
                     "--batch", "4")
    _check_machine(payload)
    rows = payload["rows"]
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        _positive(row, ["samples_per_s", "nfe_per_s", "ms_per_batch"])
        assert row["nfe"] == row["steps"] * (2 if row["solver"] == "heun" else 1)
        assert math.isclose(row["nfe_per_s"], row["nfe"] * row["samples_per_s"])
    assert any("NFE/s" in note for note in payload["notes"])


def test_bench_sample_benchmarks_a_trained_run(tmp_path, bench):
    overrides = [f"out_dir={tmp_path}", "name=tiny", "data.n_train=128", "data.n_test=32", "model.hidden=16",
                 "model.depth=1", "train.steps=2", "train.batch_size=32", "train.progress=false",
                 "train.sample_grid=false"]
    assert cli_main(["train", str(ROOT / "recipes/toy2d/fm_independent.yaml"), *overrides]) == 0
    payload = bench("bench_sample", tmp_path / "run.json", "--run", str(tmp_path / "tiny"), "--solvers", "euler",
                     "--steps", "2", "--batch", "16")
    [row] = payload["rows"]
    assert row["case"] == "tiny" and row["nfe"] == 2 and row["batch"] == 16
    _positive(row, ["samples_per_s", "nfe_per_s"])


def test_bench_couplings_times_every_source_and_nfm_extraction(tmp_path, bench):
    payload = bench("bench_couplings", tmp_path / "c.json", "--cases", "toy", "--batches", "64,128",
                    "--sizes", "500,3000", "--fit-batch", "64", "--seconds", "0")
    assert [r["batch"] for r in payload["rows"]] == [64, 128]
    assert [r["n_data"] for r in payload["scaling_rows"]] == [500, 3000]
    for row in payload["scaling_rows"]:
        _positive(row, ["fit_iters_per_s", "mips_queries_per_s", "mips_scores_per_s", "est_fit_s"])
        assert row["fit_iters"] >= 2 and math.isclose(row["mips_scores_per_s"], row["n_data"] * row["mips_queries_per_s"])
    for row in payload["rows"]:
        _positive(row, ["independent_ms", "ot_exact_ms", "sdot_ms", "nf_online_ms", "nf_online_bf16_ms",
                        "nf_precomputed_ms", "step_ms"])
        assert math.isclose(row["nf_pct_of_step"], 100 * row["nf_online_ms"] / row["step_ms"])
    (fit,) = payload["fit_rows"]
    _positive(fit, ["ms_per_iter", "extract_images_per_s", "extract_bf16_images_per_s"])


def test_teacher_cost_times_online_pairs_of_each_teacher_against_the_student_step(tmp_path, bench, nf_teacher_run):
    student = str(ROOT / "recipes" / "toy2d" / "fm_nf_teacher.yaml")
    payload = bench("teacher_cost", tmp_path / "t.json", student, str(nf_teacher_run), str(nf_teacher_run),
                    "--set", "data.n_train=1000", "--set", "data.n_test=200")
    _check_machine(payload)
    assert len(payload["rows"]) == 2
    for row in payload["rows"]:
        _positive(row, ["pairs_ms", "student_step_ms", "params"])
        assert row["perturbation"] == "gaussian" and row["batch"] == 512  # the recipe's own batch
        assert math.isclose(row["coupling_share_of_step"], row["pairs_ms"] / (row["pairs_ms"] + row["student_step_ms"]))
    assert payload["rows"][0]["cost_vs_first"] == 1.0


def test_pairing_fit_scores_each_teacher_on_the_students_images(tmp_path, monkeypatch, nf_teacher_run):
    monkeypatch.syspath_prepend(str(ROOT))
    out = tmp_path / "fit.json"
    payload = importlib.import_module("bench.experiments.pairing_fit").main(
        [str(nf_teacher_run), f"{nf_teacher_run}@model", "--device", "cpu", "--draws", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    auto, raw = payload["rows"]  # the tiny teacher has no validation split: one row per teacher entry
    for row in (auto, raw):
        assert row["draws"] == 2 and row["images"] > 100 and row["part"].startswith("all non-test")
        assert math.isfinite(row["nll_nats_per_dim"]) and row["gaussian_kl_per_dim"] >= 0 and row["z_rms"] > 0
    assert (auto["weights"], raw["weights"]) == ("auto", "model")
    assert auto["nll_nats_per_dim"] != raw["nll_nats_per_dim"]  # EMA and raw weights are different teachers


def test_reference_noise_pairs_runs_on_the_same_reference_subsets(tmp_path, monkeypatch):
    digits = str(ROOT / "recipes" / "digits" / "fm_independent.yaml")
    assert cli_main(["train", digits, f"out_dir={tmp_path}", "name=r", "train.steps=20", "data.val_fraction=0.1",
                     "train.progress=false", "train.sample_grid=false", "train.batch_size=32"]) == 0
    monkeypatch.syspath_prepend(str(ROOT))
    out = tmp_path / "noise.json"
    run = str(tmp_path / "r")
    payload = importlib.import_module("bench.experiments.reference_noise").main(
        [run, run, "--device", "cpu", "--steps", "2", "--n", "300", "--size", "144", "--subsets", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    first, second = payload["rows"]
    # the same run twice: the same samples on the same subsets, so every paired difference is zero
    assert second["diff_mean"] == 0 and second["diff_std"] == 0 and second["diff_val"] == 0
    assert first["fd_val"] is not None and len(first["per_subset"]) == 5
    assert first["fd_subset_std"] > 0 and first["fd_subset_mean"] > first["fd_test"]  # small sets bias FD upward
    assert cli_main(["train", digits, f"out_dir={tmp_path}", "name=other", "train.steps=2", "data.test_fraction=0.3",
                     "train.progress=false", "train.sample_grid=false", "train.batch_size=32"]) == 0
    with pytest.raises(SystemExit, match="another data set or test split"):
        importlib.import_module("bench.experiments.reference_noise").main([run, str(tmp_path / "other"), "--device",
                                                                           "cpu"])
    with pytest.raises(SystemExit, match="--subsets must be >= 2"):
        importlib.import_module("bench.experiments.reference_noise").main([run, "--device", "cpu", "--subsets", "1"])


def test_bench_streaming_reads_each_synthetic_set_and_reports_rate_and_memory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.benchmarks import bench_streaming

    out = tmp_path / "s.json"
    payload = bench_streaming.main(["--device", "cpu", "--sizes-gb", "0.002,0.004", "--image-size", "8", "--batch",
                                    "16", "--workers", "1", "--batches", "12", "--warmup", "2", "--repeats", "2",
                                    "--sample-every", "3", "--tmp", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    _check_machine(payload)
    small, large = payload["rows"]
    assert (small["size_gb"], large["size_gb"]) == (0.002, 0.004) and large["images"] >= 2 * small["images"]
    for row in (small, large):
        assert row["image_shape"] == [3, 8, 8] and row["timed_batches"] == 10 and row["processes"] == 2
        assert len(row["images_per_s_per_repeat"]) == 2
        _positive(row, ["images_per_s", "mb_per_s", "write_s", *(f"{k}_{w}_mb" for k in ("rss", "pss", "anon")
                                                                 for w in ("start", "end", "peak"))])
        assert row["pss_peak_mb"] <= row["rss_peak_mb"] and row["anon_peak_mb"] <= row["pss_peak_mb"] + 1
    assert not list(tmp_path.glob("bench_streaming-*"))  # the temporary sets are deleted


def test_gpu_check_smoke_runs_every_part_on_the_cpu_and_writes_one_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from bench.benchmarks import gpu_check

    payload = gpu_check.main(["--smoke"])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(payload, default=str))
    parts = payload["parts"]
    assert list(parts) == list(gpu_check.PARTS) and payload["smoke"] is True
    failed = {name: part for name, part in parts.items() if part["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1, default=str)[-4000:]
    tests = parts["cuda_tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and "summary" in tests
    train = parts["student_train"]["result"]
    assert set(train["params"]) == {"unet", "dit"} and all(n > 0 for n in train["params"].values())
    for rates in train["images_per_s"].values():
        assert list(rates) == list(gpu_check.MODES) and rates["bf16_compile"] == "skipped: --smoke"
        _positive(rates, ["fp32", "bf16", "bf16_channels_last"])
    for rates in parts["sampling"]["result"]["nfe_per_s"].values():
        _positive(rates, ["fp32", "bf16"])
    _positive(parts["teacher_encode"]["result"]["images_per_s"], ["fp32", "bf16"])
    _positive(parts["f2d2_meanflow"]["result"], ["meanflow_ms_per_step"])
    launch = parts["accelerate"]["result"]
    assert launch["ok"] and launch["cpu"]["processes"] == 2 and "gpu" not in launch


def test_gpu_check_seconds_scales_the_part_budgets_to_fit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from bench.benchmarks import gpu_check

    parts = ["teacher_encode", "sampling"]
    planned = sum(gpu_check.SMOKE.budgets[p] for p in parts)
    payload = gpu_check.main(["--smoke", "--parts", ",".join(parts), "--seconds", str(planned / 4),
                              "--out", str(tmp_path / "check.json")])
    budgets = {name: part["budget_s"] for name, part in payload["parts"].items()}
    assert budgets == {p: pytest.approx(gpu_check.SMOKE.budgets[p] / 4) for p in parts}
    assert sum(budgets.values()) == pytest.approx(planned / 4)
    unscaled = gpu_check.main(["--smoke", "--parts", "teacher_encode", "--seconds", "1e6", "--out",
                               str(tmp_path / "unscaled.json")])  # a larger allowance never raises a budget
    assert unscaled["parts"]["teacher_encode"]["budget_s"] == gpu_check.SMOKE.budgets["teacher_encode"]


def test_nfkd_compare_trains_teacher_and_both_students_and_writes_the_table(tmp_path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench.experiments.nfkd_compare", "recipes/toy2d/glow_teacher.yaml",
           "recipes/toy2d/glow_student_kd.yaml", "--seeds", "0,1", "--samples", "200", "--out", str(tmp_path / "kd"),
           "--set", f"out_dir={tmp_path}", "--set", "train.steps=20", "--set", "data.n_train=1000",
           "--set", "data.n_test=200", "--set", "train.batch_size=128", "--set", "train.log_every=10"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "kd.json").read_text())
    assert [r["role"] for r in result["rows"]] == ["teacher", "distilled", "undistilled", "distilled", "undistilled"]
    assert all(r["nll"] == r["nll"] and r["encode_per_s"] > 0 for r in result["rows"])  # finite, measured
    assert all(r["features"] == "wasserstein2" for r in result["rows"])  # 2D points: scored without a feature net
    assert result["rows"][1]["params"] == result["rows"][2]["params"] < result["rows"][0]["params"]


def _seed(values: dict[int, float]) -> dict:
    return {"rows": [{"nfe": n, "solver": "euler", "grid": "linear", "value": v} for n, v in values.items()]}


def test_pool_students_pools_every_student_and_the_members_means(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    pool_students = importlib.import_module("bench.experiments.pool_students")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"per_seed": {"nfm": [_seed({4: 20.0}), _seed({4: 22.0})],
                                              "ot": [_seed({4: 30.0}), _seed({4: 31.0})]}}))
    second.write_text(json.dumps({"per_seed": {"nfm": [_seed({4: 26.0}), _seed({4: 28.0})]}}))
    out = tmp_path / "pooled.json"
    payload = pool_students.main([str(first), str(second), "--group", "NFM=nfm@1,nfm@2", "--group", "OT=ot",
                                  "--nfe", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    nfm, ot = payload["rows"]
    assert nfm["students"] == 4 and nfm["pooled_mean"] == 24.0 and nfm["min"] == 20.0 and nfm["max"] == 28.0
    assert math.isclose(nfm["pooled_std"], math.sqrt(40 / 3))  # deviations -4, -2, 2, 4 over n - 1 = 3
    assert nfm["members_mean"] == 24.0 and math.isclose(nfm["members_std"], math.sqrt(18))  # means 21 and 27
    assert ot["students"] == 2 and ot["pooled_mean"] == 30.5 and ot["members_std"] == 0.0
    # a bare name takes the first file that holds it
    bare = pool_students.main([str(second), str(first), "--group", "N=nfm", "--nfe", "4"])["rows"][0]
    assert bare["pooled_mean"] == 27.0
    for argv, message in [(["--group", "NFM=missing"], "student 'missing' is not in the results"),
                          (["--group", "NFM=nfm", "--nfe", "8"], "no euler/linear value at NFE 8"),
                          (["--group", "no members="], "expected LABEL=STUDENT")]:
        with pytest.raises(SystemExit, match=message):
            pool_students.main([str(first), *argv])


def test_pool_students_names_the_feature_space_and_refuses_two(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    pool_students = importlib.import_module("bench.experiments.pool_students")
    per_seed = {"nfm": [_seed({4: 20.0}), _seed({4: 22.0})]}
    first, second, old = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "old.json"
    first.write_text(json.dumps({"features": "classifier-mnist-aaa", "per_seed": per_seed}))
    second.write_text(json.dumps({"features": "classifier-mnist-bbb", "per_seed": per_seed}))
    old.write_text(json.dumps({"per_seed": per_seed}))  # results written before files named their space
    argv = ["--group", "N=nfm", "--nfe", "4"]
    assert pool_students.main([str(first), str(old), *argv])["features"] == "classifier-mnist-aaa"
    assert pool_students.main([str(old), *argv])["features"] is None
    with pytest.raises(SystemExit, match="different feature spaces"):
        pool_students.main([str(first), str(second), *argv])


def test_pool_students_agrees_with_the_comparison_it_reads(monkeypatch):
    """A one-member group is the comparison's own per-student mean and standard deviation."""
    monkeypatch.syspath_prepend(str(ROOT))
    results = ROOT / "docs" / "nfm" / "mnist_long_teacher_seeds" / "results.json"
    rows = importlib.import_module("bench.experiments.pool_students").main(
        [str(results), "--group", "SD-OT=mnist-semidiscrete_ot-logitnormal", "--nfe", "1,4"])["rows"]
    reported = {r["nfe"]: r for r in json.loads(results.read_text())["rows"]
                if r["student"] == "mnist-semidiscrete_ot-logitnormal" and r["solver"] == "euler"}
    for row in rows:
        assert math.isclose(row["pooled_mean"], reported[row["nfe"]]["mean"])
        assert math.isclose(row["pooled_std"], reported[row["nfe"]]["std"])
