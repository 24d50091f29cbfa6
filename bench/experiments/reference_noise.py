"""How much a small reference set moves FD: can a validation split of this size choose between these runs?

For each run given: samples at `--steps` (the runs' own sampler), then the Fréchet distance of the same
samples to `--subsets` random subsets of `--size` test images, and to the validation split when the data
set has one of that size. Reported: each run's FD to the full test split, the mean and standard deviation
over subsets, and for every run after the first the difference to the first run on the same subsets
(paired, which is what a choice between the two rests on). When the paired standard deviation is as large
as the mean difference, a reference set of that size cannot rank the two runs. Prints a table, writes JSON.

    python -m bench.experiments.reference_noise runs/digits-nfm-fit-s0 runs/digits-semidiscrete_ot-s0 \
        --steps 4 --size 144
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.common import add_device_and_out_args, print_and_write, setup
from flowdistill.api import load_run
from shared.evaluate import generate
from shared.machine import describe_machine
from shared.metrics import classifier_features, frechet_distance, image_features

COLUMNS = {"run": "run", "fd_test": "FD (all test)", "fd_subset_mean": "FD (subsets) mean",
           "fd_subset_std": "std", "diff_mean": "minus first run, mean", "diff_std": "paired std",
           "fd_val": "FD (validation)", "diff_val": "minus first run (validation)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of one image data set")
    parser.add_argument("--steps", type=int, default=4, help="solver steps (ignored by autoregressive teachers)")
    parser.add_argument("--n", type=int, default=1000, help="samples per run")
    parser.add_argument("--size", type=int, default=144, help="images per reference subset")
    parser.add_argument("--subsets", type=int, default=40, help="random subsets of the test split")
    add_device_and_out_args(parser)
    args = parser.parse_args(argv)
    device = setup(args)
    runs = [load_run(path, device=device) for path in args.runs]
    dataset = runs[0].dataset
    if dataset.kind != "image":
        raise SystemExit(f"{args.runs[0]}: FD needs image data, {dataset.name!r} holds vectors")
    if not 1 < args.size <= len(dataset.test):
        raise SystemExit(f"--size must lie in [2, {len(dataset.test)}] (the test split's size), got {args.size}")
    if args.subsets < 2:
        raise SystemExit(f"--subsets must be >= 2 (a spread needs two), got {args.subsets}")
    others = [path for path, run in zip(args.runs, runs) if run.dataset.base_fingerprint != dataset.base_fingerprint]
    if others:
        raise SystemExit(f"{', '.join(others)}: another data set or test split than {args.runs[0]}; FDs are paired on "
                         "one test split")
    extractor = classifier_features(dataset, device)
    test = image_features(extractor, dataset.test)
    val = image_features(extractor, dataset.val) if dataset.val is not None and len(dataset.val) == args.size else None
    gen = torch.Generator().manual_seed(0)
    subsets = [torch.randperm(len(test), generator=gen)[:args.size] for _ in range(args.subsets)]
    rows, first = [], None
    for path, run in zip(args.runs, runs):
        feats = image_features(extractor, generate(run, args.n, args.steps, run.config.eval.solver,
                                                   run.config.eval.grid, 0).x.clamp(-1, 1))
        per_subset = [frechet_distance(feats, test[s]) for s in subsets]
        row = {"run": Path(path).name, "fd_test": frechet_distance(feats, test),
               "fd_subset_mean": statistics.fmean(per_subset), "fd_subset_std": statistics.stdev(per_subset),
               "fd_val": frechet_distance(feats, val) if val is not None else None, "per_subset": per_subset}
        if first is None:
            first = row
        else:
            diffs = [a - b for a, b in zip(per_subset, first["per_subset"])]
            row.update(diff_mean=statistics.fmean(diffs), diff_std=statistics.stdev(diffs),
                       diff_val=None if val is None else row["fd_val"] - first["fd_val"])
        rows.append(row)
    payload = {"machine": describe_machine(device), "settings": {k: v for k, v in vars(args).items() if k != "runs"},
               "runs": args.runs, "rows": rows}
    return print_and_write(rows, COLUMNS, payload, args.out)


if __name__ == "__main__":
    main()
