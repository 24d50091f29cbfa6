"""How fast each side of the teacher-student ratio can sample: precision, memory layout and compilation, measured.

For one recipe family at one teacher patch size (default CIFAR-10 at patch 2: 256 tokens, where the sampling
scaling table puts the 10x target), times
    teacher   one `TarFlow.decode` with its KV cache, fp32 and under bf16 autocast (as `encode_batched` and the
              recipes' `mixed_precision: bf16` use it), timed with one flow block and scaled by the block count
              (sampling_scaling's exact reduction);
    students  one Euler network evaluation of the family's U-Net (`fm_independent.yaml`) and DiT (`fm_dit.yaml`)
              in each mode of --modes: fp32, bf16 (autocast), channels_last (fp32, memory format of the
              input and weights; convolutional students only), compile (torch.compile, fp32) and compile_bf16;
at batch 1 and at --batch, median of --repeats calls after two warm-up calls (compilation happens there).
The speed-up at k NFE is the teacher's best time over k times the student's best, per sample.

    OMP_NUM_THREADS=1 python -m bench.benchmarks.student_speed --threads 1 --out docs/benchmarks/student_speed-cpu.json
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any, Callable

import torch

from bench.benchmarks.sampling_scaling import RECIPES, SHAPES, teacher_seconds
from bench.common import pick_device, print_and_write
from flowdistill.api import resolve_config
from flowdistill.components import CATALOG
from shared.machine import describe_machine
from shared.sampling import sample
from shared.timing import median_seconds

MODES = ("fp32", "bf16", "channels_last", "compile", "compile_bf16")
STUDENTS = ("fm_independent", "fm_dit")
COLUMNS = {"side": "side", "model": "model", "mode": "mode", "batch": "batch", "ms_per_sample": "ms / sample (1 NFE)",
           "vs_fp32": "vs fp32", "note": "note"}


def _autocast(mode: str, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode.endswith("bf16") else nullcontext()


def student_call(recipe: str, family: str, mode: str, batch: int, device: torch.device
                 ) -> tuple[Callable[[], Any] | None, str]:
    """A no-argument callable doing one Euler NFE of `batch` samples in `mode`, or None with the reason."""
    cfg = resolve_config(RECIPES / family / f"{recipe}.yaml")
    torch.manual_seed(0)
    model = CATALOG.models[cfg.model.name].build(cfg.model, SHAPES[family]).to(device).eval()
    noise = torch.randn(batch, *SHAPES[family], device=device)
    if mode == "channels_last":
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            return None, "no convolutions"
        model = model.to(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if mode.startswith("compile") else model
    ctx = _autocast(mode, device)

    def call() -> Any:
        with torch.inference_mode(), ctx:
            return sample(net, noise, steps=1)
    return call, ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="cifar10", choices=sorted(SHAPES))
    parser.add_argument("--patch", type=int, default=2, help="teacher patch size (tokens = (H / patch)^2)")
    parser.add_argument("--batch", type=int, default=16, help="throughput batch (besides batch 1)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median)")
    parser.add_argument("--full-teacher-tokens", type=int, default=64,
                        help="teachers with more tokens are timed with one block, scaled by the block count")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="", help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "fp32" not in modes:
        raise SystemExit(f"--modes must include fp32 and name only {', '.join(MODES)}; got {args.modes}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows: list[dict[str, Any]] = []
    best: dict[tuple[str, int], float] = {}
    for batch in (1, args.batch):
        for precision in ("fp32", "bf16"):
            with _autocast(precision, device):
                seconds, tokens, info = teacher_seconds(args.family, args.patch, batch, device, args)
            rows.append({"side": "teacher", "model": f"tarflow ({tokens} tokens)", "mode": precision, "batch": batch,
                         "ms_per_sample": 1000 * seconds / batch, "note": f"{info['passes']} passes"})
            print(f"teacher {precision} batch {batch}: {1000 * seconds / batch:.1f} ms / sample", flush=True)
        for recipe in STUDENTS:
            if not (RECIPES / args.family / f"{recipe}.yaml").is_file():
                continue
            for mode in modes:
                call, why = student_call(recipe, args.family, mode, batch, device)
                row = {"side": "student", "model": recipe, "mode": mode, "batch": batch}
                if call is None:
                    rows.append({**row, "note": f"skipped: {why}"})
                    continue
                call(), call()  # warm-up (compilation happens in the first)
                row["ms_per_sample"] = 1000 * median_seconds(call, device, args.repeats) / batch
                rows.append(row)
                print(f"{recipe} {mode} batch {batch}: {row['ms_per_sample']:.2f} ms / sample / NFE", flush=True)
    for row in rows:
        base = next(r for r in rows if (r["side"], r["model"], r["batch"], r["mode"]) ==
                    (row["side"], row["model"], row["batch"], "fp32"))
        if "ms_per_sample" in row:
            row["vs_fp32"] = base["ms_per_sample"] / row["ms_per_sample"]
            key = (row["side"] if row["side"] == "teacher" else row["model"], row["batch"])
            best[key] = min(best.get(key, float("inf")), row["ms_per_sample"])
    summary = [{"student": recipe, "batch": batch, "teacher_best_ms": best[("teacher", batch)],
                "student_best_ms": best[(recipe, batch)],
                **{f"speedup_nfe{k}": best[("teacher", batch)] / (k * best[(recipe, batch)]) for k in (1, 2, 4, 8)}}
               for (recipe, batch) in best if recipe != "teacher"]
    payload = {"bench": "student_speed", "machine": describe_machine(device), "settings": vars(args), "rows": rows,
               "summary": summary}
    print_and_write(rows, COLUMNS, {}, "")
    return print_and_write(summary, {"student": "student", "batch": "batch", "teacher_best_ms": "teacher best ms",
                                     "student_best_ms": "student best ms / NFE",
                                     **{f"speedup_nfe{k}": f"{k} NFE" for k in (1, 2, 4, 8)}}, payload, args.out)


if __name__ == "__main__":
    main()
