"""An ensemble of velocity fields trained apart: their average is one velocity field.

    v_bar(x, t) = (1 / M) * sum_m v_m(x, t),    div v_bar = (1 / M) * sum_m div v_m

Members are trained as separate runs (one seed each) and gathered by `flowdistill ensemble`; the averaged field
is an ordinary velocity field, so its ODE samples, its ODE likelihood and any distillation from it (a flow-map
teacher) work unchanged. Averaging fields that each estimate the data's field from the same finite sample
lowers the part of their error that differs between seeds; on tabular data with few rows per dimension that
part dominates the likelihood gap (docs/likelihood.md). Training a `model.name: ensemble` directly fits the
members jointly to the loss of their mean, which is one wide network, not an ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from shared.backbones import MLPConfig


@dataclass
class EnsembleConfig:
    """M copies of one velocity-field architecture whose outputs are averaged."""

    name: str = "ensemble"
    size: int = 3  # number of members M
    member: Any = field(default_factory=MLPConfig)  # every member's model section {name: mlp | unet | dit, ...}


class EnsembleField(nn.Module):
    """Mean of member velocity fields: x (B, *shape), t (B,) -> (B, *shape); weights named members.<m>.<name>."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, return_features: bool = False) -> Tensor:
        if s is not None or return_features:
            raise ValueError("an ensemble of velocity fields takes (x, t) only: no second time s and no features")
        return sum(member(x, t) for member in self.members) / len(self.members)


def build_ensemble(cfg: EnsembleConfig, data_shape: tuple[int, ...],
                   members: Mapping[str, Callable[[Any, tuple[int, ...]], nn.Module]]) -> EnsembleField:
    """`cfg.size` members built by `members[cfg.member.name]` (the application's velocity-field table)."""
    name = getattr(cfg.member, "name", None)
    if name not in members:
        raise ValueError(f"model.member must be one of {', '.join(members)}, got {cfg.member!r}")
    if cfg.size < 2:
        raise ValueError(f"model.size={cfg.size} is too small: an ensemble averages at least 2 members")
    return EnsembleField([members[name](cfg.member, data_shape) for _ in range(cfg.size)])
