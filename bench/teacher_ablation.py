"""Teacher ablation: train one recipe under several override sets, select on validation, report on test.

Each variant trains `<recipe> + overrides` (resuming a run that exists), then loads its evaluation
weights (best on validation when the recipe validates) and reports validation and test bits/dim
(exact, dequantized, whole split), the FD of 1,000 samples against the validation and the test
split (choose on `val_*`, report `test_*`), parameters and training minutes.

    python -m bench.teacher_ablation recipes/digits/teacher_bpd.yaml bench/ablations/digits_teacher.yaml \
        --out docs/nfm/teachers/digits_ablation --threads 1

Prints a Markdown table and writes `<out>.json` and `<out>.md` after every variant.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import machine
from flowdistill.api import load_run, resolve_config, train
from flowdistill.compare import train_seconds
from shared.evaluate import format_table, generate, reference_nll, write_json
from shared.metrics import feature_extractor, sample_quality
from shared.run_prepare import run_dir_of
from shared.rundir import config_path

COLUMNS = ["variant", "params", "train_minutes", "best_step", "val_bpd", "test_bpd", "val_fd", "test_fd", "overrides"]


def evaluate_variant(run_dir: Path, n_samples: int) -> dict[str, Any]:
    """Validation/test bits/dim of the evaluation weights and the FD of their samples."""
    run = load_run(run_dir)
    row: dict[str, Any] = {"params": sum(p.numel() for p in run.model.parameters()), "best_step": run.step}
    for split in ("val", "test"):
        if split == "val" and run.dataset.val is None:
            continue
        data = getattr(run.dataset, split)
        row[f"{split}_bpd"] = reference_nll(run, split, len(data), "exact")["bits_per_dim"]
    samples = generate(run, n_samples, 1, "euler", "linear", seed=0)
    extractor = feature_extractor(run.dataset)
    for split in ("val", "test"):
        if split == "test" or run.dataset.val is not None:
            row[f"{split}_fd"] = sample_quality(samples.x, run.dataset, extractor, split=split)["value"]
    row["sample_seconds"] = samples.seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="base teacher recipe")
    parser.add_argument("variants", help="YAML list of {name, overrides: [key=value, ...]}")
    parser.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    parser.add_argument("--runs", default="runs/ablation", help="parent folder of the variants' run directories")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--samples", type=int, default=1000, help="samples for the FD column")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = yaml.safe_load(Path(args.variants).read_text())
    only = set(filter(None, args.only.split(",")))
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else []
    done = {r["variant"]: r for r in results}
    for variant in variants:
        if only and variant["name"] not in only:
            continue
        overrides = [f"name={Path(args.recipe).parent.name}-{variant['name']}", f"out_dir={args.runs}",
                     "train.progress=false", "train.sample_grid=false", *variant.get("overrides", [])]
        cfg = resolve_config(args.recipe, overrides)
        run_dir = run_dir_of(cfg)
        train(cfg, resume=config_path(run_dir).is_file())
        minutes = train_seconds(run_dir, cfg.train.batch_size) / 60  # from the logged throughput, resumes included
        row = {"variant": variant["name"], "train_minutes": minutes, "threads": args.threads,
               "overrides": " ".join(variant.get("overrides", [])), **evaluate_variant(run_dir, args.samples)}
        done[variant["name"]] = row
        rows = list(done.values())
        table = format_table(rows, COLUMNS)
        print(table, flush=True)
        write_json(out.with_suffix(".json"), {"recipe": args.recipe, "machine": machine(torch.device("cpu")), "rows": rows})
        out.with_suffix(".md").write_text(
            f"Base recipe `{args.recipe}`; selection on the validation split, bits/dim on the test split.\n\n"
            f"`python -m bench.teacher_ablation {args.recipe} {args.variants} --out {args.out} "
            f"--threads {args.threads}`\n\n{table}\n")


if __name__ == "__main__":
    main()
