"""NFM couplings: the noise a normalizing-flow teacher assigns to each data point, and its OT variant.

    nf_teacher      z = f_teacher(x_i + eta * eps'(i, d)) / sigma_f     (NFM; `nfm.teacher_pairs`; a dequantized
                    likelihood teacher gets uniform cell noise instead, as it was trained)
    nf_teacher_ot   the same teacher latents for a batch, then fresh eps ~ N(0, I) re-paired with them
                    by the exact minibatch OT assignment on |z_i - eps_j|^2: the student's noise has
                    exactly the N(0, I) marginal it starts from at sampling time, and keeps the pairing's
                    structure (NFM-OT)

A pair is addressed by (image index i, draw d). Every training step picks B addresses with the step's
generator; `online` mode encodes them with the frozen teacher (no grad, optional bf16), `precomputed`
mode reads the same pairs from the cache that `flowdistill couplings RECIPE` writes
(`nfm.coupling_cache`). With `draws: 0`, online mode draws fresh eps' at every step instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nfm.coupling_cache import cache_dir_of, cache_spec, load_cache
from nfm.couplings import Coupling, CouplingConfig, exact_assignment, squared_costs
from nfm.teacher_pairs import NOISE_LAWS, TEACHER_DTYPES, TeacherHandle, load_teacher, perturbed, teacher_encode, teacher_sigma
from shared.catalog import BuildContext
from shared.run_build import require_same_data

TEACHER_MODES = ("online", "precomputed")


@dataclass
class NFTeacherConfig(CouplingConfig):
    """`coupling: {name: nf_teacher | nf_teacher_ot, teacher: RUN, ...}`: pairs from a trained flow teacher."""

    name: str = "nf_teacher"
    teacher: str = ""  # run directory of the trained flow teacher (its eta is reused)
    mode: str = "online"  # online (encode each batch) or precomputed (`flowdistill couplings`)
    draws: int = 4  # eps' draws per image; online only: 0 = fresh eps' every step
    seed: int = 0  # seed of the eps' draws (not the run seed, so students share one cache)
    dtype: str = "fp32"  # fp32 or bf16 teacher encodes
    batch: int = 256  # images per teacher encode
    shard: int = 1024  # images per cache shard file
    cache: str = ""  # cache folder (default <teacher run>/couplings/nf_teacher-d<draws>-s<seed>[-<weights>])
    weights: str = "auto"  # teacher weights: auto (best on validation, else EMA), best, ema (final EMA), model

    def data_noise(self) -> str:
        """The coupling draws its own data perturbation (the teacher's input: x + eta*eps', or cell noise)."""
        return "the teacher's input: x + eta*eps', or x + cell noise for a dequantized teacher"

    def run_dependencies(self) -> dict[str, str]:
        """The teacher run the pairs come from (needed for training only, never for sampling)."""
        return {"teacher": self.teacher}


class NFTeacherCoupling(Coupling):
    """NFM: pairs the clean x_i with z = f_teacher(x_i + eta eps'(i, d)) / sigma_f for addresses (i, d)."""

    name = "nf_teacher"

    def __init__(self, teacher: TeacherHandle, data: Tensor, mode: str = "online", draws: int = 4, seed: int = 0,
                 dtype: str = "fp32", batch_size: int = 256, cache_dir: str | Path | None = None,
                 cache_spec: dict[str, Any] | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"method.coupling.mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
        if draws < 0 or (mode == "precomputed" and draws == 0):
            raise ValueError(f"method.coupling.draws must be >= 1 for a precomputed cache (>= 0 online), got {draws}")
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"method.coupling.dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
        self.teacher, self.data = teacher, data
        self.mode, self.draws, self.seed, self.dtype, self.batch_size = mode, draws, seed, dtype, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_spec = cache_spec
        self.sigma: float | None = None
        self._cache: Tensor | None = None  # precomputed f_teacher outputs (N, draws, *shape)

    @classmethod
    def from_config(cls, cfg: NFTeacherConfig, ctx: BuildContext | None = None) -> "NFTeacherCoupling":
        if ctx is None:
            raise ValueError(f"coupling {cfg.name} needs the training data set and a run loader")
        teacher = load_teacher(cfg.teacher, ctx.load_run, weights=cfg.weights)
        require_same_data(cfg.teacher, teacher.data_fingerprint, ctx.dataset, "method.coupling.teacher")
        return cls(teacher, ctx.dataset.train, cfg.mode, cfg.draws, cfg.seed, cfg.dtype, cfg.batch,
                   cache_dir_of(cfg), cache_spec(teacher, ctx.dataset, cfg))

    def prepare(self, device: torch.device | str) -> None:
        """Move teacher and data to `device`; estimate sigma_f (online) or load and check the cache."""
        device = torch.device(device)
        if self.data.device != device:
            self.data = self.data.to(device)
        if self.mode == "online":
            self.teacher.flow.to(device)
            if self.sigma is None:
                self.sigma = teacher_sigma(self.teacher, self.data, self.seed, self.dtype, self.batch_size)
            return
        if self._cache is None:
            self._cache, self.sigma = load_cache(self.cache_dir, self.cache_spec)
        if self._cache.device != device:
            self._cache = self._cache.to(device)

    def addresses(self, n: int, generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """(image index, draw) of n pairs drawn uniformly with the step's generator."""
        index = torch.randint(len(self.data), (n,), generator=generator, device=device)
        draw = torch.randint(max(self.draws, 1), (n,), generator=generator, device=device)
        return index, draw

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"{self.name} chooses which images it pairs: call pairs(x, generator)")

    @torch.no_grad()
    def pairs(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_i, z_i) for len(x) addresses; x gives only the batch size, device and dtype."""
        self.prepare(x.device)
        index, draw = self.addresses(len(x), generator, x.device)
        if self.mode == "precomputed":
            z = self._cache[index, draw]
        elif self.draws == 0:
            law = NOISE_LAWS[self.teacher.noise_kind]
            noise = law(len(x), *self.data.shape[1:], generator=generator, device=x.device)
            z = teacher_encode(self.teacher.flow, self.teacher.perturb(self.data[index], noise), self.dtype,
                               self.batch_size)
        else:
            z = teacher_encode(self.teacher.flow, perturbed(self.data, index, draw, self.teacher, self.seed),
                               self.dtype, self.batch_size)
        return self.data[index].to(x.dtype), (z / self.sigma).to(x.dtype)


class NFTeacherOTCoupling(NFTeacherCoupling):
    """NFM-OT: fresh N(0, I) noise re-paired with the teacher latents of the batch by exact minibatch OT.

    For the batch's teacher latents z_i (already divided by sigma_f) and fresh eps_j ~ N(0, I), the
    student trains on (x_i, eps_{pi(i)}) with pi = argmin_pi sum_i |z_i - eps_{pi(i)}|^2 (`ot.emd`).
    """

    name = "nf_teacher_ot"

    @torch.no_grad()
    def pairs(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_i, eps_{pi(i)}): a permutation of a Gaussian batch, assigned by OT against the teacher latents."""
        data, z = super().pairs(x, generator)
        eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        perm = torch.from_numpy(exact_assignment(squared_costs(z, eps))).to(z.device)
        return data, eps[perm]

