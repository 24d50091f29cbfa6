"""Packed runs: a trained run reduced to what loading it needs, with a model card, for shipping or export.

    <folder>/
        config.yaml        the run's resolved config (named after the folder; out_dir reset to its default)
        model.safetensors  its evaluation weights (best on validation, else EMA, else raw)
        README.md          model card: YAML front matter (Hugging Face convention) + a short text
        manifest.json      {"step", "files": {name: {"sha256", "bytes"}}}, written last, verified on load

`flowdistill.api.load_run` reads a packed folder like any run directory (`shared.run_build.evaluation_weights`);
the project's shipped teachers are packed runs named in `flowdistill.components.PRETRAINED` and referred to
as `pretrained:<name>` wherever a run directory is accepted.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from shared.checkpoint import MANIFEST, CheckpointError, file_manifest, folder_written_atomically, verify_checkpoint
from shared.config import RunConfig, read_yaml_mapping
from shared.rundir import CONFIG, PACKED_WEIGHTS

CARD = "README.md"


def card_text(meta: dict[str, Any], body: str) -> str:
    """A model card: `meta` as YAML front matter between `---` lines, then the Markdown body."""
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n{body.strip()}\n"


def read_card(folder: str | Path) -> dict[str, Any]:
    """The YAML front matter of a packed folder's model card (a mapping; empty when it has none)."""
    path = Path(folder) / CARD
    text = path.read_text(encoding="utf-8-sig")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    if end < 0:
        raise CheckpointError(f"{path}: the front matter opened by '---' is never closed")
    meta = yaml.safe_load(text[4:end])
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the front matter is not a mapping")
    return meta


def pack_run(run_dir: str | Path, weights: str | Path, step: int, out: str | Path, meta: dict[str, Any],
             body: str) -> Path:
    """Write the packed folder `out` of a run: its config, the weights file `weights` (of training step `step`),
    the card and the manifest. Built in a temporary sibling folder and renamed into place, so `out` is either
    absent or complete; an existing `out` is replaced only after the new folder is complete."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = read_yaml_mapping(run_dir / CONFIG, "run config", str(run_dir / CONFIG))
    cfg["name"], cfg["out_dir"] = out.name, RunConfig.out_dir  # no trace of where it was trained
    with folder_written_atomically(out, "pack") as tmp:
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
        shutil.copyfile(weights, tmp / PACKED_WEIGHTS)
        (tmp / CARD).write_text(card_text(meta, body), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps({"step": int(step), "files": file_manifest(tmp)}, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    verify_checkpoint(out)
    return out


def describe(name: str, folder: str | Path) -> dict[str, Any]:
    """One listing row of a packed run: its name, reference, card figures and whether its files verify."""
    if not Path(folder, MANIFEST).is_file():
        return {"name": name, "ref": f"pretrained:{name}", "status": f"missing: no {MANIFEST} in {folder} (reinstall)"}
    meta = read_card(folder)
    try:
        verify_checkpoint(folder)
        status = "ok"
    except CheckpointError as err:
        status = f"damaged: {err}"
    return {"name": name, "ref": f"pretrained:{name}", "status": status, **meta}
