"""The project's one rule for "beats": when a comparison is a win, a tie or a loss.

Every comparison flowdistill states (the pipeline's Findings, `flowdistill compare`, the docs) is decided
here, from the repeated measurements of each side (seeds, or teacher runs where those vary):

    A beats B  <=>  A's mean is better than B's, and a one-sided Welch t-test of "A better than B"
                    rejects at ALPHA = 0.05.

With one value on one side (a single teacher) and at least two on the other, the test is the one-sample
t-test of the repeated side against that value; with one value on both sides there is no spread to test
against, and the comparison is a tie unless the quantity is exact (`exact=True`: a deterministic quantity
such as a parameter count). A comparison that is not a win either way is a **tie**: never call
it a win in code, report or docs.

Verdicts of a claim "A better than B": `holds` (A beats B), `tie`, `fails` (B beats A). A claim of
agreement ("A within tol of B") holds when |A - B| <= tol.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from scipy import stats

ALPHA = 0.05  # one-sided level of the Welch test
HOLDS, TIE, FAILS = "holds", "tie", "fails"


@dataclass(frozen=True)
class Side:
    """Repeated measurements of one side of a comparison, as mean, sample std (ddof 1) and count."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Side":
        """The side of raw values (seeds, runs)."""
        values = [float(v) for v in values]
        if not values:
            raise ValueError("a side of a comparison needs at least one value")
        n = len(values)
        mean = math.fsum(values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n)

    def text(self, digits: int = 4) -> str:
        """`mean ± std (n)`, or the mean alone for one value."""
        return f"{self.mean:.{digits}g} ± {self.std:.2g} (n={self.n})" if self.n > 1 else f"{self.mean:.{digits}g}"


def p_better(a: Side, b: Side, lower_is_better: bool = True) -> float | None:
    """One-sided p-value of "A better than B" (Welch; one-sample when one side has one value); None when untestable."""
    sign = 1.0 if lower_is_better else -1.0
    diff = sign * (a.mean - b.mean)  # < 0 when A is better
    if a.n >= 2 and b.n >= 2:
        var = a.std ** 2 / a.n + b.std ** 2 / b.n
        if var == 0.0:
            return 0.0 if diff < 0 else 1.0
        df = var ** 2 / ((a.std ** 2 / a.n) ** 2 / (a.n - 1) + (b.std ** 2 / b.n) ** 2 / (b.n - 1))
    elif a.n >= 2 or b.n >= 2:
        repeated = a if a.n >= 2 else b
        var, df = repeated.std ** 2 / repeated.n, repeated.n - 1
        if var == 0.0:
            return 0.0 if diff < 0 else 1.0
    else:
        return None
    return float(stats.t.cdf(diff / math.sqrt(var), df))


def decide(a: Side, b: Side, lower_is_better: bool = True, exact: bool = False) -> str:
    """`holds` if A beats B, `fails` if B beats A, else `tie` (the module's rule)."""
    if exact and a.n == 1 and b.n == 1:
        if a.mean == b.mean:
            return TIE
        return HOLDS if (a.mean < b.mean) == lower_is_better else FAILS
    p_a, p_b = p_better(a, b, lower_is_better), p_better(b, a, lower_is_better)
    if p_a is not None and p_a < ALPHA:
        return HOLDS
    if p_b is not None and p_b < ALPHA:
        return FAILS
    return TIE


@dataclass(frozen=True)
class Finding:
    """One line of a report's Findings: a claim, its two sides, the verdict and what the numbers mean."""

    claim: str  # e.g. "NFM beats the best OT coupling at 2 NFE"
    a_label: str
    a: Side | None
    b_label: str
    b: Side | None
    verdict: str  # holds | tie | fails
    unit: str = ""
    note: str = ""  # how the verdict was reached (the test, a tolerance, a speed-up)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        sides = {k: Side(**data[k]) if data.get(k) else None for k in ("a", "b")}
        return cls(**{**data, **sides})


def better_claim(claim: str, a_label: str, a_values: Sequence[float], b_label: str, b_values: Sequence[float],
                 unit: str, lower_is_better: bool = True) -> Finding:
    """A claim "A better than B" decided by the rule, with the test's p-value in the note."""
    a, b = Side.of(a_values), Side.of(b_values)
    verdict = decide(a, b, lower_is_better)
    p = p_better(a, b, lower_is_better)
    note = ("one value per side: no spread to test, a tie by the rule" if p is None
            else f"one-sided Welch p = {p:.3g} (win when < {ALPHA})")
    return Finding(claim, a_label, a, b_label, b, verdict, unit, note)


def within_claim(claim: str, a_label: str, a: float, b_label: str, b: float, tolerance: float, unit: str,
                 spread: float | None = None) -> Finding:
    """A claim of agreement: holds when |a - b| <= tolerance, else fails (`spread` shown with A when known)."""
    verdict = HOLDS if abs(a - b) <= tolerance else FAILS
    side_a = Side(a, spread or 0.0, 1)
    return Finding(claim, a_label, side_a, b_label, Side(b, 0.0, 1), verdict, unit,
                   f"absolute difference {abs(a - b):.3g} {unit} against a tolerance of {tolerance:g} {unit}")
