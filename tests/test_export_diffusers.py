"""`flowdistill export`: students sampled by diffusers alone match `flowdistill sample` on the same noise.

Each student is trained for two steps on digits and then given random weights (written with the project's
checkpoint writer), so that its velocity field depends strongly on x and t: a wrong time scale, sign or
grid in the export would show far above the tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import flowdistill as fd
from flowdistill.cli import main
from shared.checkpoint import save_checkpoint
from shared.rundir import checkpoints_dir

TINY = {
    "unet": ["model.channels=[8,16]", "model.attention=[false,true]", "model.attention_head_dim=8",
             "model.norm_groups=4"],
    "dit": ["model.depth=2", "model.heads=2", "model.head_dim=8"],
}
RECIPES = {"unet": "recipes/digits/fm_independent.yaml", "dit": "recipes/digits/fm_dit.yaml"}
SEED = 0


def diffusers_sample(folder: Path, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Sample an exported folder with diffusers' own classes and Euler scheduler (imports diffusers and torch only)."""
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, UNet2DModel

    if (folder / "unet").is_dir():
        model, extra = UNet2DModel.from_pretrained(folder, subfolder="unet"), {}
    else:
        model = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        extra = {"class_labels": torch.zeros(len(noise), dtype=torch.long)}
    model.eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)])
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(x, t.expand(len(x)), **extra).sample
            x = scheduler.step(v, t, x).prev_sample
    return x


def randomize(run_dir: Path) -> None:
    """Give a run random weights of unit-order effect (a new checkpoint, raw and EMA alike)."""
    run = fd.load_run(run_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    save_checkpoint(checkpoints_dir(run_dir), run.step + 1, run.model, ema=run.model)


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    runs = {}
    for backbone, recipe in RECIPES.items():
        run_dir = fd.train(recipe, ["train.steps=2", "train.batch_size=16", "train.progress=false",
                                    "train.sample_grid=false", f"out_dir={root}", f"name={backbone}", *TINY[backbone]])
        randomize(run_dir)
        runs[backbone] = run_dir
    return runs


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_diffusers_scheduler_reproduces_flowdistill_sampling(tmp_path, students, backbone):
    out = tmp_path / "export"
    assert main(["export", str(students[backbone]), str(out), "--format", "diffusers"]) == 0
    folder = {"unet": "unet", "dit": "transformer"}[backbone]
    assert (out / folder / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    run = fd.load_run(students[backbone])
    n = 6
    noise = torch.randn(n, *run.dataset.shape, generator=torch.Generator().manual_seed(SEED))  # fd.sample's noise
    for steps in (1, 2, 4):
        ours = fd.sample(run, n, steps=steps, seed=SEED).x
        theirs = diffusers_sample(out, noise, steps)
        assert (ours - noise).abs().max() > 0.5  # the field moves the noise far
        assert (ours - theirs).abs().max() < 1e-4, (steps, (ours - theirs).abs().max())
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["recipe"] == {"model": backbone, "method": "fm", "coupling": "independent", "teacher": None}
    assert front["data"]["fingerprint"] == run.dataset.base_fingerprint and front["data"]["shape"] == [1, 8, 8]
    assert "not measured" in front["quality"]
    assert yaml.safe_load((out / "flowdistill_config.yaml").read_text())["model"]["name"] == backbone


def test_the_card_quotes_the_evaluated_quality(tmp_path, students):
    run_dir = tmp_path / "evaluated"
    import shutil

    shutil.copytree(students["unet"], run_dir)
    rows = [{"steps": k, "nfe": k, "metric": "fd", "extractor": "digits-cnn", "value": 10.0 / k} for k in (1, 2, 4, 8, 16)]
    (run_dir / "eval.json").write_text(json.dumps({"rows": rows}))
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--format", "diffusers"]) == 0
    front = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])
    assert [r["nfe"] for r in front["quality"]] == [1, 2, 4, 8]
    assert front["quality"][0] == {"nfe": 1, "metric": "fd", "features": "digits-cnn", "value": 10.0}


def test_runs_without_a_diffusers_class_are_refused_and_export_as_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    mlp = fd.train("recipes/digits/fm_mlp.yaml", ["train.steps=2", "train.batch_size=16", "train.progress=false",
                                                  "train.sample_grid=false", f"out_dir={tmp_path}", "name=mlp"])
    assert main(["export", str(mlp), str(tmp_path / "out"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlp velocity field has no diffusers model class" in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(mlp), str(tmp_path / "out"), "--format", "safetensors"]) == 0
    run = fd.load_run(mlp)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state.keys() == run.model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in run.model.state_dict().items())
    assert main(["export", str(mlp), str(tmp_path / "out"), "--format", "safetensors"]) == 2
    assert "already exists" in capsys.readouterr().err
