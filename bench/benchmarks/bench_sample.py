"""Sampling throughput of flow models: samples/s and NFE/s for each fixed-step solver and step count.

By default the models are flow-matching backbones at random initialisation (throughput does not depend
on the weights) sampled with `shared.sampling.sample`; `--run DIR` benchmarks a trained run instead,
through its sampler's own `sample`, so any model of the project works. NFE/s counts single-sample
network evaluations: batched forward calls x batch size per second.

Run from the repository root:  python -m bench.benchmarks.bench_sample [--device cpu|cuda] [--run DIR] [--repeats R]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from bench.common import add_common_args, report, selected_cases, setup
from flowdistill.api import load_run
from flowdistill.components import CATALOG
from shared.data_sources import load_dataset
from shared.run_build import build_model
from shared.sampling import FIXED_SOLVERS, SampleResult, sample
from shared.timing import median, timed

COLUMNS = {"case": "case", "solver": "solver", "steps": "steps", "nfe": "NFE", "batch": "batch",
           "ms_per_batch": "ms/batch", "samples_per_s": "samples/s", "nfe_per_s": "NFE/s"}
NFE_DEFINITION = "NFE/s = NFE per batch x batch size / seconds (single-sample network evaluations per second)"


@dataclass
class Target:
    """Something to sample from: a sampler taking (noise, steps, solver) and the noise batch it starts from."""

    sampler: Callable[..., SampleResult]
    noise: Tensor
    note: str


def _int_list(text: str) -> list[int]:
    """Comma-separated positive integers."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,4,16, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--solvers", default=",".join(FIXED_SOLVERS), help="comma-separated fixed-step solvers")
    parser.add_argument("--steps", type=_int_list, default=[1, 4, 16], help="comma-separated step counts")
    parser.add_argument("--run", default="", help="a trained run directory to benchmark instead of the cases")
    parser.add_argument("--weights", choices=("auto", "best", "ema", "model"), default="auto", help="which weights of --run to load")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise batch")
    args = parser.parse_args(argv)
    args.solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    unknown = sorted(set(args.solvers) - set(FIXED_SOLVERS))
    if unknown:
        parser.error(f"unknown solver(s) {', '.join(unknown)}; choices: {', '.join(FIXED_SOLVERS)}")
    return args


def targets(args: argparse.Namespace, device: torch.device) -> dict[str, Target]:
    """The trained run named by --run, or randomly initialised models of the selected cases."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.run:
        run = load_run(args.run, weights=args.weights, device=device)
        batch = args.batch or (256 if run.dataset.kind == "image" else 1000)
        noise = run.sampler.prior_sample(batch, run.dataset.shape, device, gen)
        note = f"run {run.dir.name} ({run.config.model.name}, {args.weights} weights, step {run.step})"
        return {run.dir.name: Target(partial(run.sampler.sample, run.model), noise, note)}
    out = {}
    for name, case in selected_cases(args.cases, device).items():
        dataset = load_dataset(case.run_config().data)
        model = build_model(case.run_config(), dataset, CATALOG).to(device).eval()
        noise = torch.randn(args.batch or case.sample_batch, *dataset.shape, device=device, generator=gen)
        out[name] = Target(partial(sample, model), noise, f"{case.note}, random init")
    return out


def measure(name: str, target: Target, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Median seconds per batch of every solver and step count, after one untimed warm-up batch."""
    timed(lambda: target.sampler(target.noise, steps=1, solver=args.solvers[0]), device)
    batch = len(target.noise)
    rows = []
    for solver in args.solvers:
        for steps in args.steps:
            runs = [timed(lambda: target.sampler(target.noise, steps=steps, solver=solver), device)
                    for _ in range(args.repeats)]
            seconds, nfe = median(s for s, _ in runs), runs[0][1].nfe
            rows.append({"case": name, "model": target.note, "solver": solver, "steps": steps, "nfe": nfe,
                         "batch": batch, "ms_per_batch": seconds * 1e3, "samples_per_s": batch / seconds,
                         "nfe_per_s": nfe * batch / seconds})
            print(f"{name} {solver} steps={steps}: {batch / seconds:,.0f} samples/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sampling benchmark, print its table and write its JSON."""
    args = parse_args(argv)
    device = setup(args)
    rows, notes = [], [NFE_DEFINITION, "times: median over repeats of one batch, after one untimed warm-up batch"]
    for name, target in targets(args, device).items():
        rows += measure(name, target, args, device)
        notes.append(f"{name}: {target.note}")
    return report("sample", args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
