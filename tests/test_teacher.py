"""The TarFlow teacher as a method: NLL units, denoising, likelihood, training and the CLI end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from flowdistill.api import load_run
from flowdistill.cli import main
from nfm.tarflow import TarFlow, TarFlowConfig
from nfm.teacher import (TeacherConfig, TeacherNLL, TeacherSampler, build_teacher_loss, build_teacher_sampler,
                         categorical_baseline_bpd, check_teacher, tweedie_denoise)
from shared.backbones import MLPConfig
from shared.catalog import BuildContext
from shared.config import TrainConfig
from shared.data import Dataset, bits_per_dim, dequantize, image_to_model
from shared.paths import standard_normal_logprob
from shared.trainer import Trainer, make_accelerator

TINY = ["model.width=32", "model.head_dim=16", "model.blocks=2", "model.layers=1"]


def flow(shape=(1, 8, 8), **kw) -> TarFlow:
    torch.manual_seed(0)
    base = dict(width=32, head_dim=16, blocks=2, layers=1)
    base.update(kw)
    return TarFlow(TarFlowConfig(**base), shape)


def gaussian_2d(n: int = 512) -> torch.Tensor:
    """A fixed anisotropic 2D Gaussian sample (n, 2) for short training runs."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) * torch.tensor([0.3, 1.0]) + torch.tensor([1.0, -0.5])


