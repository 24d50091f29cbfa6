"""One-shot GPU check: the CUDA tests and the main throughputs of the project, written to ONE JSON file.

Parts (each in its own try/except with a time budget, so one failure keeps the others' results):
    cuda_tests        `pytest -m gpu` in a subprocess: passed / failed / skipped / error counts
    student_train     FM training img/s of a U-Net and a DiT of similar parameter counts, in fp32, bf16,
                      bf16 + channels-last and bf16 + torch.compile (parameter counts recorded)
    sampling          Euler sampling NFE/s of the same two students (fp32 and bf16)
    teacher_encode    TarFlow teacher encode img/s (fp32 and bf16)
    f2d2_meanflow     MeanFlow-F2D2 (jvp) step time and peak CUDA memory (bench.benchmarks.bench_f2d2's loss table)
    accelerate        a 2-process `accelerate launch --multi_gpu` of a tiny `flowdistill train` on two GPUs, and a
                      2-process CPU run (gloo) if it fails, with one GPU, or in --smoke

    python -m bench.benchmarks.gpu_check [--smoke] [--out FILE] [--parts cuda_tests,student_train,...]

--smoke runs every part at tiny sizes on the CPU (a check of the script itself, no meaningful numbers).
The JSON goes to --out, else $OUT/gpu_check.json when OUT is set, else bench/results/gpu_check-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import RESULTS
from shared.checkpoint import atomic_write_text
from shared.machine import describe_machine
from shared.timing import median_seconds, timed

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (full GPU check or CPU smoke test)."""

    shape: tuple[int, int, int]  # student image shape
    unet: dict[str, Any]  # UNetConfig fields
    dit: dict[str, Any]  # DiTConfig fields
    batch: int  # training and sampling batch
    steps: int  # timed training steps per mode
    sample_steps: int  # Euler steps of the sampling part
    teacher: str  # bench.benchmarks.bench_teacher.MODELS entry
    f2d2_case: str  # bench.common.CASES entry
    train_steps: int  # steps of the accelerate-launched run
    budgets: dict[str, float]  # seconds per part


FULL = Sizes(shape=(3, 32, 32),
             unet=dict(channels=(128, 256, 256), attention=(False, False, True), norm_groups=32),
             dit=dict(patch=2, depth=6, heads=6, head_dim=64), batch=256, steps=30, sample_steps=16,
             teacher="mnist-p4", f2d2_case="mnist", train_steps=40,
             budgets=dict(cuda_tests=180, student_train=200, sampling=40, teacher_encode=30, f2d2_meanflow=60,
                          accelerate=120))
SMOKE = Sizes(shape=(1, 8, 8), unet=dict(channels=(16, 32), attention=(False, True), norm_groups=8,
                                         attention_head_dim=16),
              dit=dict(patch=2, depth=2, heads=2, head_dim=16), batch=8, steps=2, sample_steps=2,
              teacher="digits-p2", f2d2_case="toy", train_steps=2,
              budgets=dict(cuda_tests=60, student_train=30, sampling=10, teacher_encode=10, f2d2_meanflow=20,
                           accelerate=90))
PARTS = ("cuda_tests", "student_train", "sampling", "teacher_encode", "f2d2_meanflow", "accelerate")
MODES = ("fp32", "bf16", "bf16_channels_last", "bf16_compile")


class Budget:
    """A part's time budget: `left()` seconds remain, `spent()` tells whether the budget is used up."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


# ---------------------------------------------------------------- parts


def cuda_tests(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """Run `pytest -m gpu` (in --smoke: only tests/test_backbones.py) and parse its summary counts."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/test_backbones.py" if smoke else "tests"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(budget.left(), 1))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    failed = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")]
    return {"returncode": out.returncode, "summary": summary, "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
            "errors": counts.get("errors", counts.get("error", 0)), "deselected": counts.get("deselected", 0),
            "failed_tests": failed[:50]}


def _students(sizes: Sizes) -> dict[str, torch.nn.Module]:
    """The U-Net and the DiT student of `sizes` at random initialisation (seed 0)."""
    from shared.backbones import UNetConfig, build_unet
    from shared.dit import DiTConfig, build_dit

    torch.manual_seed(0)
    return {"unet": build_unet(UNetConfig(**sizes.unet), sizes.shape),
            "dit": build_dit(DiTConfig(**sizes.dit), sizes.shape)}


