"""Pack a trained teacher run as a shipped pretrained teacher: scored, carded, hashed.

    python -m bench.experiments.ship_pretrained RUN_DIR flowdistill/pretrained/digits-tarflow \\
        --recipe recipes/digits/teacher.yaml --summary "digits NFM teacher (TarFlow, eta 0.2)" \\
        --command "flowdistill train recipes/digits/teacher.yaml" --train-seconds 915

Scores the run's evaluation weights on the test split (exact NLL in nats and bits/dim from one encode) and
its own samples (FD on the data set's classifier features, at 500 and 1,000 samples: the pipeline scores
500), then writes the packed folder (`flowdistill.packed`) with a model card whose front matter holds the
figures, the recipe, the command that reproduces it, the data fingerprint, the training time and machine.
The same figures are printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowdistill.api import load_run
from flowdistill.scoring import evaluate_teacher
from flowdistill.packed import pack_run
from shared.evaluate import reference_nll
from shared.machine import describe_machine
from shared.metrics import feature_extractor
from shared.run_build import evaluation_weights

FD_SAMPLES = (500, 1000)


def card_body(meta: dict) -> str:
    """The Markdown text under the card's front matter."""
    return f"""# {meta['name']}

{meta['summary']}. A flowdistill run packed for shipping: `config.yaml` (the resolved recipe),
`model.safetensors` (the evaluation weights, step {meta['step']}), `manifest.json` (sha256 of every file,
checked on load).

Use it wherever a run directory is accepted: `teacher: pretrained:{meta['name']}` in a pipeline,
`method.coupling.teacher=pretrained:{meta['name']}` in a student recipe, `flowdistill nll pretrained:{meta['name']}`.

| figure | value |
|---|---|
| test NLL | {meta['test_nll_nats']:.4g} nats per image, {meta['test_bits_per_dim']:.4g} bits/dim |
| sample FD ({meta['sample_fd_n']} samples) | {meta['sample_fd']:.4g} ({meta['features']}) |
| sample FD (500 samples) | {meta['sample_fd_500']:.4g} |
| parameters | {meta['parameters']:,} |
| training | {meta['train_seconds']:.0f} s on {meta['machine']} |

Reproduce: `{meta['command']}` (recipe `{meta['recipe']}`; data fingerprint `{meta['data_fingerprint']}`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="trained teacher run directory")
    parser.add_argument("out", help="packed folder to write, e.g. flowdistill/pretrained/digits-tarflow")
    parser.add_argument("--recipe", required=True, help="the recipe the run was trained from")
    parser.add_argument("--command", required=True, help="the command that reproduces the run")
    parser.add_argument("--summary", required=True, help="one line: what the teacher is")
    parser.add_argument("--train-seconds", type=float, required=True, help="wall seconds the training took")
    args = parser.parse_args()

    torch.manual_seed(0)
    run = load_run(args.run)
    data = run.dataset
    extractor = feature_extractor(data)
    nll = reference_nll(run, "test", len(data.test), "exact")
    fds = {n: evaluate_teacher(run, n, extractor)[0] for n in FD_SAMPLES}
    weights, step = evaluation_weights(run.dir)
    hw = describe_machine(torch.device("cpu"))
    name = Path(args.out).name
    meta = {
        "name": name, "summary": args.summary, "library_name": "flowdistill", "tags": ["normalizing-flow", "tarflow"],
        "recipe": args.recipe, "command": args.command, "model": run.config.model.name,
        "data": data.name, "data_fingerprint": data.base_fingerprint, "step": step,
        "test_nll_nats": float(nll["nll_nats"]), "test_bits_per_dim": float(nll["bits_per_dim"]),
        "test_points": len(data.test), "sample_fd": float(fds[1000]["value"]), "sample_fd_n": 1000,
        "sample_fd_500": float(fds[500]["value"]), "features": fds[1000]["extractor"],
        "teacher_nfe": fds[1000]["nfe"], "eta": fds[1000]["eta"],
        "parameters": sum(p.numel() for p in run.model.parameters()), "train_seconds": args.train_seconds,
        "machine": f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, python {hw['python']}",
    }
    pack_run(run.dir, weights, step, args.out, meta, card_body(meta))
    for key in ("test_bits_per_dim", "sample_fd", "sample_fd_500", "parameters", "step"):
        print(f"{key:<20} {meta[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
