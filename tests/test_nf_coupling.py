"""NFM coupling from a TarFlow teacher: round trip, online == precomputed, cache checks, resume, sharding.

The teacher run comes from the suite-wide (session-scoped) fixtures `nf_teacher_run` / `train_tiny_teacher` (tests/conftest.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowdistill.api import load_run, resolve_config
from flowdistill.cli import main
from flowdistill.components import CATALOG
from nfm.coupling_cache import MANIFEST, cache_dir_of, extract, load_cache, shard_path
from nfm.teacher_coupling import NFTeacherCoupling
from nfm.teacher_pairs import load_teacher, pair_noise, perturbed, teacher_encode
from shared.checkpoint import CheckpointError
from shared.data_sources import load_dataset
from shared.run import build_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_run(nf_teacher_run) -> Path:
    return nf_teacher_run


def _student_recipe(root: Path, teacher: Path, **coupling) -> Path:
    recipe = {
        "data": {"name": "8gaussians", "n_train": 1000, "n_test": 200},
        "model": {"name": "mlp", "hidden": 32, "depth": 2, "time_dim": 8},
        "method": {"name": "fm", "coupling": {"name": "nf_teacher", "teacher": str(teacher), "draws": 3,
                                              "shard": 300, "cache": str(root / "cache"), **coupling}},
        "train": {"steps": 10, "batch_size": 64, "progress": False, "sample_grid": False},
        "out_dir": str(root / "runs"),
    }
    path = root / "student.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _coupling(recipe: Path, *overrides: str) -> NFTeacherCoupling:
    cfg = resolve_config(recipe, overrides)
    return build_loss(cfg, load_dataset(cfg.data), CATALOG).coupling


def test_pairs_round_trip_through_the_teacher(tmp_path, teacher_run):
    coupling = _coupling(_student_recipe(tmp_path, teacher_run))
    x_batch = torch.zeros(50, 2)
    x, z = coupling.pairs(x_batch, torch.Generator().manual_seed(3))
    index, draw = coupling.addresses(50, torch.Generator().manual_seed(3), x.device)
    assert torch.equal(x, coupling.data[index])  # the student's data endpoint is the clean point
    eta = coupling.teacher.eta
    assert eta == pytest.approx(0.05)
    noisy = x + eta * pair_noise(0, index, draw, (2,))
    decoded = coupling.teacher.flow.decode(z * coupling.sigma)
    torch.testing.assert_close(decoded, noisy, atol=1e-4, rtol=0)
    # sigma_f makes the teacher outputs unit-RMS on the points it was estimated from
    all_index = torch.arange(len(coupling.data))
    z0 = teacher_encode(coupling.teacher.flow, perturbed(coupling.data, all_index, torch.zeros_like(all_index), coupling.teacher, 0))
    assert (z0 / coupling.sigma).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)


def test_online_and_precomputed_give_the_same_pairs(tmp_path, teacher_run):
    recipe = _student_recipe(tmp_path, teacher_run)
    root = extract(resolve_config(recipe, ["method.coupling.mode=precomputed"]), load_run)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["pairs"] == 3000 and len(manifest["shards"]) == 4
    online = _coupling(recipe)
    pre = _coupling(recipe, "method.coupling.mode=precomputed")
    for seed in (0, 1):
        xo, zo = online.pairs(torch.zeros(64, 2), torch.Generator().manual_seed(seed))
        xp, zp = pre.pairs(torch.zeros(64, 2), torch.Generator().manual_seed(seed))
        assert torch.equal(xo, xp)
        torch.testing.assert_close(zo, zp, atol=1e-5, rtol=1e-5)
    assert pre.sigma == pytest.approx(online.sigma, rel=1e-6)
    # the same student trained both ways ends at the same loss
    for mode in ("online", "precomputed"):
        assert main(["train", str(recipe), f"name={mode}", f"method.coupling.mode={mode}"]) == 0
    logs = [json.loads((tmp_path / "runs" / m / "metrics.jsonl").read_text().splitlines()[-1])
            for m in ("online", "precomputed")]
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-4)


def test_cache_refuses_another_teacher_and_a_stale_one(tmp_path, teacher_run, train_tiny_teacher):
    recipe = _student_recipe(tmp_path, teacher_run, mode="precomputed")
    extract(resolve_config(recipe), load_run)
    other = train_tiny_teacher(tmp_path, "other", steps=5, seed=1)
    with pytest.raises(CheckpointError, match="teacher_sha256"):
        _coupling(recipe, f"method.coupling.teacher={other}").prepare("cpu")
    with pytest.raises(CheckpointError, match="another setup.*--overwrite"):
        extract(resolve_config(recipe, [f"method.coupling.teacher={other}"]), load_run)
    # a teacher trained further after extraction makes the cache stale
    assert main(["train", str(other), "--resume", "train.steps=8"]) == 0
    extract(resolve_config(recipe, [f"method.coupling.teacher={other}"]), load_run, overwrite=True)
    assert main(["train", str(other), "--resume", "train.steps=10"]) == 0
    with pytest.raises(CheckpointError, match="teacher_step: cache has 8, recipe needs 10"):
        _coupling(recipe, f"method.coupling.teacher={other}").prepare("cpu")
    with pytest.raises(CheckpointError, match="draws"):
        load_cache(cache_dir_of(resolve_config(recipe).method.coupling), {**json.loads((tmp_path / "cache" / MANIFEST)
                                                                           .read_text())["spec"], "draws": 5})


def test_interrupted_extraction_resumes_and_corruption_is_caught(tmp_path, teacher_run):
    recipe = _student_recipe(tmp_path, teacher_run, mode="precomputed")
    root = extract(resolve_config(recipe), load_run)
    (root / MANIFEST).unlink()  # as if stopped before the end: shards 0 and 2 done, 1 and 3 missing
    shard_path(root, 1).unlink()
    shard_path(root, 3).unlink()
    kept = {s: shard_path(root, s).stat().st_mtime_ns for s in (0, 2)}
    with pytest.raises(CheckpointError, match="incomplete"):
        _coupling(recipe).prepare("cpu")
    extract(resolve_config(recipe), load_run)
    assert {s: shard_path(root, s).stat().st_mtime_ns for s in (0, 2)} == kept  # not recomputed
    coupling = _coupling(recipe)
    coupling.prepare("cpu")
    assert coupling._cache.shape == (1000, 3, 2)
    raw = bytearray(shard_path(root, 2).read_bytes())
    raw[-1] ^= 0xFF
    shard_path(root, 2).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        _coupling(recipe).prepare("cpu")


def test_teacher_on_other_data_and_wrong_recipes_are_refused(tmp_path, teacher_run, capsys):
    recipe = _student_recipe(tmp_path, teacher_run)
    with pytest.raises(ValueError, match="same data"):
        _coupling(recipe, "data.name=moons")
    with pytest.raises(ValueError, match="not one"):
        load_teacher(tmp_path / "missing", load_run)
    assert main(["couplings", str(ROOT / "recipes" / "toy2d" / "fm_independent.yaml")]) == 2
    assert "expected nf_teacher or nf_teacher_ot" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method.coupling.draws"):
        _coupling(recipe, "method.coupling.mode=precomputed", "method.coupling.draws=0")
    fresh = _coupling(recipe, "method.coupling.draws=0")  # online with fresh eps' at every step
    _, z1 = fresh.pairs(torch.zeros(8, 2), torch.Generator().manual_seed(0))
    _, z2 = fresh.pairs(torch.zeros(8, 2), torch.Generator().manual_seed(1))
    assert not torch.allclose(z1, z2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) multi-process path")
def test_two_processes_split_the_extraction(tmp_path, teacher_run):
    recipe = _student_recipe(tmp_path, teacher_run, mode="precomputed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "flowdistill", "couplings",
           str(recipe)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1800 pairs computed here" in out.stdout  # the main process did 2 of the 4 shards (600 images x 3)
    pre = _coupling(recipe)
    online = _coupling(recipe, "method.coupling.mode=online")
    xo, zo = online.pairs(torch.zeros(32, 2), torch.Generator().manual_seed(0))
    xp, zp = pre.pairs(torch.zeros(32, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(zo, zp, atol=1e-5, rtol=1e-5)


def test_sampling_and_scoring_a_student_never_load_its_teacher(tmp_path, teacher_run, train_tiny_teacher):
    import shutil

    teacher = shutil.copytree(teacher_run, tmp_path / "teacher-copy")
    recipe = _student_recipe(tmp_path, teacher)
    assert main(["train", str(recipe), "name=student"]) == 0
    cfg = resolve_config(recipe, ["name=student"])
    assert cfg.method.run_dependencies() == {"teacher": str(teacher)}
    shutil.rmtree(teacher)  # gone: training could not start now, sampling and scoring must not care
    run = load_run(tmp_path / "runs" / "student")
    samples = run.sampler.sample(run.model, torch.randn(16, 2), steps=2)
    assert samples.samples.shape == (16, 2) and samples.nfe == 2
    assert run.sampler.log_likelihood(run.model, torch.zeros(4, 2)).logp.isfinite().all()
    with pytest.raises(ValueError, match="not one"):
        _coupling(recipe)


def test_a_damaged_shard_is_recomputed_when_extraction_resumes(tmp_path, teacher_run):
    recipe = _student_recipe(tmp_path, teacher_run, mode="precomputed")
    root = extract(resolve_config(recipe), load_run)
    good = shard_path(root, 1).read_bytes()
    (root / MANIFEST).unlink()  # interrupted before sealing, with shard 1 damaged on disk
    raw = bytearray(good)
    raw[-1] ^= 0xFF
    shard_path(root, 1).write_bytes(bytes(raw))
    extract(resolve_config(recipe), load_run)
    assert shard_path(root, 1).read_bytes() == good  # the header alone would have passed it
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps(manifest)[:40])  # a torn manifest names itself
    with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
        _coupling(recipe).prepare("cpu")


@pytest.fixture(scope="module")
def bpd_teacher(tmp_path_factory) -> Path:
    """A tiny dequantized likelihood teacher (eta = 0) on digits."""
    root = tmp_path_factory.mktemp("bpd")
    assert main(["train", str(ROOT / "recipes" / "digits" / "teacher_bpd.yaml"), f"out_dir={root}", "name=t",
                 "train.steps=3", "train.batch_size=32", "train.progress=false", "train.sample_grid=false",
                 "model.width=16", "model.head_dim=8", "model.blocks=2", "model.layers=1"]) == 0
    return root / "t"


def test_a_dequantized_teacher_gets_its_own_cell_noise(tmp_path, bpd_teacher):
    """A likelihood teacher (eta = 0, uniform dequantization) is fed x + uniform cell noise, as it was trained:
    every teacher input decodes back inside its pixel's cell of width 2/L, off the cell centre, with a
    uniform spread; online and precomputed pairs agree and the cache records the levels."""
    recipe = tmp_path / "student.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"name": "digits", "test_fraction": 0.2},
        "model": {"name": "unet", "channels": [8, 16], "layers_per_block": 1, "attention": [False, False],
                  "norm_groups": 4},
        "method": {"name": "fm", "coupling": {"name": "nf_teacher", "teacher": str(bpd_teacher), "draws": 2,
                                              "shard": 500, "cache": str(tmp_path / "cache")}},
        "train": {"steps": 2, "batch_size": 16, "progress": False, "sample_grid": False},
        "out_dir": str(tmp_path / "runs")}))
    coupling = _coupling(recipe)
    levels = coupling.teacher.dequantize_levels
    assert levels == 17 and coupling.teacher.eta == 0.0 and coupling.teacher.noise_kind == "uniform"
    x, z = coupling.pairs(torch.zeros(256, 1, 8, 8), torch.Generator().manual_seed(0))
    offset = coupling.teacher.flow.decode(z * coupling.sigma) - x
    half_cell = 1.0 / levels
    assert offset.abs().max().item() <= half_cell + 1e-4  # inside the cell
    assert offset.abs().mean().item() == pytest.approx(half_cell / 2, rel=0.05)  # uniform: E|u - 1/2| * 2/L = 1/(2L)
    assert offset.mean().abs().item() < 0.02 * half_cell  # centred on x
    root = extract(resolve_config(recipe, ["method.coupling.mode=precomputed"]), load_run)
    assert json.loads((root / MANIFEST).read_text())["spec"]["dequantize_levels"] == 17
    pre = _coupling(recipe, "method.coupling.mode=precomputed")
    xp, zp = pre.pairs(torch.zeros(64, 1, 8, 8), torch.Generator().manual_seed(1))
    xo, zo = coupling.pairs(torch.zeros(64, 1, 8, 8), torch.Generator().manual_seed(1))
    assert torch.equal(xo, xp)
    torch.testing.assert_close(zo, zp, atol=1e-5, rtol=1e-5)


def test_the_teacher_curve_scores_a_dequantized_teacher_in_bits_per_dim(bpd_teacher):
    """bench.experiments.teacher_curve scores a likelihood teacher on dequantized test images: its bits/dim agrees
    with `flowdistill nll` (another dequantization draw, the same density) to within the draw's noise."""
    from bench.experiments.teacher_curve import perturbed_nll

    scores = perturbed_nll(str(bpd_teacher))
    assert main(["nll", str(bpd_teacher), "--split", "test", "--device", "cpu"]) == 0
    reference = json.loads((bpd_teacher / "nll-test.json").read_text())["bits_per_dim"]
    assert scores["teacher_bpd"] == pytest.approx(reference, abs=0.02)
    assert scores["teacher_bpd"] == pytest.approx((scores["teacher_nll_per_dim"] + math.log(17 / 2)) / math.log(2))


