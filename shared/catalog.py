"""The shape of the application's component tables: what a model, method or nested choice provides.

`shared/` defines only these types; the tables themselves are written out in `flowdistill.components`
and passed down, so no module registers itself on import and `shared/` imports no method.

    models        name -> Choice(config, build(config, data_shape) -> nn.Module)
    methods       name -> MethodChoice(config, build(config, BuildContext) -> loss,
                                       sampler(config, run_config, dataset) -> sampler)
    nested        dotted section path -> {name -> Choice}, e.g. "method.coupling"
    named_runs    name -> run folder shipped with the application, referred to as `pretrained:<name>`

A method's sampler builder gets no run loader: sampling and scoring a run never load its teachers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


NAMED_RUN_PREFIX = "pretrained:"  # `pretrained:<name>` refers to a run shipped with the application


@dataclass(frozen=True)
class Choice:
    """One named component: its config dataclass and the function that builds it from that config."""

    config: type
    build: Callable[..., Any]


@dataclass(frozen=True)
class MethodChoice(Choice):
    """A training method: `build` makes the loss (training only), `sampler` the sampler/likelihood (always)."""

    sampler: Callable[..., Any] = None  # type: ignore[assignment]


@dataclass(frozen=True)
class BuildContext:
    """What a loss (or a nested choice such as a coupling) may use while it is built for training.

    `load_run(run_dir)` loads another run (a teacher) with the same component tables; `nested` gives
    the tables of nested choices (e.g. couplings) to the method that owns them.
    """

    run_config: Any
    dataset: Any
    run_dir: Path
    load_run: Callable[[str | Path], Any]
    nested: Mapping[str, Mapping[str, Choice]] = field(default_factory=dict)

    def build_nested(self, section: str, cfg: Any) -> Any:
        """Build the nested choice `cfg` (a config dataclass with a `name`) of table `section`."""
        table = self.nested[section]
        return table[cfg.name].build(cfg, self)


@dataclass(frozen=True)
class Catalog:
    """Every component table an application assembles: models, methods and nested choices."""

    models: Mapping[str, Choice]
    methods: Mapping[str, MethodChoice]
    nested: Mapping[str, Mapping[str, Choice]] = field(default_factory=dict)
    named_runs: Mapping[str, Path] = field(default_factory=dict)

    def resolve_run(self, ref: str | Path) -> Path:
        """The folder of a run reference: `pretrained:<name>` from `named_runs`, anything else as a path."""
        text = str(ref)
        if not text.startswith(NAMED_RUN_PREFIX):
            return Path(ref)
        name = text[len(NAMED_RUN_PREFIX):]
        if name not in self.named_runs:
            known = ", ".join(sorted(self.named_runs)) or "none"
            raise ValueError(f"{text!r} names no shipped run; pretrained runs: {known} (`flowdistill pretrained` "
                             "lists them)")
        return Path(self.named_runs[name])

    def config_choices(self) -> dict[str, dict[str, type]]:
        """Dotted section path -> {name: config dataclass}, what `shared.config` validates recipes against."""
        out = {"model": {k: v.config for k, v in self.models.items()},
               "method": {k: v.config for k, v in self.methods.items()}}
        out.update({section: {k: v.config for k, v in table.items()} for section, table in self.nested.items()})
        return out
