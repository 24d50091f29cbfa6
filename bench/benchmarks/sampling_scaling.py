"""Student speed-up over its TarFlow teacher against the number of tokens, at 1, 2, 4 and 8 NFE.

For each recipe family the teacher is the recipe's TarFlow (`recipes/<family>/teacher.yaml`, at each patch size
of --grid) sampled with `TarFlow.decode` and its KV cache (one token at a time, T * (N - 1) sequential passes);
the students are the family's flow-matching networks (`fm_independent.yaml`: U-Net; `fm_dit.yaml`: DiT where the
family has one) sampled with Euler at k NFE. Weights are random (timing does not depend on them). Per setting:
median wall time of --repeats calls after one warm-up call, at batch 1 and at the throughput batch --batch.

Two reductions keep the grid within minutes on one core, both exact up to timing noise:
  - a teacher with more than --full-teacher-tokens tokens is timed with one flow block and its time multiplied
    by the recipe's number of blocks (the blocks are identical in shape and cost; decode runs them in turn);
  - a student at k NFE costs k network evaluations (Euler: nothing else of note), so one evaluation is timed
    and multiplied by k.
Teachers of more than --max-batched-tokens tokens are skipped at the throughput batch.
Speed-up = teacher seconds / student seconds per sample, at the same batch.

Run from the repository root (one thread):
    OMP_NUM_THREADS=1 python -m bench.benchmarks.sampling_scaling --threads 1 \
        --out docs/benchmarks/sampling_scaling-cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from bench.common import pick_device, print_and_write
from flowdistill.api import resolve_config
from flowdistill.components import CATALOG
from shared.machine import describe_machine
from shared.sampling import sample
from shared.timing import median_seconds

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagenet64": (3, 64, 64)}
DEFAULT_GRID = "digits:2,mnist:4,cifar10:4,cifar10:2,imagenet64:4,imagenet64:2"  # 16, 49, 64, 256, 256, 1024 tokens
STUDENTS = ("fm_independent", "fm_dit")
NFES = (1, 2, 4, 8)
COLUMNS = {"family": "family", "tokens": "tokens", "teacher_patch": "teacher patch", "student": "student",
           "batch": "batch", "teacher_ms": "teacher ms / sample", "student_nfe1_ms": "student 1-NFE ms / sample",
           **{f"speedup_nfe{k}": f"speed-up {k} NFE" for k in NFES}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=DEFAULT_GRID, help="comma-separated family:teacher_patch")
    parser.add_argument("--batch", type=int, default=16, help="throughput batch (besides batch 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median)")
    parser.add_argument("--full-teacher-tokens", type=int, default=64,
                        help="teachers with more tokens are timed with one block, times the recipe's blocks")
    parser.add_argument("--max-batched-tokens", type=int, default=256,
                        help="teachers with more tokens are skipped at the throughput batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--plot", default="", help="PNG of speed-up against tokens (default: next to --out)")
    parser.add_argument("--out", default="", help="JSON output (default: print only)")
    return parser.parse_args(argv)


def teacher_seconds(family: str, patch: int, batch: int, device: torch.device, args: argparse.Namespace
                    ) -> tuple[float, int, dict[str, Any]]:
    """Seconds per decode of `batch` samples by the family's teacher at `patch`, its token count and settings."""
    cfg = resolve_config(RECIPES / family / "teacher.yaml").model
    shape = SHAPES[family]
    tokens = (shape[1] // patch) * (shape[2] // patch)
    blocks = cfg.blocks if tokens > args.full_teacher_tokens else 1  # time one block, scale by the recipe's count
    timed_cfg = dataclasses.replace(cfg, patch=patch, blocks=cfg.blocks // blocks if blocks > 1 else cfg.blocks,
                                    dropout=0.0)
    torch.manual_seed(0)
    flow = CATALOG.models["tarflow"].build(timed_cfg, shape).to(device).eval()
    z = torch.randn(batch, *shape, device=device)
    with torch.inference_mode():
        seconds = median_seconds(lambda: flow.decode(z), device, args.repeats) * blocks
    return seconds, tokens, {"width": cfg.width, "blocks": cfg.blocks, "layers": cfg.layers,
                             "timed_blocks": timed_cfg.blocks, "passes": cfg.blocks * (tokens - 1)}


def student_seconds(family: str, recipe: str, batch: int, device: torch.device, repeats: int) -> float | None:
    """Seconds of one Euler network evaluation of `batch` samples by the family's student (None: no such recipe)."""
    path = RECIPES / family / f"{recipe}.yaml"
    if not path.is_file():
        return None
    cfg = resolve_config(path)
    torch.manual_seed(0)
    model = CATALOG.models[cfg.model.name].build(cfg.model, SHAPES[family]).to(device).eval()
    noise = torch.randn(batch, *SHAPES[family], device=device)
    with torch.inference_mode():
        return median_seconds(lambda: sample(model, noise, steps=1), device, repeats)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speed-up at each NFE against tokens, one panel per batch, one line style per student."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for student, style in zip(STUDENTS, ("-o", "--s")):
            for k, colour in zip(NFES, ("C0", "C1", "C2", "C3")):
                pts = sorted((r["tokens"], r[f"speedup_nfe{k}"]) for r in rows
                             if r["batch"] == batch and r["student"] == student)
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, label=f"{student} {k} NFE")
        ax.axhline(10, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="teacher tokens", ylabel="student speed-up (x)",
               title=f"batch {batch}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the grid, print the table, write JSON and the plot."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows: list[dict[str, Any]] = []
    student_cache: dict[tuple[str, str, int], float | None] = {}
    for item in args.grid.split(","):
        family, patch = item.split(":")
        for batch in (1, args.batch):
            shape = SHAPES[family]
            tokens = (shape[1] // int(patch)) * (shape[2] // int(patch))
            if batch > 1 and tokens > args.max_batched_tokens:
                print(f"skip {family} patch {patch} ({tokens} tokens) at batch {batch}", flush=True)
                continue
            teacher, tokens, info = teacher_seconds(family, int(patch), batch, device, args)
            for recipe in STUDENTS:
                key = (family, recipe, batch)
                if key not in student_cache:
                    student_cache[key] = student_seconds(family, recipe, batch, device, args.repeats)
                one = student_cache[key]
                if one is None:
                    continue
                row = {"family": family, "tokens": tokens, "teacher_patch": int(patch), "student": recipe,
                       "batch": batch, "teacher_ms": 1000 * teacher / batch, "student_nfe1_ms": 1000 * one / batch,
                       **{f"speedup_nfe{k}": teacher / (k * one) for k in NFES}, "teacher": info}
                rows.append(row)
                print(f"{family} {tokens} tokens {recipe} batch {batch}: teacher {teacher:.3f} s, student "
                      f"{one:.4f} s / NFE, 4-NFE speed-up {row['speedup_nfe4']:.1f}x", flush=True)
    payload = {"bench": "sampling_scaling", "machine": describe_machine(device), "settings": vars(args), "rows": rows}
    result = print_and_write(rows, COLUMNS, payload, args.out)
    target = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else "")
    if target and rows:
        plot(rows, Path(target))
    return result


if __name__ == "__main__":
    main()
