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
import sys
from pathlib import Path

import torch

from bench.common import machine
from flowdistill.api import load_run, resolve_config, train
from flowdistill.flow_scores import COLUMNS, UNDISTILLED, add_speedups, score_flow, summarize
from shared.evaluate import format_table, write_json
from shared.metrics import feature_extractor, feature_identity
from shared.run_prepare import finished_step, run_dir_of
from shared.rundir import config_path


def ensure(recipe: str, overrides: list[str]) -> Path:
    """Train a run unless finished (resume an unfinished one)."""
    cfg = resolve_config(recipe, overrides)
    if finished_step(cfg) < cfg.train.steps:
        train(cfg, resume=config_path(run_dir_of(cfg)).is_file())
    return run_dir_of(cfg)


def score(run_dir: Path, n_samples: int) -> dict:
    """`flowdistill.flow_scores.score_flow` of one run directory, named."""
    run = load_run(run_dir)
    extractor = feature_extractor(run.dataset) if run.dataset.kind == "image" else None
    return {"run": run_dir.name, "features": feature_identity(extractor), **score_flow(run, n_samples, extractor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="teacher recipe")
    parser.add_argument("student", help="student recipe (method nf_kd; its method.teacher is set here)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--skip-undistilled", action="store_true", help="distilled students only (sweeps)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", required=True, help="output stem: <out>.json and <out>.md")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to the distilled students only (repeatable), e.g. a weight sweep")
    parser.add_argument("--tag", default="", help="suffix of the student run names (keeps sweeps apart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to the teacher and every student (repeatable), e.g. train.steps=50")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = ensure(args.teacher, ["train.progress=false", "train.sample_grid=false", *args.set])
    rows = [{"role": "teacher", **score(teacher, args.samples)}]
    stem = f"{Path(args.student).parent.name}-{Path(args.student).stem}"  # digits and MNIST recipes share stems
    for seed in [int(s) for s in args.seeds.split(",")]:
        common = [f"seed={seed}", f"method.teacher={teacher}", "train.progress=false", "train.sample_grid=false",
                  *args.set]
        roles = (("distilled", args.student_set), ("undistilled", list(UNDISTILLED)))
        for role, extra in roles[:1] if args.skip_undistilled else roles:
            tag = args.tag if role == "distilled" else ""
            run = ensure(args.student, [*common, *extra, f"name={stem}-{role}{tag}-s{seed}"])
            rows.append({"role": role, "seed": seed, **score(run, args.samples)})
    summary = summarize(rows)
    add_speedups(summary)
    summary = [{"run": e["role"], **{k: v for k, v in e.items() if k != "role"}} for e in summary]
    for e in summary:  # mean ± std as one cell
        for col in COLUMNS[1:]:
            if col in e:
                e[col] = f"{e[col]:.4g}" + (f" ± {e[col + '_std']:.2g}" if e["n"] > 1 else "")
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"teacher": args.teacher, "student": args.student, "rows": rows,
                                          "summary": summary, "machine": machine(torch.device("cpu"))})
    table = format_table(summary, ["run", *COLUMNS, "param_ratio", "sample_speedup", "encode_speedup"])
    command = " ".join(["python -m bench.nfkd_compare", *sys.argv[1:]])
    out.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n\n"
                                      + format_table(rows, ["role", "seed", "run", *COLUMNS]) + "\n")
    print(table)


if __name__ == "__main__":
    main()
