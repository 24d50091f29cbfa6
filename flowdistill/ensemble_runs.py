"""Gather velocity-field runs trained apart (one seed each) into one ensemble run (`flowdistill ensemble`).

The ensemble run (`model.name: ensemble`, `shared.ensemble`) averages its members' fields; every command reads
it like any velocity-field run: `nll` scores its ODE likelihood, `sample` draws from it, and an F2D2 map distils
it (`method.teacher=<ensemble run>`, `train.init_from=<one member>`). Its checkpoint holds each member's
evaluation weights under `members.<m>.`; `imported.json` names the member runs and the sha256 of the weights
taken from each. Everything is checked before anything is written: at least two distinct runs, each a
flow-matching velocity field, of one architecture, trained on the same data, with different weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flowdistill.api import load_run
from flowdistill.components import CATALOG, VELOCITY_FIELDS
from flowdistill.importers import build_with_weights, check_new_folder, write_run
from shared.config import build_run_config, to_dict
from shared.run import Run
from shared.rundir import STANDARDIZATION, standardization_path


def gather_ensemble(runs: Sequence[str | Path], out: str | Path, weights: str = "auto",
                    overwrite: bool = False) -> Path:
    """Write the ensemble of the velocity-field runs `runs` to the new run directory `out`; returns it.

    `weights` picks each member's weights (auto: best on validation, else EMA, else raw). The ensemble's
    config is the first member's with `model` replaced by {name: ensemble, size: M, member: <their model>}.
    """
    out = Path(out)
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least 2 velocity-field runs, got {len(runs)}")
    resolved = [Path(r).resolve() for r in runs]
    repeated = sorted({str(r) for r, p in zip(runs, resolved) if resolved.count(p) > 1})
    if repeated:
        raise ValueError(f"run {repeated[0]} is given more than once; give each member once")
    if out.resolve() in resolved:
        raise ValueError(f"--out {out} is one of the member runs; write the ensemble to a new folder")
    check_new_folder(out, overwrite)
    members = [load_run(r, weights=weights) for r in runs]
    check_members(members, [str(r) for r in runs])
    first = members[0]
    raw = to_dict(first.config)
    raw.update(name=out.name, out_dir=str(out.parent),
               model={"name": "ensemble", "size": len(members), "member": to_dict(first.config.model)})
    cfg = build_run_config(raw, CATALOG.config_choices())
    state = {f"members.{m}.{key}": value for m, run in enumerate(members) for key, value in run.model.state_dict().items()}
    model = build_with_weights(cfg, first.dataset, state)
    provenance = {"format": "ensemble", "weights": weights,
                  "members": [{"run": str(r), "step": run.step, "sha256": run.weights_sha256}
                              for r, run in zip(runs, members)]}
    extra = {}
    if standardization_path(first.dir).is_file():
        extra[STANDARDIZATION] = standardization_path(first.dir).read_text()
    return write_run(cfg, model, provenance, overwrite, extra)


def check_members(members: Sequence[Run], names: Sequence[str]) -> None:
    """Refuse members that are not flow-matching velocity fields, differ in architecture or data, or share weights."""
    for run, name in zip(members, names):
        if run.config.method.name != "fm" or run.config.model.name not in VELOCITY_FIELDS:
            raise ValueError(f"run {name} has model.name={run.config.model.name} and method.name={run.config.method.name}; an "
                             f"ensemble averages velocity fields ({', '.join(VELOCITY_FIELDS)}) trained by fm")
    first, first_name = members[0], names[0]
    for run, name in zip(members[1:], names[1:]):
        ours, theirs = to_dict(first.config.model), to_dict(run.config.model)
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differing:
            shown = ", ".join(f"model.{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in differing)
            raise ValueError(f"runs {first_name} and {name} have different models ({shown}); an ensemble averages "
                             "members of one architecture, trained with different seeds")
        if run.dataset.base_fingerprint != first.dataset.base_fingerprint:
            raise ValueError(f"runs {first_name} and {name} were trained on different data; members must share "
                             "the data (data.* settings) and differ only in seed")
        own, other = standardization_path(first.dir), standardization_path(run.dir)
        if own.is_file() != other.is_file() or (own.is_file() and own.read_text() != other.read_text()):
            raise ValueError(f"runs {first_name} and {name} standardise the data differently ({STANDARDIZATION}); "
                             "members must be trained on the same files")
    seen: dict[str, str] = {}
    for run, name in zip(members, names):
        if run.weights_sha256 in seen:
            raise ValueError(f"runs {seen[run.weights_sha256]} and {name} have identical weights (trained with the "
                             "same seed?); train each member with its own seed=N")
        seen[run.weights_sha256] = name
