"""Training throughput: `shared.trainer.Trainer` against a bare PyTorch loop doing the same work, in one process.

Both paths train the same model (same init seed) with the flow-matching loss on batches indexed from an
on-device tensor, AdamW with the trainer's parameter groups, gradient clipping and, when on, the EMA lerp.
Rates are taken over log intervals, each ending in one host sync. Each path first runs one untimed
interval (warm-up), then the repeats alternate bare and trainer. Trainer rates are the `samples_per_s`
of its `metrics.jsonl` records, so its construction and the checkpoint `fit()` writes on return stay
outside the timed window.

Run from the repository root:  python -m bench.benchmarks.bench_train [--device cpu|cuda] [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from bench.common import BenchCase, add_common_args, report, selected_cases, setup
from shared.config import RunConfig, TrainConfig
from shared.data import Dataset
from shared.data_sources import load_dataset
from flowdistill.components import CATALOG
from shared.run import build_loss
from shared.run_build import build_model
from shared.rundir import metrics_path
from shared.timing import median
from shared.trainer import Trainer

DEFAULT_STEPS = {"toy": 300, "digits": 20, "mnist": 100}  # timed steps per measurement on CPU
CUDA_STEPS = 500  # timed steps per measurement on CUDA
EMA_DECAYS = (0.999, 0.0)  # the default config's EMA, then EMA off
NO_CHECKPOINT = 10**9  # ckpt_every beyond any benchmark's steps: no checkpoint inside the timed window
COLUMNS = {"case": "case", "ema_decay": "EMA", "batch": "batch", "bare_steps_per_s": "bare steps/s",
           "trainer_steps_per_s": "trainer steps/s", "bare_samples_per_s": "bare samples/s",
           "trainer_samples_per_s": "trainer samples/s", "overhead_pct": "overhead %"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--steps", type=int, default=0,
                        help=f"timed steps per measurement (default: {DEFAULT_STEPS} on cpu, {CUDA_STEPS} on cuda)")
    parser.add_argument("--log-every", type=int, default=50, help="steps per log interval (one host sync each)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="autocast for both paths (one setting per process: Accelerate fixes it)")
    return parser.parse_args(argv)


def _floats(model: nn.Module) -> list[Tensor]:
    """Floating-point parameters and buffers, as the trainer's EMA averages them."""
    return [p for p in model.state_dict().values() if p.dtype.is_floating_point]


class BareLoop:
    """A plain PyTorch loop doing the trainer's per-step work: batch, FM loss, backward, clip, AdamW, EMA."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, data: Tensor, seed: int):
        self.cfg, self.model, self.data = cfg, model.train(), data
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.params = list(model.parameters())
        ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        self.ema_pairs = (_floats(ema), _floats(model)) if ema is not None else None
        self.gen = torch.Generator(device=data.device).manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long, device=data.device)
        self.per_epoch = len(data) // cfg.batch_size
        self.step = 0

    def _train_step(self) -> Tensor:
        """One optimizer step; returns the loss without syncing."""
        cfg, device, batch = self.cfg, self.data.device, self.cfg.batch_size
        pos = (self.step % self.per_epoch) * batch
        if pos == 0:
            self.perm = torch.randperm(len(self.data), device=device, generator=self.gen)
        x = self.data[self.perm[pos:pos + batch]]
        z = torch.randn(x.shape, device=device, generator=self.gen)
        t = torch.rand(batch, device=device, generator=self.gen)
        tb = t.view(-1, *[1] * (x.dim() - 1))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            v = self.model((1 - tb) * x + tb * z, t)
            loss = (v.float() - (z - x)).pow(2).mean()
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema_pairs is not None:
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
                torch._foreach_lerp_(self.ema_pairs[0], self.ema_pairs[1], 1 - decay)
        self.step += 1
        return loss

    def run(self, intervals: int) -> list[float]:
        """Samples/s of each of `intervals` log intervals (one host sync at the end of each)."""
        rates = []
        for _ in range(intervals):
            start = time.perf_counter()
            for _ in range(self.cfg.log_every):
                loss = self._train_step()
            loss.item()
            rates.append(self.cfg.log_every * self.cfg.batch_size / (time.perf_counter() - start))
        return rates


class TrainerLoop:
    """The real `Trainer`; each `run` raises `cfg.steps` and calls `fit()` again, as a resumed run would."""

    def __init__(self, cfg: TrainConfig, run_cfg: RunConfig, dataset: Dataset, accelerator: Accelerator, run_dir: Path):
        self.cfg, self.metrics = cfg, metrics_path(run_dir)
        self.trainer = Trainer(cfg, run_cfg.seed, build_model(run_cfg, dataset, CATALOG),
                               build_loss(run_cfg, dataset, CATALOG), (dataset.train,), run_dir, accelerator)
        self.seen = 0

    def run(self, intervals: int) -> list[float]:
        """Samples/s of the next `intervals` log intervals, from the trainer's own metrics records."""
        self.cfg.steps = self.trainer.step + intervals * self.cfg.log_every
        self.trainer.fit()
        records = [json.loads(line) for line in self.metrics.read_text().splitlines()]
        self.seen, new = len(records), records[self.seen:]
        return [r["samples_per_s"] for r in new]


