"""The pipeline's Findings: which of the project's claims hold on one run, computed from its evaluation JSON.

One `Finding` per claim, each decided by the one rule of `flowdistill.verdict`:

    NFM vs the best OT student, at each scored NFE <= 4      quality, per-seed values (Welch)
    the best NFM student at the largest NFE <= 4 vs teacher   quality (one-sample t-test against the teacher)
    speed-up at equal quality                                fewest NFE where NFM's mean reaches the teacher's
    F2D2 few-step NLL vs its ODE reference at K = 4          agreement within F2D2_TOLERANCE_BPD bits/dim
    compact flow vs its undistilled twin, and vs the control test NLL over seeds (Welch)
      that starts from the teacher's blocks without distillation

and the warnings of estimates whose own checks failed (an unconverged SD-OT fit, an F2D2 map whose mean
absolute error to its reference is above the tolerance, a teacher worse than its model card).
"""
from __future__ import annotations

import math
from typing import Any

from flowdistill.verdict import FAILS, HOLDS, Finding, Side, better_claim, decide, within_claim

NFM_COUPLINGS = ("nf_teacher", "nf_teacher_ot")  # students whose pairs come from the flow teacher
OT_COUPLINGS = ("minibatch_ot", "semidiscrete_ot")  # students paired by optimal transport
FINDING_NFE = (1, 2, 4)  # the few-step budgets the claims are about
F2D2_K = 4  # the few-step likelihood claim: K = 4 jumps
F2D2_TOLERANCE_BPD = 0.05  # bits/dim (images); nats per dimension for vector data
CARD_SLACK = 0.15  # a teacher more than 15 % worse than its model card's sample quality is flagged


def _rows(students: list[dict[str, Any]], coupling: str, nfe: int) -> list[dict[str, Any]]:
    return [r for r in students if r["student"] == coupling and r["nfe"] == nfe]


def _best(students: list[dict[str, Any]], couplings: tuple[str, ...], nfe: int) -> dict[str, Any] | None:
    """The row with the lowest mean quality among `couplings` at `nfe` (any solver and grid)."""
    rows = [r for c in couplings for r in _rows(students, c, nfe)]
    return min(rows, key=lambda r: r["mean"]) if rows else None


def _values(row: dict[str, Any]) -> list[float]:
    """Per-seed values of an aggregated student row (its mean alone when the row predates them)."""
    return list(row.get("values") or [row["mean"]])


def coupling_findings(result: dict[str, Any]) -> list[Finding]:
    """NFM vs the best OT student at each NFE, the NFM student vs its teacher, and the speed-up at equal quality."""
    students, teacher = result["students"], result["teacher"]
    metric = teacher["metric"].upper()
    out = []
    nfes = [n for n in FINDING_NFE if any(r["nfe"] == n for r in students)]
    for nfe in nfes:
        nfm, ot = _best(students, NFM_COUPLINGS, nfe), _best(students, OT_COUPLINGS, nfe)
        if nfm and ot:
            out.append(better_claim(f"NFM beats the best OT coupling at {nfe} NFE", nfm["student"], _values(nfm),
                                    ot["student"], _values(ot), metric))
    if nfes:
        nfe = max(nfes)
        nfm = _best(students, NFM_COUPLINGS, nfe)
        if nfm:
            out.append(better_claim(f"the NFM student at {nfe} NFE beats its teacher", nfm["student"], _values(nfm),
                                    f"teacher ({teacher['nfe']} NFE)", [teacher["value"]], metric))
    out += [f for f in [speedup_finding(students, teacher)] if f is not None]
    return out


def speedup_finding(students: list[dict[str, Any]], teacher: dict[str, Any]) -> Finding | None:
    """The fewest NFE at which an NFM student's mean quality reaches its teacher's (as in the reach table), and its
    sampling speed-up there: holds when it is faster, fails when slower or when no scored NFE reaches the teacher."""
    if not any(r["student"] in NFM_COUPLINGS for r in students):
        return None
    metric, teacher_side = teacher["metric"].upper(), Side.of([teacher["value"]])
    for nfe in sorted({r["nfe"] for r in students}):
        row = _best(students, NFM_COUPLINGS, nfe)
        if row is None or row["mean"] > teacher["value"]:
            continue
        speedup = teacher["seconds_per_sample"] / row["seconds_per_sample"]
        verdict = HOLDS if speedup > 1 else FAILS
        return Finding("NFM samples faster than its teacher at equal quality", f"{row['student']} at {nfe} NFE",
                       Side.of(_values(row)), f"teacher ({teacher['nfe']} NFE)", teacher_side, verdict, metric,
                       f"first NFE whose mean reaches the teacher's; {speedup:.3g}x the teacher's sampling speed "
                       f"({1000 * row['seconds_per_sample']:.3g} vs {1000 * teacher['seconds_per_sample']:.3g} ms a "
                       "sample)")
    best = min((r for r in students if r["student"] in NFM_COUPLINGS), key=lambda r: r["mean"])
    return Finding("NFM samples faster than its teacher at equal quality", f"{best['student']} at {best['nfe']} NFE",
                   Side.of(_values(best)), "teacher", teacher_side, FAILS, metric,
                   "no scored NFE reaches the teacher's quality")


