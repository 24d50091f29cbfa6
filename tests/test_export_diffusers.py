"""`flowdistill export`: students sampled by diffusers alone match `flowdistill sample` on the same noise.

Each student is trained for two steps on digits and then given random weights (written with the project's
checkpoint writer), so that its velocity field depends strongly on x and t: a wrong time scale, sign or
grid in the export would show far above the tolerance.
"""
from __future__ import annotations

import json
import shutil
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
DIFFUSERS_CLASSES = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel"}
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
    assert len(err.splitlines()) == 1 and "velocity field with model.name=mlp has no diffusers model class" in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(mlp), str(tmp_path / "out"), "--format", "safetensors"]) == 0
    run = fd.load_run(mlp)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state.keys() == run.model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in run.model.state_dict().items())
    packed = fd.load_run(tmp_path / "out")  # a packed run: every command reads it like the run itself
    assert torch.equal(fd.sample(packed, 8, steps=2).x, fd.sample(run, 8, steps=2).x)
    assert main(["export", str(mlp), str(tmp_path / "out"), "--format", "safetensors"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_an_exported_student_imported_back_gives_the_same_velocities(tmp_path, students, backbone):
    out, back = tmp_path / "export", tmp_path / "back"
    assert main(["export", str(students[backbone]), str(out), "--format", "diffusers"]) == 0
    assert main(["import", "diffusers-fm", str(out), str(back), "--time", "noise-at-1", "--timestep-scale", "1000",
                 "data.name=digits"]) == 0
    ours, imported = fd.load_run(students[backbone]), fd.load_run(back)
    assert imported.config.method.name == "fm" and imported.config.model.name == backbone
    assert imported.config.model == ours.config.model
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen)
    with torch.no_grad():
        assert (ours.model(x, t) - imported.model(x, t)).abs().max() < 1e-6
    provenance = json.loads((back / "imported.json").read_text())
    assert provenance["time"] == "noise-at-1" and provenance["class"] == DIFFUSERS_CLASSES[backbone]


def tiny_dit(num_classes: int = 3) -> torch.nn.Module:
    """A DiTTransformer2DModel with random weights of unit-order effect, every block's embedder a copy of block 0's."""
    from diffusers import DiTTransformer2DModel

    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        shared = net.transformer_blocks[0].norm1.emb.state_dict()
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return net.eval()


def test_a_dit_from_elsewhere_is_the_field_diffusers_computes_and_others_are_refused(tmp_path, capsys):
    net = tiny_dit()
    argv = ["import", "diffusers-fm", str(tmp_path / "dit"), str(tmp_path / "run"), "--time", "noise-at-1",
            "--timestep-scale", "1000", "data.name=digits"]
    net.save_pretrained(tmp_path / "dit")
    assert main(argv) == 2
    assert "class-conditional (4 different label embeddings)" in capsys.readouterr().err
    with torch.no_grad():  # one label embedding for every class (not zero): an unconditional field
        for block in net.transformer_blocks:
            table = block.norm1.emb.class_embedder.embedding_table.weight
            table.copy_(table[:1].expand_as(table))
    net.save_pretrained(tmp_path / "dit")
    assert main(argv) == 0
    imported = fd.load_run(tmp_path / "run")
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen)
    with torch.no_grad():
        theirs = net(x, 1000 * t, class_labels=torch.full((5,), 2)).sample
        assert theirs.abs().max() > 0.1 and (imported.model(x, t) - theirs).abs().max() < 1e-6

    with torch.no_grad():
        net.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    net.save_pretrained(tmp_path / "dit")
    assert main(argv[:3] + [str(tmp_path / "other")] + argv[4:]) == 2
    assert "block 1 of this DiTTransformer2DModel has its own time or label embedding" in capsys.readouterr().err
    assert main(argv[:5] + ["noise-at-0"] + argv[6:]) == 2
    assert "imported in flowdistill's and diffusers' time convention only" in capsys.readouterr().err
    (tmp_path / "cond").mkdir()
    (tmp_path / "cond" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert main(argv[:2] + [str(tmp_path / "cond")] + argv[3:]) == 2
    err = capsys.readouterr().err
    assert "holds a UNet2DConditionModel; diffusers-fm imports velocity fields of the classes UNet2DModel, " \
           "DiTTransformer2DModel" in err
    assert not (tmp_path / "other").exists()


def test_a_field_in_torchcfm_time_has_the_ode_likelihood_of_the_same_field_in_ours(tmp_path, students):
    """torchcfm: s = 0 is noise, u(x, s) points from noise to data, the network sees s itself; in ours that field
    is v(x, t) = -u(x, 1 - t). The imported run's ODE log-likelihood is that of v."""
    from diffusers import UNet2DModel

    from shared.likelihood import log_likelihood

    out = tmp_path / "export"
    assert main(["export", str(students["unet"]), str(out), "--format", "diffusers"]) == 0
    for time in ("noise-at-0", "noise-at-1"):
        assert main(["import", "diffusers-fm", str(out), str(tmp_path / time), "--time", time, "--timestep-scale", "1",
                     "data.name=digits"]) == 0
    net = UNet2DModel.from_pretrained(out, subfolder="unet").eval()

    def in_ours(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -net(x, 1 - t).sample

    x = fd.load_run(tmp_path / "noise-at-0").dataset.test[:2]
    options = dict(divergence="exact", method="rk4", steps=3)
    reference = log_likelihood(in_ours, x, **options).logp
    imported = log_likelihood(fd.load_run(tmp_path / "noise-at-0").model, x, **options).logp
    assert (imported - reference).abs().max() < 1e-3  # nats
    misread = log_likelihood(fd.load_run(tmp_path / "noise-at-1").model, x, **options).logp
    assert (misread - reference).abs().max() > 1.0  # reading the other convention is a different density


def test_unets_flowdistill_cannot_build_and_foreign_folders_are_refused(tmp_path, capsys):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, time_embedding_type="fourier").save_pretrained(tmp_path / "fourier")
    argv = ["import", "diffusers-fm", str(tmp_path / "fourier"), str(tmp_path / "run"), "--time", "noise-at-1",
            "--timestep-scale", "1000", "data.name=digits"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "time_embedding_type='fourier' (flowdistill builds 'positional')" in err
    argv[2] = str(tmp_path / "nothing")
    assert main(argv) == 2 and "holds no diffusers model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
