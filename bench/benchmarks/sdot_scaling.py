"""Semidiscrete OT fit: iterations, seconds and final chi^2 against N, coarse to fine against one level.

For each case the dual potential is fitted with `nfm.semidiscrete_ot.fit_potential` and its final chi^2 (on at
least 10 N fresh noise draws) compared with the convergence tolerance (0.05):
    mixture   the 2D eight-gaussians set (`8gaussians`) at each N of --sizes
    digits    scikit-learn digits (N 1,437, d 64, the digits recipe's split)
Each fit runs once per setting in --settings ("levels:iters:batch:lr"; levels -1 is the automatic coarse-to-fine
fit, 0 the single-level fit from g = 0). N above --max-full-n is fitted once (first seed) with --large-iters
iterations (fewer from the sizes in --large-iters-cap), and evaluated on fewer than 10 N draws (`eval_draws`), to
report the rate and the chi^2 reached where one core cannot afford a converged fit.

Run from the repository root (one thread):
    OMP_NUM_THREADS=1 python -m bench.benchmarks.sdot_scaling --threads 1 --out docs/benchmarks/sdot_scaling-cpu.json
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

from bench.common import print_and_write
from nfm.semidiscrete_ot import CHI2_TOL, fit_potential, level_sizes
from shared.config import DataConfig
from shared.data_sources import load_dataset
from shared.machine import describe_machine

COLUMNS = {"case": "case", "seed": "seed", "n": "N", "dim": "d", "levels": "levels", "iters": "iters / level",
           "polish": "polish rounds", "batch": "batch", "lr": "lr", "total_iters": "iters (all levels and polish)",
           "seconds": "fit s", "ms_per_iter": "ms / iter (all levels)",
           "chi2": "final chi^2", "w2_half": "W_2^2/2", "converged": "chi^2 <= 0.05"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,160000,1280000", help="comma-separated N of the 2D mixture")
    parser.add_argument("--cases", default="mixture,digits", help="subset of mixture,digits")
    parser.add_argument("--settings", default="-1:2400:2048:0.01",
                        help="comma-separated levels:iters:batch:lr fits per mixture size")
    parser.add_argument("--digits-settings", default="-1:500:4096:0.01,0:500:4096:0.01",
                        help="levels:iters:batch:lr fits on digits (the recipe: 500 iterations, batch 4096)")
    parser.add_argument("--max-full-n", type=int, default=20000, help="larger N get --large-iters iterations")
    parser.add_argument("--large-iters", type=int, default=2400, help="finest-level iterations above --max-full-n")
    parser.add_argument("--large-iters-cap", default="1280000:100",
                        help="N:iters, comma-separated: fewer iterations from that N on (one core cannot afford more)")
    parser.add_argument("--seeds", default="0", help="comma-separated fit seeds (one row each)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="", help="JSON output (default: print only)")
    return parser.parse_args(argv)


def parse_setting(text: str) -> tuple[int, int, int, float]:
    """levels:iters:batch:lr."""
    levels, iters, batch, lr = text.split(":")
    return int(levels), int(iters), int(batch), float(lr)


def eval_draws(n: int, max_full_n: int) -> float:
    """Noise draws per point of the final evaluation: the criterion's 10 up to max_full_n, then 1.6e5 / N (at least
    0.1): the chi^2 estimate's standard deviation stays below about (4 / 1.6e5)^(1/2) = 0.005 while its cost, N^2
    scores per draw per point, stays at that of N = 1.6e5 with one draw."""
    return 10.0 if n <= max_full_n else max(0.1, min(10.0, 1.6e5 / n))


def fit_row(case: str, y: torch.Tensor, levels: int, iters: int, batch: int, lr: float, seed: int,
            draws: float = 10.0) -> dict[str, Any]:
    """One fit; its settings, wall seconds, final chi^2 and whether it meets the tolerance."""
    sizes = level_sizes(len(y), levels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table reports convergence
        start = time.perf_counter()
        info = fit_potential(y, case, iters=iters, batch=batch, lr=lr, seed=seed, levels=levels,
                             progress=False, log_seconds=3600, eval_draws=draws).info
        seconds = time.perf_counter() - start
    polish = int(info.get("polish", 0))
    total = iters + (len(sizes) - 1) * max(1, iters // 2) + polish * max(1, iters // 4)
    row = {"case": case, "seed": seed, "n": len(y), "dim": int(info["dim"]), "levels": len(sizes) - 1,
           "level_sizes": sizes, "iters": iters, "polish": polish, "eval_draws_per_point": draws, "batch": batch,
           "lr": lr, "total_iters": total, "seconds": seconds,
           "chi2": info["chi2"], "w2_half": info["w2_half"],
           "converged": bool(info["chi2"] <= CHI2_TOL and info["w2_half"] >= 0)}
    row["ms_per_iter"] = 1000 * seconds / total  # an upper bound: includes the final evaluation
    print(f"{case} N={len(y)} levels={row['levels']} iters={iters}: {seconds:.1f} s, chi2={info['chi2']:.4g}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases, print the table, write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    rows: list[dict[str, Any]] = []
    if "digits" in cases:
        y = load_dataset(DataConfig(name="digits", test_fraction=0.2)).train
        rows += [fit_row("digits", y, *parse_setting(s), seed) for s in args.digits_settings.split(",")
                 for seed in seeds]
    if "mixture" in cases:
        for n in (int(s) for s in args.sizes.split(",") if s):
            y = load_dataset(DataConfig(name="8gaussians", n_train=n)).train
            for text in args.settings.split(","):
                levels, iters, batch, lr = parse_setting(text)
                if n > args.max_full_n:
                    iters = args.large_iters
                    for cap in (c.split(":") for c in args.large_iters_cap.split(",") if c):
                        iters = min(iters, int(cap[1])) if n >= int(cap[0]) else iters
                draws = eval_draws(n, args.max_full_n)
                rows += [fit_row("mixture", y, levels, iters, batch, lr, seed, draws)
                         for seed in (seeds if n <= args.max_full_n else seeds[:1])]
    payload = {"bench": "sdot_scaling", "machine": describe_machine(torch.device("cpu")), "settings": vars(args),
               "chi2_tol": CHI2_TOL, "rows": rows}
    return print_and_write(rows, COLUMNS, payload, args.out)


if __name__ == "__main__":
    main()
