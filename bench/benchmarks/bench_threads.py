"""Intra-op threads per stage: steps per second with 1 and 2 torch threads, on an idle machine and with one
core kept busy by another process (what a second job or a browser does to a small machine).

    OMP_NUM_THREADS= python -m bench.benchmarks.bench_threads --out docs/benchmarks/threads.json

Each cell runs in a fresh subprocess (`torch.set_num_threads(t)` before any work): the digits recipes'
teacher training steps, MLP student training steps, and the teacher's autoregressive sampling of 100 images;
the median of `--repeats` timed blocks after a warm-up block. Prints a table and writes JSON; the CLI's
default thread count (`flowdistill --threads`) is the faster column of this table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

WORKLOADS = {
    "teacher train step": ("recipes/digits/teacher.yaml", "train"),
    "student train step (MLP)": ("recipes/digits/fm_mlp.yaml", "train"),
    "teacher sampling (100 images)": ("recipes/digits/teacher.yaml", "sample"),
}


def measure(recipe: str, kind: str, threads: int, repeats: int, block: int) -> float:
    """Seconds per step (or per sampling call): median over `repeats` blocks of `block` calls (runs in a child)."""
    import torch

    torch.set_num_threads(threads)
    from flowdistill.api import resolve_config
    from flowdistill.components import CATALOG
    from shared.data_sources import load_dataset
    from shared.run_build import build_model

    cfg = resolve_config(recipe, ["train.progress=false"])
    data = load_dataset(cfg.data)
    model = build_model(cfg, data, CATALOG)
    x = data.train[:cfg.train.batch_size].float()
    if kind == "train":
        from shared.run import build_loss

        loss_fn = build_loss(cfg, data, CATALOG)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        generator = torch.Generator().manual_seed(0)

        def call() -> None:
            loss, _ = loss_fn(model, (x,), generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        from shared.run_build import build_sampler

        sampler = build_sampler(cfg, data, CATALOG)
        noise = torch.randn(100, *data.shape)
        model.eval()

        def call() -> None:
            with torch.no_grad():
                sampler.sample(model, noise)

    from shared.timing import median_seconds

    def calls() -> None:
        for _ in range(block):
            call()

    return median_seconds(calls, torch.device("cpu"), repeats) / block


def busy(stop: mp.Event) -> None:
    """Keep one core busy until told to stop."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def child(args: argparse.Namespace) -> None:
    recipe, kind = WORKLOADS[args.workload]
    print(json.dumps({"seconds": measure(recipe, kind, args.threads, args.repeats, args.block)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/threads.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--workload", default="", help=argparse.SUPPRESS)  # a child's cell
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        return child(args)
    env = {**os.environ, "OMP_NUM_THREADS": ""}
    rows = []
    for load in ("idle", "one core busy"):
        stop = mp.Event()
        hog = mp.Process(target=busy, args=(stop,)) if load != "idle" else None
        if hog:
            hog.start()
        try:
            for name in WORKLOADS:
                row = {"workload": name, "load": load}
                for threads in (1, 2):
                    out = subprocess.run([sys.executable, "-m", "bench.benchmarks.bench_threads", "--workload", name,
                                          "--threads", str(threads), "--repeats", str(args.repeats),
                                          "--block", str(args.block)], capture_output=True, text=True, env=env,
                                         check=True)
                    row[f"ms_{threads}t"] = 1000 * json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
                row["ratio_2t_over_1t"] = row["ms_2t"] / row["ms_1t"]
                rows.append(row)
                print(f"{load:<14} {name:<30} 1 thread {row['ms_1t']:8.2f} ms   2 threads {row['ms_2t']:8.2f} ms   "
                      f"2t/1t {row['ratio_2t_over_1t']:.2f}", flush=True)
        finally:
            if hog:
                stop.set()
                hog.join()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
