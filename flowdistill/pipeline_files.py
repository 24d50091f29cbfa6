"""What a pipeline folder holds besides its runs: run keys that do not depend on where the folder lives, the
stage outputs it reads back (validated, naming the file and the remedy), and the evaluation's outputs when
the evaluation fails (no half-written figures folder, a full disk named as such).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from shared.checkpoint import explain_disk_full, removed_on_error

ROOT_MARK = "<pipeline>"  # what a path inside the pipeline folder is hashed as, instead of where the folder is


def root_relative(value: Any, root: Path) -> Any:
    """A string naming a path inside `root` as `<pipeline>/<its path relative to root>`, so that a run key stays
    the same when the pipeline folder is moved or copied; any other value as it is."""
    if not isinstance(value, str) or "/" not in value:
        return value
    try:
        inside = Path(value).absolute().relative_to(root.absolute())
    except ValueError:
        return value
    return f"{ROOT_MARK}/{inside.as_posix()}"


def json_damage(path: Path) -> str | None:
    """Why an existing JSON output cannot be read (torn by a kill, not JSON, not a mapping); None when it is
    fine or absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return str(err)
    return None if isinstance(data, dict) else f"holds {type(data).__name__}, not a mapping"


def read_stage_json(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON mapping a stage wrote; a missing or damaged file is a ValueError naming it and `remedy`."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; {remedy}")
    problem = json_damage(path)
    if problem:
        raise ValueError(f"{path} is damaged ({problem}); {remedy}")
    return json.loads(path.read_text())


@contextlib.contextmanager
def evaluation_outputs(figures: Path, command: str) -> Iterator[None]:
    """Around the evaluate stage: a figures folder left by an evaluation that did not finish is cleared first, and
    removed again when this one fails; a full disk is one error naming the file and to rerun `command`."""
    shutil.rmtree(figures, ignore_errors=True)
    with removed_on_error(figures), explain_disk_full(f"the evaluation in {figures.parent}",
                                                      f"rerun `{command}` (finished runs are reused)"):
        yield
