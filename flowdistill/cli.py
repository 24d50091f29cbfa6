"""`flowdistill` command line: every subcommand in one place, imports deferred until a command runs.

    run        the main job: a data set through every stage to a report
    train      train the run a recipe describes              sample   draw samples from a run
    nll        likelihood of a split (exact for flows)       eval     sample quality vs number of steps
    couplings  precompute NFM teacher pairs for a recipe     compare  students per coupling, side by side
    f2d2-eval  few-step NLL and sampling of an F2D2 run
    pretrained the teachers shipped with the package          recipes  the bundled recipes
    findings   the verdicts of a pipeline's evaluation
    prepare-data  convert a folder of images or ImageNet .npz files once into uint8 shards
    import     a model trained elsewhere (ml-tarflow checkpoint, diffusers UNet velocity field) as a run
    export     a run as a diffusers folder (UNet2DModel / DiTTransformer2DModel + scheduler) or safetensors
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

GRIDS = ("linear", "quadratic", "geometric")  # the time grids of shared.sampling (listed here so --help imports no torch)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers such as 1,2,4,8."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return values


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum; `expected` names the range in the error message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
count = int_at_least(0, "an integer >= 0 (0: the default)")  # 0 keeps the documented default


THREADS_ENV = "FLOWDISTILL_THREADS"


def free_cores() -> int:
    """Cores this process may use that are not busy (1-minute load average), split between the processes of an
    `accelerate launch` on this machine; at least 1. The default thread count: bench/benchmarks/bench_threads.py
    found two threads faster than one on an idle 2-core machine and one 2-3x faster than two while another job holds
    a core."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, (cores - busy) // processes)


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads: `--threads`, else $FLOWDISTILL_THREADS, else $OMP_NUM_THREADS, else the free
    cores (`free_cores`); returns the count."""
    import os

    if requested is None:
        for name in (THREADS_ENV, "OMP_NUM_THREADS"):
            text = os.environ.get(name, "").strip()
            if not text:
                continue
            try:
                requested = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a thread count: expected a positive integer") from None
            if requested < 1:
                raise ValueError(f"{name}={text!r} is not a thread count: expected a positive integer")
            break
        else:
            requested = free_cores()
    import torch

    torch.set_num_threads(requested)
    return requested


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train the model a recipe describes, in `<out_dir>/<name>/`."""
    from flowdistill.api import resolve_config

    cfg = resolve_config(args.recipe, args.overrides)
    if args.dry_run:
        from shared.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    from accelerate import PartialState

    from flowdistill.api import train

    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    state = PartialState()
    if state.is_main_process and cfg.train.sample_grid:
        write_samples(run_dir, steps=max(cfg.eval.steps), solver=cfg.eval.solver, grid=cfg.eval.grid,
                      n=None, seed=0, device=str(state.device))
    return 0


def describe_sampling(run: Any, steps: int, solver: str, grid: str) -> tuple[str, str]:
    """(file stem, words) naming a draw by what produced it: the sampler's own `describe_sampling` (a flow's
    decode, a flow map's jumps), else an ODE solve `steps<K>-<solver>-<grid>`."""
    describe = getattr(run.sampler, "describe_sampling", None)
    if describe is not None:
        return describe(run.model, steps, solver, grid)
    return f"steps{steps}-{solver}-{grid}", f"{solver}, {steps} steps, {grid} grid"


