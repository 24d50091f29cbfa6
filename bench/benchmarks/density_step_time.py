"""Training cost of the tabular density recipes against the data's dimension: ms per step and the recipe's minutes.

    python -m bench.benchmarks.density_step_time --threads 2 [--dims 2,8,16,32] [--recipes fm,tarflow_tabular]

For each dimension d, a Gaussian mixture with full covariances is written as a user's files
(bench.experiments.heldout_mixtures), and every recipe of `RECIPES` (recipes/density/<name>.yaml) trains
`--steps` steps on it through `flowdistill.api.train` (the real trainer, data as
`data.name=tabular data.path=... data.test_path=...`). The F2D2 stages train from the FM run of the same
d as the recipes chain them: their teacher is the ensemble of that FM run and two more seeds of it (`flowdistill
ensemble`, trained the same steps, not timed), their initialisation the FM run. The rate is the median of the trainer's
own `samples_per_s` over its log intervals after the first (warm-up); ms per step = batch / rate;
"recipe minutes" = ms per step x the recipe's `train.steps`, the training budget of its defaults (the
FM field's steps grow with d: `budget` in the recipe's comments). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import report, setup
from bench.experiments.heldout_mixtures import make
from flowdistill.api import load_run, resolve_config, train
from flowdistill.ensemble_runs import gather_ensemble
from shared.rundir import read_metrics
from shared.timing import median

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "density"
RECIPES = ("fm", "f2d2_u", "f2d2_joint", "tarflow_spline", "tarflow_tabular")
CHAIN = {"f2d2_u": "fm", "f2d2_joint": "f2d2_u"}  # stage -> the run it starts from
ENSEMBLE_SIZE = 3  # FM fields averaged into the F2D2 stages' teacher (recipes/density/f2d2_u.yaml)
COLUMNS = {"recipe": "recipe", "dim": "d", "params": "parameters", "batch": "batch", "ms_per_step": "ms / step",
           "recipe_steps": "recipe steps", "recipe_minutes": "recipe minutes", "teacher": "teacher", "note": "note"}


def recipe_overrides(name: str, dim: int, data_dir: Path, out_dir: Path, steps: int, log_every: int,
                     runs: dict[str, Path]) -> list[str]:
    """Overrides that point a density recipe at the mixture files and the runs it chains from."""
    overrides = ["data.name=tabular", f"data.path={data_dir / 'train.npy'}", f"data.test_path={data_dir / 'test.npy'}",
                 f"out_dir={out_dir}", f"name={name}-d{dim}", f"train.steps={steps}", f"train.log_every={log_every}",
                 "train.progress=false", "train.sample_grid=false", "train.eval_every=0", f"train.ckpt_every={steps}"]
    if name in CHAIN:
        overrides += [f"method.teacher={runs['fm-ensemble']}", f"train.init_from={runs[CHAIN[name]]}"]
    return overrides


def fm_ensemble(dim: int, data_dir: Path, out_dir: Path, steps: int, log_every: int, runs: dict[str, Path]) -> Path:
    """The F2D2 stages' teacher as the recipes chain it: the FM run and `ENSEMBLE_SIZE - 1` more seeds of it, averaged."""
    recipe = RECIPES_DIR / "fm.yaml"
    members = [runs["fm"]]
    for seed in range(1, ENSEMBLE_SIZE):
        overrides = recipe_overrides("fm", dim, data_dir, out_dir, steps, log_every, runs)
        members.append(train(resolve_config(recipe, [*overrides, f"name=fm-{seed}-d{dim}", f"seed={seed}"])))
    return gather_ensemble(members, out_dir / f"fm-ensemble-d{dim}")


def measure(name: str, dim: int, data_dir: Path, out_dir: Path, steps: int, log_every: int,
            runs: dict[str, Path]) -> dict[str, Any]:
    """Train `steps` steps of one recipe; the row of its timing."""
    recipe = RECIPES_DIR / f"{name}.yaml"
    defaults = resolve_config(recipe)
    cfg = resolve_config(recipe, recipe_overrides(name, dim, data_dir, out_dir, steps, log_every, runs))
    runs[name] = train(cfg)
    rates = [r["samples_per_s"] for r in read_metrics(runs[name]) if "samples_per_s" in r][1:]
    if not rates:
        raise SystemExit(f"{name}: no log interval after the first; raise --steps above 2 x --log-every")
    ms = 1000 * cfg.train.batch_size / median(rates)
    params = sum(p.numel() for p in load_run(runs[name]).model.parameters())
    row = {"recipe": name, "dim": dim, "params": params, "batch": cfg.train.batch_size, "ms_per_step": ms,
           "intervals": len(rates), "recipe_steps": defaults.train.steps,
           "recipe_minutes": ms * defaults.train.steps / 60000}
    if name in CHAIN:
        teacher = resolve_config(Path(cfg.method.teacher) / "config.yaml").model
        row["teacher"] = f"{teacher.name} of {teacher.size}" if teacher.name == "ensemble" else teacher.name
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,8,16,32", help="comma-separated dimensions")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=40, help="steps trained per recipe and d")
    parser.add_argument("--log-every", type=int, default=10, help="steps per trainer log interval (one rate each)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="", help="JSON output (default: bench/results/density_step_time-cpu.json)")
    args = parser.parse_args(argv)
    args.device = "cpu"
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choices: {', '.join(RECIPES)}")
    for stage, source in CHAIN.items():
        if stage in names and source not in names:
            raise SystemExit(f"{stage} trains from {source}: add {source} to --recipes")
    device = setup(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="density_step_time-") as tmp:
        for dim in [int(d) for d in args.dims.split(",")]:
            data_dir = Path(tmp) / f"d{dim}"
            make(dim, seed=500 + dim, out=data_dir)
            runs: dict[str, Path] = {}
            for name in [n for n in RECIPES if n in names]:  # chain order
                if name in CHAIN and CHAIN[name] not in runs:
                    continue  # the run it starts from could not be built for this d
                try:
                    rows.append(measure(name, dim, data_dir, Path(tmp) / "runs", args.steps, args.log_every, runs))
                except ValueError as err:  # e.g. a token_dim that does not divide d
                    rows.append({"recipe": name, "dim": dim, "note": f"not for d = {dim}: {err}"})
                    print(f"{name} d={dim}: {rows[-1]['note']}", flush=True)
                    continue
                print(f"{name} d={dim}: {rows[-1]['ms_per_step']:.1f} ms / step", flush=True)
                if name == "fm" and any(stage in names for stage in CHAIN):
                    runs["fm-ensemble"] = fm_ensemble(dim, data_dir, Path(tmp) / "runs", args.steps, args.log_every,
                                                      runs)
    notes = ["ms / step: median over the trainer's log intervals after the first; recipe minutes: ms / step x the "
             "recipe's own train.steps (its default budget), training only (no evaluation)"]
    return report("density_step_time", args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
