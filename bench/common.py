"""Helpers shared by the benchmarks: device and thread flags, the benchmark cases, a Markdown table and atomic
JSON output (timing: `shared.timing`; the machine description: `shared.machine`)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nfm.losses import FlowMatchingConfig
from shared.backbones import MLPConfig, UNetConfig
from shared.checkpoint import atomic_write_text
from shared.config import DataConfig, RunConfig, TrainConfig
from shared.device import resolve_device
from shared.machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchCase:
    """A data set, a backbone and the batch sizes a benchmark uses for it."""

    note: str  # one-line description for the output
    data: str  # data set name (shared.data_sources.DATASETS)
    model: Any  # backbone config (MLPConfig or UNetConfig)
    train_batch: int  # training batch size
    sample_batch: int  # sampling batch size
    cuda_only: bool = False  # too slow for the default CPU run

    def run_config(self, train: TrainConfig | None = None, seed: int = 0) -> RunConfig:
        """A flow-matching run config for this case (independent coupling, uniform times)."""
        return RunConfig(name="bench", seed=seed, data=DataConfig(name=self.data), model=self.model,
                         method=FlowMatchingConfig(), train=train or TrainConfig(batch_size=self.train_batch))


CASES: dict[str, BenchCase] = {
    "toy": BenchCase("MLP 256x3 on 8gaussians", "8gaussians", MLPConfig(hidden=256, depth=3, time_dim=32), 512, 1000),
    "digits": BenchCase("UNet (32,64) attn (F,T) on digits 8x8", "digits",
                        UNetConfig(channels=(32, 64), attention=(False, True), norm_groups=8), 128, 256),
    "mnist": BenchCase("UNet (32,64,64) attn (F,F,T) on MNIST 28x28", "mnist",
                       UNetConfig(channels=(32, 64, 64), attention=(False, False, True), norm_groups=8), 256, 256,
                       cuda_only=True),
}


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    """Add --device, --threads, --repeats, --batch, --cases and --out to a benchmark's parser."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats; medians are reported")
    parser.add_argument("--batch", type=int, default=0, help="batch size for every case (0: each case's own)")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {', '.join(CASES)} "
                                                    "(default: all; mnist only on cuda)")
    parser.add_argument("--out", default="", help="JSON output (default: bench/results/<bench>-<device>.json)")


def add_device_and_out_args(parser: argparse.ArgumentParser) -> None:
    """Add --device, --threads and --out (JSON, default: print only) to an evaluation script's parser."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--out", default="", help="JSON output (default: print only)")


def pick_device(name: str) -> torch.device:
    """The device named by --device (auto, cpu or cuda; `auto` prefers CUDA); exits when cuda is not there."""
    try:
        return resolve_device(name)
    except ValueError:
        raise SystemExit(f"--device {name}: no CUDA device is available") from None


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the benchmark's device."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def selected_cases(text: str, device: torch.device) -> dict[str, BenchCase]:
    """The cases named in --cases, or every case that fits the device."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choices: {', '.join(CASES)}")
    if not names:
        names = [n for n, c in CASES.items() if device.type == "cuda" or not c.cuda_only]
    return {n: CASES[n] for n in names}


def _fmt(value: Any) -> str:
    """Numbers rounded for a table cell."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A Markdown table of `rows` with the given key -> header columns."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def print_and_write(rows: list[dict[str, Any]], columns: dict[str, str], payload: dict[str, Any], out: str
                    ) -> dict[str, Any]:
    """Print `rows` as a Markdown table and, when `out` is set, write `payload` there as JSON; return it."""
    print(markdown_table(rows, columns))
    if out:
        atomic_write_text(Path(out), json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")
    return payload


def report(bench: str, args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
           columns: dict[str, str], notes: list[str], tag: str = "",
           extra: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] | None = None) -> dict[str, Any]:
    """Print the machine, a Markdown table (and the `extra` tables: JSON key -> (rows, columns)) and notes; write
    everything as JSON to --out; return it."""
    payload = {"bench": bench, "machine": describe_machine(device), "settings": vars(args), "notes": notes,
               "rows": rows, **{key: table for key, (table, _) in (extra or {}).items()}}
    info = payload["machine"]
    print(f"\n{bench} on {info['device']}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "device"))
    print("\n\n".join(markdown_table(t, c) for t, c in [(rows, columns), *(extra or {}).values()]))
    for note in notes:
        print(f"- {note}")
    out = Path(args.out) if args.out else RESULTS / f"{bench}-{device.type}{tag}.json"
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return payload