def write_samples(run_dir: Path, steps: int | None, solver: str, grid: str, n: int | None, seed: int, device: str,
                  out: Path | None = None, weights: str = "auto") -> Path:
    """Draw samples of a run and write a PNG (grid or scatter) and an .npz (samples, nfe, seconds, units);
    tabular runs write them in the units of the user's data file. The default file name says what produced
    the samples (`describe_sampling`): steps8-euler-linear, jumps4-geometric, decode."""
    import numpy as np

    from flowdistill.api import load_run, sample, sampling_settings
    from shared.checkpoint import atomic_write_bytes
    from shared.evaluate import LARGE_SAMPLE, require_sample_memory, sampling_estimate
    from shared.plots import save_samples_figure
    from shared.rundir import samples_dir

    run = load_run(run_dir, weights=weights, device=device)
    n = n or (64 if run.dataset.kind == "image" else 2000)
    steps, solver, grid = sampling_settings(run, steps, solver, grid)  # the run's own settings unless given
    require_sample_memory(run, n)
    if n >= LARGE_SAMPLE:
        print(sampling_estimate(run, n, steps, solver, grid))
    s = sample(run, n, steps, solver, grid, seed)
    stem, words = describe_sampling(run, steps, solver, grid)
    out = Path(out) if out else samples_dir(run_dir) / f"{stem}.png"
    title = f"{run.config.name}: {words} ({s.nfe} NFE)"
    x, data = run.dataset.to_user(s.x), run.dataset
    save_samples_figure(x, out, data.levels, data.to_user(data.test) if data.kind == "vector" else None, title)
    buf = io.BytesIO()
    np.savez(buf, samples=x.numpy(), nfe=s.nfe, seconds=s.seconds, units=data.units)
    atomic_write_bytes(out.with_suffix(".npz"), buf.getvalue())
    print(f"wrote {out} and {out.with_suffix('.npz')} ({n} samples, {s.nfe} NFE, {s.seconds:.2f} s)")
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw samples from a trained run; writes a PNG (grid or scatter) and an .npz next to it."""
    if args.out:
        from shared.checkpoint import check_output_file

        check_output_file(Path(args.out), f"--out {args.out}")
    write_samples(Path(args.run), args.steps, args.solver, args.grid, args.n, args.seed, args.device,
                  Path(args.out) if args.out else None, args.weights)
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    """Likelihood of a split (or of a file, --data): exact for flows, ODE (exact or Hutchinson divergence)
    otherwise, in the units of the data; writes nll-<split>.json (summary), nll-<split>.csv (per-sample log p,
    index, bits/dim, error to an exact density) and, for a known density, nll-<split>-calibration.png.
    --data FILE writes nll-file-<stem>.*"""
    import torch

    from flowdistill.api import load_run
    from shared.evaluate import file_points, format_nfe, score_points, score_split, write_nll

    run = load_run(args.run, weights=args.weights, device=args.device)
    divergence = args.divergence or run.config.eval.divergence
    if args.data:
        x = file_points(run, args.data)[:args.n or None]
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        res, columns = score_points(run, x, gen, divergence, label=f"file {args.data}")
        stem = f"nll-file-{Path(args.data).stem}"
    else:
        res, columns = score_split(run, args.split, args.n, divergence, args.seed)
        stem = f"nll-{args.split}"
    res["step"] = run.step
    line = f"{res['split']}: NLL {res['nll_nats']:.4f} ± {res['nll_nats_stderr']:.4f} nats/sample ({res['units']})"
    if "bits_per_dim" in res:
        line += f", {res['bits_per_dim']:.4f} bits/dim"
    if "exact_nll_nats" in res:
        line += (f"; exact NLL {res['exact_nll_nats']:.4f}, gap {res['gap_to_exact_nats']:+.4f} ± "
                 f"{res['gap_stderr']:.4f}, mean |error| {res['mean_abs_error_nats']:.4f} nats")
    timing = "read from the reference cache" if res.get("cached") else f"{res['seconds']:.1f} s"
    print(line + f" ({res['n']} points, {res['divergence']} divergence, {format_nfe(res)}, {timing})")
    paths = write_nll(Path(args.run), stem, res, columns, f"{run.config.name}: {res['split']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Sample quality vs number of steps: Markdown table on stdout, eval.json and eval.png in the run."""
    from flowdistill.api import load_run
    from shared.evaluate import format_table, quality_vs_steps, write_json
    from shared.plots import save_curves

    run = load_run(args.run, weights=args.weights, device=args.device)
    ev = run.config.eval
    steps = args.steps or list(ev.steps)
    solver, grid = args.solver or ev.solver, args.grid or ev.grid
    rows = quality_vs_steps(run, steps, solver, grid, args.n or ev.n_samples, args.seed, split=args.split)
    print(format_table(rows, ["steps", "solver", "grid", "nfe", "metric", "value", "extractor", "seconds", "samples_per_s"]))
    out = Path(args.run)
    units = {"w2_units": run.dataset.units} if run.dataset.kind == "vector" else {}  # W2 in the data's units
    stem = "eval" if args.split == "test" else f"eval-{args.split}"
    write_json(out / f"{stem}.json", {"run": run.config.name, "step": run.step, "split": args.split, **units,
                                       "rows": rows})
    label = f"{rows[0]['metric']} ({rows[0]['extractor'] or 'data'})"
    save_curves({f"{solver}/{grid}": ([r["nfe"] for r in rows], [r["value"] for r in rows])}, out / f"{stem}.png",
                "NFE", label, f"{run.config.name} ({args.split} split)")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")
    return 0


