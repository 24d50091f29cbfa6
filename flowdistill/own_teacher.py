"""`save_teacher`: a user's own flow (an `nn.Module` implementing `FlowTeacher`) as a teacher run.

The run is `model.name: user_flow` (`nfm.user_flow`): its config names the module's class by import path
with the constructor's keyword arguments, and its weights are a safetensors checkpoint, so loading it
runs no code from the files, only the named class. Everything is checked before anything is written:
the class can be imported again, the module implements the interface, the data has the module's sample
shape, and the class rebuilt from path and arguments, given the saved weights, encodes a batch of the
data as the module does. The folder is written by the importers' writer (`flowdistill.importers`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from flowdistill.components import CATALOG
from flowdistill.importers import build_with_weights, check_data, check_new_folder, teacher_config, write_run
from nfm.user_flow import UserFlowConfig, check_flow, class_path
from shared.config import DataConfig, to_dict
from shared.data_sources import load_dataset

CHECK_BATCH = 16  # data points the rebuilt flow must encode as the given one does
CHECK_TOL = 1e-5  # largest |difference| of z and of log|det| (nats), relative to 1 + |value|


def save_teacher(module: nn.Module, data: str | DataConfig | Mapping[str, Any], out: str | Path,
                 init_kwargs: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                 overwrite: bool = False) -> Path:
    """Write `module` as a teacher run at `out` (a new or empty folder) that `load_run`, `nll`, `sample` and NFM
    couplings (`method.coupling.teacher=out`) read; returns the run directory.

    `data`: the data the flow models, a data set name ("digits", "8gaussians"), a `DataConfig` or its mapping;
    its samples must have shape `module.data_shape`. `init_kwargs`: the keyword arguments that construct the
    module's class again (JSON/YAML values); by default `module.init_kwargs`, else `module.config()`, else {}.
    `overrides`: further key=value settings of the run (e.g. `method.denoise=false`).
    """
    check_new_folder(Path(out), overwrite)
    where = f"flow {type(module).__module__}:{type(module).__qualname__}"
    check_flow(module, where)
    path = class_path(type(module))
    kwargs = plain_kwargs(module if init_kwargs is None else init_kwargs, path)
    model_cfg = UserFlowConfig(flow=path, init_kwargs=kwargs)
    cfg = teacher_config(out, model_cfg, CATALOG.methods["nll"].config(), overrides, data_mapping(data))
    dataset = load_dataset(cfg.data)
    check_data(dataset, tuple(module.data_shape), int(module.num_classes), where)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    try:
        rebuilt = build_with_weights(cfg, dataset, state).eval()
    except RuntimeError as err:  # load_state_dict: other parameter names or shapes
        raise ValueError(f"{path} rebuilt with init_kwargs={kwargs} does not take the flow's weights: pass the "
                         f"init_kwargs that construct this flow ({' '.join(str(err).split())})") from None
    check_same_flow(module, rebuilt, dataset.train[:CHECK_BATCH], path, kwargs)
    provenance = {"format": "python-class", "class": path, "init_kwargs": kwargs}
    return write_run(cfg, rebuilt, provenance, overwrite)


def data_mapping(data: str | DataConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The `data:` section of a run from a data set name, a `DataConfig` or a mapping of its fields."""
    if isinstance(data, str):
        return {"name": data}
    if isinstance(data, DataConfig):
        return to_dict(data)
    if isinstance(data, Mapping):
        return dict(data)
    raise TypeError(f"data must be a data set name, a DataConfig or a mapping, got {type(data).__name__}")


def plain_kwargs(source: nn.Module | Mapping[str, Any], path: str) -> dict[str, Any]:
    """Constructor keyword arguments as JSON values (tuples become lists): from a mapping, or a module's
    `init_kwargs` attribute or `config()` method; ValueError for values a YAML config cannot hold."""
    if isinstance(source, nn.Module):
        if hasattr(source, "init_kwargs"):
            source = source.init_kwargs
        elif callable(getattr(source, "config", None)):
            source = source.config()
        else:
            source = {}
    if not isinstance(source, Mapping):
        raise ValueError(f"the constructor arguments of {path} must be a mapping of keyword arguments, "
                         f"got {type(source).__name__}")
    try:
        return json.loads(json.dumps(dict(source)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the constructor arguments of {path} must be plain JSON/YAML values (numbers, strings, "
                         f"booleans, lists, mappings): {err}") from None


@torch.no_grad()
def check_same_flow(module: nn.Module, rebuilt: nn.Module, x: torch.Tensor, path: str,
                    kwargs: Mapping[str, Any]) -> None:
    """Refuse when `rebuilt` (class from `path` with `kwargs`, the module's weights) has other interface settings
    (eta, num_classes, data_shape, decode_passes) than `module`, or encodes x (B, *shape) into another
    z (B, *shape) or log|det| (B,), naming the setting or the largest difference."""
    for name in ("eta", "num_classes", "data_shape", "decode_passes"):
        if getattr(rebuilt, name) != getattr(module, name):
            raise ValueError(f"{path} rebuilt with init_kwargs={dict(kwargs)} has {name}={getattr(rebuilt, name)!r}, "
                             f"the given flow {getattr(module, name)!r}: pass the init_kwargs that construct this flow")
    device = next(iter(module.state_dict().values()), torch.empty(0)).device
    was_training = module.training
    module.eval()
    try:
        z, logdet = module.encode(x.to(device))
    finally:
        module.train(was_training)
    z2, logdet2 = rebuilt.encode(x)
    for name, ours, theirs in (("z", z.cpu(), z2), ("log|det|", logdet.cpu(), logdet2)):
        if ours.shape != theirs.shape:
            raise ValueError(f"{path} rebuilt with init_kwargs={dict(kwargs)} encodes to {name} of shape "
                             f"{tuple(theirs.shape)}, the given flow to {tuple(ours.shape)}: pass the init_kwargs "
                             "that construct this flow")
        diff = ((ours.double() - theirs.double()).abs() / (1 + ours.double().abs())).max().item()
        if not diff <= CHECK_TOL:
            raise ValueError(f"{path} rebuilt with init_kwargs={dict(kwargs)} and the flow's weights does not "
                             f"reproduce it: {name} differs by up to {diff:.3g} (relative) on the data "
                             f"(allowed {CHECK_TOL}); pass the init_kwargs that construct this flow")
