"""NFM coupling: the noise a normalizing-flow teacher assigns to each data point.

    z = f_teacher(x + eta * eps') / sigma_f

`eta` is the teacher's own training noise (saved in its model config) and `sigma_f` the RMS of teacher
outputs over the first `SIGMA_POINTS` training images (draw 0), estimated once. The student's data
endpoint is the clean x.

A pair is addressed by (image index i, draw d): eps' comes from a generator seeded by
(teacher_seed, i, d), so each pair is a function of (i, d) and the teacher alone. Every training step
picks B addresses with the step's generator; `online` mode encodes them with the frozen teacher (no
grad, optional bf16), `precomputed` mode reads the same pairs from the cache that
`flowdistill couplings RECIPE` writes (`nfm.coupling_cache`). With `teacher_draws: 0`, online mode
draws fresh eps' at every step instead.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nfm.couplings import COUPLINGS, Coupling
from nfm.tarflow import TarFlow
from shared.checkpoint import sha256_file
from shared.rundir import config_path
from shared.run import evaluation_weights, load_run

SIGMA_POINTS = 4096  # training images (draw 0) whose teacher outputs define sigma_f
TEACHER_MODES = ("online", "precomputed")
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TeacherHandle:
    """A frozen TarFlow teacher with what identifies it: run directory, step and weights hash."""

    flow: TarFlow
    run_dir: Path
    step: int
    weights_sha256: str
    data_fingerprint: str

    @property
    def eta(self) -> float:
        """The noise level the teacher was trained with (its couplings must use the same)."""
        return float(self.flow.eta)


def load_teacher(run_dir: str | Path, device: torch.device | str = "cpu") -> TeacherHandle:
    """Load a teacher run's EMA weights (frozen, eval mode) and the hash of the file they came from."""
    run_dir = Path(run_dir)
    if not str(run_dir) or not config_path(run_dir).is_file():
        raise ValueError(f"coupling nf_teacher needs method.teacher = a trained teacher run directory "
                         f"(from `flowdistill train recipes/.../teacher.yaml`); {str(run_dir)!r} is not one")
    run = load_run(run_dir, device=device)
    if not isinstance(run.model, TarFlow):
        raise ValueError(f"method.teacher={run_dir} is a {run.config.model.name} run; nf_teacher needs a tarflow teacher")
    path, _ = evaluation_weights(run_dir)
    run.model.requires_grad_(False)
    return TeacherHandle(run.model, run_dir, run.step, sha256_file(path), run.dataset.fingerprint)


def pair_seed(seed: int, index: int, draw: int) -> int:
    """The generator seed of eps' for image `index`, draw `draw` (independent of batch and process)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pair_noise(seed: int, index: Tensor, draw: Tensor, shape: tuple[int, ...]) -> Tensor:
    """eps' (B, *shape) on the CPU for the addresses (index[b], draw[b])."""
    out = torch.empty(len(index), *shape)
    gen = torch.Generator()
    for row, (i, d) in enumerate(zip(index.tolist(), draw.tolist())):
        gen.manual_seed(pair_seed(seed, i, d))
        out[row] = torch.randn(shape, generator=gen)
    return out


@torch.no_grad()
def teacher_encode(flow: TarFlow, x: Tensor, dtype: str = "fp32", batch_size: int = 256) -> Tensor:
    """f_teacher(x) for perturbed inputs x (B, *shape) on the teacher's device, fp32 out; bf16 runs the transformers."""
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"method.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    device = next(flow.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        # fp32 also switches off an autocast the trainer may have opened around the loss
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            z, _ = flow.encode(x[start:start + batch_size].to(device).float())
        out.append(z.float())
    return torch.cat(out).to(x.device)


def perturbed(data: Tensor, index: Tensor, draw: Tensor, eta: float, seed: int) -> Tensor:
    """x_i + eta * eps'(i, d): the teacher's input for each address, on data's device."""
    noise = pair_noise(seed, index.cpu(), draw.cpu(), tuple(data.shape[1:])).to(data.device, data.dtype)
    return data[index.to(data.device)] + eta * noise


def estimate_sigma(z_draw0: Tensor) -> float:
    """sigma_f: RMS over all entries of teacher outputs (images 0..SIGMA_POINTS-1, draw 0)."""
    return float(z_draw0.double().pow(2).mean().sqrt())