def cmd_couplings(args: argparse.Namespace) -> int:
    """Precompute the NFM teacher pairs a student recipe trains on (method.coupling.mode=precomputed)."""
    from flowdistill.api import load_run, resolve_config
    from nfm.coupling_cache import extract

    extract(resolve_config(args.recipe, args.overrides), load_run, overwrite=args.overwrite)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train the same student on each coupling (and the teachers), then compare quality vs NFE, straightness and speed."""
    from flowdistill.compare import comparison_plan, load_spec, run_comparison
    from shared.evaluate import format_table

    spec = load_spec(args.spec, args.overrides)
    if args.dry_run:
        rows = comparison_plan(spec)
        print(format_table(rows, ["role", "run", "steps", "state"]))
        print(f"{sum(r['state'] != 'finished' for r in rows)} of {len(rows)} runs to train or resume; "
              f"results would go to {spec.out_dir}/{spec.name}/")
        return 0
    out = run_comparison(spec, " ".join(["flowdistill compare", args.spec, *args.overrides]))
    if (out / "comparison.md").is_file():
        print((out / "comparison.md").read_text())
        print(f"wrote {out}/comparison.md, results.json, quality_vs_nfe.png, loss_curves.png, samples.png")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: teacher -> NF couplings -> students with every coupling -> F2D2 -> evaluation -> report."""
    from flowdistill.pipeline import Pipeline, run_pipeline, select_stages
    from flowdistill.pipeline_spec import load_pipeline
    from flowdistill.recipes import pipeline_spec

    pipeline = Pipeline(load_pipeline(pipeline_spec(args.pipeline), args.overrides))
    stages = select_stages(args.only.split(",") if args.only else None, args.start, args.until)
    if args.plan:
        print(pipeline.plan())
        return 0
    command = " ".join(["flowdistill run", args.pipeline, *args.overrides])
    from shared.rundir import resumed_by

    with resumed_by(f"rerun `{command}` (finished runs are reused)"):
        seconds = run_pipeline(pipeline, stages, command=command)
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    """List the teachers shipped with the package (use one as `teacher: pretrained:<name>` in a pipeline, or
    wherever a run directory is accepted) with the figures of their model cards; every file's hash is checked."""
    from flowdistill.components import PRETRAINED
    from flowdistill.packed import describe

    for name, folder in PRETRAINED.items():
        row = describe(name, folder)
        named = (("test bits/dim", "test_bits_per_dim", "{:.4g}"), ("sample FD", "sample_fd", "{:.4g}"),
                 ("parameters", "parameters", "{:,}"))
        figures = ", ".join(f"{label} {form.format(row[key])}" for label, key, form in named if key in row)
        print(f"{row['ref']:<32} {row['status']}: {row.get('summary', '')} ({figures})")
        if args.verbose:
            print(f"    folder {folder}\n    recipe {row.get('recipe', '?')}, reproduce: {row.get('command', '?')}")
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    """Print the Findings of a pipeline's evaluation JSON (`<pipeline>/evaluation-<key>.json`): one line per claim
    with its two sides, their spread over seeds and the verdict by the project's rule (holds, tie, fails)."""
    import json

    from flowdistill.report import findings_markdown

    path = Path(args.evaluation)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the evaluation {path}: {err}; pass the evaluation-<key>.json a "
                         "`flowdistill run` wrote") from None
    print(findings_markdown(result), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the recipes bundled with the package (every command that takes a recipe or a pipeline accepts
    these paths from any folder; `flowdistill run <data>` runs `recipes/<data>/pipeline.yaml`)."""
    from flowdistill.recipes import BUNDLED_ROOT, bundled_recipes

    for path in bundled_recipes():
        first = (BUNDLED_ROOT.parent / path).read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{str(path):<48} {summary[:90]}")
    return 0


def cmd_f2d2_eval(args: argparse.Namespace) -> int:
    """F2D2 run: few-step NLL vs the teacher's ODE reference, naive baseline, sample quality (optionally
    self-guided) at K = 1, 2, 4, 8; writes f2d2-eval.json/png."""
    from flowdistill.f2d2_eval import run_f2d2_eval

    return run_f2d2_eval(args)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Convert a folder of images (class subfolders give labels) or downsampled-ImageNet .npz files once into
    memory-mappable uint8 shards and a manifest; train on them with data.name=shards data.path=OUT."""
    from shared.image_sources import prepare_data

    m = prepare_data(args.source, args.out, args.format, args.image_size, args.shard_mb, args.overwrite)
    classes = m["meta"].get("classes")
    labels = f"{len(classes)} classes" if classes else "labelled" if m["labels"] else "no labels"
    print(f"wrote {args.out}: {m['count']:,} images of shape {tuple(m['shape'])}, {len(m['shards'])} shard(s), {labels}")
    return 0


