"""The flow-matching loss used by every NFM student, whatever coupling supplies its noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nfm.couplings import build_coupling
from shared.config import RunConfig
from shared.data import Dataset
from shared.method import Method
from shared.paths import TIME_SAMPLERS, interpolate, sample_times, velocity_target
from shared.registry import register_method


@dataclass
class FlowMatchingConfig:
    """Flow matching with a chosen coupling: || v(x_t, t) - (z - x) ||^2."""

    name: str = "fm"
    coupling: str = "independent"  # noise source paired with each data point (nfm.couplings.COUPLINGS)
    time_sampler: str = "uniform"  # training-time distribution: uniform or logit_normal
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    ot_reg: float = 0.0  # minibatch_ot: entropic regularisation relative to the mean cost (0: exact ot.emd)
    sdot_potential: str = ""  # semidiscrete_ot: potential file (default <run dir>/couplings/sdot_potential.safetensors)
    sdot_iters: int = 2000  # semidiscrete_ot: stochastic-ascent iterations of the dual fit
    sdot_batch: int = 4096  # semidiscrete_ot: noise samples per fit iteration
    sdot_lr: float = 0.01  # semidiscrete_ot: Adam step of the fit, relative to the data's RMS norm
    sdot_chunk: int = 8192  # semidiscrete_ot: data points per matmul block of the inner-product search
    teacher: str = ""  # nf_teacher: run directory of the trained tarflow teacher (its eta is reused)
    teacher_mode: str = "online"  # nf_teacher: online (encode each batch) or precomputed (`flowdistill couplings`)
    teacher_draws: int = 4  # nf_teacher: eps' draws per image; online only: 0 = fresh eps' every step
    teacher_seed: int = 0  # nf_teacher: seed of the eps' draws (not the run seed, so students share one cache)
    teacher_dtype: str = "fp32"  # nf_teacher: fp32 or bf16 teacher encodes
    teacher_batch: int = 256  # nf_teacher: images per teacher encode
    teacher_shard: int = 1024  # nf_teacher: images per cache shard file
    teacher_cache: str = ""  # nf_teacher: cache folder (default <teacher run>/couplings/nf_teacher-d<draws>-s<seed>)


class FlowMatchingLoss(Method):
    """Mean squared error between the model velocity at x_t and the conditional velocity z - x."""

    def __init__(self, cfg: FlowMatchingConfig, dataset: Dataset | None = None, run_cfg: RunConfig | None = None):
        if cfg.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown method.time_sampler {cfg.time_sampler!r}; choices: {', '.join(TIME_SAMPLERS)}")
        self.cfg = cfg
        self.coupling = build_coupling(cfg.coupling, cfg, dataset, run_cfg)

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        x, z = self.coupling.pairs(batch[0], generator)
        t = sample_times(x.shape[0], self.cfg.time_sampler, x.device, generator, self.cfg.time_mean, self.cfg.time_std)
        v = model(interpolate(x, z, t), t)
        loss = (v.float() - velocity_target(x, z).float()).pow(2).mean()
        return loss, {}


@register_method("fm", FlowMatchingConfig)
def build_flow_matching(cfg: FlowMatchingConfig, run_cfg, dataset) -> FlowMatchingLoss:
    """Registry builder for `method.name: fm`."""
    return FlowMatchingLoss(cfg, dataset, run_cfg)
