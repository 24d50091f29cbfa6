"""Gaussian mixtures the recipes were never tuned on, written as a user's tabular files, and the scores of
likelihood runs on them against the exact density.

    python -m bench.experiments.heldout_mixtures make --dim 16 --seed 101 --out mixtures/d16-s101
    flowdistill train recipes/density/fm.yaml data.name=tabular data.path=mixtures/d16-s101/train.npy \\
        data.test_path=mixtures/d16-s101/test.npy ...
    python -m bench.experiments.heldout_mixtures score mixtures/d16-s101 runs/RUN [--csv f2d2-eval.csv]

`make` draws a mixture other than the bundled `gmm<D>` sets (shared/densities.py): the number of
components k is drawn from 3..8 (or --components), weights from a Dirichlet(2) distribution, means from
N(0, (spread^2 / d) I) (mean distance about spread * sqrt(2) whatever d, as for the bundled sets; --spread 3
by default), and covariances by --covariance:
    isotropic   s_k^2 I, s_k log-uniform on [0.25, 0.8] (the bundled sets' range of scales);
    full        R_k diag(s^2) R_k^T, R_k a random rotation, s log-uniform on [0.15, 1] per direction: thin,
                tilted components, d (d + 1) / 2 parameters each (a harder case: more to learn per point).
It writes train.npy (20,000 x d
float32; --n-train), test.npy (2,000 x d), test_logp.npy (the exact log p of each test row, float64, nats in the
file's units) and mixture.json (the parameters).

`score` reads a run's per-point table (default: f2d2-eval.csv, else nll-test.csv, whichever exists) and
reports, for every log p column, the gap (model NLL - exact NLL, nats per sample; negative: the model
claims more density than the truth) with its paired standard error and the mean |error|, and writes
<run>/heldout-score.json.

`table` gathers the scores of the runs `heldout_density.sh` wrote under RUNS/<name>/ for the mixtures
MIXTURES/heldout-<name>/ into one JSON and prints the Markdown table docs/likelihood.md quotes.

`seeds RUNS0 RUNS1 ...` does the same for the chains run again with other seeds (`heldout_density.sh M RUNS_N
PARTS seed=N`, one RUNS folder per seed, laid out alike): each seed's gap, the mean over seeds with its standard
error (seed s.d. / sqrt(seeds)) and the seeds' s.d., for the estimates every seed has.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shared.evaluate import standard_error

N_TRAIN, N_TEST = 20000, 2000


def draw_mixture(dim: int, seed: int, components: int = 0, spread: float = 3.0, covariance: str = "isotropic"
                 ) -> dict[str, Tensor]:
    """Weights (k,), means (k, d), covariance factors (k, d, d) with cov_k = A_k A_k^T, float64."""
    g = torch.Generator().manual_seed(seed)
    k = components or int(torch.randint(3, 9, (1,), generator=g))
    gamma = -torch.log(torch.rand(k, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2, 1): Dirichlet(2)
    weights = gamma / gamma.sum()
    means = spread / math.sqrt(dim) * torch.randn(k, dim, generator=g, dtype=torch.float64)
    if covariance == "isotropic":
        scales = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(math.log(0.25), math.log(0.8), generator=g))
        return {"weights": weights, "means": means, "factors": scales[:, None, None] * torch.eye(dim, dtype=torch.float64)}
    if covariance != "full":
        raise ValueError(f"covariance must be isotropic or full, got {covariance!r}")
    rotations = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))[0]
    scales = torch.exp(torch.empty(k, dim, dtype=torch.float64).uniform_(math.log(0.15), 0.0, generator=g))
    return {"weights": weights, "means": means, "factors": rotations * scales[:, None, :]}


def mixture_log_prob(mix: dict[str, Tensor], x: Tensor) -> Tensor:
    """Exact log p(x) (N,) in nats per sample, float64: log-sum-exp over components of log N(x; mu_k, A_k A_k^T)."""
    comps = torch.distributions.MultivariateNormal(mix["means"], scale_tril=torch.linalg.cholesky(
        mix["factors"] @ mix["factors"].transpose(1, 2)))
    return torch.logsumexp(comps.log_prob(x.double()[:, None, :]) + mix["weights"].log(), dim=1)


def mixture_velocity(mix: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
    """The exact flow-matching field of the mixture on the linear path x_t = (1 - t) x + t z (t = 0 data, t = 1
    noise, z ~ N(0, I)): v(x_t, t) = E[z - x | x_t] (B, d), computed in float64 and returned in x's dtype.

    Given component k, (x, x_t) is Gaussian with x_t ~ N((1 - t) mu_k, C_k), C_k = (1 - t)^2 S_k + t^2 I, so
    E[z - x | x_t, k] = (t I - (1 - t) S_k) C_k^-1 (x_t - (1 - t) mu_k) - mu_k, averaged with the posterior
    weights w_k N(x_t; (1 - t) mu_k, C_k) / p_t(x_t). Its ODE likelihood is the mixture's exact log p.
    """
    xd, td = x.double(), t.double().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1) against (B, k, d, d)
    cov = mix["factors"] @ mix["factors"].transpose(1, 2)  # (k, d, d)
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    c = (1 - td) ** 2 * cov + td ** 2 * eye  # (B, k, d, d)
    r = xd[:, None, :] - (1 - td[..., 0]) * mix["means"]  # (B, k, d)
    chol = torch.linalg.cholesky(c)
    solved = torch.cholesky_solve(r[..., None], chol)[..., 0]  # C_k^-1 r
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_w = mix["weights"].log() - 0.5 * ((r * solved).sum(-1) + log_det)  # (B, k), constants cancel
    per_k = (td[..., 0] * solved - (1 - td[..., 0]) * (cov @ solved[..., None])[..., 0]) - mix["means"]
    return (torch.softmax(log_w, dim=1)[..., None] * per_k).sum(1).to(x.dtype)


def read_mixture(mixture_dir: Path) -> dict[str, Tensor]:
    """The parameters `make` wrote to mixture.json: weights (k,), means (k, d), factors (k, d, d), float64."""
    info = json.loads((mixture_dir / "mixture.json").read_text())
    return {key: torch.tensor(info[key], dtype=torch.float64) for key in ("weights", "means", "factors")}


def standardised(mix: dict[str, Tensor], mean: Tensor, std: Tensor) -> dict[str, Tensor]:
    """The mixture of (x - mean) / std: what a run fitted on standardised rows models (mean, std (d,))."""
    return {"weights": mix["weights"], "means": (mix["means"] - mean) / std,
            "factors": mix["factors"] / std[:, None]}


def sample_mixture(mix: dict[str, Tensor], n: int, g: torch.Generator) -> Tensor:
    """n points (n, d) float64."""
    k = torch.multinomial(mix["weights"], n, replacement=True, generator=g)
    eps = torch.randn(n, mix["means"].shape[1], generator=g, dtype=torch.float64)
    return mix["means"][k] + torch.einsum("nij,nj->ni", mix["factors"][k], eps)


def make(dim: int, seed: int, out: Path, components: int = 0, spread: float = 3.0, covariance: str = "isotropic",
         n_train: int = N_TRAIN) -> dict[str, Any]:
    """Write train.npy, test.npy, test_logp.npy and mixture.json under out; return the description."""
    mix = draw_mixture(dim, seed, components, spread, covariance)
    g = torch.Generator().manual_seed(seed + 7919)
    train, test = sample_mixture(mix, n_train, g).float(), sample_mixture(mix, N_TEST, g).float()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", train.numpy())
    np.save(out / "test.npy", test.numpy())
    logp = mixture_log_prob(mix, test)  # of the float32 rows the file holds
    np.save(out / "test_logp.npy", logp.numpy())
    info = {"dim": dim, "seed": seed, "components": len(mix["weights"]), "spread": spread,
            "covariance": covariance, "weights": mix["weights"].tolist(),
            "exact_test_nll": -logp.mean().item(), "n_train": n_train, "n_test": N_TEST}
    (out / "mixture.json").write_text(json.dumps({**info, "means": mix["means"].tolist(),
                                                  "factors": mix["factors"].tolist()}) + "\n")
    return info


def read_columns(path: Path) -> dict[str, np.ndarray]:
    """A per-point CSV written by f2d2-eval or nll: column name -> float array."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: np.array([float(r[name]) for r in rows]) for name in rows[0]}


