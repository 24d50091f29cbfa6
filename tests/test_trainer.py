"""Trainer: LR schedule, deterministic batches, exact resume after an interruption, NaN handling, EMA."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from nfm.couplings import IndependentCoupling
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from shared.backbones import MLPConfig, build_mlp
from shared.checkpoint import latest_checkpoint, load_checkpoint
from shared.config import TrainConfig
from shared.run import data_noise
from shared.trainer import EMA, EpochSampler, Trainer, TrainingDiverged, lr_at


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, log_every=5, ckpt_every=1000, progress=False,
                ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _fm() -> FlowMatchingLoss:
    """Plain flow matching (independent coupling)."""
    return FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling())


def _data() -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(256, 2, generator=g) * 0.5 + 1.0,)


def _trainer(run_dir, method=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=32, depth=2, time_dim=16), (2,))
    method = method or _fm()
    return Trainer(_cfg(**kw), 0, model, method, _data(), run_dir, Accelerator(cpu=True))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_epoch_sampler_is_a_sharded_permutation_and_a_function_of_step():
    world = 2
    samplers = [EpochSampler(100, 10, seed=3, rank=r, world=world) for r in range(world)]
    epoch = torch.cat([s.indices(step) for step in range(5) for s in samplers])
    assert len(set(epoch.tolist())) == 100
    again = EpochSampler(100, 10, seed=3, rank=1, world=world)
    assert torch.equal(again.indices(7), samplers[1].indices(7))
    assert not torch.equal(samplers[0].indices(5), samplers[0].indices(0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(15, 10, seed=0, rank=0, world=2)


class _InterruptAt:
    """Wraps a method and sends SIGINT to this process during one chosen step."""

    def __init__(self, inner, at_call: int):
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def __call__(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(model, batch, generator)


def test_interrupted_then_resumed_run_repeats_uninterrupted_losses(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit()
    part = _trainer(tmp_path / "part", method=_InterruptAt(_fm(), at_call=23))
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step_00000023"
    resumed = _trainer(tmp_path / "part")
    assert resumed.resume() and resumed.step == 23
    resumed.fit()
    def without_timing(run):
        return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in _metrics(run)]

    assert without_timing(tmp_path / "part") == without_timing(tmp_path / "full")
    assert len(without_timing(tmp_path / "full")) == 8
    for p, q in zip(full.raw_model.parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q)


class _NaNAfter:
    """A loss that turns NaN from a given step on."""

    def __init__(self, inner, start: int):
        self.inner, self.start, self.calls = inner, start, 0

    def __call__(self, model, batch, generator):
        self.calls += 1
        loss, logs = self.inner(model, batch, generator)
        return (loss * float("nan") if self.calls > self.start else loss), logs


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, method=_NaNAfter(_fm(), 12), ckpt_every=10)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    assert "step 15" in str(err.value) and "step_00000010" in str(err.value)
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step_00000010"
    model = build_mlp(MLPConfig(hidden=32, depth=2, time_dim=16), (2,))
    load_checkpoint(last, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_lowers_the_loss_and_ema_tracks_the_model(tmp_path):
    trainer = _trainer(tmp_path, steps=60)
    trainer.fit()
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert losses[-1] < losses[0]
    ema, model = trainer.ema.model, trainer.raw_model
    diffs = [(e - p).abs().max().item() for e, p in zip(ema.parameters(), model.parameters())]
    assert 0 < max(diffs) < 1.0


def test_ema_update_is_a_lerp_with_ramped_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        before = ema.model.weight.clone()
        model.weight.add_(1.0)
    ema.update(model, step=0)
    decay = min(0.99, 1 / 10)
    assert torch.allclose(ema.model.weight, decay * before + (1 - decay) * model.weight)


class _RecordBatches:
    """Wraps a method and keeps a copy of every data batch it is given."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, model, batch, generator):
        self.batches.append(batch[0].clone())
        return self.inner(model, batch, generator)


