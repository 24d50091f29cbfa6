"""Where a flow's likelihood errs on a known density: per-sample error against the exact log p, by density.

    python -m bench.experiments.density_tails runs/density-tarflow

Scores the run's whole test split (`shared.evaluate.score_split`) and reports the mean gap, the mean
|error| on the 5 % of test points with the lowest exact density and on the rest, the mean signed error
there (a heavy or light tail shows as a sign), and the eight worst points with their density rank.
Nats per sample. Prints only.
"""
from __future__ import annotations

import argparse

import torch

from flowdistill.api import load_run
from shared.evaluate import score_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run trained on a data set with a known density")
    parser.add_argument("--tail", type=float, default=0.05, help="share of lowest-density test points")
    args = parser.parse_args(argv)
    run = load_run(args.run, device="cpu")
    if run.dataset.log_density is None:
        raise SystemExit(f"{args.run}: data set {run.dataset.name!r} has no known density")
    res, cols = score_split(run, "test")
    exact, err = cols["exact_logp_nats"], cols["logp_nats"] - cols["exact_logp_nats"]
    low = exact < torch.quantile(exact, args.tail)
    print(f"{args.run}: {res['n']} test points, gap {res['gap_to_exact_nats']:+.4f} nats, mean |error| "
          f"{err.abs().mean().item():.4f}")
    print(f"lowest-density {args.tail:.0%}: mean |error| {err[low].abs().mean().item():.4f}, mean error (model - exact) "
          f"{err[low].mean().item():+.4f}; the rest: mean |error| {err[~low].abs().mean().item():.4f}, mean error "
          f"{err[~low].mean().item():+.4f}")
    for i in err.abs().argsort(descending=True)[:8].tolist():
        rank = (exact < exact[i]).double().mean().item()
        print(f"  point {i}: exact {exact[i].item():.2f}, model {cols['logp_nats'][i].item():.2f}, "
              f"error {err[i].item():+.2f}, density rank {rank:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