def image_dataset(levels: int = 17, n: int = 40, labels: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(0, levels, (2 * n, 1, 4, 4), generator=g)
    y = torch.randint(0, 3, (2 * n,), generator=g) if labels else None
    x = image_to_model(ints, levels)
    return Dataset("fake", x[:n], x[n:], None if y is None else y[:n], None if y is None else y[n:], levels, "0")


def test_loss_is_nats_per_dim_and_matches_bits_per_dim():
    model = flow()  # a fresh flow is the identity: log p(x) = log N(x; 0, I)
    method = TeacherNLL(TeacherConfig(dequantize=True), levels=17)
    x = image_to_model(torch.randint(0, 17, (64, 1, 8, 8)), 17)
    loss, logs = method(model, (x,), torch.Generator().manual_seed(1))
    x_deq = dequantize(x, 17, torch.Generator().manual_seed(1))
    nll = -standard_normal_logprob(x_deq).mean()
    torch.testing.assert_close(loss, nll / 64)
    torch.testing.assert_close(logs["bpd"], bits_per_dim(nll, 64, 17))
    torch.testing.assert_close(logs["bpd"], (loss + math.log(17 / 2)) / math.log(2))


def test_noise_augmentation_uses_the_model_eta():
    model = flow(eta=0.3)
    method = TeacherNLL(TeacherConfig(), levels=None)
    x = torch.zeros(2000, 1, 8, 8)
    assert method.perturb(model, x, torch.Generator().manual_seed(0)).std().item() == pytest.approx(0.3, rel=0.02)


def test_tweedie_step_on_a_gaussian_and_sample_nfe():
    model = flow(eta=0.1).eval()  # identity flow: grad log N(x) = -x, so the step shrinks x by 1 - eta^2
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(tweedie_denoise(model, x, 0.1), x * (1 - 0.01))
    sampler = TeacherSampler(TeacherConfig())
    out = sampler.sample(model, x)
    torch.testing.assert_close(out.samples, x * (1 - 0.01))
    assert out.nfe == 2 * 15 + 2
    plain = TeacherSampler(TeacherConfig(denoise=False)).sample(model, x)
    assert torch.equal(plain.samples, x) and plain.nfe == 2 * 15


def test_log_likelihood_is_exact_change_of_variables():
    model = flow(eta=0.0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.out.weight.normal_(0, 0.1)
    x = torch.randn(6, 1, 8, 8)
    sampler = TeacherSampler(TeacherConfig())
    assert sampler.exact_likelihood
    res = sampler.log_likelihood(model, x, divergence="hutchinson")
    z, logdet = model.encode(x)
    torch.testing.assert_close(res.logp, standard_normal_logprob(z) + logdet)
    torch.testing.assert_close(res.z, z)
    assert res.nfe == 1 and (logdet.abs() > 0.01).all()


def test_conditional_training_step_and_guided_sampling():
    model = flow((1, 4, 4), num_classes=3, label_dropout=0.5)
    with torch.no_grad():
        for block in model.blocks:  # away from the zero init, so gradients reach the label embeddings
            block.out.weight.normal_(0, 0.05)
    data = image_dataset(labels=True)
    run_cfg = SimpleNamespace(model=model.cfg)
    cfg = TeacherConfig(guidance=1.0)
    method = build_teacher_loss(cfg, BuildContext(run_cfg, data, Path("unused"), load_run))
    assert isinstance(method, TeacherNLL)
    loss, _ = method(model, (data.train, data.train_labels), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(b.label.weight.grad.abs()[3].sum() > 0 for b in model.blocks)  # the null class is trained
    out = build_teacher_sampler(cfg, run_cfg, data).sample(model.eval(), torch.randn(6, 1, 4, 4))
    assert out.samples.shape == (6, 1, 4, 4) and torch.isfinite(out.samples).all()


@pytest.mark.parametrize("cfg, model, match", [
    (TeacherConfig(dequantize=True), TarFlowConfig(eta=0.05), "model.eta=0"),
    (TeacherConfig(), MLPConfig(), "model.name: tarflow"),
    (TeacherConfig(), TarFlowConfig(num_classes=10), "no labels"),
    (TeacherConfig(guidance=2.0), TarFlowConfig(), "guidance"),
])
def test_build_rejects_inconsistent_settings(cfg, model, match):
    data, run_cfg = image_dataset(), SimpleNamespace(model=model)
    with pytest.raises(ValueError, match=match):
        check_teacher(cfg, run_cfg, data)
    with pytest.raises(ValueError, match=match):  # the loss (training) ...
        build_teacher_loss(cfg, BuildContext(run_cfg, data, Path("unused"), load_run))
    with pytest.raises(ValueError, match=match):  # ... and the sampler (loading a run) both check
        build_teacher_sampler(cfg, run_cfg, data)


def test_categorical_baseline():
    data = image_dataset(levels=4, n=4000)  # uniform levels: log2(4) = 2 bits per dim
    assert categorical_baseline_bpd(data) == pytest.approx(2.0, abs=0.01)
    const = Dataset("c", torch.full((10, 3), -0.5), torch.full((5, 3), -0.5), None, None, 2, "0")
    assert categorical_baseline_bpd(const) == pytest.approx(-math.log2(11 / 12))


def test_teacher_trains_through_the_shared_trainer(tmp_path):
    data = gaussian_2d()
    model = flow((2,), token_dim=1, eta=0.0)
    cfg = TrainConfig(steps=60, batch_size=128, lr=5e-3, warmup_steps=5, log_every=10, ckpt_every=1000,
                      progress=False, ema_decay=0.9)
    Trainer(cfg, 0, model, TeacherNLL(TeacherConfig(), None), (data,), tmp_path, Accelerator(cpu=True)).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3


def test_cli_train_nll_sample_eval_on_a_tiny_teacher(tmp_path):
    args = ["out_dir=" + str(tmp_path), "name=t", "train.steps=20", "train.batch_size=64", "train.log_every=10",
            "train.progress=false", *TINY]
    assert main(["train", "recipes/digits/teacher_bpd.yaml", *args]) == 0
    run_dir = tmp_path / "t"
    run = load_run(run_dir)
    assert isinstance(run.model, TarFlow) and isinstance(run.sampler, TeacherSampler) and run.step == 20
    # the post-training samples are named by what drew them (a decode), not by solver steps that do not apply
    drawn = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert drawn and all(name.startswith("decode") for name in drawn), drawn
    assert main(["nll", str(run_dir), "--n", "100", "--device", "cpu"]) == 0
    res = json.loads((run_dir / "nll-test.json").read_text())
    assert res["n"] == 100 and res["nfe_mean"] == 1 and 0 < res["bits_per_dim"] < 8
    x = dequantize(run.dataset.test[:100], 17, torch.Generator().manual_seed(0))
    direct = run.sampler.log_likelihood(run.model, x).logp.double().mean().item()
    assert res["nll_nats"] == pytest.approx(-direct, rel=1e-5)
    out = tmp_path / "s.png"
    assert main(["sample", str(run_dir), "--n", "16", "--out", str(out), "--device", "cpu"]) == 0
    saved = np.load(out.with_suffix(".npz"))
    assert out.is_file() and saved["samples"].shape == (16, 1, 8, 8) and int(saved["nfe"]) == 2 * 15


def test_cli_eval_on_a_toy_teacher(tmp_path):
    args = ["out_dir=" + str(tmp_path), "name=t", "train.steps=10", "train.batch_size=64", "train.log_every=5",
            "train.progress=false", "train.sample_grid=false", "data.n_train=256", "data.n_test=64", *TINY]
    assert main(["train", "recipes/toy2d/teacher.yaml", *args]) == 0
    assert main(["eval", str(tmp_path / "t"), "--n", "64", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "t" / "eval.json").read_text())["rows"]
    assert rows[0]["metric"] == "w2" and rows[0]["nfe"] == 2 * 1 + 2


def test_bench_teacher_runs_and_cache_matches(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench.benchmarks.bench_teacher import main as bench_main

    out = tmp_path / "teacher.json"
    payload = bench_main(["--device", "cpu", "--repeats", "1", "--encode-batch", "8", "--decode-batch", "2",
                          "--models", "digits-p2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"] and [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[0]["cached_vs_uncached_max_abs"] < 1e-5 and rows[0]["encode_images_per_s"] > 0


def test_bf16_autocast_training_keeps_the_flow_maps_and_weights_in_fp32(tmp_path):
    """train.mixed_precision=bf16 on a CPU: the transformers run in bf16, the affine maps, log-determinant and
    loss in fp32; the first loss agrees with the fp32 run to bf16 accuracy and training still learns."""
    data = gaussian_2d()
    losses = {}
    for precision in ("no", "bf16"):
        model = flow((2,), token_dim=1, eta=0.0)
        cfg = TrainConfig(steps=60, batch_size=128, lr=5e-3, warmup_steps=5, log_every=10, ckpt_every=1000,
                          progress=False, ema_decay=0.9, mixed_precision=precision)
        out = tmp_path / precision
        Trainer(cfg, 0, model, TeacherNLL(TeacherConfig(), None), (data,), out,
                make_accelerator(precision, cpu=True)).fit()
        losses[precision] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = model(data[:8])
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    assert losses["bf16"][0] == pytest.approx(losses["no"][0], abs=0.05)
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.3
    assert losses["bf16"][-1] == pytest.approx(losses["no"][-1], abs=0.1)
