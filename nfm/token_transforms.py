"""The elementwise map a TarFlow block applies to each token value, given parameters from earlier tokens.

`affine` (TarFlow's own):  z = (x - mu) * exp(-alpha),           log|dz/dx| = -alpha.
`spline`: the affine map followed by a monotone rational-quadratic spline s (Durkan et al., 2019)
with K bins on [-B, B] and the identity (linear tails) outside,
    z = s((x - mu) * exp(-alpha)),   log|dz/dx| = -alpha + log s'((x - mu) * exp(-alpha)).
One value's parameters are (alpha, mu) for affine and (alpha, mu, K widths, K heights, K - 1 interior
derivatives) for spline; a block's output holds them as (P, d) per token, P the count per value.
All-zero parameters give the identity for both (the derivative inputs are offset so that a zero
input means slope 1), so a block whose output projection starts at zero starts as the identity.
The spline itself is normflows' `unconstrained_rational_quadratic_spline`, which has an analytic
inverse; the log-determinant stays in the dtype of the inputs (fp64 for Jacobian checks).
"""
from __future__ import annotations

import math

from normflows.utils.splines import DEFAULT_MIN_DERIVATIVE, unconstrained_rational_quadratic_spline
from torch import Tensor

TRANSFORMS = ("affine", "spline")
_UNIT_SLOPE = math.log(math.expm1(1 - DEFAULT_MIN_DERIVATIVE))  # softplus(c) + min_derivative = 1


def params_per_value(transform: str, bins: int) -> int:
    """P, the number of predicted parameters per token value: 2 (affine) or 3K + 1 (spline with K bins)."""
    if transform == "affine":
        return 2
    if transform == "spline":
        return 3 * bins + 1
    raise ValueError(f"tarflow transform must be one of {TRANSFORMS}, got {transform!r}")


def _split(params: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Parameters (..., P, d) -> alpha, mu (..., d) and spline widths, heights (..., d, K), slopes (..., d, K-1)."""
    alpha, mu = params[..., 0, :], params[..., 1, :]
    rest = params[..., 2:, :].movedim(-2, -1)
    widths, heights, slopes = rest[..., :bins], rest[..., bins:2 * bins], rest[..., 2 * bins:]
    return alpha, mu, widths, heights, slopes + _UNIT_SLOPE


def forward(x: Tensor, params: Tensor, transform: str, bins: int, bound: float) -> tuple[Tensor, Tensor]:
    """Token values x (..., d) and parameters (..., P, d) -> z (..., d) and log|dz/dx| (..., d) in nats."""
    if transform == "affine":
        alpha, mu = params[..., 0, :], params[..., 1, :]
        return (x - mu) * (-alpha).exp(), -alpha
    alpha, mu, widths, heights, slopes = _split(params, bins)
    u = (x - mu) * (-alpha).exp()
    z, logabsdet = unconstrained_rational_quadratic_spline(u, widths, heights, slopes, inverse=False,
                                                           tails="linear", tail_bound=bound)
    return z, logabsdet - alpha


def inverse(z: Tensor, params: Tensor, transform: str, bins: int, bound: float) -> Tensor:
    """Invert `forward`: z (..., d) and the same parameters (..., P, d) -> x (..., d)."""
    if transform == "affine":
        alpha, mu = params[..., 0, :], params[..., 1, :]
        return z * alpha.exp() + mu
    alpha, mu, widths, heights, slopes = _split(params, bins)
    u, _ = unconstrained_rational_quadratic_spline(z, widths, heights, slopes, inverse=True,
                                                   tails="linear", tail_bound=bound)
    return u * alpha.exp() + mu
