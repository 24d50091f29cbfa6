"""How well each flow teacher's NFM pairs fit N(0, I) on the images an NFM student trains on.

For every teacher run given: its NLL of the perturbed training images (nats per dimension; the gap
KL(q_train || N(0, I)) up to a constant shared by teachers of the same data and eta, `nfm.pairing_fit`),
the KL of the Gaussian fitted to its latents, and the latents' RMS. The images are all non-test images of
the teacher's data set (what a student with `data.val_fraction: 0` trains on); a teacher that held out a
validation split is also scored on that held-out part alone. Prints a table, writes JSON.

    python -m bench.experiments.pairing_fit runs/digits-teacher_long runs/digits-teacher_long@ema --out fit.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import add_device_and_out_args, print_and_write, setup
from flowdistill.api import load_run
from nfm.pairing_fit import pairing_fit
from nfm.teacher_pairs import teacher_of_run
from shared.machine import describe_machine

COLUMNS = {"teacher": "teacher", "weights": "weights", "step": "step", "eta": "eta", "images": "images",
           "part": "images scored", "nll_nats_per_dim": "NLL (nats/dim)", "nll_standard_error": "± s.e.",
           "gaussian_kl_per_dim": "Gaussian-fit KL (nats/dim)", "z_rms": "z RMS"}


def teacher_rows(entry: str, draws: int, seed: int, device: Any) -> list[dict[str, Any]]:
    """Pairing fit of one teacher (`RUN` or `RUN@WEIGHTS`, WEIGHTS one of auto, best, ema, model) on all
    non-test images, and on its held-out validation images if any."""
    run_dir, _, weights = entry.partition("@")
    run = load_run(run_dir, weights=weights or "auto", device=device)
    teacher = teacher_of_run(run, run_dir)
    parts = {"all non-test (the student's)": run.dataset.fit_split()[0]}
    if run.dataset.val is not None:
        parts["validation (unseen by the teacher)"] = run.dataset.val
    rows = []
    for part, images in parts.items():
        fit = pairing_fit(teacher, images, draws=draws, seed=seed)
        rows.append({"teacher": Path(run_dir).name, "weights": weights or "auto", "step": run.step, "part": part,
                     **fit})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teachers", nargs="+", help="trained flow teacher run directories, each optionally "
                                                    "followed by @auto, @best, @ema or @model (default: auto)")
    parser.add_argument("--draws", type=int, default=4, help="perturbations per image (the coupling's draws)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (the coupling's seed)")
    add_device_and_out_args(parser)
    args = parser.parse_args(argv)
    device = setup(args)
    rows = [row for run_dir in args.teachers for row in teacher_rows(run_dir, args.draws, args.seed, device)]
    payload = {"machine": describe_machine(device), "draws": args.draws, "seed": args.seed, "rows": rows}
    return print_and_write(rows, COLUMNS, payload, args.out)


if __name__ == "__main__":
    main()
