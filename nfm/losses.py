"""The flow-matching loss used by every NFM student, whatever coupling supplies its noise.

    L(theta) = E_{t, (x, z) ~ coupling} || v_theta(x_t, t) - (z - x) ||^2,    x_t = (1 - t) x + t z

in squared units of the data per dimension (a mean over batch and dimensions), t = 0 data, t = 1 noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from nfm.couplings import Coupling, IndependentConfig
from shared.catalog import BuildContext
from shared.method import VelocityFieldSampler
from shared.paths import TIME_SAMPLERS, interpolate, sample_times, velocity_target

_COUPLING_KEYS = {"ot_reg": "reg", "sdot_potential": "potential", "sdot_iters": "iters", "sdot_batch": "batch",
                  "sdot_lr": "lr", "sdot_chunk": "chunk", "teacher": "teacher", "teacher_mode": "mode",
                  "teacher_draws": "draws", "teacher_seed": "seed", "teacher_dtype": "dtype",
                  "teacher_batch": "batch", "teacher_shard": "shard", "teacher_cache": "cache"}


@dataclass
class FlowMatchingConfig:
    """Flow matching with a chosen coupling: || v(x_t, t) - (z - x) ||^2."""

    name: str = "fm"
    coupling: Any = field(default_factory=IndependentConfig)  # the noise source: {name: independent | minibatch_ot | ...}
    time_sampler: str = "uniform"  # training-time distribution: uniform or logit_normal
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        old: f"it is method.coupling.{new} now, inside the coupling's own section "
             f"(e.g. method: {{coupling: {{name: ..., {new}: ...}}}})" for old, new in _COUPLING_KEYS.items()}

    def data_noise(self) -> str:
        """What data noise the coupling draws itself ("" when it uses the batch as given)."""
        return self.coupling.data_noise() if hasattr(self.coupling, "data_noise") else ""

    def run_dependencies(self) -> dict[str, str]:
        """Runs the coupling reads during training (a teacher), by role."""
        return self.coupling.run_dependencies()


class FlowMatchingLoss:
    """Mean squared error between the model velocity at x_t and the conditional velocity z - x."""

    def __init__(self, cfg: FlowMatchingConfig, coupling: Coupling):
        if cfg.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown method.time_sampler {cfg.time_sampler!r}; choices: {', '.join(TIME_SAMPLERS)}")
        self.cfg, self.coupling = cfg, coupling

    def prepare(self, device: torch.device) -> None:
        """Set the coupling up on `device` before the first step (fit or load an OT potential, move a
        teacher), so that its cost is reported on its own rather than inside the first step's ETA."""
        prepare = getattr(self.coupling, "prepare", None)
        if prepare is not None:
            prepare(device)

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        x, z = self.coupling.pairs(batch[0], generator)
        t = sample_times(x.shape[0], self.cfg.time_sampler, x.device, generator, self.cfg.time_mean, self.cfg.time_std)
        v = model(interpolate(x, z, t), t)
        loss = (v.float() - velocity_target(x, z).float()).pow(2).mean()
        return loss, {}


def build_flow_matching_loss(cfg: FlowMatchingConfig, ctx: BuildContext) -> FlowMatchingLoss:
    """The `fm` method's loss with its coupling built from the `method.coupling` table."""
    return FlowMatchingLoss(cfg, ctx.build_nested("method.coupling", cfg.coupling))


def build_velocity_sampler(cfg: Any, run_cfg: Any, dataset: Any) -> VelocityFieldSampler:
    """The sampler of a velocity-field model: ODE sampling and ODE likelihood."""
    return VelocityFieldSampler()
