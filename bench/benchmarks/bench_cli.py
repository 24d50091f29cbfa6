"""CLI start-up: wall time of `flowdistill --help`, `train RECIPE --dry-run` and `python -c "import torch"`.

Each command runs in a fresh process `--repeats` times; the table gives the median and the minimum
(the minimum is the least disturbed by other load on the machine).

    python -m bench.benchmarks.bench_cli --repeats 7
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import report
from shared.timing import median

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "flowdistill --help": [sys.executable, "-m", "flowdistill", "--help"],
    "flowdistill train R --dry-run": [sys.executable, "-m", "flowdistill", "train",
                                      "recipes/digits/fm_nf_teacher.yaml", "--dry-run"],
    "import torch (floor)": [sys.executable, "-c", "import torch"],
}
COLUMNS = {"command": "command", "median_s": "median s", "min_s": "min s", "repeats": "repeats"}


def time_command(cmd: list[str], repeats: int) -> list[float]:
    """Wall seconds of `repeats` fresh runs of a command (its output discarded)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    parser.add_argument("--out", default="", help="JSON output (default: bench/results/cli-cpu.json)")
    args = parser.parse_args()
    time_command(COMMANDS["import torch (floor)"], 1)  # warm the file cache once
    rows = []
    for name, cmd in COMMANDS.items():
        times = time_command(cmd, args.repeats)
        rows.append({"command": name, "median_s": median(times), "min_s": min(times), "repeats": args.repeats})
    report("cli", args, torch.device("cpu"), rows, COLUMNS,
           ["target: --help and train --dry-run under 2.5 s on a 2-core CPU; import torch is the floor"])


if __name__ == "__main__":
    main()
