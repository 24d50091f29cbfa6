"""`flowdistill f2d2-eval RUN`: few-step sampling and likelihood of an F2D2 run against its references.

For each K: sample quality (W2 / feature FD) with and without self-guidance, the few-step NLL
(K NFE, no Jacobian), the naive estimate without D (f2d2.flowmap.naive_log_likelihood), the
teacher's reference NLL (adaptive ODE, exact or Hutchinson divergence), the per-sample absolute
error between them, NFE and wall time. Every estimate scores the same test points, dequantized
once with the seeded generator exactly as shared.evaluate.reference_nll does, and bits/dim come
from shared.data.bits_per_dim. With an NF teacher (method.nf_teacher or --nf-teacher), its exact
log p on the same points is reported next to the ODE-reference gap.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from f2d2.flowmap import few_step_log_likelihood, naive_log_likelihood
from f2d2.guidance import guided_sample
from flowdistill.api import load_run
from shared.data import bits_per_dim
from shared.evaluate import (cache_folder, evaluation_points, format_table, generate, generate_with, likelihood_key,
                             nfe_summary, run_likelihood, score_batches, standard_error, write_columns, write_json)
from shared.likelihood import (CONVERGED_NATS, LikelihoodResult, choose_divergence, default_solver_settings,
                               log_likelihood, refinement_change)
from shared.reference_cache import ReferenceScores, cached_reference
from shared.sampling import GRIDS
from shared.metrics import feature_extractor, sample_quality
from shared.run import Run
from shared.run_build import require_same_data

LogpFn = Callable[[Tensor, torch.Generator], LikelihoodResult]
CHECK_POINTS = 8  # points of the ODE reference's convergence check (two more adaptive solves each)


def score(fn: LogpFn, x: Tensor, gen: torch.Generator, batch_size: int) -> dict[str, Any]:
    """Per-sample log p (N,) float64 on the CPU, NFE (mean per point; `nfe_per_point` (N,)) and wall seconds
    of `fn` over x in batches."""
    s = score_batches(fn, x, gen, batch_size, desc="score")
    return {"logp": s.logp, "nfe": s.nfe.double().mean().item(), "nfe_per_point": s.nfe, "seconds": s.seconds}


def reference_fn(run: Run, divergence: str) -> tuple[str, LogpFn]:
    """The ODE reference: the teacher run's likelihood, or the map's own tangent u(x, t, t) without a teacher."""
    teacher = run.config.method.teacher
    if teacher:
        ref = load_run(teacher, device=next(run.model.parameters()).device)
        return f"teacher {ref.config.name}", lambda x, g: ref.sampler.log_likelihood(ref.model, x, divergence, g)
    return "tangent u(x,t,t)", lambda x, g: log_likelihood(lambda y, t: run.model(y, t, t)[0], x, divergence,
                                                            generator=g)


def reference_convergence(run: Run, x: Tensor, divergence: str) -> dict[str, Any] | None:
    """The ODE reference's own check on the first `CHECK_POINTS` points: how far log p moves when the solver's
    tolerances are halved (`shared.likelihood.refinement_change`), in nats per sample, against the
    tolerance `CONVERGED_NATS`. None when the reference is exact (a normalizing-flow teacher)."""
    teacher = run.config.method.teacher
    if teacher:
        ref = load_run(teacher, device=x.device)
        if not getattr(ref.sampler, "ode_likelihood", False):
            return None
        field = ref.model
    else:
        def field(y: Tensor, t: Tensor) -> Tensor:
            return run.model(y, t, t)[0]
    _, change = refinement_change(field, x[:CHECK_POINTS], divergence)
    return {"points": len(change), "max_nats": change.max().item(), "mean_nats": change.mean().item(),
            "tolerance_nats": CONVERGED_NATS}


def copy_generator(gen: torch.Generator) -> torch.Generator:
    """A generator in the same state as `gen` (so that what draws after the reference does not depend on
    whether the reference was computed or read from the cache)."""
    out = torch.Generator(device=gen.device)
    out.set_state(gen.get_state())
    return out


def reference_scores(run: Run, x: Tensor, gen: torch.Generator, divergence: str, batch_size: int, label: str,
                     cache: bool = True) -> tuple[str, ReferenceScores]:
    """The reference log p (model units) and NFE of each point, with the reference's name.

    With a teacher: the teacher run's own likelihood, read from or written to the teacher's reference cache
    (the one `flowdistill nll TEACHER` uses, keyed by the teacher's weights). Without: the ODE likelihood of
    the map's tangent u(x, t, t), cached in this run's folder keyed by the map's weights. Probes are drawn
    from a copy of `gen`, which is left as it was.
    """
    teacher = run.config.method.teacher
    if teacher:
        ref = load_run(teacher, device=x.device)
        return f"teacher {ref.config.name}", run_likelihood(ref, x, copy_generator(gen), divergence, batch_size,
                                                            label, cache)
    name, fn = reference_fn(run, divergence)

    def compute() -> ReferenceScores:
        return score_batches(fn, x, copy_generator(gen), batch_size, desc="reference")

    if not cache:
        return name, compute()
    key = likelihood_key(run.model, x, divergence, f"tangent ode likelihood, {default_solver_settings()}", gen,
                         batch_size)
    return name, cached_reference(cache_folder(run), key, compute, label)


def valid_grids(run: Run, steps: list[int]) -> list[str]:
    """The grids (of GRIDS, in that order) whose jumps the map was trained on for every K in `steps`."""
    out = []
    for grid in GRIDS:
        try:
            for k in steps:
                run.sampler.check_grid(k, grid)
        except ValueError:
            continue
        out.append(grid)
    return out


def grid_disagreement(run: Run, x: Tensor, ref_logp: Tensor, steps: list[int], grid: str, batch_size: int) -> float:
    """Mean over K of the mean |few-step log p_K - reference log p| (nats per point) of points x on `grid`."""
    gaps = []
    for k in steps:
        few = score(lambda y, g: few_step_log_likelihood(run.model, y, k, grid), x, torch.Generator(), batch_size)
        gaps.append((few["logp"] - ref_logp).abs().mean().item())
    return sum(gaps) / len(gaps)


def choose_grid(run: Run, steps: list[int], n: int, divergence: str, seed: int = 0, batch_size: int = 500,
                cache: bool = True) -> dict[str, Any]:
    """Choose the time grid of the K jumps on the validation split, without an exact density.

    Criterion: agreement with the reference the map distils. For each grid whose jumps the map was trained
    on for every requested K (`valid_grids`; a Shortcut map accepts only dyadic jumps), the mean over K of
    the mean per-point |few-step log p_K - ODE reference log p| on the first `n` validation points (all when
    n = 0); the smallest wins, linear on a tie. The few-step estimate is a distillation of that reference, so
    the grid on which it reproduces the reference best is the one its K jumps were learned best on; it needs
    no exact density, and it does not reward a map for straying below the reference (validation NLL
    would). The ODE reference comes from the reference cache. Returns {grid, chosen_by, criterion, split,
    n, scores (grid -> nats), reason}; without a validation split (data.val_fraction = 0) or with one valid
    grid, nothing is compared and `reason` says so.
    """
    candidates = valid_grids(run, steps)
    base = {"chosen_by": "validation", "split": "val", "criterion": CRITERION, "scores": {}, "n": 0}
    if not candidates:
        raise ValueError(f"no time grid has only trained jumps for K = {', '.join(map(str, steps))}; "
                         + ("use K a power of two" if run.sampler.trained_levels else "check --steps"))
    if len(candidates) == 1:
        return {**base, "grid": candidates[0], "chosen_by": "only valid grid",
                "reason": f"the only grid whose jumps the map was trained on for K = {', '.join(map(str, steps))}"}
    if run.dataset.val is None or not len(run.dataset.val):
        grid = "linear" if "linear" in candidates else candidates[0]
        return {**base, "grid": grid, "chosen_by": "default",
                "reason": "not chosen: the run has no validation split (data.val_fraction = 0); pass --grid"}
    x, gen = evaluation_points(run, "val", n or len(run.dataset.val), seed)
    _, ref = reference_scores(run, x, gen, divergence, batch_size, "val", cache)
    scores = {g: grid_disagreement(run, x, ref.logp, steps, g, batch_size) for g in candidates}
    grid = min(candidates, key=lambda g: scores[g])
    others = ", ".join(f"{g} {scores[g]:.3f}" for g in candidates if g != grid)
    return {**base, "grid": grid, "scores": scores, "n": len(x),
            "reason": f"chosen on val: mean |few-step - ODE| {scores[grid]:.3f} vs {others} nats"}


CRITERION = "mean over K of mean |few-step log p - ODE reference log p| on the validation split (smallest wins)"


def _guided_quality(run: Run, steps: int, n: int, seed: int, lr: float, iterations: int, extractor: Any,
                    batch_size: int, grid: str) -> tuple[float, int, float]:
    """Sample quality, NFE and seconds of self-guided sampling on the same seeded noise as `generate`."""
    s = generate_with(run, n, lambda noise: guided_sample(run.model, noise, steps, lr, iterations, grid), seed,
                      batch_size)
    return sample_quality(s.x, run.dataset, extractor)["value"], s.nfe, s.seconds


def evaluate(run: Run, steps: list[int], n_nll: int, n_samples: int, divergence: str, seed: int = 0,
             guidance_steps: int = 0, guidance_lr: float = 0.1, nf_teacher: str = "", batch_size: int = 500,
             grid: str = "linear", split: str = "test", cache: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Rows (one per K) of few-step vs reference likelihood and sample quality, plus the reference's own cost,
    and per-sample columns (N,): index, reference / NF / exact log p and few-step log p per K, in nats.

    n_nll = 0 scores the whole split. Tabular runs report every log p in the units of the user's file
    (the standardisation's log-Jacobian added; differences between estimates do not change). `grid` "auto"
    chooses the grid on the validation split (`choose_grid`); the summary's `grid_choice` records how the
    grid was set. The ODE reference comes from the reference cache unless `cache` is False.
    """
    data, model = run.dataset, run.model
    div = choose_divergence(divergence, data.dim)
    if grid == "auto":
        choice = choose_grid(run, steps, n_nll, div, seed, batch_size, cache)
        grid = choice["grid"]
    else:
        choice = {"grid": grid, "chosen_by": "given", "reason": "given (--grid), not chosen"}
    for k in steps:
        run.sampler.check_grid(k, grid)
    points = getattr(data, split, None)
    x, gen = evaluation_points(run, split, n_nll or (0 if points is None else len(points)), seed)
    shift = 0.0 if data.standardization is None else data.standardization.log_jacobian
    ref_name, ref_scores = reference_scores(run, x, gen, div, batch_size, split, cache)
    ref = {"logp": ref_scores.logp, "nfe": ref_scores.nfe.double().mean().item(), "seconds": ref_scores.seconds}
    nf = None
    if nf_teacher:
        nf_run = load_run(nf_teacher, device=x.device)
        require_same_data(nf_teacher, nf_run.dataset.base_fingerprint, data, "--nf-teacher")
        nf = score(lambda y, g: nf_run.sampler.log_likelihood(nf_run.model, y), x, gen, batch_size)
    extractor = feature_extractor(data, device=str(x.device)) if data.kind == "image" else None
    analytic = None if data.log_density is None else data.log_density(x.cpu()).double()
    for result in (ref, nf):
        if result is not None:
            result["logp"] = result["logp"] + shift
    columns: dict[str, Tensor] = {"index": torch.arange(len(x)), "ref_logp_nats": ref["logp"]}
    if nf is not None:
        columns["nf_logp_nats"] = nf["logp"]
    if analytic is not None:
        columns["exact_logp_nats"] = analytic

    def nll_stats(logp: Tensor, prefix: str) -> dict[str, float]:
        out = {f"{prefix}nll": -logp.mean().item()}
        if data.levels is not None:
            out[f"{prefix}bpd"] = bits_per_dim(-logp, data.dim, data.levels).mean().item()
        return out

    rows = []
    for k in steps:
        few = score(lambda y, g: few_step_log_likelihood(model, y, k, grid), x, gen, batch_size)
        naive = score(lambda y, g: naive_log_likelihood(model, y, k, grid, divergence=div, generator=g), x, gen,
                      batch_size)
        few["logp"], naive["logp"] = few["logp"] + shift, naive["logp"] + shift
        columns[f"K{k}_logp_nats"] = few["logp"]
        row: dict[str, Any] = {"K": k, "nfe": few["nfe"], **nll_stats(few["logp"], ""),
                               **nll_stats(ref["logp"], "ref_")}
        row["mae"] = (few["logp"] - ref["logp"]).abs().mean().item()
        if data.levels is not None:  # the same per-sample error in bits per dimension
            row["mae_bpd"] = row["mae"] / (data.dim * math.log(2))
        row.update(nll_stats(naive["logp"], "naive_"))
        row["naive_mae"] = (naive["logp"] - ref["logp"]).abs().mean().item()
        if nf is not None:
            row["nf_nll"] = -nf["logp"].mean().item()
            row["nf_mae"] = (few["logp"] - nf["logp"]).abs().mean().item()
            row["ref_nf_mae"] = (ref["logp"] - nf["logp"]).abs().mean().item()
        if analytic is not None:
            row["exact_nll"] = -analytic.mean().item()
            row["analytic_mae"] = (few["logp"] - analytic).abs().mean().item()
            row["ref_analytic_mae"] = (ref["logp"] - analytic).abs().mean().item()
            row["gap_to_exact"] = row["nll"] - row["exact_nll"]
            row["gap_stderr"] = standard_error(analytic - few["logp"])  # paired: the same points
            row["ref_gap_to_exact"] = row["ref_nll"] - row["exact_nll"]
        row.update(seconds=few["seconds"], ref_seconds=ref["seconds"], ref_nfe=ref["nfe"],
                   speedup=ref["seconds"] / max(few["seconds"], 1e-9))
        s = generate(run, n_samples, k, "euler", grid, seed, batch_size)
        q = sample_quality(s.x, data, extractor)
        row.update(metric=q["metric"], quality=q["value"], extractor=q["extractor"], sample_seconds=s.seconds)
        if guidance_steps:
            row["guided_quality"], row["guided_nfe"], row["guided_seconds"] = _guided_quality(
                run, k, n_samples, seed, guidance_lr, guidance_steps, extractor, batch_size, grid)
        rows.append(row)
    summary = {"run": run.config.name, "step": run.step, "reference": ref_name, "divergence": div, "n": len(x),
               "split": split, "grid": grid, "grid_choice": choice, "units": data.units,
               "reference_cached": ref_scores.cached, "reference_seconds": ref_scores.seconds,
               "reference_convergence": reference_convergence(run, x, div),
               **nfe_summary(ref_scores.nfe, "reference_nfe"), "nf_teacher": nf_teacher or None,
               "exact_density": data.log_density is not None, "guidance_lr": guidance_lr,
               "guidance_steps": guidance_steps, "rows": rows}
    return summary, columns


COLUMNS = ["K", "nfe", "nll", "ref_nll", "mae", "naive_nll", "naive_mae", "nf_nll", "nf_mae", "ref_nf_mae",
           "exact_nll", "gap_to_exact", "gap_stderr", "ref_gap_to_exact", "analytic_mae", "ref_analytic_mae", "bpd", "ref_bpd", "mae_bpd", "naive_bpd", "seconds", "ref_seconds",
           "ref_nfe", "speedup", "metric", "quality", "guided_quality", "guided_nfe"]


def run_f2d2_eval(args: Any) -> int:
    """Print the grid (and why), the Markdown table; write f2d2-eval.json/.csv/.png into the run directory, or
    f2d2-eval-GRID.* when --grid set the grid (so an override never replaces the report on the chosen grid)."""
    from shared.evaluate import format_nfe
    from shared.plots import save_curves

    run = load_run(args.run, weights=args.weights, device=args.device)
    if run.config.method.name != "f2d2":
        raise ValueError(f"{args.run} is a {run.config.method.name!r} run; f2d2-eval needs an f2d2 run")
    ev = run.config.eval
    result, columns = evaluate(run, args.steps, args.n, args.n_samples or ev.n_samples,
                               args.divergence or ev.divergence, args.seed, args.guidance_steps, args.guidance_lr,
                               args.nf_teacher or run.config.method.nf_teacher, args.batch_size, args.grid or "auto",
                               args.split)
    rows, grid = result["rows"], result["grid"]
    print(f"grid: {grid} ({result['grid_choice']['reason']})")
    cached = " (read from the reference cache)" if result["reference_cached"] else ""
    print(f"{result['run']} (step {result['step']}): reference {result['reference']}, {result['divergence']} "
          f"divergence, {format_nfe(result, 'reference_nfe')}{cached}, {result['n']} {args.split} points, "
          f"{grid} grid; log p in nats per sample ({result['units']}), NLL = -mean log p")
    print(format_table(rows, [c for c in COLUMNS if c in rows[0]]))
    out = Path(args.run)
    stem = "f2d2-eval" + (f"-{grid}" if args.grid else "") + ("" if args.split == "test" else f"-{args.split}")
    write_json(out / f"{stem}.json", result)
    write_columns(out / f"{stem}.csv", columns)
    if "exact_logp_nats" in columns:
        from shared.plots import save_calibration

        estimates = {f"K = {r['K']}": columns[f"K{r['K']}_logp_nats"] for r in rows}
        estimates["ODE reference"] = columns["ref_logp_nats"]
        save_calibration(estimates, columns["exact_logp_nats"], out / f"{stem}-calibration.png",
                         f"{result['run']}: few-step and ODE log p against the exact density")
    ks = [r["K"] for r in rows]
    curves = {"F2D2 (D head)": (ks, [r["mae"] for r in rows]), "naive (no D)": (ks, [r["naive_mae"] for r in rows])}
    if "nf_mae" in rows[0]:
        curves["F2D2 vs NF teacher"] = (ks, [r["nf_mae"] for r in rows])
    save_curves(curves, out / f"{stem}.png", "K (NFE)", "mean |log p_K - log p_ref| (nats)", result["run"])
    print(f"wrote {out / stem}.json, .csv and .png" + (" and -calibration.png" if "exact_logp_nats" in columns else ""))
    return 0