# ---------------------------------------------------------------- parser


def cmd_import(args: argparse.Namespace) -> int:
    """Turn a model trained elsewhere into a run directory that every command accepts: `import ml-tarflow
    CKPT.pth --img-size ... OUT data.name=...` writes an apple/ml-tarflow checkpoint as a TarFlow teacher run;
    `import diffusers-fm FOLDER --time ... OUT data.name=...` a diffusers UNet2DModel or DiTTransformer2DModel
    velocity field as a flow-matching run."""
    from flowdistill.importers import import_diffusers_fm, import_ml_tarflow
    from nfm.ml_tarflow import MLTarFlowShape

    if args.source == "diffusers-fm":
        run_dir = import_diffusers_fm(args.folder, args.time, args.timestep_scale, args.out, args.overrides,
                                      args.overwrite)
        print(f"wrote flow-matching run {run_dir}")
        return 0
    shape = MLTarFlowShape(args.channels_in, args.img_size, args.patch_size, args.channels, args.blocks,
                           args.layers_per_block, args.num_classes)
    run_dir = import_ml_tarflow(args.checkpoint, shape, args.noise_std, args.out, args.overrides, args.overwrite)
    print(f"wrote teacher run {run_dir}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Average velocity-field runs trained apart (same recipe and data, one seed each) into one ensemble run
    that nll, sample and F2D2 (method.teacher=OUT) read like any velocity field: averaging seeds lowers the
    field's error where rows are few per dimension (docs/likelihood.md)."""
    from flowdistill.ensemble_runs import gather_ensemble

    run_dir = gather_ensemble(args.runs, args.out, args.weights, args.overwrite)
    print(f"wrote ensemble run {run_dir} ({len(args.runs)} members)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's evaluation weights as a folder other tools load, with a model card (README.md):
    --format diffusers (unet and dit flow-matching students: UNet2DModel or DiTTransformer2DModel plus a
    FlowMatchEulerDiscreteScheduler config) or --format safetensors (any run: weights, config, card)."""
    from flowdistill.export import export_run

    out = export_run(args.run, args.format, args.out, args.weights, args.overwrite)
    print(f"wrote {out} ({args.format})")
    return 0


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every command that reads a finished run shares."""
    parser.add_argument("run", help="run directory written by `flowdistill train`")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--weights", default="auto", choices=["auto", "best", "ema", "model"],
                        help="which weights to load: auto (best-on-validation, else EMA, else raw), best, ema, model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise, dequantization and probes")


def add_recipe_args(parser: argparse.ArgumentParser, help_overrides: str) -> None:
    """A recipe and its dotted key=value overrides."""
    parser.add_argument("recipe", help="YAML recipe (train also takes an existing run directory with --resume)")
    parser.add_argument("overrides", nargs="*", help=help_overrides)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(prog="flowdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "show the traceback of an error instead of its one-line message"
    threads_help = (f"torch intra-op threads per process (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else "
                    "the cores not busy, the faster choice measured by bench/benchmarks/bench_threads.py)")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--threads", type=positive_int, default=None, help=threads_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any) -> argparse.ArgumentParser:
        doc = " ".join(func.__doc__.split())
        p = sub.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        p.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS, help=threads_help)
        return p

    p = command("run", cmd_run)
    p.add_argument("pipeline", help="pipeline spec (YAML), e.g. recipes/digits/pipeline.yaml, or a bundled "
                                    "pipeline's name: digits, mnist, toy2d")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec, e.g. seeds=[0,1]")
    p.add_argument("--plan", action="store_true", help="print the stages, what is done and what would run; run nothing")
    p.add_argument("--only", default="", help="comma-separated stages to run, by the names --plan prints (the "
                                              "bundled pipelines: teacher, couplings, students, f2d2, compact, "
                                              "evaluate, report)")
    p.add_argument("--from", dest="start", default=None, help="first stage to run")
    p.add_argument("--until", default=None, help="last stage to run")

    p = command("pretrained", cmd_pretrained)
    p.add_argument("--verbose", action="store_true", help="also print each folder, recipe and reproducing command")

    command("recipes", cmd_recipes)

    p = command("findings", cmd_findings)
    p.add_argument("evaluation", help="evaluation-<key>.json of a pipeline (or docs/pipeline_digits/evaluation.json)")

    p = command("train", cmd_train)
    add_recipe_args(p, "dotted key=value overrides, e.g. train.steps=2000 seed=1")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    p = command("sample", cmd_sample)
    add_run_args(p)
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps (default: the largest of the "
                                                                   "run's eval.steps, as eval uses)")
    p.add_argument("--solver", default="", help="euler, heun, or an adaptive torchdiffeq method (dopri5) "
                                                "(default: the run's eval.solver)")
    p.add_argument("--grid", default="", choices=["", *GRIDS], help="time grid of fixed-step solvers "
                                                                    "(default: the run's eval.grid)")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--out", default="", help="output PNG path (default: <run>/samples/...)")

    p = command("nll", cmd_nll)
    add_run_args(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--n", type=count, default=0, help="points to score (default: the whole split)")
    p.add_argument("--divergence", default="", help="exact, hutchinson or auto (default: the run's eval.divergence)")
    p.add_argument("--data", default="", help="score this .npy/.npz/.csv file of (N, D) vectors in the units of the "
                                              "run's data instead of a split; writes nll-file-<stem>.json/.csv")

    p = command("eval", cmd_eval)
    add_run_args(p)
    p.add_argument("--steps", type=int_list, default=None, help="comma-separated step counts, e.g. 1,2,4,8,16,32")
    p.add_argument("--solver", default="", help="euler or heun (default: the run's eval.solver)")
    p.add_argument("--grid", default="", help="linear, quadratic or geometric (default: the run's eval.grid)")
    p.add_argument("--n", type=count, default=0, help="samples per row (default: the run's eval.n_samples)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="split the samples are scored against: test (reporting, eval.json), val (choosing "
                        "settings, eval-val.json; needs data.val_fraction > 0) or train (closeness to the "
                        "training images, eval-train.json)")

    p = command("ensemble", cmd_ensemble)
    p.add_argument("runs", nargs="+", help="flow-matching run directories of one recipe, trained with different seed=N")
    p.add_argument("--out", required=True, help="the ensemble run directory to write (a new folder)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "ema", "model"],
                   help="each member's weights: auto (best-on-validation, else EMA, else raw), best, ema, model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")

    p = command("couplings", cmd_couplings)
    add_recipe_args(p, "dotted key=value overrides, e.g. method.coupling.draws=8")
    p.add_argument("--overwrite", action="store_true", help="delete a cache of another setup and start over")

    p = command("compare", cmd_compare)
    p.add_argument("spec", help="comparison spec (YAML), e.g. recipes/toy2d/compare.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec, e.g. seeds=[0] n_samples=500")
    p.add_argument("--dry-run", action="store_true", help="list the runs the comparison needs and which exist; "
                                                          "train nothing")

    p = command("f2d2-eval", cmd_f2d2_eval)
    add_run_args(p)
    p.add_argument("--steps", type=int_list, default=[1, 2, 4, 8], help="comma-separated K (default 1,2,4,8)")
    p.add_argument("--grid", default="", choices=GRIDS, help="time grid of the K jumps (geometric, quadratic: "
                   "shorter jumps near the data; Shortcut maps accept only grids of trained jumps). Default: "
                   "chosen on the validation split as the grid whose few-step log p agrees best with the ODE "
                   "reference (mean |few-step - ODE|, no exact density needed); given, it is used as is and "
                   "the report goes to f2d2-eval-GRID.json")
    p.add_argument("--split", default="test", choices=["test", "val"], help="points scored (val: choose settings "
                   "such as the grid there, then report on test)")
    p.add_argument("--n", type=count, default=0, help="points scored (default: the whole split)")
    p.add_argument("--n-samples", type=count, default=0, help="samples per quality value (default: eval.n_samples)")
    p.add_argument("--divergence", default="", help="reference and naive divergence: exact, hutchinson, auto")
    p.add_argument("--guidance-steps", type=count, default=0, help="Adam steps of self-guidance (0: none)")
    p.add_argument("--guidance-lr", type=float, default=0.1, help="Adam learning rate of self-guidance")
    p.add_argument("--nf-teacher", default="", help="normalizing-flow run to compare with "
                                                     "(default: the run's method.nf_teacher)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="batch of scoring and sampling")

    p = command("import", cmd_import)
    sources = p.add_subparsers(dest="source", required=True, metavar="FORMAT")
    q = sources.add_parser("ml-tarflow", help="an apple/ml-tarflow checkpoint (.pth state_dict) as a TarFlow teacher run",
                           description="Write an apple/ml-tarflow checkpoint as a TarFlow teacher run (model tarflow, "
                                       "method nll). The sizes are the numbers in ml-tarflow's file names, e.g. "
                                       "afhq_model_8_768_8_8_0.07.pth: --patch-size 8 --channels 768 --blocks 8 "
                                       "--layers-per-block 8 --noise-std 0.07. The checkpoint is read with "
                                       "torch.load(weights_only=True); one that does not fit the sizes is refused "
                                       "with the keys and shapes that differ.")
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    q.add_argument("checkpoint", help="ml-tarflow .pth file (a state_dict saved by its train.py)")
    q.add_argument("out", help="run directory to write (a new folder)")
    q.add_argument("overrides", nargs="*", help="key=value settings of the run; data.name is required, e.g. "
                                                "data.name=imagefolder data.path=afhq data.image_size=256")
    q.add_argument("--img-size", type=positive_int, required=True, help="image side in pixels")
    q.add_argument("--patch-size", type=positive_int, required=True, help="patch side p")
    q.add_argument("--channels", type=positive_int, required=True, help="transformer width (a multiple of 64)")
    q.add_argument("--blocks", type=positive_int, required=True, help="flow blocks")
    q.add_argument("--layers-per-block", type=positive_int, required=True, help="transformer layers per block")
    q.add_argument("--num-classes", type=count, default=0, help="class labels (0: unconditional)")
    q.add_argument("--noise-std", type=float, required=True, help="std of the noise the model was trained with")
    q.add_argument("--in-channels", dest="channels_in", type=positive_int, default=3,
                   help="image channels (default 3)")
    q.add_argument("--overwrite", action="store_true", help="replace a folder already at OUT")
    q = sources.add_parser("diffusers-fm", help="a diffusers UNet2DModel or DiTTransformer2DModel velocity field as "
                                                "a flow-matching run",
                           description="Write a diffusers UNet2DModel or DiTTransformer2DModel trained with flow "
                                       "matching elsewhere as a flow-matching run (model unet or dit, method fm) that "
                                       "sample, nll and f2d2 (as its teacher) use. --time and --timestep-scale say "
                                       "how the network reads time (a DiT: noise-at-1 and 1000 only).")
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    q.add_argument("folder", help="folder written by save_pretrained (the model's, or a pipeline's with unet/ or "
                                  "transformer/)")
    q.add_argument("out", help="run directory to write (a new folder)")
    q.add_argument("overrides", nargs="*", help="key=value settings of the run; data.name is required")
    q.add_argument("--time", required=True, choices=["noise-at-1", "noise-at-0"],
                   help="noise-at-1: t = 1 is noise, output v = noise - data (flowdistill, diffusers' "
                        "FlowMatchEuler); noise-at-0: t = 0 is noise, output data - noise (torchcfm)")
    q.add_argument("--timestep-scale", type=float, required=True,
                   help="the network was fed timestep = scale * t: 1000 (diffusers) or 1 (torchcfm)")
    q.add_argument("--overwrite", action="store_true", help="replace a folder already at OUT")

    p = command("export", cmd_export)
    p.add_argument("run", help="run directory written by `flowdistill train`")
    p.add_argument("out", help="folder to write (a new folder)")
    p.add_argument("--format", required=True, choices=["diffusers", "safetensors"],
                   help="diffusers: unet/ or transformer/ + scheduler/ loadable by diffusers alone (flow-matching "
                        "students); safetensors: model.safetensors + flowdistill_config.yaml (every run)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "ema", "model"],
                   help="which weights to export: auto (best-on-validation, else EMA, else raw), best, ema, model")
    p.add_argument("--overwrite", action="store_true", help="replace a folder already at OUT")

    p = command("prepare-data", cmd_prepare_data)
    p.add_argument("source", help="folder of images, or a downsampled-ImageNet .npz file or folder of them")
    p.add_argument("out", help="shard folder to write (manifest.json, images_*.npy, labels.npy)")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "imagenet_npz"],
                   help="source format (auto: imagenet_npz for .npz files, else folder)")
    p.add_argument("--image-size", type=count, default=0, help="resize images to this square side (0: keep)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="approximate size of one shard in MiB")
    p.add_argument("--overwrite", action="store_true", help="replace a shard folder already at OUT")
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as one line and exit code 2 (imported only once an error is being matched).

    OSError covers what the file system refuses (permissions, a file where a folder should be, a full disk).
    """
    from shared.checkpoint import CheckpointError
    from shared.trainer import TrainingDiverged

    return CheckpointError, TrainingDiverged, ValueError, OSError


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Print warnings as `flowdistill COMMAND: warning: ...`, without the source line that raised them."""
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"flowdistill {command}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowdistill` console script and `python -m flowdistill`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # overrides may also follow options: `train RUN --resume train.steps=3000`
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with contextlib.nullcontext() if args.debug else one_line_warnings(args.command):
            set_threads(args.threads)
            return args.func(args)
    except user_errors() as err:
        if args.debug:
            raise
        print(f"flowdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Leave the process group of a multi-process launch, if this process joined one, before the interpreter exits:
    a gloo process that exits with its group still open can abort (exit code -6) after its work is done."""
    dist = sys.modules.get("torch.distributed")  # nothing to leave when no command imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
