"""`flowdistill` command line: train, sample, nll and eval on one run-directory format."""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers such as 1,2,4,8."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return values


def cmd_train(args: argparse.Namespace) -> int:
    """Train the model a recipe describes, in `<out_dir>/<name>/`."""
    from shared.config import dump_yaml
    from shared.run import resolve_config, train_run

    cfg = resolve_config(args.recipe, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from accelerate import PartialState

    run_dir = train_run(cfg, resume=args.resume, overwrite=args.overwrite)
    state = PartialState()
    if state.is_main_process and cfg.train.sample_grid:
        _write_samples(run_dir, steps=max(cfg.eval.steps), solver=cfg.eval.solver, grid=cfg.eval.grid,
                       n=None, seed=0, device=state.device)
    return 0


def _write_samples(run_dir: Path, steps: int, solver: str, grid: str, n: int | None, seed: int,
                   device: torch.device, out: Path | None = None, weights: str = "ema") -> Path:
    from shared.checkpoint import atomic_write_bytes
    from shared.evaluate import generate
    from shared.plots import save_samples_figure
    from shared.run import load_run

    run = load_run(run_dir, weights=weights, device=device)
    n = n or (64 if run.dataset.kind == "image" else 2000)
    s = generate(run, n, steps, solver, grid, seed)
    out = Path(out) if out else run_dir / "samples" / f"steps{steps}-{solver}-{grid}.png"
    title = f"{run.config.name}: {solver}, {steps} steps ({s.nfe} NFE), {grid} grid"
    save_samples_figure(s.x, out, run.dataset.levels, run.dataset.test if run.dataset.kind == "vector" else None, title)
    buf = io.BytesIO()
    np.savez(buf, samples=s.x.numpy(), nfe=s.nfe, seconds=s.seconds)
    atomic_write_bytes(out.with_suffix(".npz"), buf.getvalue())
    print(f"wrote {out} and {out.with_suffix('.npz')} ({n} samples, {s.nfe} NFE, {s.seconds:.2f} s)")
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw samples from a trained run; writes a PNG (grid or scatter) and an .npz next to it."""
    _write_samples(Path(args.run), args.steps, args.solver, args.grid, args.n, args.seed, _device(args.device),
                   Path(args.out) if args.out else None, args.weights)
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    """Reference NLL (ODE, exact or Hutchinson divergence) of a split; prints and writes nll.json."""
    from shared.evaluate import reference_nll, write_json
    from shared.run import load_run

    run = load_run(args.run, weights=args.weights, device=_device(args.device))
    res = reference_nll(run, args.split, args.n or run.config.eval.nll_samples,
                        args.divergence or run.config.eval.divergence, args.seed)
    res["step"] = run.step
    line = f"{res['split']}: NLL {res['nll_nats']:.4f} ± {res['nll_nats_stderr']:.4f} nats/sample"
    if "bits_per_dim" in res:
        line += f", {res['bits_per_dim']:.4f} bits/dim"
    print(line + f" ({res['n']} points, {res['divergence']} divergence, {res['nfe_mean']:.0f} NFE, {res['seconds']:.1f} s)")
    write_json(Path(args.run) / f"nll-{args.split}.json", res)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Sample quality vs number of steps: Markdown table on stdout, eval.json and eval.png in the run."""
    from shared.evaluate import format_table, quality_vs_steps, write_json
    from shared.plots import save_curves
    from shared.run import load_run

    run = load_run(args.run, weights=args.weights, device=_device(args.device))
    ev = run.config.eval
    steps = args.steps or list(ev.steps)
    solver, grid = args.solver or ev.solver, args.grid or ev.grid
    rows = quality_vs_steps(run, steps, solver, grid, args.n or ev.n_samples, args.seed)
    print(format_table(rows, ["steps", "solver", "grid", "nfe", "metric", "value", "extractor", "seconds", "samples_per_s"]))
    out = Path(args.run)
    write_json(out / "eval.json", {"run": run.config.name, "step": run.step, "rows": rows})
    label = f"{rows[0]['metric']} ({rows[0]['extractor'] or 'data'})"
    save_curves({f"{solver}/{grid}": ([r["nfe"] for r in rows], [r["value"] for r in rows])}, out / "eval.png",
                "NFE", label, run.config.name)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(prog="flowdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument("recipe", help="YAML recipe, or an existing run directory (with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=2000 seed=1")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name first")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    def run_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("run", help="run directory written by `flowdistill train`")
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
        q.add_argument("--weights", default="auto", choices=["auto", "best", "ema", "model"],
                       help="which weights to load: auto (best-on-validation, else EMA, else raw), best, ema, model")
        q.add_argument("--seed", type=int, default=0, help="seed of the noise / dequantization")

    p = sub.add_parser("sample", help=cmd_sample.__doc__, description=cmd_sample.__doc__)
    run_args(p)
    p.add_argument("--steps", type=int, default=8, help="solver steps")
    p.add_argument("--solver", default="euler", help="euler, heun, or an adaptive torchdiffeq method (dopri5)")
    p.add_argument("--grid", default="linear", choices=["linear", "quadratic"], help="time grid of fixed-step solvers")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="", help="output PNG path (default: <run>/samples/...)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("nll", help=cmd_nll.__doc__, description=cmd_nll.__doc__)
    run_args(p)
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--n", type=int, default=0, help="points to score (default: eval.nll_samples of the run)")
    p.add_argument("--divergence", default="", help="exact, hutchinson or auto (default: the run's eval.divergence)")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    run_args(p)
    p.add_argument("--steps", type=int_list, default=None, help="comma-separated step counts, e.g. 1,2,4,8,16,32")
    p.add_argument("--solver", default="", help="euler or heun (default: the run's eval.solver)")
    p.add_argument("--grid", default="", help="linear or quadratic (default: the run's eval.grid)")
    p.add_argument("--n", type=int, default=0, help="samples per row (default: the run's eval.n_samples)")
    p.set_defaults(func=cmd_eval)

    from shared import registry

    registry.load_plugins()
    for name, entry in sorted(registry.COMMANDS.items()):
        entry.build(sub.add_parser(name, help=entry.config_cls, description=entry.config_cls))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowdistill` console script and `python -m flowdistill`."""
    from shared.checkpoint import CheckpointError
    from shared.config import ConfigError
    from shared.data import DataError
    from shared.trainer import TrainingDiverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # overrides may also follow options: `train RUN --resume train.steps=3000`
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, ValueError, FileNotFoundError) as err:
        print(f"flowdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
