"""Score a normalizing-flow run (teacher or compact student) the way NF distillation is judged.

One row per run: parameters; the exact test NLL in nats per sample (and bits/dim for images) from one
encode of the whole test split; sample quality (W2, or classifier-feature FD for images) of samples
drawn at prior temperature T = 1.0 and T = 0.7, z ~ N(0, T^2 I), through the run's own sampler
(decoding, plus the Tweedie step of an eta-perturbed flow); sampling and encoding throughput in
samples per second. Used by the pipeline's `compact` stage and by `bench/nfkd_compare.py`.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from shared.evaluate import generate_with, reference_nll
from shared.metrics import FeatureExtractor, sample_quality
from shared.run import Run

# The undistilled twin of an `nf_kd` student: same architecture and budget, plain maximum likelihood.
UNDISTILLED = ("method.nll_weight=1", "method.latent_weight=0", "method.intermediate_weight=0",
               "method.synth_weight=0")
TEMPERATURES = {"quality_t1": 1.0, "quality_t07": 0.7}
COLUMNS = ["params", "nll", "bpd", "quality_t1", "quality_t07", "sample_per_s", "encode_per_s"]


@torch.no_grad()
def score_flow(run: Run, n_samples: int, extractor: FeatureExtractor | None = None, seed: int = 0
               ) -> dict[str, Any]:
    """The row described in the module docstring for one loaded flow run."""
    data, model = run.dataset, run.model
    row: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    nll = reference_nll(run, "test", len(data.test), "exact")
    row["nll"], row["bpd"] = nll["nll_nats"], nll.get("bits_per_dim")
    for key, temperature in TEMPERATURES.items():
        s = generate_with(run, n_samples, lambda noise: run.sampler.sample(model, temperature * noise), seed)
        row[key] = sample_quality(s.x, data, extractor)["value"]
        if temperature == 1.0:
            row["sample_per_s"] = n_samples / max(s.seconds, 1e-9)
    device = next(model.parameters()).device
    test = data.test.to(device)
    t0 = time.perf_counter()
    run.sampler.log_likelihood(model, test)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["encode_per_s"] = len(test) / max(time.perf_counter() - t0, 1e-9)
    return row


def summarize(rows: list[dict[str, Any]], group_key: str = "role") -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every column, one entry per group in first-seen order.

    Each entry holds `<col>` (mean, float), `<col>_std` (0.0 for one seed) and `n` (runs averaged).
    """
    out = []
    for group in dict.fromkeys(r[group_key] for r in rows):
        members = [r for r in rows if r[group_key] == group]
        entry: dict[str, Any] = {group_key: group, "n": len(members)}
        for col in COLUMNS:
            values = [float(r[col]) for r in members if r.get(col) is not None]
            if values:
                entry[col] = statistics.fmean(values)
                entry[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def add_speedups(summary: list[dict[str, Any]], reference: str = "teacher", group_key: str = "role") -> None:
    """Add `sample_speedup`, `encode_speedup` and `param_ratio` against the `reference` group's means, in place."""
    ref = next(e for e in summary if e[group_key] == reference)
    for e in summary:
        e["sample_speedup"] = e["sample_per_s"] / ref["sample_per_s"]
        e["encode_speedup"] = e["encode_per_s"] / ref["encode_per_s"]
        e["param_ratio"] = e["params"] / ref["params"]
