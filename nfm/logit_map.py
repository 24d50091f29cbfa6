"""The logit map of dequantized images (RealNVP's preprocessing), shared by the flows that offer it.

    v = logit(s),   s = a + (1 - 2a) (x + 1) / 2,   x in [-1, 1] (model scale), 0 < a < 1/2

Per value dv/dx = (1 - 2a) / (2 s (1 - s)), so log|det dv/dx| = sum_i [log((1 - 2a)/2) - log s_i - log(1 - s_i)]
in nats. The map is a bijection from |x| < 1 + 2a / (1 - 2a) onto the real line: a flow on v, plus this
log-determinant, is a density on that interval that integrates to one, and dequantized data in [-1, 1] lies
inside it. a = 0 turns the map off (v = x, log-det 0). With a = 0.001 the near-empty background cells of an
image land far in the tails (logit(0.001) = -6.9), which an affine flow on [-1, 1] would otherwise spend its
first thousand steps learning to compress.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_logit_alpha(family: str, alpha: float, eta: float) -> None:
    """Refuse an `alpha` outside [0, 0.5), or alpha > 0 with training noise eta > 0 (x + eta*eps leaves [-1, 1])."""
    if not 0 <= alpha < 0.5:
        raise ValueError(f"{family} logit_alpha {alpha} must lie in [0, 0.5) (0 turns the logit map off)")
    if alpha and eta:
        raise ValueError(f"{family} logit_alpha {alpha} needs eta 0: x + eta*eps leaves [-1, 1], where "
                         "the logit map is undefined; use it for dequantized likelihood recipes")


def to_logit(x: Tensor, alpha: float, family: str) -> tuple[Tensor, Tensor]:
    """Data x (B, *shape) -> v = logit(s) (same shape, fp32 or fp64) and log|det dv/dx| (B,) in nats.

    Raises ValueError naming `family` (the flow, for the message) when alpha > 0 and x leaves [-1, 1].
    """
    x = x if x.dtype == torch.float64 else x.float()
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if not alpha:
        return x, logdet
    s = alpha + (1 - 2 * alpha) * (x + 1) / 2
    if s.amin() <= 0 or s.amax() >= 1:
        raise ValueError(f"{family} with model.logit_alpha {alpha} needs data in [-1, 1] (dequantized images), "
                         f"got values in [{x.amin().item():.4g}, {x.amax().item():.4g}]")
    log_jac = math.log((1 - 2 * alpha) / 2) - torch.log(s) - torch.log1p(-s)
    return torch.logit(s), logdet + log_jac.flatten(1).sum(1)


def from_logit(v: Tensor, alpha: float) -> Tensor:
    """The inverse of `to_logit`: x = 2 (sigmoid(v) - a) / (1 - 2a) - 1 (identity when a = 0)."""
    return v if not alpha else 2 * (torch.sigmoid(v) - alpha) / (1 - 2 * alpha) - 1
