"""The teacher-quality curve: NFM student quality against the quality of the teacher that paired it.

Reads a comparison's `results.json` (`flowdistill compare`) whose NFM students name their teacher with
`method.coupling.teacher=<run>`, scores each teacher's exact test NLL (one encode) of the inputs it was
trained on, x + eta*eps or, for a dequantized likelihood teacher, x + uniform cell noise (nats per
dimension on the model's [-1, 1] scale; bits/dim too for the latter), and plots student FD at each NFE against the teacher's sample FD and its NLL, with the
baseline couplings as horizontal lines. A straight-line fit of student FD on teacher FD (per NFE) says
which teacher FD would make NFM match semidiscrete OT.

    python -m bench.experiments.teacher_curve runs/digits-teacher-curve/results.json --out docs/nfm/digits/teacher_curve
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdistill.api import load_run
from nfm.teacher_pairs import NOISE_LAWS, teacher_of_run
from shared.data import bits_per_dim
from shared.evaluate import format_table, write_json

BASELINES = ("independent", "minibatch_ot", "semidiscrete_ot")


def teacher_of(entry: str) -> tuple[str, str] | None:
    """(student name, teacher run directory) of an NFM student entry, or None for other students."""
    parts = dict(p.split("=", 1) for p in shlex.split(entry)[1:] if "=" in p)
    return (parts["name"], parts["method.coupling.teacher"]) if "method.coupling.teacher" in parts else None


@torch.no_grad()
def perturbed_nll(run_dir: str, seed: int = 0) -> dict[str, float]:
    """Mean exact test NLL (nats per dimension) of the teacher's own training perturbation of x, seeded;
    with `teacher_bpd` (bits/dim of the integer data) for a dequantized teacher."""
    run = load_run(run_dir)
    teacher = teacher_of_run(run, run_dir)
    x = run.dataset.test
    noise = NOISE_LAWS[teacher.noise_kind](x.shape, generator=torch.Generator().manual_seed(seed))
    nll = -run.sampler.log_likelihood(run.model, teacher.perturb(x, noise)).logp.double().mean()
    out = {"teacher_nll_per_dim": float(nll / run.dataset.dim)}
    if teacher.dequantize_levels is not None:
        out["teacher_bpd"] = float(bits_per_dim(nll, run.dataset.dim, teacher.dequantize_levels))
    return out


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """Teacher FD at which a least-squares line through (teacher FD, student FD) reaches `target`."""
    if len(points) < 2:
        return None
    slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return None if slope <= 0 else float((target - intercept) / slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.json of `flowdistill compare`")
    parser.add_argument("--out", required=True, help="output stem: <out>.json, <out>.md, <out>.png")
    parser.add_argument("--nfe", default="1,2,4", help="comma-separated NFE to plot")
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--grid", default="linear")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    nfes = [int(n) for n in args.nfe.split(",")]
    teachers = {t["name"]: t for t in results["teachers"]}
    cell = {(r["student"], r["nfe"]): r for r in results["rows"] if r["solver"] == args.solver and r["grid"] == args.grid}
    rows: list[dict[str, Any]] = []
    for entry in results["spec"]["students"]:
        pair = teacher_of(entry)
        if pair is None:
            continue
        student, teacher_dir = pair
        teacher = teachers[Path(teacher_dir).name]
        row = {"student": student, "teacher": teacher["name"], "teacher_fd": teacher["value"],
               **perturbed_nll(teacher_dir)}
        row.update({f"fd_nfe{n}": cell[(student, n)]["mean"] for n in nfes if (student, n) in cell})
        rows.append(row)
    rows.sort(key=lambda r: r["teacher_fd"])
    names = sorted({k[0] for k in cell})
    baselines: dict[str, dict[int, float]] = {}
    for b in BASELINES:
        match = [s for s in names if s.endswith(b)]
        if match:
            baselines[b] = {n: cell[(match[0], n)]["mean"] for n in nfes if (match[0], n) in cell}
    sd = baselines.get("semidiscrete_ot", {})
    cross = {n: crossing([(r["teacher_fd"], r[f"fd_nfe{n}"]) for r in rows if f"fd_nfe{n}" in r], sd[n])
             for n in nfes if n in sd}
    write_json(Path(args.out).with_suffix(".json"), {"rows": rows, "baselines": baselines, "crossing_teacher_fd": cross,
                                                     "source": args.results})
    import matplotlib.pyplot as plt

    from shared.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "teacher_fd", "teacher sample FD"),
                           (axes[1], "teacher_nll_per_dim", "teacher test NLL of its training inputs (nats/dim)")):
        for i, n in enumerate(nfes):
            pts = [(r[key], r[f"fd_nfe{n}"]) for r in rows if f"fd_nfe{n}" in r]
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"NFM, {n} NFE")
            for j, (b, values) in enumerate(baselines.items()):
                if n in values:
                    ax.axhline(values[n], color=f"C{i}", ls=("--", ":", "-.")[j], lw=1,
                               label=f"{b}, {n} NFE" if key == "teacher_fd" else None)
        ax.set(xlabel=label, yscale="log")
        ax.grid(alpha=0.3)
    span = [min(r["teacher_fd"] for r in rows), max(r["teacher_fd"] for r in rows)]
    axes[0].plot(span, span, color="k", lw=0.8, ls=(0, (1, 3)), label="student FD = teacher FD")
    axes[0].set_ylabel("student FD")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, Path(args.out).with_suffix(".png"))
    bpd = ["teacher_bpd"] if all("teacher_bpd" in r for r in rows) else []
    table = format_table(rows, ["student", "teacher", "teacher_fd", "teacher_nll_per_dim", *bpd,
                                *[f"fd_nfe{n}" for n in nfes]])
    lines = [f"Source: `{args.results}` ({args.solver}, {args.grid} grid). Baselines: "
             + "; ".join(f"{b} " + ", ".join(f"{n} NFE {v:.4g}" for n, v in vals.items()) for b, vals in baselines.items()),
             "", table, "", "Teacher FD at which the NFM student's line reaches semidiscrete OT: "
             + ", ".join(f"{n} NFE: {v:.4g}" if v is not None else f"{n} NFE: no crossing" for n, v in cross.items())]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
