"""The one rule for "beats" (against scipy's own tests) and the pipeline report's Findings and warnings."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy import stats

from flowdistill.findings import findings, warnings_of
from flowdistill.report import build
from flowdistill.report_doc import Doc, fmt
from flowdistill.verdict import FAILS, HOLDS, TIE, Finding, Side, decide, p_better


@pytest.mark.parametrize("seed", range(5))
def test_welch_p_value_equals_scipys(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, 3 + seed), rng.normal(0.7, 2, 4)
    expected = stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue
    assert p_better(Side.of(a), Side.of(b)) == pytest.approx(expected, rel=1e-9)
    # higher is better: the same test the other way round
    expected_up = stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
    assert p_better(Side.of(a), Side.of(b), lower_is_better=False) == pytest.approx(expected_up, rel=1e-9)


def test_one_value_side_is_a_one_sample_test():
    seeds = [20.0, 22.0, 21.0]
    expected = stats.ttest_1samp(seeds, 25.0, alternative="less").pvalue
    assert p_better(Side.of(seeds), Side.of([25.0])) == pytest.approx(expected, rel=1e-9)
    assert p_better(Side.of([25.0]), Side.of(seeds)) == pytest.approx(1 - expected, rel=1e-9)


def test_decide_wins_ties_and_losses():
    assert decide(Side.of([10, 11, 10.5]), Side.of([20, 21, 20.5])) == HOLDS
    assert decide(Side.of([20, 21, 20.5]), Side.of([10, 11, 10.5])) == FAILS
    assert decide(Side.of([10, 14, 12]), Side.of([11, 15, 13])) == TIE  # overlapping spreads
    assert decide(Side.of([10.0]), Side.of([99.0])) == TIE  # one value each: no spread to test
    assert decide(Side.of([10.0]), Side.of([99.0]), exact=True) == HOLDS  # deterministic quantities


def evaluation(nfm=(20.0, 21.0), sdot=(30.0, 31.0), f2d2_bpd=2.00, ref_bpd=2.02, compact=True, **extra):
    """A small evaluation JSON of the pipeline's shape (two seeds, NFE 1, 2, 4)."""
    students = []
    for name, values, slow in (("independent", (60.0, 62.0), 1.0), ("semidiscrete_ot", sdot, 1.0),
                               ("minibatch_ot", (40.0, 41.0), 1.0), ("nf_teacher", nfm, 1.0)):
        for nfe in (1, 2, 4):
            vals = [v + 10.0 / nfe for v in values]
            students.append({"student": name, "solver": "euler", "grid": "linear", "steps": nfe, "nfe": nfe,
                             "metric": "fd", "mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)),
                             "seeds": 2, "values": vals, "seconds_per_sample": 1e-4 * nfe * slow})
    result = {
        "pipeline": "t", "teacher": {"name": "teacher", "nfe": 62, "metric": "fd", "value": 24.0, "n": 500,
                                     "seconds_per_sample": 2e-3, "params": 906688, "eta": 0.2,
                                     "card": {"sample_fd": 20.0, "sample_fd_n": 1000, "sample_fd_500": 23.0}},
        "students": students, "dim": 64, "warnings": [],
        "f2d2": [{"label": "f2d2-nf_teacher", "on": "nf_teacher", "reference": "teacher ODE", "n": 100,
                  "rows": [{"K": 4, "nfe": 4.0, "nll": 1.0, "ref_nll": 1.0, "bpd": f2d2_bpd, "ref_bpd": ref_bpd,
                            "mae_bpd": abs(f2d2_bpd - ref_bpd) + 0.01, "ref_nfe": 400.0}]}],
        "compact": None,
    }
    if compact:
        common = {"params": 1000, "depth": 2, "sample_speedup": 2.0, "encode_speedup": 2.0}
        result["compact"] = {"summary": [
            {"role": "teacher", "n": 1, "bpd": 2.0, "bpd_std": 0.0, **common},
            {"role": "distilled", "n": 2, "bpd": 2.30, "bpd_std": 0.005, **common},
            {"role": "undistilled", "n": 2, "bpd": 2.50, "bpd_std": 0.005, **common},
            {"role": "init_only", "n": 2, "bpd": 2.29, "bpd_std": 0.005, **common}]}
    result.update(extra)
    return result