def test_dequantize_adds_cell_noise_that_is_a_function_of_seed_and_step(tmp_path):
    levels = 4
    grid = (torch.arange(256) % levels + 0.5) / levels * 2 - 1  # cell centres of a 4-level "image" set
    data = (torch.stack([grid, grid.flip(0)], 1),)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        model = build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,))
        method = _RecordBatches(_fm())
        Trainer(_cfg(steps=4), 0, model, method, data, tmp_path / name, Accelerator(cpu=True),
                batch_transform=data_noise(0, levels, levels)).fit()
        runs.append(torch.stack(method.batches))
    first, again = runs
    assert torch.equal(first, again)  # the noise is a function of (seed, step)
    centres = ((first + 1) / 2 * levels).floor().clamp(max=levels - 1) / levels * 2 - 1 + 1 / levels
    offset = first - centres
    assert offset.abs().max() <= 1 / levels + 1e-6  # inside the cell (half-width 1/levels)
    assert offset.std() > 0.4 / levels  # and spread over it (uniform: std 0.577 / levels)
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("recipe,levels,match", [
    ("toy2d/fm_independent.yaml", None, "needs quantised image data"),
    ("digits/teacher_bpd.yaml", 17, "draws its own data noise (method.dequantize or the model's x + eta*eps)"),
    ("digits/fm_nf_teacher.yaml", 17, "draws its own data noise (the teacher's input: x + eta*eps', or x + cell noise"),
])
def test_data_dequantize_is_refused_where_it_cannot_apply(recipe, levels, match):
    import re

    from flowdistill.api import resolve_config
    from shared.run import check_dequantize

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    with pytest.raises(ValueError, match=re.escape(match)):
        check_dequantize(resolve_config(recipes / recipe, ["data.dequantize=true"]), levels)
    assert check_dequantize(resolve_config(recipes / "digits/fm_mlp.yaml"), 17) == 17
    assert check_dequantize(resolve_config(recipes / "digits/fm_independent.yaml"), 17) is None


class _ValidationLoss:
    """A loss whose value on the validation split is scripted per pass (to test best-weight selection)."""

    def __init__(self, inner, scripted: list[float]):
        self.inner, self.scripted, self.passes = inner, scripted, 0

    def __call__(self, model, batch, generator):
        if not model.training:  # validation passes run the evaluation weights in eval mode
            value = self.scripted[min(self.passes, len(self.scripted) - 1)]
            return torch.tensor(value), {}
        return self.inner(model, batch, generator)


def test_best_on_validation_keeps_the_weights_of_the_lowest_validation_loss(tmp_path):
    from shared.run_build import evaluation_weights

    data = _data()
    val = (data[0][:32],)  # one validation batch per pass
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,))
    loss = _ValidationLoss(_fm(), [3.0, 1.0, 2.0, 4.0])

    def counting(model, batch, generator):
        out = loss(model, batch, generator)
        if not model.training:
            loss.passes += 1
        return out

    trainer = Trainer(_cfg(steps=40, eval_every=10, log_every=10), 0, model, counting, data, tmp_path,
                      Accelerator(cpu=True), val_data=val)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [3.0, 1.0, 2.0, 4.0]
    assert records[-1]["val_best"] == 1.0
    best = latest_checkpoint(tmp_path / "checkpoints" / "best")
    assert json.loads((best / "trainer.json").read_text()) == {"step": 20, "val_loss": 1.0}
    (tmp_path / "config.yaml").write_text("")  # evaluation_weights only needs the checkpoints
    path, step = evaluation_weights(tmp_path)
    assert step == 20 and path.parent == best
    path, step = evaluation_weights(tmp_path, "ema")
    assert step == 40 and path.name == "ema.safetensors"


def test_validation_needs_a_validation_split(tmp_path):
    model = build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,))
    with pytest.raises(ValueError, match="data.val_fraction"):
        Trainer(_cfg(eval_every=10), 0, model, _fm(), _data(), tmp_path,
                Accelerator(cpu=True))