def measure(name: str, case: BenchCase, steps: int, args: argparse.Namespace, device: torch.device,
            accelerator: Accelerator) -> list[dict[str, Any]]:
    """Alternate bare and trainer measurements of one case, EMA on and off; one row per EMA setting."""
    dataset = load_dataset(case.run_config().data)
    log_every = min(args.log_every, steps)
    intervals = max(steps // log_every, 1)
    data = dataset.train.to(device)
    batch = args.batch or case.train_batch
    rows = []
    for ema_decay in EMA_DECAYS:
        cfg = TrainConfig(batch_size=batch, lr=2e-3, ema_decay=ema_decay,
                          mixed_precision=args.mixed_precision, log_every=log_every, ckpt_every=NO_CHECKPOINT,
                          progress=False, sample_grid=False)
        run_cfg = case.run_config(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            loops = {"bare": BareLoop(cfg, build_model(run_cfg, dataset, CATALOG).to(device), data, run_cfg.seed),
                     "trainer": TrainerLoop(cfg, run_cfg, dataset, accelerator, Path(tmp))}
            for loop in loops.values():
                loop.run(1)
            rates: dict[str, list[float]] = {"bare": [], "trainer": []}
            for rep in range(args.repeats):
                for path in (("bare", "trainer") if rep % 2 == 0 else ("trainer", "bare")):
                    rates[path].append(median(loops[path].run(intervals)))
        accelerator.free_memory()
        bare, trainer = median(rates["bare"]), median(rates["trainer"])
        paired = [(b / t - 1) * 100 for b, t in zip(rates["bare"], rates["trainer"])]
        rows.append({
            "case": name, "model": case.note, "ema_decay": ema_decay, "batch": batch,
            "mixed_precision": args.mixed_precision, "timed_steps": intervals * log_every, "log_every": log_every,
            "bare_steps_per_s": bare / batch, "trainer_steps_per_s": trainer / batch,
            "bare_samples_per_s": bare, "trainer_samples_per_s": trainer, "overhead_pct": median(paired),
            "overhead_pct_per_repeat": paired,
        })
        print(f"{name} ema={ema_decay}: bare {bare:,.0f} / trainer {trainer:,.0f} samples/s, "
              f"overhead {rows[-1]['overhead_pct']:+.2f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the training benchmark, print its table and write its JSON."""
    args = parse_args(argv)
    device = setup(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    rows = []
    for name, case in selected_cases(args.cases, device).items():
        steps = args.steps or (CUDA_STEPS if device.type == "cuda" else DEFAULT_STEPS[name])
        rows += measure(name, case, steps, args, device, accelerator)
    notes = ["rates: median over repeats of the median log-interval rate, after one untimed warm-up interval",
             "overhead % = median over repeats of (bare rate / trainer rate - 1) * 100, each repeat's two "
             "measurements back to back; target: at most 5",
             "steps/s = optimizer steps per second; samples/s = steps/s x batch"]
    tag = "-bf16" if args.mixed_precision == "bf16" else ""
    return report("train", args, device, rows, COLUMNS, notes, tag)


if __name__ == "__main__":
    main()