def by_claim(items):
    return {f.claim: f for f in items}


def test_findings_when_nfm_wins():
    got = by_claim(findings(evaluation()))
    for nfe in (1, 2, 4):
        f = got[f"NFM beats the best OT coupling at {nfe} NFE"]
        assert f.verdict == HOLDS and f.b_label == "semidiscrete_ot" and f.a.n == 2
    # 22.5 and 23.5 against 24.0: one-sample t = -2 with 1 degree of freedom, p = 0.15: a tie, not a win
    assert got["the NFM student at 4 NFE beats its teacher"].verdict == TIE
    speed = got["NFM samples faster than its teacher at equal quality"]
    assert speed.verdict == HOLDS and "at 4 NFE" in speed.a_label and "5x" in speed.note
    assert got["F2D2 (nf_teacher student) at K = 4 matches its ODE reference"].verdict == HOLDS
    assert got["the distilled compact flow beats its undistilled twin"].verdict == HOLDS
    assert got["the distilled compact flow beats the same start without distillation"].verdict == TIE


def test_findings_when_nfm_loses():
    got = by_claim(findings(evaluation(nfm=(40.0, 41.0), sdot=(20.0, 21.0))))
    assert got["NFM beats the best OT coupling at 2 NFE"].verdict == FAILS
    assert got["the NFM student at 4 NFE beats its teacher"].verdict == FAILS
    speed = got["NFM samples faster than its teacher at equal quality"]
    assert speed.verdict == FAILS and "no scored NFE" in speed.note


def test_f2d2_outside_its_tolerance_fails_and_warns():
    result = evaluation(f2d2_bpd=1.90, ref_bpd=2.00)
    f = by_claim(findings(result))["F2D2 (nf_teacher student) at K = 4 matches its ODE reference"]
    assert f.verdict == FAILS and "0.1" in f.note
    assert any("F2D2 (nf_teacher student)" in w and "above the tolerance" in w for w in warnings_of(result))


def test_an_ode_reference_that_moves_under_refinement_is_a_warning():
    result = evaluation()
    assert not any("ODE reference moves" in w for w in warnings_of(result))
    table = result["f2d2"][0]
    table["reference_convergence"] = {"points": 8, "max_nats": 0.008, "mean_nats": 0.002, "tolerance_nats": 0.005}
    assert not any("ODE reference moves" in w for w in warnings_of(result))  # one point alone does not count
    table["reference_convergence"].update(mean_nats=0.03, max_nats=0.04)
    (line,) = [w for w in warnings_of(result) if "ODE reference moves" in w]
    assert all(isinstance(f, Finding) for f in findings(result))  # a warning, never a claim
    assert "F2D2 (nf_teacher student)" in line and "0.03 nats" in line and "at most 0.04" in line
    assert "8 points" in line


def test_warnings_pass_through_and_teacher_card():
    fit = "semidiscrete_ot-s0: its semidiscrete OT fit did not converge (chi^2 of the assignments 0.2 > tolerance 0.05)"
    result = evaluation(warnings=[fit])
    assert warnings_of(result) == [fit]
    worse = copy.deepcopy(result)
    worse["teacher"]["value"] = 40.0
    assert any("worse than its model card" in w for w in warnings_of(worse))


