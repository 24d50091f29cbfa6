"""Score a normalizing-flow run (teacher or compact student) the way NF distillation is judged.

One row per run: parameters; the exact validation NLL (when the run carved a validation split: the
column settings are chosen on) and test NLL in nats per sample (and bits/dim for images) from one
encode of the whole test split; sample quality (W2, or classifier-feature FD for images) of samples
drawn at prior temperature T = 1.0 and T = 0.7, z ~ N(0, T^2 I), through the run's own sampler
(decoding, plus the Tweedie step of an eta-perturbed flow); sampling and encoding throughput in
samples per second (the median of `repeats` timed passes over one batch, after a warm-up pass). Used by the
pipeline's `compact` stage and by `bench/experiments/nfkd_compare.py`.
"""
from __future__ import annotations

from typing import Any

import torch

from shared.evaluate import generate_with, mean_and_std, reference_nll
from shared.metrics import FeatureExtractor, sample_quality
from shared.run import Run
from shared.timing import median_seconds

# The undistilled twin of an `nf_kd` student: same architecture and budget, plain maximum likelihood from a
# fresh initialisation (a student started from the teacher's blocks, train.init_from, already uses the teacher).
LIKELIHOOD_ONLY = ("method.nll_weight=1", "method.latent_weight=0", "method.intermediate_weight=0",
                   "method.synth_weight=0")  # the control of a teacher-initialised student: its start, no distillation
UNDISTILLED = (*LIKELIHOOD_ONLY, "train.init_from=")
TEMPERATURES = {"quality_t1": 1.0, "quality_t07": 0.7}
COLUMNS = ["params", "val_nll", "val_bpd", "nll", "bpd", "quality_t1", "quality_t07", "sample_per_s", "encode_per_s"]


@torch.no_grad()
def score_flow(run: Run, n_samples: int, extractor: FeatureExtractor | None = None, seed: int = 0,
               repeats: int = 5) -> dict[str, Any]:
    """The row described in the module docstring for one loaded flow run."""
    data, model = run.dataset, run.model
    row: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    nll = reference_nll(run, "test", len(data.test), "exact")
    row["nll"], row["bpd"] = nll["nll_nats"], nll.get("bits_per_dim")
    if data.val is not None and len(data.val):  # for choosing settings: never the test columns
        val = reference_nll(run, "val", len(data.val), "exact")
        row["val_nll"], row["val_bpd"] = val["nll_nats"], val.get("bits_per_dim")
    for key, temperature in TEMPERATURES.items():
        s = generate_with(run, n_samples, lambda noise: run.sampler.sample(model, temperature * noise), seed)
        row[key] = sample_quality(s.x, data, extractor)["value"]
    device = next(model.parameters()).device
    noise = run.sampler.prior_sample(min(n_samples, 500), data.shape, device, torch.Generator(device).manual_seed(seed))
    test = data.test[:500].to(device)
    sample_s = median_seconds(lambda: run.sampler.sample(model, noise), device, repeats)
    encode_s = median_seconds(lambda: run.sampler.log_likelihood(model, test), device, repeats)
    row["sample_per_s"], row["encode_per_s"] = len(noise) / max(sample_s, 1e-9), len(test) / max(encode_s, 1e-9)
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
                entry[col], entry[f"{col}_std"] = mean_and_std(values)
        out.append(entry)
    return out


def add_speedups(summary: list[dict[str, Any]], reference: str = "teacher", group_key: str = "role") -> None:
    """Add `sample_speedup`, `encode_speedup` and `param_ratio` against the `reference` group's means, in place."""
    ref = next(e for e in summary if e[group_key] == reference)
    for e in summary:
        e["sample_speedup"] = e["sample_per_s"] / ref["sample_per_s"]
        e["encode_speedup"] = e["encode_per_s"] / ref["encode_per_s"]
        e["param_ratio"] = e["params"] / ref["params"]
