"""Where recipes are found: the bundled ones travel with the package, and a recipe named inside a spec
resolves relative to the file that names it.

A recipe reference in a pipeline or comparison spec (`teacher: recipes/digits/teacher.yaml ...`) is looked
up, in order: as an absolute path; relative to the folder of the spec that names it; relative to the working
folder; as a bundled recipe (`recipes/<data>/<file>.yaml` under the installed package). `flowdistill run
digits` names the bundled `recipes/digits/pipeline.yaml`; `flowdistill recipes` lists every bundled recipe.
"""
from __future__ import annotations

from pathlib import Path

from shared.config import ConfigError

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "recipes"  # installed beside the flowdistill package
PIPELINE = "pipeline.yaml"


def resolve_recipe(reference: str | Path, spec_dir: str | Path | None = None) -> Path:
    """The recipe file a reference names (see the module docstring); a missing one is a ConfigError naming
    every place looked at."""
    path = Path(reference)
    candidates = [path] if path.is_absolute() else [
        *([Path(spec_dir) / path] if spec_dir is not None else []), path,
        BUNDLED_ROOT.parent / path if path.parts[:1] == ("recipes",) else BUNDLED_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(f"recipe {str(reference)!r} not found (looked at {looked}); `flowdistill recipes` lists the "
                      "bundled recipes")


def pipeline_spec(name_or_path: str) -> Path:
    """A pipeline spec file: a path, or the name of a bundled data set's pipeline (`digits` ->
    recipes/digits/pipeline.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_ROOT / name_or_path / PIPELINE
    if path.suffix == "" and bundled.is_file():
        return bundled
    names = ", ".join(p.parent.name for p in sorted(BUNDLED_ROOT.glob(f"*/{PIPELINE}")))
    raise ConfigError(f"pipeline {name_or_path!r} not found: expected a pipeline YAML file or a bundled pipeline "
                      f"name ({names})")


def bundled_recipes() -> list[Path]:
    """Every bundled recipe, relative to the bundled root's parent (`recipes/<data>/<file>.yaml`)."""
    return sorted(p.relative_to(BUNDLED_ROOT.parent) for p in BUNDLED_ROOT.glob("*/*.yaml"))