def f2d2_findings(result: dict[str, Any]) -> list[Finding]:
    """Per F2D2 map: its few-step NLL at K = 4 against its own ODE reference (agreement within the tolerance)."""
    out = []
    for table in result.get("f2d2") or []:
        row = next((r for r in table["rows"] if r["K"] == F2D2_K), None)
        if row is None:
            continue
        few, ref, spread, unit = _per_dim(row, result)
        out.append(within_claim(f"F2D2 ({table['on']} student) at K = {F2D2_K} matches its ODE reference",
                                f"F2D2, {row['nfe']:.3g} NFE", few, f"ODE reference, {row.get('ref_nfe', 0):.3g} NFE",
                                ref, F2D2_TOLERANCE_BPD, unit, spread))
    return out


def _per_dim(row: dict[str, Any], result: dict[str, Any]) -> tuple[float, float, float, str]:
    """(few-step, reference, mean abs. error) per dimension: bits/dim for images, nats per dimension otherwise."""
    if row.get("bpd") is not None and row.get("ref_bpd") is not None:
        return row["bpd"], row["ref_bpd"], row.get("mae_bpd", 0.0), "bits/dim"
    dim = result.get("dim") or 1
    return row["nll"] / dim, row["ref_nll"] / dim, row.get("mae", 0.0) / dim, "nats/dim"


def compact_findings(result: dict[str, Any]) -> list[Finding]:
    """The distilled compact flow against its undistilled twin and against the teacher-initialised control."""
    compact = result.get("compact")
    if not compact:
        return []
    by_role = {e["role"]: e for e in compact["summary"]}
    column, unit = ("bpd", "bits/dim") if by_role.get("distilled", {}).get("bpd") is not None else ("nll", "nats")
    out = []
    distilled = by_role.get("distilled")
    for other, claim in (("undistilled", "the distilled compact flow beats its undistilled twin"),
                         ("init_only", "the distilled compact flow beats the same start without distillation")):
        if distilled is None or other not in by_role:
            continue
        a, b = _side(distilled, column), _side(by_role[other], column)
        verdict = decide(a, b)
        note = ("one value per side: no spread to test, a tie by the rule" if a.n < 2 and b.n < 2 else
                "one-sided Welch test over seeds at 5 %")
        out.append(Finding(claim, "distilled", a, other.replace("_", "-"), b, verdict, f"test {unit}", note))
    return out


def _side(entry: dict[str, Any], column: str) -> Side:
    return Side(entry[column], entry.get(column + "_std") or 0.0, int(entry["n"]))


def warnings_of(result: dict[str, Any]) -> list[str]:
    """One line per estimate whose own check failed (recorded by the evaluate stage, or derived here)."""
    out = list(result.get("warnings") or [])
    for table in result.get("f2d2") or []:
        check = table.get("reference_convergence")
        if check and check["mean_nats"] > check["tolerance_nats"]:
            out.append(f"F2D2 ({table['on']} student): its ODE reference moves by {check['mean_nats']:.3g} nats per "
                       f"sample on average (at most {check['max_nats']:.3g}) when the solver's tolerances are halved "
                       f"({check['points']} points checked), above the tolerance {check['tolerance_nats']:g}: the "
                       "reference is uncertain by about that much")
        row = next((r for r in table["rows"] if r["K"] == F2D2_K), None)
        if row is None:
            continue
        _, _, spread, unit = _per_dim(row, result)
        if spread > F2D2_TOLERANCE_BPD:
            out.append(f"F2D2 ({table['on']} student): mean absolute error to its ODE reference at K = {F2D2_K} is "
                       f"{spread:.3g} {unit}, above the tolerance {F2D2_TOLERANCE_BPD} {unit}")
    card, teacher = result["teacher"].get("card") or {}, result["teacher"]
    n = teacher["n"]  # FD is biased upwards at fewer samples: compare with the card's figure at the same count
    card_value = card.get(f"sample_fd_{n}") or (card.get("sample_fd") if card.get("sample_fd_n") == n else None)
    if card_value and math.isfinite(teacher["value"]) and teacher["value"] > card_value * (1 + CARD_SLACK):
        out.append(f"the teacher samples at {teacher['metric'].upper()} {teacher['value']:.4g} ({n} samples), more "
                   f"than {100 * CARD_SLACK:.0f} % worse than its model card's {card_value:.4g} at the same count")
    return out


def findings(result: dict[str, Any]) -> list[Finding]:
    """Every Finding of an evaluation, in the report's order."""
    return coupling_findings(result) + f2d2_findings(result) + compact_findings(result)


