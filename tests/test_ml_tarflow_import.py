"""ml-tarflow checkpoints imported as teacher runs reproduce ml-tarflow's own outputs (tests/fixtures/ml_tarflow).

The fixtures were written by apple/ml-tarflow's `transformer_flow.Model` (see their README): its
log-dets are means over tokens and values, its loss `0.5 mean(z^2) - mean(logdets)`, its samples
`reverse(noise)` start from noise * sqrt(var). The 1x8x8 model is imported on scikit-learn digits; the
3x8x8 conditional one on 8x8 RGB crops of scikit-learn's two sample photographs (class = photograph).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdistill as fd
from flowdistill.cli import main
from flowdistill.importers import import_ml_tarflow
from nfm.ml_tarflow import MLTarFlowShape
from shared.data import bits_per_dim

FIXTURES = Path(__file__).parent / "fixtures" / "ml_tarflow"
MODELS = ("uncond_1x8x8", "cond_3x8x8")
TOL = 1e-5


def shape_of(name: str) -> tuple[MLTarFlowShape, float]:
    """The ml-tarflow constructor arguments saved beside a fixture, and its noise_std."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    shape = MLTarFlowShape(meta["in_channels"], meta["img_size"], meta["patch_size"], meta["channels"],
                           meta["num_blocks"], meta["layers_per_block"], meta["num_classes"])
    return shape, meta["noise_std"]


def reference(name: str) -> dict[str, torch.Tensor]:
    with np.load(FIXTURES / f"{name}_reference.npz") as ref:
        return {k: torch.from_numpy(ref[k]) for k in ref.files}


