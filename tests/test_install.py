"""A plain (non-editable) install carries the recipes and the shipped teachers: the wheel is built, installed
into a fresh virtual environment and runs the toy2d pipeline by name from an empty folder."""
from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "data.n_train=600 data.n_test=300 train.progress=false train.ckpt_every=10"


def build_wheel(out: Path) -> Path:
    """The project's wheel: built by the installed setuptools when it is recent enough (no network needed), else
    in pip's isolated build environment."""
    isolation = ["--no-build-isolation"] if setuptools_version() >= (68,) else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    return next(out.glob("flowdistill-*.whl"))


def setuptools_version() -> tuple[int, ...]:
    """The installed setuptools' (major, minor) version; (0,) when it is absent."""
    if importlib.util.find_spec("setuptools") is None:
        return (0,)
    from importlib.metadata import version

    return tuple(int(p) for p in version("setuptools").split(".")[:2] if p.isdigit())


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel's files; its dependencies (torch, ...) are taken from this
    interpreter's site-packages by a path file, whose own path files (an editable install) are not read."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    Path(purelib, "dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return python


@pytest.mark.slow
def test_wheel_runs_the_toy2d_pipeline_by_name_from_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "recipes/toy2d/pipeline.yaml" in names
    assert "flowdistill/pretrained/digits-tarflow/model.safetensors" in names
    python = fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    overrides = [f"teacher=recipes/toy2d/teacher.yaml train.steps=20 model.blocks=2 {TINY}",
                 f"student=recipes/toy2d/fm_independent.yaml train.steps=20 model.hidden=32 {TINY}",
                 "couplings=[independent,nf_teacher]", "coupling_overrides={nf_teacher: [method.coupling.draws=2]}",
                 "f2d2_u=", "f2d2_joint=", "f2d2_on=[]", "compact=", "compact_nfm=false", "steps=[1,2]",
                 "n_samples=100", "curvature_samples=20", "curvature_steps=4"]
    done = subprocess.run([str(python), "-m", "flowdistill", "run", "toy2d", *overrides], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import flowdistill; print(flowdistill.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "venv") in where  # the wheel's copy ran, not the source tree
    report = (work / "runs" / "toy2d-pipeline" / "report" / "report.md").read_text()
    assert report.index("## Findings") < report.index("## Teacher")
