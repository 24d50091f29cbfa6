"""The bias of F2D2's few-step log p at the map Shortcut training converges to, against exact densities.

    python -m bench.experiments.f2d2_fixed_point                 # Gaussian (std 0.15, 2D), gmm2, gmm8; levels 6 and 7

No training: `f2d2.fixed_point.ConvergedShortcutMap` evaluates the fixed point of the training targets on
the data's exact velocity, for the current finest-level rule (midpoint) and the earlier one (two Euler
half steps). For each case: mean of (few-step log p - exact log p) over test points, in nats per sample,
with its paired standard error, at K = 1 and 4. Prints a Markdown table; writes
bench/results/f2d2-fixed-point.json.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import RESULTS
from f2d2.fixed_point import ConvergedShortcutMap, euler_half_step_targets, exact_tangent
from f2d2.flowmap import few_step_log_likelihood
from f2d2.losses import shortcut_targets
from shared.densities import KNOWN_DENSITIES, GaussianMixture
from shared.evaluate import format_table, standard_error, write_json

RULES = {"midpoint (current)": shortcut_targets, "two Euler half steps (earlier)": euler_half_step_targets}


def cases(n: int) -> dict[str, tuple[GaussianMixture, torch.Tensor]]:
    """name -> (density, n test points float64): a sharp one-component Gaussian and two known mixtures."""
    one = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.tensor([[0.3, -0.2]], dtype=torch.float64),
                          torch.tensor([0.15], dtype=torch.float64))
    out = {"gaussian std 0.15 (2D)": one, "gmm2": KNOWN_DENSITIES["gmm2"], "gmm8": KNOWN_DENSITIES["gmm8"]}
    return {k: (d, d.sample(n, torch.Generator().manual_seed(0)).double()) for k, d in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="test points per density")
    parser.add_argument("--levels", default="6,7", help="comma-separated method.levels")
    args = parser.parse_args(argv)
    rows = []
    for name, (density, x) in cases(args.n).items():
        exact, tangent = density.log_prob(x), exact_tangent(density.velocity)
        for levels in (int(v) for v in args.levels.split(",")):
            for rule, targets in RULES.items():
                row = {"density": name, "levels": levels, "finest level": rule}
                for k in (1, 4):
                    diff = few_step_log_likelihood(ConvergedShortcutMap(tangent, levels, targets), x, k).logp - exact
                    row[f"K{k}_bias"] = diff.mean().item()
                    row[f"K{k}_se"] = standard_error(diff)
                rows.append(row)
    print(f"few-step log p - exact log p at the converged Shortcut map, nats per sample ({args.n} points)")
    print(format_table(rows, ["density", "levels", "finest level", "K1_bias", "K1_se", "K4_bias", "K4_se"]))
    write_json(RESULTS / "f2d2-fixed-point.json", {"n": args.n, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
