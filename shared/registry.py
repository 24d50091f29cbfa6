"""Name-to-class tables for models and methods, so recipes pick components by name.

Each entry pairs a config dataclass with a builder. Modules register themselves on import;
`load_plugins` imports every package that registers entries, so a saved run can be rebuilt
whatever the caller imported first.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    """A registered component: its config dataclass and a builder taking that config."""

    config_cls: type
    build: Callable[..., Any]


MODELS: dict[str, Entry] = {}
METHODS: dict[str, Entry] = {}
COMMANDS: dict[str, Entry] = {}  # extra CLI subcommands: config_cls holds the help text
_PLUGIN_MODULES = ("shared.backbones", "nfm.losses", "nfm.teacher", "nfm.teacher_coupling", "nfm.coupling_cache",
                   "nfm.compare", "f2d2.flowmap", "f2d2.losses", "f2d2.report")


def register_model(name: str, config_cls: type) -> Callable:
    """Class/function decorator: `build(config, data_shape) -> nn.Module` under `name`."""

    def wrap(build: Callable) -> Callable:
        MODELS[name] = Entry(config_cls, build)
        return build

    return wrap


def register_method(name: str, config_cls: type) -> Callable:
    """Decorator: `build(config, run_config, dataset) -> loss object` under `name`."""

    def wrap(build: Callable) -> Callable:
        METHODS[name] = Entry(config_cls, build)
        return build

    return wrap


def register_command(name: str, help: str) -> Callable:
    """Decorator: `configure(parser)` adds arguments and `set_defaults(func=...)` for `flowdistill <name>`."""

    def wrap(configure: Callable) -> Callable:
        COMMANDS[name] = Entry(help, configure)
        return configure

    return wrap


def load_plugins() -> None:
    """Import every module that registers models or methods."""
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)


def model_configs() -> dict[str, type]:
    """Model name -> config dataclass."""
    load_plugins()
    return {k: v.config_cls for k, v in MODELS.items()}


def method_configs() -> dict[str, type]:
    """Method name -> config dataclass."""
    load_plugins()
    return {k: v.config_cls for k, v in METHODS.items()}