def sigma_points(n: int) -> int:
    """How many training images define sigma_f."""
    return min(n, SIGMA_POINTS)


class NFTeacherCoupling(Coupling):
    """NFM: pairs the clean x_i with z = f_teacher(x_i + eta eps'(i, d)) / sigma_f for addresses (i, d)."""

    name = "nf_teacher"

    def __init__(self, teacher: TeacherHandle, data: Tensor, mode: str = "online", draws: int = 4, seed: int = 0,
                 dtype: str = "fp32", batch_size: int = 256, cache_dir: str | Path | None = None,
                 cache_spec: dict[str, Any] | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"method.teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
        if draws < 0 or (mode == "precomputed" and draws == 0):
            raise ValueError(f"method.teacher_draws must be >= 1 for a precomputed cache (>= 0 online), got {draws}")
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"method.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
        self.teacher, self.data = teacher, data
        self.mode, self.draws, self.seed, self.dtype, self.batch_size = mode, draws, seed, dtype, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_spec = cache_spec
        self.sigma: float | None = None
        self._cache: Tensor | None = None  # precomputed f_teacher outputs (N, draws, *shape)

    @classmethod
    def from_config(cls, cfg: Any, dataset: Any = None, run_cfg: Any = None) -> "NFTeacherCoupling":
        from nfm.coupling_cache import cache_dir_of, cache_spec

        if dataset is None:
            raise ValueError("coupling nf_teacher needs the training data set")
        teacher = load_teacher(cfg.teacher)
        if teacher.data_fingerprint != dataset.fingerprint:
            raise ValueError(f"teacher {cfg.teacher} was trained on data {teacher.data_fingerprint}, this run's "
                             f"{dataset.name!r} data is {dataset.fingerprint}: NFM pairs must come from the same data "
                             f"(same data.* settings as the teacher recipe)")
        return cls(teacher, dataset.train, cfg.teacher_mode, cfg.teacher_draws, cfg.teacher_seed, cfg.teacher_dtype,
                   cfg.teacher_batch, cache_dir_of(cfg), cache_spec(teacher, dataset, cfg))

    def prepare(self, device: torch.device | str) -> None:
        """Move teacher and data to `device`; estimate sigma_f (online) or load and check the cache."""
        device = torch.device(device)
        if self.data.device != device:
            self.data = self.data.to(device)
        if self.mode == "online":
            self.teacher.flow.to(device)
            if self.sigma is None:
                n = sigma_points(len(self.data))
                index = torch.arange(n)
                z = teacher_encode(self.teacher.flow, perturbed(self.data, index, torch.zeros_like(index),
                                                               self.teacher.eta, self.seed), self.dtype, self.batch_size)
                self.sigma = estimate_sigma(z)
            return
        if self._cache is None:
            from nfm.coupling_cache import load_cache

            self._cache, self.sigma = load_cache(self.cache_dir, self.cache_spec)
        if self._cache.device != device:
            self._cache = self._cache.to(device)

    def addresses(self, n: int, generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """(image index, draw) of n pairs drawn uniformly with the step's generator."""
        index = torch.randint(len(self.data), (n,), generator=generator, device=device)
        draw = torch.randint(max(self.draws, 1), (n,), generator=generator, device=device)
        return index, draw

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError("nf_teacher chooses which images it pairs: call pairs(x, generator)")

    @torch.no_grad()
    def pairs(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_i, z_i) for len(x) addresses; x gives only the batch size, device and dtype."""
        self.prepare(x.device)
        index, draw = self.addresses(len(x), generator, x.device)
        if self.mode == "precomputed":
            z = self._cache[index, draw]
        elif self.draws == 0:
            noise = torch.randn(len(x), *self.data.shape[1:], generator=generator, device=x.device)
            z = teacher_encode(self.teacher.flow, self.data[index] + self.teacher.eta * noise, self.dtype,
                               self.batch_size)
        else:
            z = teacher_encode(self.teacher.flow, perturbed(self.data, index, draw, self.teacher.eta, self.seed),
                               self.dtype, self.batch_size)
        return self.data[index].to(x.dtype), (z / self.sigma).to(x.dtype)


COUPLINGS["nf_teacher"] = NFTeacherCoupling