def test_the_coupling_pairs_with_the_teacher_weights_it_names(tmp_path, teacher_run):
    from safetensors.torch import load_file

    from shared.run_build import evaluation_weights

    recipe = _student_recipe(tmp_path, teacher_run, cache="")
    auto, raw = _coupling(recipe), _coupling(recipe, "method.coupling.weights=model")
    path, _ = evaluation_weights(teacher_run, "model")
    saved = load_file(str(path))
    for name, tensor in raw.teacher.flow.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], atol=0, rtol=0)
    assert raw.teacher.weights_sha256 != auto.teacher.weights_sha256  # the tiny teacher keeps EMA weights too
    assert cache_dir_of(resolve_config(recipe, ["method.coupling.weights=model"]).method.coupling).name == \
        "nf_teacher-d3-s0-model"
    assert cache_dir_of(resolve_config(recipe).method.coupling).name == "nf_teacher-d3-s0"
    with pytest.raises(ValueError, match="weights must be one of auto, best, ema, model"):
        _coupling(recipe, "method.coupling.weights=final")


def test_a_teacher_load_hashes_each_weights_file_once(teacher_run, monkeypatch):
    """Loading a teacher verifies the checkpoint its weights come from, once, and takes the weights' digest
    from that verified manifest: no file is hashed twice."""
    import shared.checkpoint as checkpoint

    hashed: list[str] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(str(path)) or real(path))
    teacher = load_teacher(str(teacher_run), load_run, torch.device("cpu"))
    from shared.run_build import evaluation_weights

    assert hashed and len(hashed) == len(set(hashed)), hashed
    path, _ = evaluation_weights(teacher_run)
    assert str(path) in hashed and teacher.weights_sha256 == real(path)
