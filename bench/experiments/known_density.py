"""The known-density table: every likelihood the project computes, scored against the exact log p.

    python -m bench.experiments.known_density --data gmm2 --prefix density        # runs of recipes/density/*.yaml
    python -m bench.experiments.known_density --data gmm8 --prefix density-gmm8 --f2d2-run f2d2_8-joint

For one data set whose exact density is known (shared.densities) and the runs trained on it by the
recipes in recipes/density (<prefix>-f2d2_joint and <prefix>-tarflow, or the runs named by --f2d2-run and
--tarflow-run; the FM field is the F2D2 run's teacher), this:

1. chooses F2D2's time grid on the first 1,000 validation points: f2d2-eval at K = 4 on the linear
   and the geometric grid (the grids whose jumps Shortcut trains at every K), keeping the one with the
   smaller mean per-sample |log p_4 - exact log p|;
2. reports on the whole test split, with the chosen grid: the TarFlow's exact log p (one pass), the
   FM field's ODE reference (adaptive dopri5, exact divergence, per-sample step control), F2D2 at
   K = 1, 2, 4, 8 and the naive estimate without D at the same K.

Each row has the mean NLL, the exact NLL of the same points, the gap (model NLL - exact NLL; negative:
the model claims more density than the truth) with its paired standard error, and the mean
per-sample |error|, all in nats per sample. Writes <out>/<data>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdistill.api import load_run
from flowdistill.f2d2_eval import evaluate
from shared.evaluate import format_table, score_split, standard_error, write_json

GRIDS = ("linear", "geometric")  # grids of trained jumps (f2d2.flowmap.untrained_jumps)
STEPS = (1, 2, 4, 8)
VAL_POINTS = 1000  # validation points of the grid choice (the first of the split)


def _row(method: str, nfe: float, logp: Tensor, exact: Tensor, seconds: float) -> dict[str, Any]:
    """Mean NLL, gap to the exact NLL with its paired standard error, mean |error| (nats per sample)."""
    diff = exact - logp  # per-sample NLL gap
    return {"method": method, "nfe": round(nfe, 1), "nll": -logp.mean().item(), "exact_nll": -exact.mean().item(),
            "gap": diff.mean().item(), "gap_se": standard_error(diff),
            "mean_abs_error": diff.abs().mean().item(), "max_abs_error": diff.abs().max().item(),
            "seconds": round(seconds, 2)}


def choose_grid(f2d2_run: Any, divergence: str) -> tuple[str, dict[str, float]]:
    """Among the grids whose jumps the map was trained on at every K of STEPS, the one with the smaller mean
    per-sample |log p_4 - exact| on the validation split, and every score."""
    scores = {}
    for grid in GRIDS:
        try:
            for k in STEPS:
                f2d2_run.sampler.check_grid(k, grid)
        except ValueError:
            continue
        summary, _ = evaluate(f2d2_run, [4], VAL_POINTS, 200, divergence, grid=grid, split="val")
        scores[grid] = summary["rows"][0]["analytic_mae"]
    return min(scores, key=scores.get), scores


def known_density_table(data: str, prefix: str, runs: Path, batch_size: int = 500, f2d2_run: str = "",
                        tarflow_run: str = "") -> dict[str, Any]:
    """Validation grid choice and the test-split rows (see the module docstring).

    `f2d2_run` / `tarflow_run` name the runs under `runs` (default `<prefix>-f2d2_joint`, `<prefix>-tarflow`).
    """
    f2d2_run, tarflow_run = f2d2_run or f"{prefix}-f2d2_joint", tarflow_run or f"{prefix}-tarflow"
    f2d2 = load_run(runs / f2d2_run, device="cpu")
    if f2d2.config.data.name != data or f2d2.dataset.log_density is None:
        raise ValueError(f"{runs / f2d2_run} is trained on {f2d2.config.data.name!r}; expected "
                         f"{data!r}, a data set with a known density")
    divergence = f2d2.config.eval.divergence
    grid, val_scores = choose_grid(f2d2, divergence)
    summary, columns = evaluate(f2d2, list(STEPS), 0, 2000, divergence, grid=grid, batch_size=batch_size)
    exact = columns["exact_logp_nats"]
    rows = []
    flow = load_run(runs / tarflow_run, device="cpu")
    res, flow_cols = score_split(flow, "test")
    rows.append(_row("TarFlow (exact, one pass)", res["nfe_mean"], flow_cols["logp_nats"], exact, res["seconds"]))
    first = summary["rows"][0]
    rows.append(_row(f"ODE reference ({summary['reference']}, dopri5)", first["ref_nfe"], columns["ref_logp_nats"],
                     exact, first["ref_seconds"]))
    for r in summary["rows"]:
        rows.append(_row(f"F2D2 K = {r['K']} ({grid})", r["nfe"], columns[f"K{r['K']}_logp_nats"], exact,
                         r["seconds"]))
    naive = {r["K"]: r for r in summary["rows"]}
    for k in STEPS:  # naive: only the summary statistics are kept by f2d2-eval
        r = naive[k]
        rows.append({"method": f"naive, no D, K = {k} ({grid})", "nfe": k, "nll": r["naive_nll"],
                     "exact_nll": r["exact_nll"], "gap": r["naive_nll"] - r["exact_nll"], "gap_se": float("nan"),
                     "mean_abs_error": float("nan"), "max_abs_error": float("nan"), "seconds": float("nan")})
    return {"data": data, "split": "test", "n": len(exact), "grid": grid, "grid_chosen_on": "val",
            "val_mean_abs_error_K4": val_scores, "units": "nats per sample", "runs": {"f2d2": f2d2_run, "teacher": f2d2.config.method.teacher, "tarflow": tarflow_run},
            "w2": {r["K"]: r["quality"] for r in summary["rows"]}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="gmm2", help="known-density data set the runs were trained on")
    parser.add_argument("--prefix", default="density", help="run names <prefix>-fm, -f2d2_joint, -tarflow")
    parser.add_argument("--runs", default="runs", help="folder holding the runs")
    parser.add_argument("--f2d2-run", default="", help="F2D2 joint run name (default <prefix>-f2d2_joint)")
    parser.add_argument("--tarflow-run", default="", help="TarFlow run name (default <prefix>-tarflow)")
    parser.add_argument("--out", default="docs/likelihood", help="folder of <data>.json")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = known_density_table(args.data, args.prefix, Path(args.runs), f2d2_run=args.f2d2_run,
                                 tarflow_run=args.tarflow_run)
    print(f"{args.data}: test split, {result['n']} points, nats per sample; grid {result['grid']} chosen on the "
          f"validation split (mean |error| at K = 4: {result['val_mean_abs_error_K4']})")
    print(format_table(result["rows"], ["method", "nfe", "nll", "exact_nll", "gap", "gap_se", "mean_abs_error",
                                        "max_abs_error", "seconds"]))
    write_json(Path(args.out) / f"{args.data}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
