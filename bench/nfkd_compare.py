"""Distilled vs undistilled compact flows against their teacher: bits/dim (or NLL), FD at two temperatures, speed.

Trains (or reuses) the teacher recipe once, then the student recipe per seed twice: distilled (its own
weights) and undistilled (`method.nll_weight=1`, every other weight 0: the same architecture and
budget with plain maximum likelihood). Reports per run: test NLL (nats/sample; bits/dim for images,
exact, whole test split), sample quality at temperature 1.0 and 0.7 (FD or W2 to the test split),
sampling and encoding throughput, parameters; then the mean and std over seeds.

    python -m bench.nfkd_compare recipes/digits/glow_teacher_bpd.yaml recipes/digits/glow_student_kd.yaml \
        --seeds 0,1,2 --out docs/nfkd/digits_glow
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine
from flowdistill.api import load_run, resolve_config, train
from shared.evaluate import format_table, reference_nll, write_json
from shared.metrics import feature_extractor, sample_quality
from shared.run import finished_step, run_dir_of
from shared.rundir import config_path

UNDISTILLED = ["method.nll_weight=1", "method.latent_weight=0", "method.intermediate_weight=0",
               "method.synth_weight=0"]
COLUMNS = ["run", "params", "nll", "bpd", "quality_t1", "quality_t07", "sample_per_s", "encode_per_s"]


def ensure(recipe: str, overrides: list[str]) -> Path:
    """Train a run unless finished (resume an unfinished one)."""
    cfg = resolve_config(recipe, overrides)
    if finished_step(cfg) < cfg.train.steps:
        train(cfg, resume=config_path(run_dir_of(cfg)).is_file())
    return run_dir_of(cfg)


@torch.no_grad()
def score(run_dir: Path, n_samples: int) -> dict[str, Any]:
    """Likelihood, quality at T = 1 and 0.7, and throughput of one flow run."""
    run = load_run(run_dir)
    data = run.dataset
    row: dict[str, Any] = {"run": run_dir.name, "params": sum(p.numel() for p in run.model.parameters())}
    nll = reference_nll(run, "test", len(data.test), "exact")
    row["nll"] = nll["nll_nats"]
    row["bpd"] = nll.get("bits_per_dim")
    extractor = feature_extractor(data) if data.kind == "image" else None
    for temperature, key in ((1.0, "quality_t1"), (0.7, "quality_t07")):
        noise = temperature * torch.randn(n_samples, *data.shape, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        x = run.model.decode(noise)
        seconds = time.perf_counter() - t0
        row[key] = sample_quality(x, data, extractor)["value"]
        if temperature == 1.0:
            row["sample_per_s"] = n_samples / seconds
    t0 = time.perf_counter()
    run.model.encode(data.test)
    row["encode_per_s"] = len(data.test) / (time.perf_counter() - t0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="teacher recipe")
    parser.add_argument("student", help="student recipe (method nf_kd; its method.teacher is set here)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", required=True, help="output stem: <out>.json and <out>.md")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to the teacher and every student (repeatable), e.g. train.steps=50")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = ensure(args.teacher, ["train.progress=false", "train.sample_grid=false", *args.set])
    rows = [{"role": "teacher", **score(teacher, args.samples)}]
    stem = Path(args.student).stem
    for seed in [int(s) for s in args.seeds.split(",")]:
        common = [f"seed={seed}", f"method.teacher={teacher}", "train.progress=false", "train.sample_grid=false",
                  *args.set]
        for role, extra in (("distilled", []), ("undistilled", UNDISTILLED)):
            run = ensure(args.student, [*common, *extra, f"name={stem}-{role}-s{seed}"])
            rows.append({"role": role, "seed": seed, **score(run, args.samples)})
    summary = []
    for role in ("teacher", "distilled", "undistilled"):
        group = [r for r in rows if r["role"] == role]
        entry: dict[str, Any] = {"run": role, "params": group[0]["params"]}
        for key in COLUMNS[2:]:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                entry[key] = f"{statistics.fmean(values):.4g}" + (f" ± {statistics.stdev(values):.2g}"
                                                                  if len(values) > 1 else "")
        summary.append(entry)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"teacher": args.teacher, "student": args.student, "rows": rows,
                                          "summary": summary, "machine": machine(torch.device("cpu"))})
    table = format_table(summary, COLUMNS)
    out.with_suffix(".md").write_text(f"`python -m bench.nfkd_compare {args.teacher} {args.student} --seeds "
                                      f"{args.seeds} --out {args.out}`\n\n{table}\n\n"
                                      + format_table(rows, ["role", "seed", *COLUMNS]) + "\n")
    print(table)


if __name__ == "__main__":
    main()
