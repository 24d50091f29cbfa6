"""Models trained elsewhere become run directories that every command reads unchanged.

`import_ml_tarflow` turns an apple/ml-tarflow checkpoint into a teacher run (`model.name: tarflow`,
`method.name: nll`): `config.yaml`, a verified safetensors checkpoint (`shared.checkpoint`) and
`imported.json`, which records where the weights came from. `import_diffusers_fm` turns a diffusers
`UNet2DModel` velocity field trained elsewhere into a flow-matching run (`model.name: unet`, `method.name:
fm`) whose time convention (`model.time_reversed`, `model.timestep_scale`) maps the network's to ours, and a
`DiTTransformer2DModel` into a `model.name: dit` run (`flowdistill.import_dit`). `write_run` also writes
`flowdistill.save_teacher`'s runs of a user's own flow.
The run directory is written in a hidden sibling folder and renamed into place, so a failed import
leaves nothing behind; everything that can be refused (file, checkpoint shape, data) is checked before
anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from flowdistill.components import CATALOG
from flowdistill.diffusers_settings import check_same_settings, model_cfg_side
from flowdistill.import_dit import dit_config_of, dit_weights
from nfm.ml_tarflow import MLTarFlowShape, convert_state_dict, read_checkpoint, tarflow_config
from shared.checkpoint import atomic_write_text, check_writable, folder_written_atomically, save_checkpoint, sha256_file
from shared.config import ConfigError, RunConfig, apply_overrides, build_run_config, dump_yaml, to_dict
from shared.data import Dataset
from shared.data_sources import load_dataset
from shared.rundir import checkpoints_dir, config_path

IMPORTED = "imported.json"  # the provenance of an imported run's weights


def teacher_config(out: str | Path, model: Any, method: Any, overrides: Sequence[str],
                   data: dict[str, Any] | None = None) -> RunConfig:
    """The run config of a teacher written to `out`: `model`, `method`, the data (`data`, a `DataConfig` mapping,
    or `data.*` overrides) and `train.steps: 1`, the step its checkpoint is written at (a finished run)."""
    out = Path(out)
    if data is None and not any(o.split("=", 1)[0] == "data.name" for o in overrides):
        raise ConfigError("name the data the model was trained on, e.g. data.name=digits (data.* overrides): "
                          "sampling, nll and NFM pairs read it from the run")
    if out.name in ("", ".", ".."):
        raise ConfigError(f"the run directory to write must be a new folder name, got {str(out)!r}")
    raw = {"name": out.name, "out_dir": str(out.parent), "model": to_dict(model), "method": to_dict(method),
           "data": dict(data or {}), "train": {"steps": 1}}
    return build_run_config(apply_overrides(raw, list(overrides)), CATALOG.config_choices())


def check_data(dataset: Dataset, shape: tuple[int, ...], num_classes: int, what: str) -> None:
    """Refuse data whose per-sample shape is not `shape`, or whose labels a conditional model has no class for."""
    if tuple(dataset.shape) != tuple(shape):
        raise ValueError(f"{what} models samples of shape {tuple(shape)}, but data {dataset.name!r} has samples of "
                         f"shape {tuple(dataset.shape)}: choose data.* settings of that shape")
    if num_classes:
        if dataset.train_labels is None:
            raise ValueError(f"{what} is class-conditional ({num_classes} classes) but data {dataset.name!r} has "
                             "no labels")
        top = int(dataset.train_labels.max())
        if top >= num_classes:
            raise ValueError(f"{what} has {num_classes} classes but the labels of data {dataset.name!r} reach {top}")


def write_run(cfg: RunConfig, model: nn.Module, provenance: dict[str, Any], overwrite: bool = False,
              extra: dict[str, str] | None = None) -> Path:
    """Write `<out_dir>/<name>/` (config.yaml, a checkpoint of `model` at step `train.steps`, so the run counts as
    finished, imported.json and the text files `extra`, name -> content) all at once."""
    run_dir = Path(cfg.out_dir) / cfg.name
    check_new_folder(run_dir, overwrite)
    check_writable(run_dir.parent, f"run directory {run_dir}")
    with folder_written_atomically(run_dir, "import") as tmp:
        atomic_write_text(config_path(tmp), dump_yaml(cfg))
        save_checkpoint(checkpoints_dir(tmp), cfg.train.steps, model)
        atomic_write_text(tmp / IMPORTED, json.dumps(provenance, indent=1) + "\n")
        for name, text in (extra or {}).items():
            atomic_write_text(tmp / name, text)
    return run_dir


def check_new_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse a run directory that exists and is not empty, unless `overwrite`."""
    if run_dir.exists() and not overwrite and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FileExistsError(f"{run_dir} already exists; pass --overwrite (overwrite=True) to replace it")


