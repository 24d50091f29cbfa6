"""Dataclass configs, YAML recipes and dotted `key=value` overrides: the project's one config system.

A recipe is a YAML mapping whose top-level keys are the fields of `RunConfig`. Some sections are
polymorphic (`model`, `method`, `method.coupling`): their `name` picks a dataclass from a table of
choices that the application passes in (`choices`, keyed by the section's dotted path), and every
other key must be a field of that dataclass. Unknown keys are rejected with the valid keys listed, so
a typo never silently falls back to a default; a dataclass may list keys that moved elsewhere in a
`MOVED_KEYS` mapping (old key -> new spelling) so that old recipes get a precise message.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false are booleans, so that `no`, `yes`, `on`
    and `off` stay strings (`train.mixed_precision: no` is the string "no", not False)."""


_BOOL = "tag:yaml.org,2002:bool"
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: Any) -> Any:
    """Parse YAML text or a file object with `RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)


@dataclass
class DataConfig:
    """Which data set to train and evaluate on (see `shared.data_sources.DATASETS`)."""

    name: str = "8gaussians"  # data set name; `flowdistill data --list` style errors list the choices
    path: str = ""  # file or folder for `cifar10` (root), `imagefolder`, `tabular`, `shards`, `imagenet_npz`
    test_path: str = ""  # tabular: a separate test file with the same columns (then all of `path` is training data)
    download: bool = False  # allow torchvision to download CIFAR-10 into `path`
    n_train: int = 20000  # samples generated for toy sets (tabular data ignores it: see max_train_rows)
    n_test: int = 5000  # held-out samples generated for toy sets (tabular data ignores it: see max_test_rows)
    max_train_rows: int = 0  # tabular: keep at most this many training rows (0: all); a cap that drops rows warns
    max_test_rows: int = 0  # tabular: keep at most this many test rows (0: all); a cap that drops rows warns
    test_fraction: float = 0.2  # share of a finite data set kept as the test split
    val_fraction: float = 0.0  # share of the training split held out for validation (model selection, never test)
    image_size: int = 0  # resize ImageFolder images to this side (0: keep, all must agree)
    seed: int = 0  # seed of the toy generator and of the train/test split
    dequantize: bool = False  # images: train on x + uniform cell noise (fresh each step), the density bits/dim scores
    shift: int = 0  # images: translate each training image by up to this many pixels (zero-level padding)
    storage: str = "memory"  # memory (float32), uint8 (on the device) or stream (mapped shards); see shared.streaming
    workers: int = 4  # data.storage=stream: DataLoader workers per training process (0: read in that process)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method (one trainer for all)."""

    steps: int = 2000  # optimizer steps
    batch_size: int = 256  # per-process batch size
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # linear warmup steps before the cosine decay
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of `lr`
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    ema_decay: float = 0.999  # EMA of weights used for evaluation, ramped as min(decay, (1 + step) / (10 + step)) (0: off)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (passed to Accelerate)
    log_every: int = 50  # steps between metric lines (the only host syncs of the loop)
    ckpt_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # how many checkpoints to keep on disk
    progress: bool = True  # tqdm bar on the main process
    sample_grid: bool = True  # write a sample grid / scatter at the end of training
    init_from: str = ""  # run directory whose evaluation weights (best, else EMA) initialise the model (staged training)
    eval_every: int = 0  # steps between validation-loss passes; the best weights go to checkpoints/best (0: off)
    trackers: tuple[str, ...] = ()  # Accelerate trackers that also receive the metrics, e.g. [tensorboard] (<run>/tracking)


@dataclass
class EvalConfig:
    """Defaults for `sample`, `eval` and `nll` on a run (each can be overridden on the CLI)."""

    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # step counts compared by `eval`
    solver: str = "euler"  # fixed-step solver: euler or heun
    grid: str = "linear"  # time grid: linear, quadratic (t^2) or geometric (t halves each step), see shared.sampling
    n_samples: int = 2000  # samples drawn per row of the `eval` table
    nll_samples: int = 500  # test points scored by `nll`
    divergence: str = "auto"  # exact, hutchinson, or auto (exact up to 64 dims)


@dataclass
class RunConfig:
    """Everything needed to re-create a run; saved as `config.yaml` in the run directory."""

    name: str = "run"  # run name; the run directory is `<out_dir>/<name>`
    out_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # seed of model init, batches, noise and times
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # a model config dataclass chosen by `model.name`
    method: Any = None  # a method (loss) config dataclass chosen by `method.name`
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> Any:
    """Plain YAML-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads `1e-3` as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, str):
        if isinstance(value, annotation) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


Choices = Mapping[str, Mapping[str, type]]  # dotted section path -> {name: config dataclass}


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "", choices: Choices | None = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the valid ones listed.

    `where` is the dotted prefix of `cls`'s section (e.g. "method."); a field whose dotted path is a key
    of `choices` is a polymorphic section built by its `name`.
    """
    data = dict(data or {})
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in sorted(set(data) & set(moved)):
        raise ConfigError(f"{where}{key} has moved: {moved[key]}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; valid keys here: {', '.join(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, annotation = data[f.name], hints[f.name]
        if where + f.name in choices:
            kwargs[f.name] = build_choice(where + f.name, value, choices)
        elif dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{f.name}: expected a mapping, got {value!r}")
            kwargs[f.name] = from_dict(annotation, value, f"{where}{f.name}.", choices)
        else:
            kwargs[f.name] = _coerce(value, annotation, where + f.name)
    return cls(**kwargs)


def build_choice(section: str, data: Any, choices: Choices) -> Any:
    """Build a polymorphic section (`model`, `method`, `method.coupling`) whose `name` selects a dataclass."""
    table = choices[section]
    listed = ", ".join(sorted(table))
    if isinstance(data, str) and data in table:
        raise ConfigError(f"{section}: write the choice as a section, {section}: {{name: {data}}} "
                          f"(on the command line {section}.name={data}); choices: {listed}")
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"{section}: a section with a `name` is required; choices: {listed}")
    name = data["name"]
    if name not in table:
        raise ConfigError(f"{section}.name: unknown {section.rsplit('.', 1)[-1]} {name!r}; choices: {listed}")
    return from_dict(table[name], data, f"{section}.", choices)


