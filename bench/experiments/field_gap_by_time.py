"""Where in time a velocity field's likelihood gap comes from, on a mixture with a known field.

    python -m bench.experiments.field_gap_by_time MIXTURE RUN [--n 500] [--cuts 0.05 0.1 0.2 0.4] [--split test]

MIXTURE is a folder `bench.experiments.heldout_mixtures make` wrote, RUN a velocity-field run trained on its
train.npy (recipes/density/fm.yaml). The mixture's exact field on the linear path (`mixture_velocity`) has the
mixture's exact log p as its ODE likelihood, so splicing it into the learned field on part of [0, 1] shows how much
of the learned field's gap that part carries:

    analytic on [0, tau), learned on [tau, 1]:   what is left when the field near the data is exact
    learned on [0, tau), analytic on [tau, 1]:   what the field near the data costs on its own

Every row is the ODE likelihood (dopri5, exact divergence) of the first N rows of the split, as a gap to the exact
NLL in nats per sample (± paired standard error); --split train scores the training rows instead, whose gap next to
the test one separates fitting from generalising. A second table gives the field's squared error against the exact
field, E ||v_theta(x_t, t) - v(x_t, t)||^2 (summed over coordinates, standardised units), at x_t = (1 - t) x + t z
for x from the training rows and from the test rows at each --times t: equal errors on both mean the field is as
wrong where it was trained as elsewhere. Prints both and writes RUN/field-gap-by-time.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.experiments.heldout_mixtures import mixture_log_prob, mixture_velocity, read_mixture, standardised
from shared.evaluate import standard_error
from shared.likelihood import log_likelihood


class SplicedField(nn.Module):
    """v(x, t) = analytic(x, t) where `analytic_below` says t < tau (else t >= tau), the learned field elsewhere."""

    def __init__(self, learned: nn.Module, mix: dict[str, Tensor], tau: float, analytic_below: bool):
        super().__init__()
        self.learned, self.mix, self.tau, self.analytic_below = learned, mix, tau, analytic_below

    def forward(self, x: Tensor, t: Tensor, **_: Any) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        use_analytic = t < self.tau if self.analytic_below else t >= self.tau
        return torch.where(use_analytic[:, None], mixture_velocity(self.mix, x, t), self.learned(x, t))


def fields(learned: nn.Module, mix: dict[str, Tensor], cuts: list[float]) -> list[tuple[str, nn.Module]]:
    """(label, field) for the learned field, the analytic one and each splice at each cut."""
    rows = [("learned on [0, 1]", SplicedField(learned, mix, -1.0, True)),
            ("analytic on [0, 1]", SplicedField(learned, mix, 2.0, True))]
    rows += [(f"analytic on [0, {tau:g}), learned after", SplicedField(learned, mix, tau, True)) for tau in cuts]
    rows += [(f"learned on [0, {tau:g}), analytic after", SplicedField(learned, mix, tau, False)) for tau in cuts]
    return rows


def mixture_in_run_units(run: Any, mixture_dir: Path) -> dict[str, Tensor]:
    """The mixture of `mixture_dir` in the standardised units the run's model works in."""
    std = run.dataset.standardization
    if std is None:
        raise SystemExit(f"{run.dir}: the run has no standardisation on record; train it on data.name=tabular")
    return standardised(read_mixture(mixture_dir), torch.as_tensor(std.mean, dtype=torch.float64),
                        torch.as_tensor(std.std, dtype=torch.float64))


def gap_by_time(run: Any, mixture_dir: Path, n: int, cuts: list[float], split: str = "test") -> dict[str, Any]:
    """The gap (model NLL - exact NLL, nats per sample) of each spliced field on the first n rows of `split` of a
    loaded run (`flowdistill.api.load_run`); the mixture is mapped into the run's standardised units."""
    rows = getattr(run.dataset, split)
    if rows is None:
        raise SystemExit(f"{run.dir}: the run has no {split} split (data.val_fraction = 0)")
    x = rows[:n].float()
    mix = mixture_in_run_units(run, mixture_dir)
    exact = mixture_log_prob(mix, x)
    result: dict[str, Any] = {"mixture": str(mixture_dir), "run": str(run.dir), "split": split, "n": len(x),
                              "rows": []}
    for label, field in fields(run.model, mix, cuts):
        diff = exact - log_likelihood(field, x, divergence="exact").logp.double()
        result["rows"].append({"field": label, "gap": diff.mean().item(), "gap_se": standard_error(diff)})
        print(f"  {label:>40}: gap {diff.mean().item():+.4f} ± {standard_error(diff):.4f}", flush=True)
    return result


@torch.no_grad()
def field_error_by_time(run: Any, mixture_dir: Path, n: int, times: list[float], seed: int = 0) -> list[dict[str, Any]]:
    """Mean squared error (B-mean of the coordinate sum) of the run's field against the exact one at x_t built from
    the first n training rows and the first n test rows, one row per t."""
    mix = mixture_in_run_units(run, mixture_dir)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in times:
        row: dict[str, Any] = {"t": t}
        for split in ("train", "test"):
            x = getattr(run.dataset, split)[:n].float()
            x_t = (1 - t) * x + t * torch.randn(x.shape, generator=g)
            times_b = torch.full((len(x),), t)
            err = (run.model(x_t, times_b).double() - mixture_velocity(mix, x_t, times_b).double()).pow(2).sum(1)
            row[split] = err.mean().item()
        rows.append(row)
        print(f"  t = {t:4.2f}: squared field error {row['train']:.4f} (x from training rows), "
              f"{row['test']:.4f} (test rows)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=500, help="rows of the split to score")
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--split", choices=("test", "val", "train"), default="test")
    parser.add_argument("--times", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9],
                        help="times of the field-error table")
    args = parser.parse_args(argv)
    from flowdistill.api import load_run

    run = load_run(args.run)
    print(f"{args.run}: {args.split} split, first {args.n} rows, gap to the exact NLL in nats per sample")
    result = gap_by_time(run, args.mixture, args.n, args.cuts, args.split)
    print(f"field error against the exact field, {min(args.n * 4, len(run.dataset.test))} points per split and time")
    result["field_error"] = field_error_by_time(run, args.mixture, min(args.n * 4, len(run.dataset.test)), args.times)
    (args.run / "field-gap-by-time.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
