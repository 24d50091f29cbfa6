"""`model.name: user_flow`: a flow written by the user, rebuilt from the import path of its class.

A run's weights are tensors only (safetensors), so the code of a user's flow cannot travel with them.
The run's config names the class instead, `model.flow: "package.module:QualName"`, with the keyword
arguments of its constructor (`model.init_kwargs`, plain JSON/YAML values); the builder imports the
class, constructs it with those arguments and checks that it implements `nfm.flow_interface.FlowTeacher`.
The class must therefore live in an importable module: not `__main__`, not inside a function.
`flowdistill.save_teacher` writes such runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nfm.flow_interface import missing_members

MOVE_CLASS = "move the class into a module that can be imported (a .py file on the Python path) and import it from there"


@dataclass
class UserFlowConfig:
    """Which class a user's flow is, by import path, and the keyword arguments that construct it."""

    name: str = "user_flow"
    flow: str = ""  # import path of the flow's class, "package.module:QualName"
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments (JSON/YAML values)

    def flow_layers(self) -> None:
        """Unknown: the class is the user's (its depth is not part of the config)."""
        return None


def class_path(cls: type) -> str:
    """The import path "module:QualName" of `cls`; ValueError for a class no other process can import."""
    where = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__":
        raise ValueError(f"the flow class {cls.__qualname__} is defined in __main__ (a script or notebook), which a "
                         f"run cannot import again: {MOVE_CLASS}")
    if "<locals>" in cls.__qualname__:
        raise ValueError(f"the flow class {where} is defined inside a function, which a run cannot import again: "
                         f"{MOVE_CLASS}")
    if import_class(where) is not cls:
        raise ValueError(f"importing {where} gives another object than the flow's class: {MOVE_CLASS}")
    return where


def import_class(path: str) -> type:
    """The class at import path "package.module:QualName"; ValueError naming what could not be found."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"model.flow={path!r} is not an import path: expected 'package.module:ClassName'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.flow={path!r}: module {module_name!r} cannot be imported ({err}); "
                         "install it or put it on the Python path") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model.flow={path!r}: {module_name} has no {qualname}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"model.flow={path!r} is a {type(obj).__name__}, not a class")
    return obj


def check_flow(flow: object, where: str) -> None:
    """ValueError naming the `FlowTeacher` members `flow` lacks (see `nfm.flow_interface`)."""
    if not isinstance(flow, nn.Module):
        raise ValueError(f"{where} is a {type(flow).__name__}, not a torch.nn.Module")
    missing = missing_members(flow)
    if missing:
        raise ValueError(f"{where} does not implement the flow-teacher interface (nfm.flow_interface.FlowTeacher): "
                         f"missing {', '.join(missing)}")


def build_user_flow(cfg: UserFlowConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """Import `cfg.flow`, construct it with `cfg.init_kwargs`, and check the interface and the data shape."""
    cls = import_class(cfg.flow)
    try:
        flow = cls(**cfg.init_kwargs)
    except TypeError as err:
        raise ValueError(f"model.flow={cfg.flow!r} cannot be constructed with model.init_kwargs "
                         f"{cfg.init_kwargs!r}: {err}") from None
    check_flow(flow, f"model.flow={cfg.flow!r}")
    if tuple(flow.data_shape) != tuple(data_shape):
        raise ValueError(f"model.flow={cfg.flow!r} models samples of shape {tuple(flow.data_shape)}, but the run's "
                         f"data has samples of shape {tuple(data_shape)}")
    return flow