@pytest.fixture(scope="module")
def photo_crops(tmp_path_factory) -> Path:
    """An image folder of 8x8 RGB crops: class folders `china` and `flower` (scikit-learn's sample photographs)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("crops")
    photos = load_sample_images()
    for name, image in zip(("china", "flower"), photos.images):
        (root / name).mkdir()
        for i in range(40):
            r, c = divmod(i, 8)
            crop = image[40 + 32 * r:40 + 32 * r + 8, 60 + 64 * c:60 + 64 * c + 8]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{i:02d}.png")
    return root


def data_overrides(name: str, crops: Path) -> list[str]:
    if name.startswith("uncond"):
        return ["data.name=digits"]
    return ["data.name=imagefolder", f"data.path={crops}"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, photo_crops) -> dict[str, Path]:
    """Each fixture model imported through the command line, as `flowdistill import ml-tarflow` writes it."""
    root = tmp_path_factory.mktemp("imported")
    runs = {}
    for name in MODELS:
        shape, noise_std = shape_of(name)
        argv = ["import", "ml-tarflow", str(FIXTURES / f"{name}.pth"), str(root / name),
                "--img-size", str(shape.img_size), "--patch-size", str(shape.patch_size),
                "--channels", str(shape.channels), "--blocks", str(shape.num_blocks),
                "--layers-per-block", str(shape.layers_per_block), "--num-classes", str(shape.num_classes),
                "--noise-std", str(noise_std), "--in-channels", str(shape.in_channels),
                *data_overrides(name, photo_crops)]
        assert main(argv) == 0
        runs[name] = root / name
    return runs


def close_where_moderate(ours: torch.Tensor, theirs: torch.Tensor, bound: float = 10.0) -> float:
    """Max |ours - theirs| over entries with |theirs| < bound, after checking that NaN and inf sit at the same
    places and that the larger entries agree to 1e-2 relative.

    The fixtures' flows are random (untrained), so some decoded chains explode (x_i = z_i exp(alpha_i) + mu_i
    compounds over tokens and blocks) and reach 1e30 or overflow in ml-tarflow itself; rounding differences
    of float32 kernels are amplified by the same factors there, and only there.
    """
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.isinf(), theirs.isinf()) and torch.equal(ours[theirs.isinf()], theirs[theirs.isinf()])
    finite = theirs.isfinite()
    large = finite & (theirs.abs() >= bound)
    rel = ((ours[large] - theirs[large]).abs() / theirs[large].abs()).max().item() if large.any() else 0.0
    assert rel < 1e-2, rel
    moderate = finite & ~large
    assert moderate.float().mean() > 0.5  # most entries are compared at full precision
    return (ours[moderate] - theirs[moderate]).abs().max().item()


@pytest.mark.parametrize("name", MODELS)
def test_the_imported_teacher_reproduces_every_ml_tarflow_array(imported, name):
    run = fd.load_run(imported[name])
    ref = reference(name)
    flow = run.model
    x, y = ref["x"], ref.get("y")
    tokens, values = flow.n_tokens, flow.token_dim
    with torch.no_grad():
        z, logdet, levels = flow.encode_with_levels(x, y)
    assert (flow.to_tokens(z) - ref["z"]).abs().max() < TOL
    assert (logdet / (tokens * values) - ref["logdets"]).abs().max() < TOL  # ml-tarflow's mean log-dets
    assert len(levels) == len(ref["block_outputs"])
    for ours, theirs in zip(levels, ref["block_outputs"]):
        assert (flow.to_tokens(ours) - theirs).abs().max() < TOL
    loss = 0.5 * z.pow(2).mean() - (logdet / (tokens * values)).mean()
    assert abs(loss.item() - ref["loss"].item()) < TOL
    noise = flow.from_tokens(ref["noise"])
    assert close_where_moderate(flow.decode(flow.scale_prior_noise(noise), y), ref["sample_guidance0"]) < TOL
    run.sampler.cfg.denoise = False  # ml-tarflow's reverse() is the decode alone
    sampled = run.sampler.sample(flow, noise, labels=y).samples
    assert close_where_moderate(sampled, ref["sample_guidance0"]) < TOL
    if y is not None:
        guided = flow.decode(flow.scale_prior_noise(noise), y, guidance=1.0)
        assert close_where_moderate(guided, ref["sample_guidance1"]) < TOL
        with torch.no_grad():
            z_u, logdet_u = flow.encode(x, None)  # ml-tarflow's y=None: the mean class embedding
        assert (flow.to_tokens(z_u) - ref["z_uncond"]).abs().max() < TOL
        assert (logdet_u / (tokens * values) - ref["logdets_uncond"]).abs().max() < TOL


@pytest.mark.parametrize("name", MODELS)
def test_exact_log_likelihood_is_ml_tarflows_loss_in_nats_and_bits(imported, name):
    run = fd.load_run(imported[name])
    ref = reference(name)
    x, y = ref["x"], ref.get("y")
    logp = run.sampler.log_likelihood(run.model, x, labels=y).logp
    dim = x[0].numel()
    loss = ref["loss"].item()  # nats per dimension, without the Gaussian's constant
    nats_per_dim = -logp.mean().item() / dim
    assert abs(nats_per_dim - (loss + 0.5 * math.log(2 * math.pi))) < TOL
    levels = run.dataset.levels
    bits = bits_per_dim(-logp.mean(), dim, levels).item()
    assert abs(bits - (loss + 0.5 * math.log(2 * math.pi) + math.log(levels / 2)) / math.log(2)) < TOL
    if y is None:  # the public API scores the same density
        assert torch.allclose(fd.log_likelihood(run, x), logp)


def test_an_nfm_student_trains_on_pairs_from_the_imported_teacher(tmp_path, imported):
    teacher = imported["uncond_1x8x8"]
    run_dir = fd.train("recipes/digits/fm_nf_teacher.yaml", [
        f"method.coupling.teacher={teacher}", "method.coupling.draws=1", "train.steps=2", "train.batch_size=16",
        "train.progress=false", "train.sample_grid=false", "model.channels=[8,16]", "model.attention_head_dim=8",
        "model.norm_groups=4", f"out_dir={tmp_path}", "name=student"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    samples = fd.sample(fd.load_run(run_dir), n=4, steps=2)
    assert samples.x.shape == (4, 1, 8, 8) and samples.x.isfinite().all()


def cli_args(checkpoint: Path, out: Path, name: str = "uncond_1x8x8", **sizes: int) -> list[str]:
    shape, noise_std = shape_of(name)
    values = {"img-size": shape.img_size, "patch-size": shape.patch_size, "channels": shape.channels,
              "blocks": shape.num_blocks, "layers-per-block": shape.layers_per_block, "in-channels": 1, **sizes}
    flags = [part for key, v in values.items() for part in (f"--{key}", str(v))]
    return ["import", "ml-tarflow", str(checkpoint), str(out), *flags, "--noise-std", str(noise_std),
            "data.name=digits"]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowdistill import: error: ")
    return err


def test_a_checkpoint_of_another_shape_is_refused_with_the_keys_that_differ(tmp_path, capsys):
    out = tmp_path / "teacher"
    err = one_line_error(capsys, cli_args(FIXTURES / "uncond_1x8x8.pth", out, blocks=5))
    assert "uncond_1x8x8.pth' does not fit the ml-tarflow model --img-size 8 --patch-size 2 --channels 64 --blocks 5" in err
    assert "blocks.4.attn_blocks.0.attention.norm.bias: missing (expected (64,))" in err and "and 22 more" in err
    err = one_line_error(capsys, cli_args(FIXTURES / "uncond_1x8x8.pth", out, channels=128))
    assert "blocks.0.attn_blocks.0.attention.qkv.weight: checkpoint (192, 64), expected (384, 128)" in err
    err = one_line_error(capsys, cli_args(FIXTURES / "cond_3x8x8.pth", out, name="cond_3x8x8", **{"in-channels": 3}))
    assert "blocks.0.class_embed: unexpected (3, 1, 64)" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_foreign_and_unreadable_checkpoints_get_one_line_errors(tmp_path, capsys):
    out = tmp_path / "teacher"
    err = one_line_error(capsys, cli_args(tmp_path / "absent.pth", out))
    assert "absent.pth" in err and "does not exist" in err
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), foreign)
    assert "not an ml-tarflow TarFlow checkpoint" in one_line_error(capsys, cli_args(foreign, out))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in one_line_error(capsys, cli_args(text, out))
    assert not out.exists()


def test_data_of_another_shape_and_an_existing_folder_are_refused(tmp_path, imported, capsys):
    shape, noise_std = shape_of("cond_3x8x8")
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*shape \(1, 8, 8\)"):
        import_ml_tarflow(FIXTURES / "cond_3x8x8.pth", shape, noise_std, tmp_path / "t", ["data.name=digits"])
    with pytest.raises(ValueError, match="data.name=digits"):
        import_ml_tarflow(FIXTURES / "cond_3x8x8.pth", shape, noise_std, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    existing = imported["uncond_1x8x8"]
    assert "already exists" in one_line_error(capsys, cli_args(FIXTURES / "uncond_1x8x8.pth", existing))
