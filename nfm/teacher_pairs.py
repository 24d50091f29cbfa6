"""The teacher side of NFM pairs: a frozen flow, the addressed noise eps'(i, d), encodes and sigma_f.

    z = f_teacher(x~_i(d)) / sigma_f,   x~_i(d) = x_i + eta * eps'(i, d)            (a noise-trained teacher)
                                        x~_i(d) = x_i + (u'(i, d) - 1/2) * 2 / L      (a dequantized one, eta = 0)

The teacher's input is perturbed exactly as the teacher was trained: Gaussian noise of its own `eta`
(saved in its model config), or, for a likelihood teacher trained on uniformly dequantized images
(`method.dequantize`), uniform noise over the pixel's cell of width 2 / L (L quantisation levels). Its
latents then follow the density it was fitted to; a cell centre x_i alone is a point the teacher never
saw. `sigma_f` is the RMS of the teacher outputs over the first `SIGMA_POINTS` training images (draw 0).
eps'(i, d) and u'(i, d) come from a generator seeded by (seed, i, d), so a pair is a function of its
address and the teacher alone: the online coupling and the precomputed cache (`nfm.coupling_cache`)
produce the same pairs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from nfm.flow_interface import FlowTeacher
from nfm.tarflow import encode_batched
from shared.rundir import config_path

SIGMA_POINTS = 4096  # training images (draw 0) whose teacher outputs define sigma_f
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TeacherHandle:
    """A frozen flow teacher with what identifies it: run directory, step, weights hash and data."""

    flow: nn.Module  # a normalizing flow implementing `nfm.flow_interface.FlowTeacher` (TarFlow, Glow)
    run_dir: Path
    step: int
    weights_sha256: str
    data_fingerprint: str
    dequantize_levels: int | None = None  # L of a teacher trained on uniformly dequantized images, else None

    @property
    def eta(self) -> float:
        """The noise level the teacher was trained with (its couplings must use the same)."""
        return float(self.flow.eta)

    def perturb(self, x: Tensor, noise: Tensor) -> Tensor:
        """The teacher's training input for clean x (B, *shape): x + eta * noise (noise ~ N(0, I)), or for a
        dequantized teacher x + (noise - 1/2) * 2 / L (noise ~ U[0, 1)); see `noise_kind`."""
        if self.dequantize_levels is not None:
            return x + (noise - 0.5) * (2.0 / self.dequantize_levels)
        return x + self.eta * noise

    @property
    def noise_kind(self) -> str:
        """The law of the noise `perturb` takes: "uniform" for a dequantized teacher, else "gaussian"."""
        return "uniform" if self.dequantize_levels is not None else "gaussian"


def load_teacher(run_dir: str | Path, load_run: Callable[..., Any], device: torch.device | str = "cpu",
                 weights: str = "auto") -> TeacherHandle:
    """Load a teacher run's weights (frozen, eval mode) and the hash of the file they came from; `weights` as
    in `shared.rundir.weights_file`: auto (best on validation, else EMA), best, ema (final EMA), model."""
    given = str(run_dir)
    if not given or (":" not in given and not config_path(given).is_file()):
        raise ValueError("an NFM coupling needs method.coupling.teacher = a trained teacher run directory "
                         "(from `flowdistill train recipes/.../teacher.yaml`) or a shipped one (pretrained:<name>); "
                         + (f"{given!r} is not one" if given else "it is not set"))
    run = load_run(given, weights=weights, device=device)
    return teacher_of_run(run, run.dir)


def teacher_of_run(run: Any, run_dir: str | Path) -> TeacherHandle:
    """The teacher handle of a run already loaded from `run_dir` (its model frozen here); the weights' digest
    is the one its load verified."""
    run_dir = Path(run_dir)
    if not isinstance(run.model, FlowTeacher):
        raise ValueError(f"method.coupling.teacher={run_dir} is a {run.config.model.name} run; "
                         "NFM couplings need a normalizing-flow teacher")
    run.model.requires_grad_(False)
    levels = run.dataset.levels if getattr(run.config.method, "dequantize", False) else None
    return TeacherHandle(run.model, run_dir, run.step, run.weights_sha256, run.dataset.base_fingerprint, levels)


def pair_seed(seed: int, index: int, draw: int) -> int:
    """The generator seed of eps' for image `index`, draw `draw` (independent of batch and process)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


NOISE_LAWS = {"gaussian": torch.randn, "uniform": torch.rand}


def pair_noise(seed: int, index: Tensor, draw: Tensor, shape: tuple[int, ...], kind: str = "gaussian") -> Tensor:
    """eps' ~ N(0, I) (or u' ~ U[0, 1) with kind="uniform"), (B, *shape) on the CPU, for the addresses
    (index[b], draw[b])."""
    law = NOISE_LAWS[kind]
    out = torch.empty(len(index), *shape)
    gen = torch.Generator()
    for row, (i, d) in enumerate(zip(index.tolist(), draw.tolist())):
        gen.manual_seed(pair_seed(seed, i, d))
        out[row] = law(shape, generator=gen)
    return out


def teacher_encode(flow: nn.Module, x: Tensor, dtype: str = "fp32", batch_size: int = 256) -> Tensor:
    """f_teacher(x) (B, *shape), fp32 on x's device, for perturbed inputs x; bf16 runs the transformers."""
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"method.coupling.dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    # fp32 also switches off an autocast the trainer may have opened around the loss
    with torch.autocast(x.device.type, enabled=False):
        return encode_batched(flow, x.float(), batch_size=batch_size, dtype=TEACHER_DTYPES[dtype])[0]


def perturbed(data: Tensor, index: Tensor, draw: Tensor, teacher: TeacherHandle, seed: int) -> Tensor:
    """x~_i(d), the teacher's input for each address (B, *shape), on data's device (`TeacherHandle.perturb`)."""
    noise = pair_noise(seed, index.cpu(), draw.cpu(), tuple(data.shape[1:]), teacher.noise_kind)
    return teacher.perturb(data[index.to(data.device)], noise.to(data.device, data.dtype))


def estimate_sigma(z_draw0: Tensor) -> float:
    """sigma_f: RMS over all entries of teacher outputs (images 0..SIGMA_POINTS-1, draw 0)."""
    return float(z_draw0.double().pow(2).mean().sqrt())


def sigma_points(n: int) -> int:
    """How many training images define sigma_f."""
    return min(n, SIGMA_POINTS)


def teacher_sigma(teacher: TeacherHandle, data: Tensor, seed: int, dtype: str = "fp32", batch_size: int = 256
                  ) -> float:
    """sigma_f computed by encoding draw 0 of the first `sigma_points(N)` images of `data`."""
    index = torch.arange(sigma_points(len(data)))
    z = teacher_encode(teacher.flow, perturbed(data, index, torch.zeros_like(index), teacher, seed), dtype, batch_size)
    return estimate_sigma(z)
