"""The one training loop of flowdistill, built on Accelerate; every method plugs in as a loss object.

Reproducibility by construction: the batch of step k and every random number the loss draws come
from generators seeded by (seed, step, process), so a resumed run repeats the uninterrupted run's
losses exactly without any saved RNG state. Host syncs happen only every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared.checkpoint import (atomic_write_text, latest_checkpoint, load_checkpoint, remove_temporaries,
                               save_checkpoint)
from shared.config import TrainConfig
from shared.rundir import best_dir, checkpoints_dir, metrics_path, read_metrics, resume_remedy

Batch = tuple[Tensor, ...]
BatchTransform = Callable[[Batch, torch.Generator], Batch]


class BatchSource(Protocol):
    """Batches that do not sit in memory as float tensors (`shared.streaming`): this process's batch at a step."""

    def batch(self, step: int) -> Batch: ...


def make_accelerator(mixed_precision: str = "no", **kwargs: Any) -> Accelerator:
    """An Accelerator with this run's precision ("no", "bf16" or "fp16"); `kwargs` go to `Accelerator`.

    Accelerate keeps one process-wide state whose precision the first Accelerator fixes, and refuses a later
    one that asks for another. One process may train several runs (the pipeline, a comparison, a notebook), so
    the precision part of that state is cleared when it differs; the process group (`PartialState`) is kept.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


class TrainingDiverged(RuntimeError):
    """The loss (or a parameter) became NaN/inf; the last good checkpoint is kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `cfg.lr`, then cosine decay to `cfg.min_lr_ratio * cfg.lr` at `cfg.steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A distinct 63-bit seed for each (run seed, step, process, stream)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None

    @staticmethod
    def _floats(model: nn.Module) -> list[Tensor]:
        return [p for p in model.state_dict().values() if p.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the averaged weights towards the current ones (decay ramps up early in training)."""
        if self._pairs is None:
            self._pairs = (self._floats(self.model), self._floats(model))
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1 - decay)


class EpochSampler:
    """Deterministic batches from an in-memory tensor: a fresh permutation per epoch, sharded over processes."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        if n < batch_size * world:
            raise ValueError(f"train split has {n} items, fewer than one global batch "
                             f"({batch_size} x {world} processes); lower train.batch_size")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // (batch_size * world)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        """Row indices of this process's batch at `step` (a pure function of step)."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, stream=1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = (pos * self.world + self.rank) * self.batch
        return self._perm[start:start + self.batch]


class Trainer:
    """Runs `method` on `model` over `data` with AdamW, warmup+cosine LR, clipping, EMA and checkpoints."""

    def __init__(self, cfg: TrainConfig, seed: int, model: nn.Module, loss: Callable, data: Batch | BatchSource,
                 run_dir: str | Path, accelerator: Accelerator | None = None,
                 batch_transform: BatchTransform | None = None, val_data: Batch | None = None):
        """`loss(model, batch, generator) -> (scalar, logs)`; `data`: tensors moved to the device whole, or a
        `BatchSource` (uint8 data, `shared.streaming`); `batch_transform(batch, generator)` draws per-step
        data noise (augmentation, dequantization); `val_data` is scored every `cfg.eval_every`."""
        self.cfg, self.seed, self.method = cfg, seed, loss
        self.batch_transform = batch_transform
        if cfg.eval_every and val_data is None:
            raise ValueError("train.eval_every > 0 needs a validation split: set data.val_fraction > 0")
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator or make_accelerator(cfg.mixed_precision)
        acc = self.accelerator
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self._raw_model = acc.unwrap_model(self.model)
        self._params = [p for p in self._raw_model.parameters() if p.requires_grad]
        # Accelerate's wrappers cost ~0.1 ms of Python per step; bypass them when they add nothing.
        self._plain = acc.scaler is None and acc.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU")
        if self.ema is not None:
            self.ema.model.to(acc.device)
        self.source = None if isinstance(data, tuple) else data
        self.data = () if self.source is not None else tuple(d.to(acc.device) for d in data)
        self.val_data = None if val_data is None else tuple(d.to(acc.device) for d in val_data)
        self.after_checkpoint: list[Callable[[], None]] = []  # run on the main process after each checkpoint
        self.best_val = math.inf
        self.sampler = None if self.source is not None else EpochSampler(
            len(self.data[0]), cfg.batch_size, seed, acc.process_index, acc.num_processes)
        self.generator = torch.Generator(device=acc.device)
        self.step = 0
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    # ------------------------------------------------------------------ state

    @property
    def raw_model(self) -> nn.Module:
        """The model without Accelerate/DDP wrappers."""
        return self._raw_model

    def resume(self) -> bool:
        """Load the run's latest checkpoint if there is one; returns whether it did."""
        if self.accelerator.is_main_process:
            for root in (checkpoints_dir(self.run_dir), best_dir(self.run_dir)):
                for name in remove_temporaries(root):
                    self.accelerator.print(f"removed {root / name}, left by an interrupted checkpoint write")
        self.accelerator.wait_for_everyone()
        path = latest_checkpoint(checkpoints_dir(self.run_dir))
        if path is None:
            self._truncate_metrics(0)  # lines of an attempt killed before its first checkpoint
            return False
        state = load_checkpoint(path, self.raw_model, self.ema.model if self.ema else None, self.optimizer)
        self.step = state["step"]
        self.best_val = state.get("best_val", math.inf)
        self._count = state.get("interval_count", 0)
        self._sums = {k: torch.tensor(v, device=self.accelerator.device) for k, v in state.get("interval_sums", {}).items()}
        self._truncate_metrics(self.step)
        return True

    def save(self) -> Path | None:
        """Checkpoint the current step (main process writes; all processes wait)."""
        acc = self.accelerator
        finite = torch.stack([p.detach().isfinite().all() for p in self.raw_model.parameters()]).all()
        if not bool(acc.reduce(finite.float(), reduction="mean") == 1):
            raise TrainingDiverged(f"parameters became non-finite by step {self.step}; not saving over "
                                   f"the last good checkpoint {latest_checkpoint(checkpoints_dir(self.run_dir))}")
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            sums = {k: v.item() for k, v in self._sums.items()}
            path = save_checkpoint(checkpoints_dir(self.run_dir), self.step, self.raw_model,
                                   self.ema.model if self.ema else None, self.optimizer,
                                   {"interval_count": self._count, "interval_sums": sums, "best_val": self.best_val},
                                   keep=self.cfg.keep_checkpoints)
            for callback in self.after_checkpoint:
                callback()
        acc.wait_for_everyone()
        return path

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after `step` (they belong to work that a resume repeats)."""
        path = metrics_path(self.run_dir)
        if not self.accelerator.is_main_process or not path.is_file():
            return
        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= step]  # a torn last line is dropped
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss of the evaluation weights (EMA when on) over the whole validation split.

        The data noise and the loss's own randomness come from one fixed seed, so successive passes
        compare weights, not noise draws. Every process scores the full split (it is small).
        """
        model = self.ema.model if self.ema is not None else self.raw_model
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=self.accelerator.device)
        generator.manual_seed(step_seed(self.seed, 0, 0, stream=2))
        total, count = 0.0, 0
        n = len(self.val_data[0])
        for start in range(0, n, self.cfg.batch_size):
            batch = tuple(d[start:start + self.cfg.batch_size] for d in self.val_data)
            if self.batch_transform is not None:
                batch = self.batch_transform(batch, generator)
            loss, _ = self.method(model, batch, generator)
            total += float(loss) * len(batch[0])
            count += len(batch[0])
        model.train(was_training)
        return total / count

    def _validate_and_keep_best(self) -> dict[str, float]:
        """Score the validation split; when it improves, write the evaluation weights to checkpoints/best."""
        value = self.validate()
        if value < self.best_val:
            self.best_val = value
            if self.accelerator.is_main_process:
                weights = self.ema.model if self.ema is not None else self.raw_model
                save_checkpoint(best_dir(self.run_dir), self.step, weights, trainer_state={"val_loss": value}, keep=1)
        self.accelerator.wait_for_everyone()
        return {"val_loss": value, "val_best": self.best_val}

    # ------------------------------------------------------------------ loop

    def _train_step(self) -> None:
        """One optimizer step; accumulates diagnostics on the device without syncing."""
        acc, cfg = self.accelerator, self.cfg
        if self.source is not None:
            batch = self.source.batch(self.step)
        else:
            idx = self.sampler.indices(self.step).to(acc.device, non_blocking=True)
            batch = tuple(d[idx] for d in self.data)
        self.generator.manual_seed(step_seed(self.seed, self.step, acc.process_index))
        if self.batch_transform is not None:
            batch = self.batch_transform(batch, self.generator)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        with acc.autocast():
            loss, logs = self.method(self.model, batch, self.generator)
        acc.backward(loss)
        logs = {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in logs.items()}}
        optimizer = self.optimizer.optimizer if self._plain else self.optimizer
        if cfg.grad_clip > 0:
            clip = torch.nn.utils.clip_grad_norm_ if self._plain else acc.clip_grad_norm_
            logs["grad_norm"] = clip(self._params, cfg.grad_clip).detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model, self.step)
        for k, v in logs.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._count += 1
        self.step += 1

    def _flush_logs(self, t_start: float, step_start: int, extra: dict[str, float] | None = None) -> dict[str, Any]:
        """Average the interval's diagnostics over steps and processes, check them, append to the JSONL log."""
        acc = self.accelerator
        keys = sorted(self._sums)
        stacked = acc.reduce(torch.stack([self._sums[k] for k in keys]), reduction="mean")
        values = (stacked / max(self._count, 1)).tolist()
        record = {"step": self.step, **dict(zip(keys, values)), **(extra or {}), "lr": lr_at(self.step - 1, self.cfg)}
        elapsed = time.perf_counter() - t_start
        record["samples_per_s"] = (self.step - step_start) * self.cfg.batch_size * acc.num_processes / max(elapsed, 1e-9)
        self._sums, self._count = {}, 0
        if not all(math.isfinite(v) for v in values):
            last = latest_checkpoint(checkpoints_dir(self.run_dir))
            raise TrainingDiverged(
                f"non-finite training diagnostics at step {self.step} ({dict(zip(keys, values))}); "
                f"stopped without saving. Last good checkpoint: {last or 'none yet'}. "
                "Try a lower train.lr, train.grad_clip>0, or train.mixed_precision=no.")
        if acc.is_main_process:
            with open(metrics_path(self.run_dir), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.cfg.trackers:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    def fit(self) -> dict[str, Any]:
        """Train until `cfg.steps`, logging and checkpointing; Ctrl-C saves a checkpoint to resume from."""
        acc, cfg = self.accelerator, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process),
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        record: dict[str, Any] = {}
        t_start, step_start = time.perf_counter(), self.step
        with _deferred_interrupt() as interrupted:
            while self.step < cfg.steps:
                self._train_step()
                bar.update(1)
                validated = {}
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    validated = self._validate_and_keep_best()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or validated:
                    record = self._flush_logs(t_start, step_start, validated)
                    t_start, step_start = time.perf_counter(), self.step
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if interrupted():
                    bar.close()
                    self.save()
                    acc.print(f"interrupted at step {self.step}; checkpoint saved, {resume_remedy()}")
                    raise KeyboardInterrupt
                if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
        bar.close()
        self.save()
        return record


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn the first SIGINT/SIGTERM into a flag checked between steps (a second one stops at once)."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: object) -> None:
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(hit)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
