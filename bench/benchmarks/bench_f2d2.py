"""Benchmark F2D2: few-step vs reference likelihood of trained runs, and the cost of the JVP loss.

    python -m bench.benchmarks.bench_f2d2 --device cpu --runs runs/toy2d-f2d2_joint_checkerboard --n 1000
    python -m bench.benchmarks.bench_f2d2 --device cuda --runs runs/digits-f2d2_joint,runs/mnist-f2d2_joint

    python -m bench.benchmarks.bench_f2d2 --device cpu --cases toy,digits      # training-step cost only

With --runs (per run, via flowdistill.f2d2_eval.evaluate; writes bench/results/f2d2-<device>-nll.json): for
K = 1, 2, 4, 8 the mean per-sample |log p_K - log p_ref| of F2D2 and of the naive estimate without
D, the mean NLL gap, and the wall time of the reference ODE likelihood over that of the K-step one.
Without --runs (per case of bench/common.py; writes ...-train.json): time per training step and
peak memory of plain flow matching, Shortcut-F2D2 and MeanFlow-F2D2 (the jvp loss), u only and
joint (self divergence: exact for vectors, Hutchinson for images; no teacher needed). Peak memory is
CUDA's max_memory_allocated; on CPU it is not measured.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from bench.common import BenchCase, add_common_args, report, selected_cases, setup
from f2d2.flowmap import FlowMapConfig, build_flowmap
from f2d2.losses import F2D2, F2D2Config
from flowdistill.components import MODELS
from nfm.couplings import IndependentCoupling
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from shared.data_sources import load_dataset
from shared.timing import median_seconds

LOSSES = {  # name -> F2D2 settings (None: plain flow matching on the same backbone without s)
    "fm (plain)": None,
    "shortcut u": dict(variant="shortcut", d_weight=0.0),
    "shortcut u+D": dict(variant="shortcut", d_weight=1.0),
    "meanflow u (jvp)": dict(variant="meanflow", d_weight=0.0),
    "meanflow u+D (jvp)": dict(variant="meanflow", d_weight=1.0),
}


def flowmap_config(case: BenchCase) -> FlowMapConfig:
    """The flow-map twin of a benchmark case's backbone."""
    return FlowMapConfig(backbone=replace(case.model, second_time=False))


def bench_losses(name: str, case: BenchCase, device: torch.device, repeats: int) -> list[dict]:
    """One row per loss: median seconds per optimizer step, samples/s and peak CUDA memory."""
    data = load_dataset(case.run_config().data)
    x = data.train[:case.train_batch].to(device)
    rows = []
    for loss_name, settings in LOSSES.items():
        torch.manual_seed(0)
        if settings is None:
            model = MODELS[case.model.name].build(case.model, data.shape).to(device)
            method = FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling())
        else:
            model = build_flowmap(flowmap_config(case), data.shape).to(device)
            divergence = "exact" if data.kind == "vector" else "hutchinson"
            method = F2D2(F2D2Config(div_source="self", divergence=divergence, **settings), data.dim)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(0)

        def step() -> None:
            loss, _ = method(model, (x,), gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(step, device, repeats, warmup=0)  # warmed up before the memory reset
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append({"case": name, "loss": loss_name, "batch": case.train_batch, "ms_per_step": 1e3 * seconds,
                     "samples_per_s": case.train_batch / seconds, "peak_mib": peak if peak is not None else "n/a"})
    return rows


def bench_runs(runs: list[str], device: torch.device, n: int, n_samples: int) -> list[dict]:
    """One row per (run, K): likelihood errors and the wall-time ratio reference / few-step."""
    from flowdistill.api import load_run
    from flowdistill.f2d2_eval import evaluate

    rows = []
    for path in runs:
        run = load_run(path, device=device)
        # cache=False: the reference is timed here, not read back from an earlier (possibly other-device) run
        result, _ = evaluate(run, [1, 2, 4, 8], n, n_samples, run.config.eval.divergence, cache=False)
        for r in result["rows"]:
            rows.append({"run": result["run"], "K": r["K"], "mae": r["mae"], "naive_mae": r["naive_mae"],
                         "gap": r["nll"] - r["ref_nll"], "bpd_gap": r["bpd"] - r["ref_bpd"] if "bpd" in r else "",
                         "analytic_mae": r.get("analytic_mae", ""), "seconds": r["seconds"],
                         "ref_seconds": r["ref_seconds"], "speedup": r["speedup"], "ref_nfe": r["ref_nfe"],
                         "n": result["n"], "divergence": result["divergence"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, repeats=5)
    parser.add_argument("--runs", default="", help="comma-separated trained f2d2 run directories (part 1)")
    parser.add_argument("--n", type=int, default=1000, help="test points scored per run")
    parser.add_argument("--n-samples", type=int, default=1000, help="samples per quality value")
    args = parser.parse_args(argv)
    device = setup(args)
    runs = [r for r in args.runs.split(",") if r.strip()]
    if runs:
        rows = bench_runs(runs, device, args.n, args.n_samples)
        columns = {"run": "run", "K": "K", "mae": "mean abs(logp_K - logp_ref)", "naive_mae": "same, naive (no D)",
                   "gap": "NLL_K - NLL_ref (nats)", "bpd_gap": "bits/dim gap", "analytic_mae": "abs err vs analytic",
                   "seconds": "K-step s", "ref_seconds": "reference s", "speedup": "ref / K-step", "ref_nfe": "ref NFE"}
        notes = ["log p in nats per sample on the same (dequantized) test points; reference: teacher ODE, dopri5"]
        return report("f2d2", args, device, rows, columns, notes, tag="-nll")
    rows = []
    for name, case in selected_cases(args.cases, device).items():
        rows += bench_losses(name, case, device, args.repeats)
    return report("f2d2", args, device, rows,
                  {"case": "case", "loss": "loss", "batch": "batch", "ms_per_step": "ms / step",
                   "samples_per_s": "samples/s", "peak_mib": "peak MiB"},
                  ["jvp losses run the jvp in float32 with math attention under no_grad, then a plain forward",
                   "divergence: self (the map's tangent), exact for vectors, Hutchinson (1 Rademacher probe) "
                   "for images"], tag="-train")


if __name__ == "__main__":
    main()
