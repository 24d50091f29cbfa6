"""`flowdistill export`: a run's evaluation weights as a folder other tools load, with a model card.

`--format diffusers` (flow-matching students on the `unet` or `dit` backbone) writes

    OUT/unet/ or OUT/transformer/   UNet2DModel / DiTTransformer2DModel (config.json + safetensors)
    OUT/scheduler/                  FlowMatchEulerDiscreteScheduler config (shift 1, 1000 train timesteps)
    OUT/flowdistill_config.yaml     the run's config;  OUT/README.md  the model card (YAML front matter)

Time convention, ours and diffusers' alike: sigma = t, t = 1 noise, t = 0 data, the model's output is the
velocity v = noise - data, a step is x + (sigma_next - sigma) v, and the network sees timestep = 1000 t
(our backbones scale t by 1000 inside). Our Euler sampler with K steps walks sigma = 1, 1 - 1/K, ..., 0:
`scheduler.set_timesteps(sigmas=[1 - k/K for k < K])` reproduces it (the default `set_timesteps(K)`
ends at sigma = 1/1000 instead). A DiT student shares one time embedding across blocks; diffusers gives
each block its own, so each gets a copy, and its label embedding (DiT's, required by diffusers) is zero:
call the transformer with `class_labels = zeros(B)`.

`--format safetensors` (every run, and the only one for flows, flow maps and MLPs, which have no
diffusers class) writes a packed run (`flowdistill.packed`: config.yaml, model.safetensors, the card and a
sha256 manifest), which every flowdistill command reads like the run it came from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowdistill.api import Run, load_run
from flowdistill.packed import CARD, card_text, pack_run
from shared.checkpoint import atomic_write_text, check_writable, folder_written_atomically
from shared.config import dump_yaml
from shared.run_build import evaluation_weights

FORMATS = ("diffusers", "safetensors")
CARD_NFE = (1, 2, 4, 8)  # the NFE whose sample quality the card quotes (from the run's eval.json)
DIFFUSERS_MODELS = {"unet": ("unet", "UNet2DModel"), "dit": ("transformer", "DiTTransformer2DModel")}


def check_diffusers_exportable(run: Run) -> str:
    """The backbone name (`unet` or `dit`) of a run diffusers can load; ValueError naming why not otherwise."""
    model, method = run.config.model.name, run.config.method.name
    if method != "fm":
        kind = {"f2d2": "a flow map (u, D)", "nll": "a normalizing flow", "nf_kd": "a normalizing flow"}
        raise ValueError(f"{kind.get(method, f'a {method} run')} has no diffusers model class; "
                         "export it with --format safetensors (weights, config and card)")
    if model not in DIFFUSERS_MODELS:
        raise ValueError(f"a velocity field with model.name={model} has no diffusers model class (diffusers loads "
                         "unet and dit students); export it with --format safetensors")
    cfg = run.config.model
    if getattr(cfg, "time_reversed", False) or getattr(cfg, "timestep_scale", 1000.0) != 1000.0:
        raise ValueError("this unet sees time in another convention (model.time_reversed or model.timestep_scale, "
                         "an imported field): the FlowMatchEuler scheduler would misread it; export it with "
                         "--format safetensors")
    return model


def dit_for_diffusers(model: nn.Module) -> nn.Module:
    """A plain DiTTransformer2DModel equal to our TimeDiT: every block's time embedder is a copy of the shared
    one, and its label embedding (one class) is zero, so that block conditioning = MLP_t(emb(1000 t))."""
    from diffusers import DiTTransformer2DModel

    plain = DiTTransformer2DModel.from_config(model.dit.config)
    state = dict(model.dit.state_dict())
    for i, block in enumerate(plain.transformer_blocks):
        prefix = f"transformer_blocks.{i}.norm1.emb."
        for name, value in model.t_embed.state_dict().items():
            state[prefix + "timestep_embedder." + name] = value
        table = block.norm1.emb.class_embedder.embedding_table.weight
        state[prefix + "class_embedder.embedding_table.weight"] = torch.zeros_like(table)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def quality_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of the run's eval.json at CARD_NFE (metric, feature space, value), if it was evaluated."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("rows", [])
    return [{"nfe": r["nfe"], "metric": r["metric"], "features": r.get("extractor") or "data", "value": r["value"]}
            for r in rows if r.get("nfe") in CARD_NFE]


def card_metadata(run: Run, weights_file: Path, fmt: str) -> dict[str, Any]:
    """The model card's YAML front matter: what was distilled from what, on which data, and how good it is."""
    cfg = run.config
    coupling = getattr(cfg.method, "coupling", None)
    teacher = getattr(coupling, "teacher", "") or getattr(cfg.method, "nf_teacher", "") or ""
    meta: dict[str, Any] = {
        "library_name": "diffusers" if fmt == "diffusers" else "flowdistill",
        "tags": ["flowdistill", "flow-matching" if cfg.method.name == "fm" else cfg.method.name],
        "recipe": {"model": cfg.model.name, "method": cfg.method.name,
                   "coupling": getattr(coupling, "name", None), "teacher": teacher or None},
        "run": {"name": cfg.name, "step": run.step, "weights": weights_file.name},
        "data": {"name": run.dataset.name, "fingerprint": run.dataset.base_fingerprint,
                 "shape": list(run.dataset.shape), "levels": run.dataset.levels},
        "time_convention": "sigma = t; t=1 noise, t=0 data; output v = noise - data; timestep = 1000 t",
    }
    teacher_source = Path(teacher) / "imported.json" if teacher else None
    if teacher_source is not None and teacher_source.is_file():
        meta["recipe"]["teacher_source"] = json.loads(teacher_source.read_text())
    rows = quality_rows(run.dir)
    meta["quality"] = rows or "not measured: run `flowdistill eval RUN --steps 1,2,4,8` before exporting"
    return meta