def import_ml_tarflow(checkpoint: str | Path, shape: MLTarFlowShape, noise_std: float, out: str | Path,
                      overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write an ml-tarflow checkpoint as a TarFlow teacher run at `out`; returns the run directory.

    `shape` holds the numbers of ml-tarflow's file name (e.g. afhq_model_8_768_8_8_0.07.pth: patch 8,
    width 768, 8 blocks of 8 layers, noise_std 0.07); `overrides` are `data.*` (and other) key=value
    settings of the run, `data.name` required. Data and checkpoint are checked before anything is written.
    """
    if noise_std < 0:
        raise ValueError(f"--noise-std must be >= 0, got {noise_std}")
    state = read_checkpoint(checkpoint)
    # refuses a foreign or misshapen checkpoint, naming the keys
    weights = convert_state_dict(state, shape, f"checkpoint {str(checkpoint)!r}")
    cfg = teacher_config(out, tarflow_config(shape, noise_std), CATALOG.methods["nll"].config(), overrides)
    dataset = load_dataset(cfg.data)
    image = (shape.in_channels, shape.img_size, shape.img_size)
    check_data(dataset, image, shape.num_classes, f"ml-tarflow checkpoint {str(checkpoint)!r}")
    model = build_with_weights(cfg, dataset, weights)
    provenance = {"format": "ml-tarflow", "file": str(Path(checkpoint).resolve()),
                  "sha256": sha256_file(Path(checkpoint)), "shape": to_dict(shape), "noise_std": noise_std}
    return write_run(cfg, model, provenance, overwrite)


def build_with_weights(cfg: RunConfig, dataset: Dataset, weights: dict[str, Tensor]) -> nn.Module:
    """The model `cfg` names for `dataset`, with `weights` loaded strictly, its sampler checked against the data."""
    CATALOG.methods[cfg.method.name].sampler(cfg.method, cfg, dataset)  # refuses settings the method cannot use
    model = CATALOG.models[cfg.model.name].build(cfg.model, dataset.shape)
    model.load_state_dict(weights, strict=True)
    return model


TIME_CONVENTIONS = ("noise-at-1", "noise-at-0")  # ours and diffusers' FlowMatchEuler / torchcfm's
UNET_FIXED = {"sample_size", "in_channels", "out_channels"}  # set from the data shape
DIFFUSERS_FIELDS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}  # class -> pipeline subfolder


def read_diffusers(folder: str | Path) -> Any:
    """The diffusers velocity field in `folder` (or its `unet/` / `transformer/` subfolder), in eval mode: a
    UNet2DModel or a DiTTransformer2DModel, read from config.json's `_class_name`."""
    import diffusers

    folder = Path(folder)
    roots = [folder / sub for sub in DIFFUSERS_FIELDS.values()] + [folder]
    root = next((r for r in roots if (r / "config.json").is_file()), None)
    if root is None:
        raise FileNotFoundError(f"{str(folder)!r} holds no diffusers model (no config.json there or in "
                                f"{' or '.join(f'{sub}/' for sub in DIFFUSERS_FIELDS.values())})")
    name = json.loads((root / "config.json").read_text()).get("_class_name")
    if name not in DIFFUSERS_FIELDS:
        raise ValueError(f"{str(root)!r} holds a {name}; diffusers-fm imports velocity fields of the classes "
                         f"{', '.join(DIFFUSERS_FIELDS)}")
    return getattr(diffusers, name).from_pretrained(root).eval()


def unet_config_of(net: Any, time: str, timestep_scale: float) -> Any:
    """Our `UNetConfig` that builds `net`'s architecture; ValueError naming the diffusers settings it cannot."""
    from shared.backbones import TimeUNet, UNetConfig

    if time not in TIME_CONVENTIONS:
        raise ValueError(f"--time must be one of {', '.join(TIME_CONVENTIONS)}, got {time!r}")
    theirs = dict(net.config)
    kinds = list(theirs["down_block_types"])
    cfg = UNetConfig(channels=tuple(theirs["block_out_channels"]), layers_per_block=theirs["layers_per_block"],
                     attention=tuple(k == "AttnDownBlock2D" for k in kinds),
                     attention_head_dim=theirs["attention_head_dim"] or 8, norm_groups=theirs["norm_num_groups"],
                     dropout=theirs.get("dropout", 0.0), time_reversed=time == "noise-at-0",
                     timestep_scale=float(timestep_scale))
    side = model_cfg_side(net)
    ours = dict(TimeUNet(cfg, (theirs["in_channels"], side, side)).unet.config)
    check_same_settings(theirs, ours, UNET_FIXED, "UNet2DModel", "unet")
    return cfg


def import_diffusers_fm(folder: str | Path, time: str, timestep_scale: float, out: str | Path,
                        overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write a diffusers velocity field (UNet2DModel or DiTTransformer2DModel) as a flow-matching run at `out`;
    returns the run directory.

    `time`: noise-at-1 (ours and diffusers' FlowMatchEuler: the network's v points from data to noise) or
    noise-at-0 (torchcfm: time s = 1 - t, the network's u = -v). `timestep_scale`: the network was fed
    timestep = scale * (its time), 1000 (diffusers) or 1 (torchcfm). A DiT is read in ours only (noise-at-1, 1000).
    """
    if timestep_scale <= 0:
        raise ValueError(f"--timestep-scale must be > 0, got {timestep_scale}")
    net = read_diffusers(folder)
    cls = type(net).__name__
    if cls == "UNet2DModel":
        model_cfg = unet_config_of(net, time, timestep_scale)
        weights = {f"unet.{k}": v for k, v in net.state_dict().items()}
    else:
        model_cfg = dit_config_of(net, time, timestep_scale)
        weights = dit_weights(net)
    cfg = teacher_config(out, model_cfg, CATALOG.methods["fm"].config(), overrides)
    dataset = load_dataset(cfg.data)
    side = model_cfg_side(net)
    check_data(dataset, (net.config.in_channels, side, side), 0, f"{cls} {str(folder)!r}")
    model = build_with_weights(cfg, dataset, weights)
    provenance = {"format": "diffusers-fm", "class": cls, "folder": str(Path(folder).resolve()), "time": time,
                  "timestep_scale": timestep_scale}
    return write_run(cfg, model, provenance, overwrite)
