"""Coupling cost per training batch for each source, against the student's own training step, and SD-FM fit cost.

For each recipe family (toy2d, digits, mnist; data, student and batch size from its fm_independent.yaml) and for
batch sizes {recipe batch, 256, 1024}, the median wall time of:
    independent      z ~ N(0, I)
    minibatch_ot     exact OT (ot.emd on the CPU), and its entropic variant (reg = OT_REG below)
    semidiscrete_ot  fresh noise + chunked MIPS against the N train points (throughput in queries/s)
    nf_teacher       online: one teacher encode of x + eta*eps' per batch (fp32 and bf16);
                     precomputed: a gather from the coupling cache
    student step     FM loss forward + backward + AdamW step of the recipe's model (independent coupling)
The SD-FM fit is timed per iteration at the recipe's method.coupling.batch and extrapolated to its
method.coupling.iters; the precomputed NFM cache's extraction throughput (perturb + teacher encode at the
nf_teacher recipe's method.coupling.batch, images/s) is timed too.
The teacher is the recipe's TarFlow, randomly initialised (throughput does not depend on the weights).

SD-FM scaling (--sizes): on synthetic Gaussian points (N, --dim) for each N, the dual fit's iterations/s
(`nfm.semidiscrete_ot.DualAscent.step`, noise batch --fit-batch) and the inner-product search's queries/s
(`nfm.mips.InnerProductSearch`, same batch, a random potential), each timed for about --seconds.

Run from the repository root:
    python -m bench.benchmarks.bench_couplings [--device cpu|cuda] [--cases toy,digits,mnist] \
        [--sizes 20000,160000,1280000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import add_common_args, report, setup
from flowdistill.api import resolve_config
from flowdistill.components import CATALOG
from nfm.couplings import IndependentCoupling, MinibatchOTCoupling, SemidiscreteOTCoupling
from nfm.losses import FlowMatchingConfig, FlowMatchingLoss
from nfm.mips import InnerProductSearch
from nfm.semidiscrete_ot import DualAscent, SemidiscretePotential
from nfm.teacher_coupling import NFTeacherCoupling
from nfm.teacher_pairs import TeacherHandle, perturbed, teacher_encode
from shared.data_sources import load_dataset
from shared.run_build import build_model
from shared.timing import median_seconds, timed

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CASES = {"toy": "toy2d", "digits": "digits", "mnist": "mnist"}  # case -> recipe folder
EXTRA_BATCHES = (256, 1024)  # scaling batch sizes besides each recipe's own
OT_REG = 0.05  # entropic minibatch OT regularisation (relative to the mean cost)
FIT_ITERS = 10  # timed SD-FM fit iterations per case
COLUMNS = {"case": "case", "batch": "batch", "n_data": "N", "dim": "dim", "independent_ms": "independent ms",
           "ot_exact_ms": "OT exact ms", "ot_sinkhorn_ms": f"OT sinkhorn({OT_REG}) ms", "sdot_ms": "SD-FM ms",
           "nf_online_ms": "NFM online ms", "nf_online_bf16_ms": "NFM online bf16 ms",
           "nf_precomputed_ms": "NFM cached ms", "step_ms": "student step ms", "ot_pct_of_step": "OT exact / step %",
           "sdot_pct_of_step": "SD-FM / step %", "nf_pct_of_step": "NFM online / step %",
           "sdot_queries_per_s": "SD-FM MIPS queries/s"}
FIT_COLUMNS = {"case": "case", "n_data": "N", "dim": "dim", "sdot_batch": "fit batch", "ms_per_iter": "ms / iter",
               "sdot_iters": "recipe iters", "est_fit_s": "est. fit s", "mips_pairs_per_s": "MIPS scores/s",
               "extract_images_per_s": "NFM extraction img/s", "extract_bf16_images_per_s": "NFM extraction bf16 img/s"}
SCALING_COLUMNS = {"device": "device", "n_data": "N", "dim": "dim", "batch": "batch", "fit_iters": "timed iters",
                   "fit_iters_per_s": "fit iters/s", "fit_ms_per_iter": "ms / iter",
                   "est_fit_s": "est. 2000-iter fit s", "mips_queries_per_s": "MIPS queries/s",
                   "mips_scores_per_s": "MIPS scores/s"}
DEFAULT_SIZES = "20000,160000,1280000"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: each recipe's own, "
                        f"{', '.join(map(str, EXTRA_BATCHES))})")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated data-set sizes N of the SD-FM scaling table ('' skips it)")
    parser.add_argument("--dim", type=int, default=2, help="dimension of the scaling table's synthetic points")
    parser.add_argument("--fit-batch", type=int, default=4096, help="noise batch of the scaling table")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="scaling table: time each measurement for about this long (at least 2 calls)")
    parser.add_argument("--scaling-only", action="store_true", help="skip the recipe cases, run only the scaling table")
    return parser.parse_args(argv)


def student_step(cfg: Any, dataset: Any, device: torch.device, batch: int) -> Callable[[], None]:
    """One FM training step of the recipe's model on a fixed batch (forward, backward, AdamW)."""
    model = build_model(cfg, dataset, CATALOG).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    loss_fn = FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling())
    x = dataset.train[torch.arange(batch) % len(dataset.train)].to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        loss, _ = loss_fn(model, (x,), generator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def nf_couplings(name: str, dataset: Any, device: torch.device) -> tuple[NFTeacherCoupling, NFTeacherCoupling]:
    """Online and precomputed NFM couplings around the recipe's (randomly initialised) teacher."""
    teacher_cfg = resolve_config(RECIPES / CASES[name] / "teacher.yaml")
    nf_cfg = resolve_config(RECIPES / CASES[name] / "fm_nf_teacher.yaml").method.coupling
    torch.manual_seed(0)
    flow = build_model(teacher_cfg, dataset, CATALOG).to(device).eval().requires_grad_(False)
    teacher = TeacherHandle(flow, Path("."), 0, "", dataset.base_fingerprint)
    online = NFTeacherCoupling(teacher, dataset.train, "online", nf_cfg.draws, batch_size=nf_cfg.batch)
    cached = NFTeacherCoupling(teacher, dataset.train, "precomputed", nf_cfg.draws)
    cached._cache = torch.randn(len(dataset.train), nf_cfg.draws, *dataset.shape, device=device)
    cached.sigma = 1.0
    return online, cached


def extraction_rate(coupling: NFTeacherCoupling, dtype: str, device: torch.device, images: int = 1024) -> float:
    """Images/s of cache extraction: perturb with the addressed eps' and encode, method.coupling.batch at a time."""
    data = coupling.data.to(device)
    index = torch.arange(images) % len(data)
    draw = torch.zeros_like(index)

    def extract() -> Any:
        return teacher_encode(coupling.teacher.flow, perturbed(data, index, draw, coupling.teacher, 0), dtype,
                              coupling.batch_size)

    return images / median_seconds(extract, device, 1)


def bench_case(name: str, device: torch.device, repeats: int, batches: tuple[int, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the coupling table for one recipe family, and its fit-cost row."""
    cfg = resolve_config(RECIPES / CASES[name] / "fm_independent.yaml")
    sd_cfg = resolve_config(RECIPES / CASES[name] / "fm_semidiscrete_ot.yaml").method.coupling
    dataset = load_dataset(cfg.data)
    n, dim = len(dataset.train), dataset.dim
    generator = torch.Generator(device=device).manual_seed(0)
    sdot = SemidiscreteOTCoupling(dataset.train, dataset.fingerprint, chunk=sd_cfg.chunk)
    sdot.potential = SemidiscretePotential(torch.randn(n, generator=torch.Generator().manual_seed(0)),
                                           dataset.fingerprint)
    sdot.prepare(device)
    online, cached = nf_couplings(name, dataset, device)
    rows = []
    for batch in sorted(set(batches) or {cfg.train.batch_size, *EXTRA_BATCHES}):
        x = dataset.train[torch.arange(batch) % n].to(device)
        row = {"case": name, "batch": batch, "n_data": n, "dim": dim}
        half = max(repeats // 2, 1)
        row["independent_ms"] = 1000 * median_seconds(lambda: IndependentCoupling()(x, generator), device, repeats)
        row["ot_exact_ms"] = 1000 * median_seconds(lambda: MinibatchOTCoupling()(x, generator), device, repeats)
        row["ot_sinkhorn_ms"] = 1000 * median_seconds(lambda: MinibatchOTCoupling(OT_REG)(x, generator), device, half)
        row["sdot_ms"] = 1000 * median_seconds(lambda: sdot.pairs(x, generator), device, repeats)
        online.prepare(device)
        row["nf_online_ms"] = 1000 * median_seconds(lambda: online.pairs(x, generator), device, half)
        online.dtype = "bf16"
        row["nf_online_bf16_ms"] = 1000 * median_seconds(lambda: online.pairs(x, generator), device, half)
        online.dtype = "fp32"
        row["nf_precomputed_ms"] = 1000 * median_seconds(lambda: cached.pairs(x, generator), device, repeats)
        row["step_ms"] = 1000 * median_seconds(student_step(cfg, dataset, device, batch), device, half)
        row["ot_pct_of_step"] = 100 * row["ot_exact_ms"] / row["step_ms"]
        row["sdot_pct_of_step"] = 100 * row["sdot_ms"] / row["step_ms"]
        row["nf_pct_of_step"] = 100 * row["nf_online_ms"] / row["step_ms"]
        row["sdot_queries_per_s"] = batch / (row["sdot_ms"] / 1000)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ascent = DualAscent(dataset.train.reshape(n, -1).to(device), sd_cfg.batch, generator, sd_cfg.chunk)
    ms = 1000 * median_seconds(lambda: ascent.step(sd_cfg.lr), device, FIT_ITERS)
    fit = {"case": name, "n_data": n, "dim": dim, "sdot_batch": sd_cfg.batch, "ms_per_iter": ms,
           "sdot_iters": sd_cfg.iters, "est_fit_s": ms * sd_cfg.iters / 1000,
           "mips_pairs_per_s": sd_cfg.batch * n / (ms / 1000),
           "extract_images_per_s": extraction_rate(online, "fp32", device),
           "extract_bf16_images_per_s": extraction_rate(online, "bf16", device)}
    print(json.dumps(fit), flush=True)
    return rows, fit


def rate(fn: Callable[[], Any], device: torch.device, seconds: float) -> tuple[int, float]:
    """(calls, calls per second) of `fn` after one warm-up call, repeated for about `seconds` (at least twice)."""
    fn()
    calls, elapsed = 0, 0.0
    while calls < 2 or elapsed < seconds:
        elapsed += timed(fn, device)[0]
        calls += 1
    return calls, calls / elapsed


def bench_scaling(sizes: list[int], dim: int, batch: int, device: torch.device, seconds: float) -> list[dict[str, Any]]:
    """Fit iterations/s and MIPS queries/s of SD-FM against the number of data points N."""
    rows = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        y = torch.randn(n, dim, device=device, generator=gen)
        ascent = DualAscent(y, batch, gen)
        fit_calls, fit_rate = rate(lambda: ascent.step(1e-3), device, seconds)
        search, g = InnerProductSearch(y), 0.1 * torch.randn(n, device=device, generator=gen)
        queries = torch.randn(batch, dim, device=device, generator=gen)
        _, mips_rate = rate(lambda: search(queries, g), device, seconds)
        row = {"device": device.type, "n_data": n, "dim": dim, "batch": batch, "fit_iters": fit_calls,
               "fit_iters_per_s": fit_rate, "fit_ms_per_iter": 1000 / fit_rate, "est_fit_s": 2000 / fit_rate,
               "mips_queries_per_s": batch * mips_rate, "mips_scores_per_s": batch * n * mips_rate}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print two Markdown tables and write JSON."""
    args = parse_args(argv)
    device = setup(args)
    names = [c.strip() for c in args.cases.split(",") if c.strip()] or (
        list(CASES) if device.type == "cuda" else ["toy", "digits"])
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choices: {', '.join(CASES)}")
    rows, fits = [], []
    for name in [] if args.scaling_only else names:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
        case_rows, fit = bench_case(name, device, args.repeats, batches)
        rows += case_rows
        fits.append(fit)
    notes = [f"medians of {args.repeats} timed calls after a warm-up (half as many for sinkhorn and the student step); "
             "minibatch OT solves on the CPU whatever the device",
             "student step: FM loss forward + backward + AdamW on the recipe's model (independent coupling)",
             "NFM online: perturb (per-address seeded eps') + teacher encode of the batch; cached: a gather from the "
             "(N, draws, ...) cache on the device; extraction: 1024 images, one timed pass",
             f"fit: {FIT_ITERS} timed SD-FM dual iterations, extrapolated to the recipe's method.coupling.iters "
             "(plus a final evaluation of about 10 N noise draws, not included)",
             f"scaling: synthetic N(0, I_{args.dim}) points, noise batch {args.fit_batch}, each rate timed for about "
             f"{args.seconds:g} s after a warm-up call; est. fit s = 2000 iterations at that rate (the recipes' "
             "default), without the final evaluation"]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    scaling = bench_scaling(sizes, args.dim, args.fit_batch, device, args.seconds)
    return report("bench_couplings", args, device, rows, COLUMNS, notes,
                  extra={"fit_rows": (fits, FIT_COLUMNS), "scaling_rows": (scaling, SCALING_COLUMNS)})


if __name__ == "__main__":
    main()
