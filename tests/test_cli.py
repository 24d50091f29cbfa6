"""End to end through the command line: train, sample, eval, nll, resume, errors, and 2-process Accelerate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from flowdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "recipes" / "toy2d" / "fm_independent.yaml")
DIGITS = str(ROOT / "recipes" / "digits" / "fm_independent.yaml")
# Student on two moons for the W2 check. Reference points on this data: two independent
# 2000-point draws of the data are ~0.09 apart in W2, N(0, I) noise is ~0.66 away.
MOONS = ["data.name=moons", "train.steps=3000", "train.batch_size=256", "train.warmup_steps=50", "train.lr=0.003",
         "model.hidden=128", "train.log_every=100", "train.progress=false"]
W2_BOUND_AT_32_STEPS = 0.2


def _train(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    assert main(["train", recipe, f"out_dir={tmp_path}", "name=run", "train.progress=false", *overrides]) == 0
    return tmp_path / "run"


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("moons"), TOY, *MOONS)


def test_toy_student_reaches_stated_w2_and_files_exist(moons_run, capsys):
    assert (moons_run / "config.yaml").is_file() and (moons_run / "checkpoints" / "latest").is_file()
    assert main(["eval", str(moons_run), "--steps", "1,4,32", "--n", "2000", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| steps |" in table and "w2" in table
    rows = json.loads((moons_run / "eval.json").read_text())["rows"]
    w2 = {r["steps"]: r["value"] for r in rows}
    assert [r["nfe"] for r in rows] == [1, 4, 32]
    assert w2[32] < W2_BOUND_AT_32_STEPS, w2
    assert w2[1] > w2[32]
    assert (moons_run / "eval.png").stat().st_size > 1000


def test_sample_writes_png_and_npz_with_nfe(moons_run, tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", str(moons_run), "--steps", "3", "--solver", "heun", "--n", "50", "--out", str(out),
                 "--device", "cpu"]) == 0
    saved = np.load(out.with_suffix(".npz"))
    assert saved["samples"].shape == (50, 2) and int(saved["nfe"]) == 6
    assert out.stat().st_size > 1000


def test_the_api_samples_and_scores_with_the_runs_own_settings_unless_given(moons_run):
    import flowdistill as fd

    run = fd.load_run(moons_run)
    run.config.eval.steps, run.config.eval.solver = (1, 3), "heun"  # what `sample`, `eval` and `nll` default to
    assert fd.sample(run, 20).nfe == 6  # 3 Heun steps, two evaluations each
    assert fd.sample(run, 20, steps=2, solver="euler").nfe == 2
    run.config.eval.divergence = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        fd.log_likelihood(run, run.dataset.test[:4])
    assert torch.isfinite(fd.log_likelihood(run, run.dataset.test[:4], divergence="exact")).all()


def test_nll_reports_finite_nats_and_writes_json(moons_run, capsys):
    assert main(["nll", str(moons_run), "--n", "64", "--device", "cpu"]) == 0
    res = json.loads((moons_run / "nll-test.json").read_text())
    assert res["divergence"] == "exact" and res["n"] == 64 and np.isfinite(res["nll_nats"])
    assert res["nfe_mean"] > 10
    assert "nats/sample" in capsys.readouterr().out


def test_digits_student_end_to_end_with_classifier_features(tmp_path, capsys):
    run = _train(tmp_path, DIGITS, "train.steps=30", "train.log_every=10", "train.batch_size=64",
                 "data.val_fraction=0.1")
    grid = run / "samples" / "steps32-euler-linear.png"
    assert grid.is_file()
    assert main(["eval", str(run), "--steps", "2", "--n", "200", "--device", "cpu"]) == 0
    row = json.loads((run / "eval.json").read_text())["rows"][0]
    assert row["metric"] == "fd" and row["extractor"] == "classifier-digits" and row["value"] > 0
    # the same samples (same seed) scored against the validation split, written next to the test figures
    assert main(["eval", str(run), "--steps", "2", "--n", "200", "--device", "cpu", "--split", "val"]) == 0
    val = json.loads((run / "eval-val.json").read_text())
    assert val["split"] == "val" and json.loads((run / "eval.json").read_text())["split"] == "test"
    assert val["rows"][0]["value"] > 0 and val["rows"][0]["value"] != row["value"]
    assert (run / "eval-val.png").is_file()
    assert main(["eval", str(run), "--steps", "2", "--n", "200", "--device", "cpu", "--split", "train"]) == 0
    assert json.loads((run / "eval-train.json").read_text())["rows"][0]["value"] not in (row["value"], val["rows"][0]["value"])
    assert main(["nll", str(run), "--n", "8", "--divergence", "hutchinson", "--device", "cpu"]) == 0
    res = json.loads((run / "nll-test.json").read_text())
    assert 0 < res["bits_per_dim"] < 20


def test_resume_continues_and_extends(tmp_path, capsys):
    run = _train(tmp_path, TOY, "train.steps=20", "train.log_every=10", "model.hidden=16")
    assert main(["train", str(run), "--resume", "train.steps=30"]) == 0
    assert "resumed at step 20" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


@pytest.mark.parametrize("argv, message", [
    (["train", TOY, "train.stepz=3"], "valid keys"),
    (["train", "recipes/none.yaml"], "not found"),
    (["train", TOY, "data.name=cifar100"], "choices"),
    (["eval", "no/such/run"], "not a run directory"),
])
def test_bad_input_gets_a_clear_error(argv, message, capsys, tmp_path):
    assert main(argv + ([f"out_dir={tmp_path}"] if argv[0] == "train" else [])) == 2
    assert message in capsys.readouterr().err


def test_existing_run_is_not_overwritten_without_flag(tmp_path, capsys):
    _train(tmp_path, TOY, "train.steps=5", "model.hidden=16", "train.sample_grid=false")
    assert main(["train", TOY, f"out_dir={tmp_path}", "name=run", "train.steps=5"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", TOY, f"out_dir={tmp_path}", "name=run", "--resume", "model.hidden=32"]) == 2
    assert "model.hidden" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "flowdistill", "eval", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "--steps" in out.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU (gloo) multi-process path")
def test_two_process_accelerate_launch_trains(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "flowdistill", "train", TOY,
           f"out_dir={tmp_path}", "name=ddp", "train.steps=20", "train.log_every=10", "train.batch_size=64",
           "model.hidden=32", "train.progress=false", "train.sample_grid=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20]
    assert json.loads(lines[-1])["samples_per_s"] > 0
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000020" / "model.safetensors").is_file()


def test_init_from_copies_matching_weights_and_reports_new_ones(tmp_path, capsys):
    import torch

    from flowdistill.api import load_run
    from shared.run_build import init_from_run

    source = _train(tmp_path, TOY, "train.steps=10", "model.hidden=16", "train.sample_grid=false")
    assert main(["train", TOY, f"out_dir={tmp_path}", "name=child", "train.steps=1", "train.lr=1e-12", "model.hidden=16",
                 "model.depth=4", f"train.init_from={source}", "train.sample_grid=false"]) == 0
    printed = capsys.readouterr().out
    assert "newly initialised: " in printed and "newly initialised: none" not in printed
    parent, child = load_run(source).model, load_run(tmp_path / "child").model
    assert torch.allclose(parent.out.weight, child.out.weight, atol=1e-8)  # one step at lr 1e-12
    with pytest.raises(Exception, match="no checkpoint"):
        init_from_run(child, tmp_path / "nothing")


def test_resume_continues_the_folder_it_is_given_after_a_move(tmp_path, capsys):
    source = _train(tmp_path, TOY, "train.steps=10", "model.hidden=16", "train.sample_grid=false",
                    "train.ckpt_every=10")
    moved = tmp_path / "moved"
    source.rename(moved)
    capsys.readouterr()
    assert main(["train", str(moved), "--resume", "train.steps=20"]) == 0
    assert "resumed at step 10" in capsys.readouterr().out
    assert not source.exists()  # nothing recreated under the old name
    assert (moved / "checkpoints" / "step_00000020").is_dir()


def test_nll_scores_the_whole_split_per_sample_against_the_exact_density(tmp_path, capsys):
    run = _train(tmp_path, TOY, "data.name=gmm2", "data.n_train=2000", "data.n_test=120", "train.steps=30",
                 "model.hidden=32", "train.sample_grid=false")
    capsys.readouterr()
    assert main(["nll", str(run), "--device", "cpu"]) == 0
    assert "exact NLL" in capsys.readouterr().out
    summary = json.loads((run / "nll-test.json").read_text())
    lines = (run / "nll-test.csv").read_text().splitlines()
    assert lines[0] == "index,logp_nats,exact_logp_nats,abs_error_nats,nfe" and len(lines) == 121  # the whole split
    rows = [list(map(float, ln.split(","))) for ln in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(120))
    assert all(abs(abs(r[1] - r[2]) - r[3]) < 1e-9 for r in rows)
    assert summary["gap_to_exact_nats"] == pytest.approx(-sum(r[1] for r in rows) / 120 - summary["exact_nll_nats"])
    from shared.data_sources import load_dataset
    from flowdistill.api import resolve_config

    data = load_dataset(resolve_config(run, []).data)
    assert summary["exact_nll_nats"] == pytest.approx(-data.log_density(data.test).mean().item())
    assert (run / "nll-test-calibration.png").stat().st_size > 0  # model log p against the exact log p


def test_init_from_applies_when_a_resumed_run_has_no_checkpoint_yet(tmp_path):
    import torch

    from flowdistill.api import load_run

    source = _train(tmp_path, TOY, "train.steps=10", "model.hidden=16", "train.sample_grid=false")
    child = tmp_path / "child"
    child.mkdir()
    common = ["train", TOY, f"out_dir={tmp_path}", "name=child", "train.steps=1", "train.lr=1e-12", "model.hidden=16",
              f"train.init_from={source}", "train.sample_grid=false", "train.progress=false"]
    from flowdistill.api import resolve_config
    from shared.config import dump_yaml

    (child / "config.yaml").write_text(dump_yaml(resolve_config(TOY, common[3:])))  # killed before its first checkpoint
    assert main([*common, "--resume"]) == 0
    assert torch.allclose(load_run(source).model.out.weight, load_run(child).model.out.weight, atol=1e-8)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_being_trained_elsewhere_is_refused_and_left_untouched(tmp_path, capsys):
    from shared.rundir import lock_path, run_lock

    run = _train(tmp_path, TOY, "train.steps=4", "model.hidden=16", "train.sample_grid=false")
    assert not lock_path(run).exists()  # released and removed after training
    before = _snapshot(tmp_path)
    with run_lock(run):  # another trainer of the same run holds it
        assert main(["train", str(run), "--resume", "train.steps=8"]) == 2
        assert "is being trained by another process" in capsys.readouterr().err
        assert main(["train", TOY, f"out_dir={tmp_path}", "name=run", "--overwrite", "train.steps=4"]) == 2
        assert "is being trained by another process" in capsys.readouterr().err
        before[lock_path(run).name] = b""
        assert _snapshot(tmp_path) == before  # neither the run nor its checkpoints touched
    assert main(["train", str(run), "--resume", "train.steps=8"]) == 0  # free again once released


def test_the_lock_of_a_killed_trainer_does_not_block_the_next(tmp_path):
    from shared.rundir import lock_path, run_lock

    run = tmp_path / "out" / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from shared.rundir import run_lock\n"
                               f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError, match="another process"):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(run).exists()  # SIGKILL leaves the file, but not the lock
    with run_lock(run):
        pass
    assert not lock_path(run).exists()


def test_a_train_that_fails_before_writing_leaves_no_out_dir(tmp_path):
    out = tmp_path / "new" / "runs"
    assert main(["train", TOY, f"out_dir={out}", "name=r", "train.progress=false", "data.name=tabular",
                 f"data.path={tmp_path / 'missing.npy'}"]) == 2  # refused inside the lock, by the data loader
    assert not (tmp_path / "new").exists()


def test_thread_count_comes_from_the_option_the_environment_or_the_free_cores(monkeypatch):
    import os

    import torch

    from flowdistill.cli import THREADS_ENV, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv(THREADS_ENV, "3")
        assert set_threads(2) == 2 and torch.get_num_threads() == 2  # --threads wins
        assert set_threads(None) == 3  # then FLOWDISTILL_THREADS
        monkeypatch.delenv(THREADS_ENV)
        assert set_threads(None) == 1  # then OMP_NUM_THREADS
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
        assert set_threads(None) == 3  # four cores, one busy
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(None) == 1  # shared by two processes of a launch
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
        assert set_threads(None) == 1  # never below one
        monkeypatch.setenv(THREADS_ENV, "many")
        with pytest.raises(ValueError, match="FLOWDISTILL_THREADS='many' is not a thread count"):
            set_threads(None)
    finally:
        torch.set_num_threads(before)
