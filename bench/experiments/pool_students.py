"""Students pooled over teacher runs: the figures that say whether a result holds for a recipe or for one run.

A comparison reports each student name over its seeds. When the same NFM recipe was paired by several training
runs of one teacher recipe (`mnist-nfm-long`, `mnist-nfm-long-t1`, ...), the question is how all those students
do together. For every group of student names and every NFE this prints

- `pooled`: mean and standard deviation over every seed of every member (one value per trained student);
- `over members`: mean and standard deviation of the members' own means (one value per teacher run);
- `min` / `max`: the best and worst single student, for "every NFM student below every OT student".

With several results files, `name@k` names the student `name` of the k-th file (a name two comparisons used
for different runs, for example a student retrained after its teacher was).

Values are the quality metric of the comparison (FD: lower is better) for one solver and grid.

    python -m bench.experiments.pool_students runs/mnist-compare-long-teacher-seeds/results.json \\
        --group "NFM logit-normal=mnist-nfm-long-logitnormal,mnist-nfm-long-t1-logitnormal" \\
        --group "SD-OT logit-normal=mnist-semidiscrete_ot-logitnormal" --out pooled.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import print_and_write
from shared.evaluate import mean_and_std


def parse_group(text: str) -> tuple[str, list[str]]:
    """`label=name1,name2` -> (label, [name1, name2])."""
    label, sep, names = text.partition("=")
    members = [n.strip() for n in names.split(",") if n.strip()]
    if not sep or not label.strip() or not members:
        raise ValueError(f"--group {text!r}: expected LABEL=STUDENT[,STUDENT...], e.g. 'NFM=mnist-nfm-long,"
                         "mnist-nfm-long-t1'")
    return label.strip(), members


def student_values(per_seed: dict[str, list[dict[str, Any]]], name: str, nfe: int, solver: str, grid: str
                   ) -> list[float]:
    """One value per seed of student `name` at `nfe` with `solver` on `grid`."""
    if name not in per_seed:
        raise KeyError(f"student {name!r} is not in the results; they hold {', '.join(sorted(per_seed))}")
    values = [r["value"] for seed in per_seed[name] for r in seed["rows"]
              if r["nfe"] == nfe and r["solver"] == solver and r["grid"] == grid]
    if len(values) != len(per_seed[name]):
        raise KeyError(f"student {name!r} has no {solver}/{grid} value at NFE {nfe} for every seed "
                       f"({len(values)} of {len(per_seed[name])})")
    return values


def pool(per_seed: dict[str, list[dict[str, Any]]], members: list[str], nfe: int, solver: str, grid: str
         ) -> dict[str, Any]:
    """Pooled and per-member statistics of a group of students at one NFE (see the module docstring)."""
    by_member = {m: student_values(per_seed, m, nfe, solver, grid) for m in members}
    every = [v for values in by_member.values() for v in values]
    pooled_mean, pooled_std = mean_and_std(every)
    members_mean, members_std = mean_and_std([statistics.fmean(values) for values in by_member.values()])
    return {"nfe": nfe, "students": len(every), "pooled_mean": pooled_mean, "pooled_std": pooled_std,
            "members_mean": members_mean, "members_std": members_std, "min": min(every), "max": max(every),
            "values": by_member}


def merged_per_seed(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The per-seed results of one or more comparisons, by student name. A student of the k-th file (from 1) is
    also reachable as `name@k`, for a name that two comparisons used for different runs; a bare name takes the
    first file that holds it."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for k, path in enumerate(paths, start=1):
        results = json.loads(Path(path).read_text())
        if "per_seed" not in results:
            raise ValueError(f"{path}: not the results.json of `flowdistill compare` (no 'per_seed')")
        for name, seeds in results["per_seed"].items():
            merged.setdefault(name, seeds)
            merged[f"{name}@{k}"] = seeds
    return merged


def feature_space(paths: list[str]) -> str | None:
    """The FD feature space the comparisons were scored in (their `features`); refused when they differ,
    since FDs of two feature spaces cannot be pooled. None when no file names one (older results)."""
    spaces = {json.loads(Path(path).read_text()).get("features") for path in paths} - {None}
    if len(spaces) > 1:
        raise ValueError(f"the results were scored in different feature spaces ({', '.join(sorted(spaces))}); "
                         "pool only results of one")
    return spaces.pop() if spaces else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json of one or more `flowdistill compare` runs")
    parser.add_argument("--group", action="append", required=True, help="LABEL=STUDENT[,STUDENT...] (repeatable)")
    parser.add_argument("--nfe", default="1,2,4,8", help="comma-separated NFE values")
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--grid", default="linear")
    parser.add_argument("--out", default="", help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    try:
        groups = [parse_group(g) for g in args.group]
        nfes = [int(n) for n in args.nfe.split(",") if n.strip()]
        per_seed = merged_per_seed(args.results)
        features = feature_space(args.results)
        rows = [{"group": label, **pool(per_seed, members, nfe, args.solver, args.grid)}
                for label, members in groups for nfe in nfes]
    except (ValueError, KeyError) as err:
        raise SystemExit(f"pool_students: {err.args[0] if err.args else err}") from None
    table = [{**r, "pooled": f"{r['pooled_mean']:.1f} ± {r['pooled_std']:.1f}",
              "members": f"{r['members_mean']:.1f} ± {r['members_std']:.1f}",
              "range": f"{r['min']:.1f} - {r['max']:.1f}"} for r in rows]
    columns = {"group": "group", "nfe": "NFE", "students": "students", "pooled": "pooled (every student)",
               "members": "over members' means", "range": "best - worst"}
    payload = {"results": args.results, "features": features, "solver": args.solver, "grid": args.grid,
               "groups": {label: members for label, members in groups}, "rows": rows}
    return print_and_write(table, columns, payload, args.out)


if __name__ == "__main__":
    main()