def score(mixture_dir: Path, run_dir: Path, csv_name: str = "") -> dict[str, Any]:
    """Gap to the exact NLL (± paired s.e.) and mean |error| of every `*logp_nats` column of the run's table."""
    exact = torch.from_numpy(np.load(mixture_dir / "test_logp.npy"))
    names = [csv_name] if csv_name else ["f2d2-eval.csv", "nll-test.csv"]
    path = next((run_dir / n for n in names if (run_dir / n).is_file()), None)
    if path is None:
        raise SystemExit(f"{run_dir}: none of {', '.join(names)} found; run f2d2-eval or nll on the test split first")
    cols = read_columns(path)
    index = cols["index"].astype(int)
    rows = {}
    for name, values in cols.items():
        if not name.endswith("logp_nats") or name.startswith("exact"):
            continue
        diff = exact[index] - torch.from_numpy(values)
        rows[name.removesuffix("logp_nats").rstrip("_") or "logp"] = {"gap": diff.mean().item(), "gap_se": standard_error(diff),
                                                 "mean_abs_error": diff.abs().mean().item()}
    result = {"mixture": str(mixture_dir), "run": str(run_dir), "table": path.name, "n": len(index),
              "n_test": len(exact), "exact_nll": -exact[index].mean().item(), "rows": rows}
    (run_dir / "heldout-score.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


RUN_ROWS = (("fm", "logp", "FM field, ODE (dopri5)"), ("fm-ensemble", "logp", "3 FM fields averaged, ODE"),
            ("f2d2_joint", "K1", "F2D2, K = 1"),
            ("f2d2_joint", "K2", "F2D2, K = 2"), ("f2d2_joint", "K4", "F2D2, K = 4"), ("f2d2_joint", "K8", "F2D2, K = 8"),
            ("tarflow", "logp", "TarFlow (exact, one pass)"))


def gather(runs_root: Path, mixtures_root: Path) -> list[dict[str, Any]]:
    """One row per (mixture, estimate) found: the mixture's description, the gap, its s.e., the mean |error|."""
    rows = []
    for run_dir in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        info = json.loads((mixtures_root / f"heldout-{run_dir.name}" / "mixture.json").read_text())
        for run, column, label in RUN_ROWS:
            path = run_dir / run / "heldout-score.json"
            if not path.is_file():
                continue
            scored = json.loads(path.read_text())
            row = {"mixture": run_dir.name, "dim": info["dim"], "components": info["components"],
                   "covariance": info.get("covariance", "isotropic"), "exact_nll": scored["exact_nll"],
                   "estimate": label, "points": scored["n"], **scored["rows"][column]}
            if run == "f2d2_joint":
                row["grid"] = json.loads((run_dir / run / "f2d2-eval.json").read_text())["grid"]
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per mixture (by d): the gap ± s.e. of each estimate (nats per sample), the grid F2D2 used."""
    labels = [label for _, _, label in RUN_ROWS]
    lines = ["| mixture | d | components | exact NLL | " + " | ".join(labels) + " | F2D2 grid |",
             "|" + "---|" * (len(labels) + 5)]
    for name in sorted({r["mixture"] for r in rows}, key=lambda n: (next(r["dim"] for r in rows if r["mixture"] == n), n)):
        mine = {r["estimate"]: r for r in rows if r["mixture"] == name}
        first = next(iter(mine.values()))
        cells = [f"{mine[l]['gap']:+.3f} ± {mine[l]['gap_se']:.3f}" if l in mine else "not run" for l in labels]
        grid = next((r["grid"] for r in mine.values() if "grid" in r), "")
        lines.append(f"| {name} | {first['dim']} | {first['components']} ({first['covariance']}) | "
                     f"{first['exact_nll']:.3f} | " + " | ".join(cells) + f" | {grid} |")
    return "\n".join(lines)


def across_seeds(runs_roots: list[Path], mixtures_root: Path) -> list[dict[str, Any]]:
    """The same chains run with other seeds (one `heldout_density.sh ... seed=N` folder of runs per seed): for each
    (mixture, estimate) found under every root, the gap of each seed, their mean, the seeds' standard deviation and
    the standard error of the mean over seeds (sd / sqrt(seeds)); the test points are the same for every seed."""
    per_seed = [{(r["mixture"], r["estimate"]): r for r in gather(root, mixtures_root)} for root in runs_roots]
    rows = []
    for key, first in per_seed[0].items():
        if not all(key in seed for seed in per_seed):
            continue
        gaps = np.array([seed[key]["gap"] for seed in per_seed])
        sd = float(gaps.std(ddof=1)) if len(gaps) > 1 else float("nan")
        rows.append({"mixture": first["mixture"], "dim": first["dim"], "components": first["components"],
                     "estimate": first["estimate"], "exact_nll": first["exact_nll"], "gaps": gaps.tolist(),
                     "gap_se_each": [seed[key]["gap_se"] for seed in per_seed], "mean": float(gaps.mean()),
                     "seed_sd": sd, "mean_se": sd / len(gaps) ** 0.5})
    return rows


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """One line per (mixture, estimate): each seed's gap, the mean over seeds ± its s.e., the seeds' s.d."""
    n = len(rows[0]["gaps"]) if rows else 0
    lines = ["| mixture | d | components | estimate | " + " | ".join(f"seed {i}" for i in range(n))
             + " | mean ± s.e. over seeds | s.d. over seeds |", "|" + "---|" * (n + 6)]
    for r in sorted(rows, key=lambda r: (r["dim"], r["mixture"])):
        lines.append(f"| {r['mixture']} | {r['dim']} | {r['components']} | {r['estimate']} | "
                     + " | ".join(f"{g:+.3f}" for g in r["gaps"])
                     + f" | {r['mean']:+.3f} ± {r['mean_se']:.3f} | {r['seed_sd']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write a mixture's train/test files and exact test log p")
    mk.add_argument("--dim", type=int, required=True)
    mk.add_argument("--seed", type=int, required=True)
    mk.add_argument("--components", type=int, default=0, help="0: drawn from 3..8")
    mk.add_argument("--spread", type=float, default=3.0, help="typical norm of a component mean (the means' "
                    "per-coordinate std is spread / sqrt(d))")
    mk.add_argument("--covariance", choices=("isotropic", "full"), default="isotropic")
    mk.add_argument("--n-train", type=int, default=N_TRAIN, help="training rows")
    mk.add_argument("--out", type=Path, required=True)
    sc = sub.add_parser("score", help="score a run's per-point table against the exact density")
    sc.add_argument("mixture", type=Path)
    sc.add_argument("run", type=Path)
    sc.add_argument("--csv", default="")
    tb = sub.add_parser("table", help="gather the scores of heldout_density.sh runs into one JSON and a table")
    tb.add_argument("runs", type=Path, help="folder of <name>/ run folders")
    tb.add_argument("--mixtures", type=Path, required=True, help="folder of heldout-<name>/ mixture folders")
    tb.add_argument("--out", type=Path, required=True)
    sd = sub.add_parser("seeds", help="the same chains run with several seeds: each seed's gap, mean and spread")
    sd.add_argument("runs", type=Path, nargs="+", help="one folder of <name>/ run folders per seed")
    sd.add_argument("--mixtures", type=Path, required=True, help="folder of heldout-<name>/ mixture folders")
    sd.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "seeds":
        rows = across_seeds(args.runs, args.mixtures)
        args.out.write_text(json.dumps({"runs": [r.name for r in args.runs], "rows": rows}, indent=1) + "\n")
        print(seeds_table(rows))
        return 0
    if args.command == "table":
        rows = gather(args.runs, args.mixtures)
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        print(markdown_table(rows))
        return 0
    if args.command == "make":
        info = make(args.dim, args.seed, args.out, args.components, args.spread, args.covariance, args.n_train)
        print(f"{args.out}: d {info['dim']}, {info['components']} components, exact test NLL "
              f"{info['exact_test_nll']:.4f} nats")
        return 0
    result = score(args.mixture, args.run, args.csv)
    print(f"{result['run']} ({result['table']}, {result['n']} of {result['n_test']} test points): exact NLL "
          f"{result['exact_nll']:.4f}")
    for name, r in result["rows"].items():
        print(f"  {name:>10}: gap {r['gap']:+.4f} ± {r['gap_se']:.4f}, mean |error| {r['mean_abs_error']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