def _train_rate(model: torch.nn.Module, sizes: Sizes, device: torch.device, mode: str) -> float:
    """Training images/s of FM steps (loss, backward, AdamW) of `model` in `mode` (see MODES)."""
    from nfm.couplings import IndependentCoupling
    from nfm.losses import FlowMatchingConfig, FlowMatchingLoss

    model = model.to(device).train()
    memory_format = torch.channels_last if mode == "bf16_channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.compile(model) if mode == "bf16_compile" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = FlowMatchingLoss(FlowMatchingConfig(), IndependentCoupling())
    x = torch.randn(sizes.batch, *sizes.shape, device=device).contiguous(memory_format=memory_format)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=mode != "fp32"):
            loss, _ = loss_fn(net, (x,), generator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    seconds, _ = timed(lambda: [step() for _ in range(sizes.steps)], device)
    return sizes.batch * sizes.steps / seconds


def student_train(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """img/s per backbone and mode, with parameter counts; compile is skipped in --smoke (minutes on a CPU)."""
    result: dict[str, Any] = {"shape": list(sizes.shape), "batch": sizes.batch, "params": {}, "images_per_s": {}}
    for name, model in _students(sizes).items():
        result["params"][name] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {result['params'][name] / 1e6:.2f} M parameters", flush=True)
        rates = result["images_per_s"][name] = {}
        for mode in MODES:
            if budget.spent():
                rates[mode] = "skipped: part budget spent"
            elif mode == "bf16_compile" and smoke:
                rates[mode] = "skipped: --smoke"
            else:
                try:
                    rates[mode] = _train_rate(model, sizes, device, mode)
                except Exception as err:  # one mode failing (e.g. compile) keeps the others
                    rates[mode] = f"error: {type(err).__name__}: {err}"[:500]
            print(f"  {mode}: {rates[mode]}", flush=True)
    return result


def sampling(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """Euler sampling NFE/s (network evaluations x batch / s) of both students, fp32 and bf16."""
    from shared.sampling import sample

    result: dict[str, Any] = {"steps": sizes.sample_steps, "batch": sizes.batch, "nfe_per_s": {}}
    noise = torch.randn(sizes.batch, *sizes.shape, device=device)
    for name, model in _students(sizes).items():
        model = model.to(device).eval()
        rates = result["nfe_per_s"][name] = {}
        for mode in ("fp32", "bf16"):
            if budget.spent():
                rates[mode] = "skipped: part budget spent"
                continue
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=mode == "bf16"):
                seconds = median_seconds(lambda: sample(model, noise, sizes.sample_steps), device, 3)
            rates[mode] = sizes.batch * sizes.sample_steps / seconds
    return result


def teacher_encode(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """TarFlow encode images/s (one parallel pass, no_grad) in fp32 and bf16."""
    from bench.benchmarks.bench_teacher import MODELS
    from nfm.tarflow import build_tarflow

    shape, cfg = MODELS[sizes.teacher]
    torch.manual_seed(0)
    flow = build_tarflow(cfg, shape).to(device).eval()
    x = torch.randn(sizes.batch, *shape, device=device)
    result: dict[str, Any] = {"model": sizes.teacher, "batch": sizes.batch,
                              "params": sum(p.numel() for p in flow.parameters()), "images_per_s": {}}
    for mode in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=mode == "bf16"):
            seconds = median_seconds(lambda: flow.encode(x), device, 3)
        result["images_per_s"][mode] = sizes.batch / seconds
    return result


def f2d2_meanflow(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """ms per step and peak CUDA memory (MiB; "n/a" on the CPU) of the F2D2 losses, MeanFlow's jvp among them."""
    from bench.benchmarks.bench_f2d2 import bench_losses
    from bench.common import CASES

    rows = bench_losses(sizes.f2d2_case, CASES[sizes.f2d2_case], device, repeats=3)
    meanflow = [r for r in rows if r["loss"].startswith("meanflow")]
    return {"case": sizes.f2d2_case, "rows": rows, "meanflow_ms_per_step": meanflow[0]["ms_per_step"],
            "meanflow_peak_mib": meanflow[0]["peak_mib"]}


def _launch(cpu: bool, sizes: Sizes, out_dir: Path, timeout: float) -> dict[str, Any]:
    """Two processes of a tiny toy2d `flowdistill train`; return code, processes the run reports, output tail.

    On the GPU: `accelerate launch --multi_gpu --num_processes 2` (one device per process);
    on the CPU: the same launch with no visible GPU (Accelerate then uses gloo; `accelerate launch --cpu` would
    start a single process).
    """
    name = "cpu" if cpu else "gpu"
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", *launcher, "-m", "flowdistill.cli", "train", "recipes/toy2d/fm_independent.yaml",
           f"out_dir={out_dir}", f"name={name}", f"train.steps={sizes.train_steps}", "train.batch_size=64",
           "train.log_every=1", "train.progress=false", "train.sample_grid=false", "data.n_train=1024",
           "data.n_test=128", "model.hidden=32", "model.depth=1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    text = out.stdout + out.stderr
    metrics = out_dir / name / "metrics.jsonl"
    reported = re.findall(r"(\d+) process\(es\) on", text)
    return {"returncode": out.returncode, "seconds": time.perf_counter() - start,
            "processes": int(reported[0]) if reported else 0,
            "logged_steps": len(metrics.read_text().splitlines()) if metrics.is_file() else 0,
            "output_tail": text[-2000:]}


def accelerate(sizes: Sizes, device: torch.device, budget: Budget, smoke: bool) -> dict[str, Any]:
    """Two processes on two GPUs; if that fails (or with fewer than two GPUs, or in --smoke), two CPU processes
    (gloo). `--multi_gpu` gives each process its own device, so one GPU cannot hold both (seen on an H200)."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        if device.type == "cuda" and not smoke and torch.cuda.device_count() >= 2:
            result["gpu"] = _launch(False, sizes, Path(tmp), budget.left() / 2)
        if "gpu" not in result or result["gpu"]["returncode"] != 0:
            result["cpu"] = _launch(True, sizes, Path(tmp), budget.left())
    result["ok"] = any(r["returncode"] == 0 and r["processes"] == 2 and r["logged_steps"] > 0
                       for r in result.values())
    return result


RUNNERS: dict[str, Callable[[Sizes, torch.device, Budget, bool], dict[str, Any]]] = {
    "cuda_tests": cuda_tests, "student_train": student_train, "sampling": sampling,
    "teacher_encode": teacher_encode, "f2d2_meanflow": f2d2_meanflow, "accelerate": accelerate}


# ---------------------------------------------------------------- driver


def run_part(name: str, sizes: Sizes, device: torch.device, smoke: bool, scale: float = 1.0) -> dict[str, Any]:
    """One part with its budget (`scale` times the part's own): {"status", "seconds", "result" or "error"};
    status ok, failed (the part ran but its check did not pass), error (it raised) or timeout."""
    budget = Budget(sizes.budgets[name] * scale)
    print(f"== {name} (budget {budget.seconds:.0f} s)", flush=True)
    try:
        result = RUNNERS[name](sizes, device, budget, smoke)
        status = {"status": "failed" if result.get("ok") is False else "ok", "result": result}
    except subprocess.TimeoutExpired as err:
        status = {"status": "timeout", "error": f"exceeded its {budget.seconds:.0f} s budget: {err}"[:2000]}
    except Exception as err:  # a part's failure is recorded, the remaining parts still run
        status = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    status["seconds"], status["budget_s"] = budget.seconds - budget.left(), budget.seconds
    print(f"   {status['status']} in {status['seconds']:.1f} s", flush=True)
    return status


def output_path(arg: str, device: torch.device) -> Path:
    """--out, else $OUT/gpu_check.json, else bench/results/gpu_check-<device>.json."""
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return RESULTS / f"gpu_check-{device.type}.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts, write the JSON and return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests the script itself)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--out", default="", help="JSON output (default: $OUT/gpu_check.json or bench/results/)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="scale the parts' time budgets so that together they fit in this many seconds (0: as set)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choices: {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check of this script")
    device = torch.device("cpu" if args.smoke else "cuda")
    sizes = SMOKE if args.smoke else FULL
    planned = sum(sizes.budgets[p] for p in parts)
    scale = min(1.0, args.seconds / planned) if args.seconds > 0 else 1.0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    payload: dict[str, Any] = {"bench": "gpu_check", "smoke": args.smoke, "machine": describe_machine(device),
                               "parts": {}}
    out = output_path(args.out, device)
    for name in parts:
        payload["parts"][name] = run_part(name, sizes, device, args.smoke, scale)
        payload["seconds"] = time.perf_counter() - start
        atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n")  # kept if a later part hangs
    print(f"wrote {out}: " + ", ".join(f"{k} {v['status']}" for k, v in payload["parts"].items()))
    return payload


if __name__ == "__main__":
    main()