def test_validation_loss_is_deterministic_and_uses_a_fixed_noise_draw(tmp_path):
    data = _data()
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,))
    trainer = Trainer(_cfg(), 0, model, _fm(), data, tmp_path,
                      Accelerator(cpu=True), val_data=(data[0][:100],))
    assert trainer.validate() == trainer.validate()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    data = _data()
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,))
    Trainer(_cfg(steps=20, ckpt_every=10), 0, model, _fm(), data, tmp_path,
            Accelerator(cpu=True)).fit()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 25, "loss": 0.')  # a write cut short
    torch.manual_seed(0)
    again = Trainer(_cfg(steps=30, ckpt_every=10), 0, build_mlp(MLPConfig(hidden=16, depth=1, time_dim=8), (2,)),
                    _fm(), data, tmp_path, Accelerator(cpu=True))
    with pytest.warns(UserWarning, match="torn last line"):
        assert again.resume()
    again.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path):
    from flowdistill.api import resolve_config, train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy2d" / "fm_independent.yaml"
    small = [f"out_dir={tmp_path}", "name=r", "train.steps=10", "train.ckpt_every=10", "model.hidden=16",
             "train.progress=false", "data.n_train=500", "data.n_test=100", "train.batch_size=64"]
    run = train(resolve_config(recipe, small))
    with pytest.raises(Exception, match="unknown data set"):
        train(resolve_config(recipe, small + ["data.name=nope"]), overwrite=True)
    assert (run / "checkpoints" / "step_00000010").is_dir()  # a bad config deletes nothing
    train(resolve_config(recipe, small + ["seed=1"]), overwrite=True)
    assert not (tmp_path / ".r.replaced").exists() and (run / "checkpoints" / "step_00000010").is_dir()
    assert "seed: 1" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_training_killed_at_ten_random_points_resumes_to_the_same_losses_and_weights(tmp_path):
    """SIGKILL a training process 10 times at random moments (some land inside checkpoint writes)."""
    import random
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "toy2d" / "fm_independent.yaml"
    args = [f"out_dir={tmp_path}", "train.steps=400", "train.ckpt_every=10", "train.log_every=5", "model.hidden=64",
            "train.batch_size=64", "data.n_train=2000", "data.n_test=200", "train.progress=false",
            "train.sample_grid=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(name: str, resume: bool) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flowdistill", "train", str(recipe), f"name={name}", *args]
        return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert train("reference", False).wait() == 0
    rng = random.Random(7)
    for _ in range(10):
        proc = train("killed", (tmp_path / "killed" / "config.yaml").is_file())
        time.sleep(rng.uniform(3.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert train("killed", True).wait() == 0

    def records(name: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]

    assert records("killed") == records("reference")
    final = {n: load_file(str(latest_checkpoint(tmp_path / n / "checkpoints") / "model.safetensors"))
             for n in ("reference", "killed")}
    assert all(torch.equal(final["reference"][k], final["killed"][k]) for k in final["reference"])
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))  # no temp folders left behind


def test_tensorboard_tracker_receives_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowdistill.api import resolve_config, train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy2d" / "fm_independent.yaml"
    run = train(resolve_config(recipe, [f"out_dir={tmp_path}", "name=tb", "train.steps=20", "train.log_every=10",
                                        "model.hidden=16", "train.batch_size=64", "data.n_train=500",
                                        "data.n_test=100", "train.progress=false", "train.trackers=[tensorboard]"]))
    events = list((run / "tracking").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [10, 20]


def test_one_process_trains_runs_of_different_precision_one_after_another(tmp_path):
    """The pipeline and comparisons train several runs in one process; Accelerate's process-wide state must not
    refuse a bf16 run after an fp32 one (or the other way round)."""
    from flowdistill.api import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy2d" / "fm_independent.yaml"
    common = [f"out_dir={tmp_path}", "train.steps=2", "train.log_every=1", "train.progress=false",
              "data.n_train=256", "train.batch_size=64"]
    for name, precision in (("a", "no"), ("b", "bf16"), ("c", "no")):
        train(recipe, [*common, f"name={name}", f"train.mixed_precision={precision}"])
        saved = (tmp_path / name / "config.yaml").read_text()
        assert f"mixed_precision: {precision}" in saved or f"mixed_precision: '{precision}'" in saved
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) >= 2