def card_body(meta: dict[str, Any], fmt: str, folder: str | None, class_name: str | None, where: str) -> str:
    """The model card's text under its front matter: how to sample the exported model found at `where`."""
    if fmt == "diffusers":
        labels = ", class_labels=torch.zeros(len(x), dtype=torch.long)" if folder == "transformer" else ""
        usage = f"""```python
import torch
from diffusers import {class_name}, FlowMatchEulerDiscreteScheduler

model = {class_name}.from_pretrained("{where}", subfolder="{folder}").eval()
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{where}", subfolder="scheduler")
K = 4  # steps; these sigmas are flowdistill's Euler grid 1, 1 - 1/K, ..., 0
scheduler.set_timesteps(sigmas=[1 - k / K for k in range(K)])
x = torch.randn(16, *{tuple(meta["data"]["shape"])})
with torch.no_grad():
    for t in scheduler.timesteps:
        v = model(x, t.expand(len(x)){labels}).sample
        x = scheduler.step(v, t, x).prev_sample
```
Samples are in the model's scale [-1, 1]."""
    else:
        usage = (f"A packed flowdistill run (`config.yaml`, `model.safetensors`, `manifest.json` with the sha256 of "
                 f"every file): every flowdistill command that reads a run reads this folder, e.g. "
                 f"`flowdistill sample {where}` or `flowdistill nll {where}`.")
    return f"# {meta['run']['name']}\n\nExported by `flowdistill export`.\n\n{usage}"


def export_run(run_dir: str | Path, fmt: str, out: str | Path, weights: str = "auto", overwrite: bool = False) -> Path:
    """Write a run's evaluation weights to `out` in `fmt` (see the module docstring); returns `out`.

    Everything is checked (format, model kind, destination) before a file is written, and the folder is
    written beside `out` and renamed into place.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choices: {', '.join(FORMATS)}")
    out, run_dir = Path(out), Path(run_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    run = load_run(run_dir, weights=weights)
    backbone = check_diffusers_exportable(run) if fmt == "diffusers" else None
    check_writable(out.parent, f"export folder {out}")
    weights_file, _ = evaluation_weights(run_dir, weights)
    folder, class_name = DIFFUSERS_MODELS[backbone] if backbone else (None, None)
    meta = card_metadata(run, weights_file, fmt)
    body = card_body(meta, fmt, folder, class_name, str(out))
    if backbone is None:
        return pack_run(run.dir, weights_file, run.step, out, meta, body)
    with folder_written_atomically(out, "export") as tmp:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if backbone == "unet":
            run.model.unet.save_pretrained(tmp / folder, safe_serialization=True)
        else:
            dit_for_diffusers(run.model).save_pretrained(tmp / folder, safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(tmp / "scheduler")
        atomic_write_text(tmp / "flowdistill_config.yaml", dump_yaml(run.config))
        atomic_write_text(tmp / CARD, card_text(meta, body))
    return out