def build_run_config(data: dict[str, Any], choices: Choices) -> RunConfig:
    """Validate a full recipe mapping into a `RunConfig`; `choices` must cover `model` and `method`."""
    data = dict(data)
    for section in ("model", "method"):
        data.setdefault(section, None)
    cfg = from_dict(RunConfig, data, "", choices)
    check_ranges(cfg)
    return cfg


EVAL_SOLVERS = ("euler", "heun", "dopri5", "dopri8", "bosh3", "adaptive_heun")  # shared.sampling.SOLVERS
INT64 = (-2**63, 2**63 - 1)  # what torch, numpy and the file formats hold: every integer setting must fit
MAX_SAMPLES = 100_000_000  # data.n_train / data.n_test: points generated (toy sets); data.max_*_rows: rows kept
RANGES = (  # (key, test, what is expected)
    ("train.steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.lr", lambda v: v > 0, "a number > 0"),
    ("train.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("train.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("train.grad_clip", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1) (0 disables EMA)"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.ckpt_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: v >= 0, "an integer >= 0 (0: no validation)"),
    ("train.mixed_precision", lambda v: v in ("no", "bf16", "fp16"), "one of no, bf16, fp16"),
    ("train.trackers", lambda v: set(v) <= {"tensorboard"}, "a list of Accelerate trackers: tensorboard"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("data.seed", lambda v: v >= 0, "an integer >= 0"),
    ("data.n_train", lambda v: v <= MAX_SAMPLES, f"an integer <= {MAX_SAMPLES} (points generated or rows kept)"),
    ("data.n_test", lambda v: v <= MAX_SAMPLES, f"an integer <= {MAX_SAMPLES} (points generated or rows kept)"),
    ("data.max_train_rows", lambda v: 0 <= v <= MAX_SAMPLES, f"an integer in [0, {MAX_SAMPLES}] (0: every row)"),
    ("data.max_test_rows", lambda v: 0 <= v <= MAX_SAMPLES, f"an integer in [0, {MAX_SAMPLES}] (0: every row)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("data.shift", lambda v: v >= 0, "an integer >= 0"),
    ("data.storage", lambda v: v in ("memory", "uint8", "stream"), "one of memory, uint8, stream"),
    ("data.workers", lambda v: v >= 0, "an integer >= 0 (0: read in the training process)"),
    ("eval.solver", lambda v: v in EVAL_SOLVERS, "one of " + ", ".join(EVAL_SOLVERS)),
    ("eval.grid", lambda v: v in ("linear", "quadratic", "geometric"), "linear, quadratic or geometric"),
    ("eval.steps", lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of integers >= 1"),
    ("eval.n_samples", lambda v: v >= 1, "an integer >= 1"),
    ("eval.nll_samples", lambda v: v >= 1, "an integer >= 1"),
)


def check_ranges(cfg: RunConfig) -> None:
    """Refuse values outside their range before anything runs, naming the key and what is expected."""
    if cfg.name in ("", ".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError(f"name={cfg.name!r} is not a run name: expected a folder name without '/' "
                          "(the run directory is <out_dir>/<name>)")
    check_int64(cfg)
    for key, ok, expected in RANGES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: expected {expected}")
    if cfg.train.eval_every and cfg.data.val_fraction == 0:
        raise ConfigError("train.eval_every > 0 needs a validation split: set data.val_fraction > 0 "
                          "(e.g. data.val_fraction=0.1)")


def check_int64(cfg: Any) -> None:
    """Refuse an integer setting (anywhere in the config, lists included) that does not fit in 64 bits."""
    for key, value in flatten(to_dict(cfg)).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
                raise ConfigError(f"{key}={value!r} is out of range: expected an integer that fits in 64 bits "
                                  "(between -2^63 and 2^63 - 1)")


# ---------------------------------------------------------------- recipes and overrides


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse `a.b=value` strings; values are read as YAML scalars/lists (`steps=[1,2]`, `lr=1e-3`)."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=2000)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        parsed.append((key.split("."), load_yaml(raw) if raw != "" else ""))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of a recipe mapping with dotted overrides set (validation happens on build)."""
    import copy

    data = copy.deepcopy(data)
    for keys, value in parse_overrides(overrides):
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(keys)}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, a syntax error (with line and column) or a non-mapping
    is a ConfigError naming `what` (e.g. "recipe") and an `example` path of the expected kind."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found (expected a YAML file such as {example})")
    try:
        with open(path) as fh:
            data = load_yaml(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {str(path)!r}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None, choices: Choices) -> RunConfig:
    """Read a YAML recipe (or a run's saved `config.yaml`), apply overrides, validate against `choices`."""
    path = Path(path)
    data = read_yaml_mapping(path, "recipe", "recipes/toy2d/fm_independent.yaml")
    if not data and not overrides:
        raise ConfigError(f"recipe {str(path)!r} is empty: a recipe sets at least model: {{name: ...}} and "
                          "method: {name: ...} (see recipes/toy2d/fm_independent.yaml)")
    data.setdefault("name", f"{path.parent.name}-{path.stem}")
    return build_run_config(apply_overrides(data, overrides or []), choices)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: {"train": {"steps": 1}} -> {"train.steps": 1}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (what `config.yaml` in a run directory holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
