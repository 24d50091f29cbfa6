"""TarFlow teacher costs: encoding throughput, sampling time, cached vs uncached autoregressive decoding.

Models have the digits recipe's size (8x8, patch 2: 16 tokens) and the MNIST recipe's size (28x28,
patch 4: 49 tokens), with small random output projections so that decoding is not the identity
(timings do not depend on the weights). Encoding is one parallel pass under no_grad; sampling is the
cached decode (T * (N - 1) sequential one-token passes) plus the Tweedie denoising step (encode
forward and backward). Both run in fp32 and under bf16 autocast; cached and uncached decoding of the
same noise batch run in fp32 and must agree.

Run from the repository root:  python -m bench.benchmarks.bench_teacher [--device cpu|cuda] [--repeats R]
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

import torch

from bench.common import pick_device, report
from nfm.tarflow import TarFlow, TarFlowConfig
from nfm.teacher import TeacherConfig, TeacherSampler
from shared.timing import median_seconds

MODELS = {  # name -> (data shape, config) as in recipes/digits/teacher*.yaml and recipes/mnist/teacher*.yaml
    "digits-p2": ((1, 8, 8), TarFlowConfig(patch=2, width=128, blocks=4, layers=2, head_dim=64)),
    "mnist-p4": ((1, 28, 28), TarFlowConfig(patch=4, width=128, blocks=4, layers=2, head_dim=64)),
}
COLUMNS = {"model": "model", "tokens": "tokens", "dtype": "dtype", "encode_images_per_s": "encode img/s",
           "sample_s_per_batch": "sample s/batch", "sample_over_encode": "sample/encode per image",
           "decode_cached_s": "decode cached s", "decode_uncached_s": "decode uncached s",
           "cache_speedup": "cache speed-up", "cached_vs_uncached_max_abs": "max abs diff cached vs uncached"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported")
    parser.add_argument("--encode-batch", type=int, default=256, help="batch of the encoding throughput")
    parser.add_argument("--decode-batch", type=int, default=0, help="sampling/decoding batch (0: 64 CPU, 256 GPU)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--out", default="", help="JSON output (default: bench/results/teacher-<device>.json)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choices: {', '.join(MODELS)}")
    return args


def build(name: str, device: torch.device) -> TarFlow:
    """A seeded model in eval mode with small random output projections (a non-identity flow)."""
    shape, cfg = MODELS[name]
    torch.manual_seed(0)
    flow = TarFlow(cfg, shape).to(device).eval()
    with torch.no_grad():
        for block in flow.blocks:
            block.out.weight.normal_(0, 0.02)
    return flow


def measure(name: str, args: argparse.Namespace, device: torch.device, decode_batch: int) -> list[dict[str, Any]]:
    """One row per dtype for a model; the fp32 row also holds the cached vs uncached decode."""
    flow = build(name, device)
    sampler = TeacherSampler(TeacherConfig(denoise=True))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.encode_batch, *flow.data_shape, device=device, generator=gen)
    z = torch.randn(decode_batch, *flow.data_shape, device=device, generator=gen)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        def precision():
            return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

        def encode() -> None:
            with torch.no_grad(), precision():
                flow.encode(x)

        def sample() -> None:
            with precision():
                sampler.sample(flow, z)

        enc, smp = median_seconds(encode, device, args.repeats), median_seconds(sample, device, args.repeats)
        rows.append({"model": name, "tokens": flow.n_tokens, "dtype": str(dtype).removeprefix("torch."),
                     "encode_batch": args.encode_batch, "encode_images_per_s": args.encode_batch / enc,
                     "sample_batch": decode_batch, "sample_s_per_batch": smp, "sample_nfe": flow.decode_passes + 2,
                     "sample_over_encode": (smp / decode_batch) / (enc / args.encode_batch)})
    cached = median_seconds(lambda: flow.decode(z, use_cache=True), device, args.repeats)
    uncached = median_seconds(lambda: flow.decode(z, use_cache=False), device, args.repeats)
    diff = (flow.decode(z, use_cache=True) - flow.decode(z, use_cache=False)).abs().max().item()
    rows[0].update({"decode_cached_s": cached, "decode_uncached_s": uncached, "cache_speedup": uncached / cached,
                    "cached_vs_uncached_max_abs": diff})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the teacher benchmark, print its table and write its JSON."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    decode_batch = args.decode_batch or (256 if device.type == "cuda" else 64)
    rows = []
    for name in args.models:
        rows += measure(name, args, device, decode_batch)
    notes = [f"encode: batch {args.encode_batch}, no_grad; sample and decode: batch {decode_batch}",
             "sample = cached decode + Tweedie denoise; sample/encode = seconds per image of each",
             "times: median over repeats after one untimed warm-up call; decode rows in fp32"]
    return report("teacher", args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main()