def test_report_opens_with_findings_and_shows_warnings(tmp_path):
    result = evaluation(f2d2_bpd=1.90, ref_bpd=2.00, warnings=["semidiscrete_ot-s0: its fit did not converge"])
    result.update({"hardware": {"cpu": "cpu", "cores": 2, "device": "cpu", "torch": "2", "threads": 1},
                   "straightness": [], "quality_figure": "q.png", "sample_figures": {}, "runs": {}})
    (tmp_path / "q.png").write_bytes(b"\x89PNG")
    from flowdistill.pipeline_stages import STAGES

    doc = build(result, {}, tmp_path, "flowdistill run x", STAGES)
    md = "\n".join(doc.md)
    assert md.index("## Findings") < md.index("## Teacher") < md.index("## Students")
    assert "| NFM beats the best OT coupling at 1 NFE |" in md and "| HOLDS |" in md and "| FAILS |" in md
    assert "**Warning:** semidiscrete_ot-s0: its fit did not converge" in md
    assert "**Warning:** F2D2 (nf_teacher student)" in md
    assert "quality_t07" not in md and "seconds_per_sample" not in md
    assert "class='warning'" in "".join(doc.html)


def test_numbers_are_readable():
    assert fmt(14510.3) == "14,510" and fmt(906688) == "906,688" and fmt(0.01234567) == "0.01235"
    assert "e+" not in fmt(1.451e4)
    doc = Doc(None)
    doc.table([{"quality_t07": 1.0}], ["quality_t07"])
    assert "quality at T = 0.7" in doc.md[0]


def test_an_unconverged_semidiscrete_fit_becomes_a_report_warning(tmp_path):
    """The evaluate stage reads each SD-OT student's saved potential and warns when it fails the convergence check."""
    from types import SimpleNamespace

    import torch

    from flowdistill.stages.students import fit_warnings
    from nfm.couplings import SDOT_FILE, SemidiscreteOTConfig
    from nfm.semidiscrete_ot import SemidiscretePotential, save_potential

    def student(label: str, chi2: float) -> SimpleNamespace:
        run_dir = tmp_path / label
        (run_dir / "couplings").mkdir(parents=True)
        save_potential(run_dir / "couplings" / SDOT_FILE,
                       SemidiscretePotential(torch.zeros(4), "fp", {"chi2": chi2, "w2_half": 0.3}))
        cfg = SimpleNamespace(method=SimpleNamespace(coupling=SemidiscreteOTConfig()))
        return SimpleNamespace(label=label, dir=run_dir, config=cfg)

    runs = [student("semidiscrete_ot-s0", 0.01), student("semidiscrete_ot-s1", 0.9)]
    got = fit_warnings(SimpleNamespace(coupling_students=lambda: runs))
    assert len(got) == 1 and got[0].startswith("semidiscrete_ot-s1: its semidiscrete OT fit did not converge")
    assert "0.9 > tolerance 0.05" in got[0] and "method.coupling.iters" in got[0]


def test_compare_names_the_best_student_only_when_the_rule_says_so():
    from flowdistill.scoring import verdict_rows

    rows = [{"student": name, "solver": "euler", "grid": "linear", "nfe": 2, "metric": "fd", "mean": float(np.mean(v)),
             "values": v} for name, v in (("a", [10.0, 10.5, 10.2]), ("b", [20.0, 20.4, 19.8]), ("c", [30.0, 31.0, 29.0]))]
    (row,) = verdict_rows(rows)
    assert row["best"].startswith("a (") and row["runner_up"].startswith("b (") and row["verdict"] == "beats the runner-up"
    rows[1]["values"] = [9.0, 12.0, 11.0]
    rows[1]["mean"] = float(np.mean(rows[1]["values"]))
    assert verdict_rows(rows)[0]["verdict"] == "tie"


def test_html_findings_colour_their_verdicts(tmp_path):
    result = evaluation(nfm=(40.0, 41.0), sdot=(20.0, 21.0))
    doc = Doc(tmp_path)
    doc.findings(findings(result), [])
    page = "".join(doc.html)
    assert "<table class='findings'>" in page and "<td class='fails'>FAILS</td>" in page
