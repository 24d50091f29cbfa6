"""What an online NFM coupling costs per training step, for each trained flow teacher given.

For a student recipe (method fm, coupling nf_teacher) and trained teacher runs (a full teacher and the
compact flow distilled from it, say), the median wall time at the student's batch size of:
    pairs      one online `NFTeacherCoupling.pairs` call: perturb the batch, one frozen-teacher encode
    step       the student's own training step (FM loss forward + backward + AdamW, independent noise)
and the coupling's share of a step, pairs / (pairs + step). Prints a table, writes JSON.

    python -m bench.benchmarks.teacher_cost recipes/mnist/fm_nf_teacher.yaml runs/mnist-teacher_bpd \\
        runs/mnist-tarflow_student_kd-distilled-s0 --set train.batch_size=64 --set 'model.channels=[16,32,32]'
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bench.benchmarks.bench_couplings import student_step
from bench.common import RESULTS, markdown_table, setup
from flowdistill.api import load_run, resolve_config
from nfm.teacher_coupling import NFTeacherCoupling
from nfm.teacher_pairs import load_teacher
from shared.data_sources import load_dataset
from shared.machine import describe_machine
from shared.timing import median_seconds


def teacher_row(run_dir: str, data: torch.Tensor, batch: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median ms of one online pairs call of `batch` images from the teacher run, and its parameter count."""
    teacher = load_teacher(run_dir, load_run, device)
    coupling = NFTeacherCoupling(teacher, data, "online", draws=4, batch_size=max(batch, 1))
    coupling.prepare(device)
    x, gen = data[:batch].to(device), torch.Generator(device=device).manual_seed(0)
    pairs_ms = 1000 * median_seconds(lambda: coupling.pairs(x, gen), device, repeats)
    return {"teacher": Path(run_dir).name, "params": sum(p.numel() for p in teacher.flow.parameters()),
            "perturbation": teacher.noise_kind, "pairs_ms": pairs_ms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="student recipe (its data, model and batch size are used)")
    parser.add_argument("teachers", nargs="+", help="trained flow teacher run directories")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="student recipe override")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=str(RESULTS / "teacher_cost.json"))
    args = parser.parse_args(argv)
    device = setup(args)
    cfg = resolve_config(args.student, args.set)
    dataset = load_dataset(cfg.data)
    batch = cfg.train.batch_size
    step_ms = 1000 * median_seconds(student_step(cfg, dataset, device, batch), device, args.repeats)
    rows = []
    for run_dir in args.teachers:
        row = teacher_row(run_dir, dataset.train, batch, device, args.repeats)
        row.update({"batch": batch, "student_step_ms": step_ms,
                    "coupling_share_of_step": row["pairs_ms"] / (row["pairs_ms"] + step_ms)})
        rows.append(row)
    for row in rows:
        row["cost_vs_first"] = row["pairs_ms"] / rows[0]["pairs_ms"]
    print(markdown_table(rows, {k: k for k in rows[0]}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": describe_machine(device), "student": args.student, "overrides": args.set, "rows": rows}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
