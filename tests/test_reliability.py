"""Bad inputs and faults on the command line, one table row each (the table of docs/reliability.md).

Every row is what a user does, the message fragment they see, the exit code, and what must not be left
behind or lost. A row's command runs in-process on tiny runs; unless the row says otherwise, nothing
under the case's folder may change (no run folder created, no file of an existing run touched).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from flowdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "recipes" / "toy2d" / "fm_independent.yaml")
NFM = str(ROOT / "recipes" / "toy2d" / "fm_nf_teacher.yaml")
TEACHER = str(ROOT / "recipes" / "toy2d" / "teacher.yaml")
PIPELINE = str(ROOT / "recipes" / "toy2d" / "pipeline.yaml")
DOC = ROOT / "docs" / "reliability.md"
TINY = ["data.n_train=200", "data.n_test=100", "train.steps=2", "train.batch_size=64", "model.hidden=16",
        "train.progress=false", "train.sample_grid=false"]
TINY_TEACHER = ["data.n_train=200", "data.n_test=100", "train.steps=2", "train.batch_size=64", "model.width=32",
                "model.head_dim=16", "model.blocks=2", "train.progress=false", "train.sample_grid=false"]
PRECOMPUTED = ["method.coupling.mode=precomputed", "method.coupling.shard=64"]  # 4 shards of the 200 images
PIPE_SMALL = "data.n_train=200 data.n_test=100 train.batch_size=64 train.progress=false"
PIPE_SPEC = {  # a pipeline of three 2-step runs and one coupling cache, scored on few samples
    "name": "p", "teacher": f"{TEACHER} train.steps=2 model.width=32 model.head_dim=16 model.blocks=2 {PIPE_SMALL}",
    "student": f"{TOY} train.steps=2 model.hidden=16 {PIPE_SMALL}", "couplings": ["independent", "nf_teacher"],
    "coupling_overrides": {"nf_teacher": ["method.coupling.draws=2", "method.coupling.shard=64"]},
    "steps": [1], "n_samples": 100, "curvature_steps": 4, "curvature_samples": 20, "nll_points": 20}
DIVERGES = ["train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0", "train.log_every=1", "train.steps=20"]
TRACEBACK = -1  # the exit "code" of a row whose exception propagates (--debug)
DiskUsage = namedtuple("DiskUsage", "total used free")


def cli(argv: list[str]) -> int:
    """`flowdistill ARGV` in-process; argparse's own errors exit with their code."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def snapshot(folder: Path) -> dict[str, str]:
    """Every folder and file under `folder` with the sha256 of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A finished 2-step student run, and a 2-step TarFlow teacher with a precomputed coupling cache."""
    root = tmp_path_factory.mktemp("built")
    assert cli(["train", TOY, f"out_dir={root}", "name=good", "train.log_every=1", *TINY]) == 0
    assert cli(["train", TEACHER, f"out_dir={root}", "name=teacher", *TINY_TEACHER]) == 0
    assert cli(["couplings", NFM, *TINY, f"method.coupling.teacher={root / 'teacher'}", *PRECOMPUTED]) == 0
    return {"good": root / "good", "teacher": root / "teacher"}


@pytest.fixture(scope="module")
def built_pipeline(tmp_path_factory) -> Path:
    """The folder of a finished tiny pipeline (`PIPE_SPEC`): runs, coupling cache, evaluation, report."""
    import yaml

    root = tmp_path_factory.mktemp("pipeline")
    spec = root / "p.yaml"
    spec.write_text(yaml.safe_dump({**PIPE_SPEC, "out_dir": str(root)}))
    assert cli(["run", str(spec)]) == 0
    return root / "p"


class Env:
    """One case's folder (`tmp`), its run folder parent (`out`), and helpers that build its inputs."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, built: dict[str, Path],
                 request: pytest.FixtureRequest):
        self.tmp, self.mp, self.built, self.request = tmp, monkeypatch, built, request
        self.out = tmp / "runs"
        self.out.mkdir()
        self.held = contextlib.ExitStack()  # locks held by "another process" during the case
        self.seen = ""  # what the command printed (stdout and stderr), for checks that read it

    def train(self, *overrides: str, recipe: str = TOY, name: str = "r") -> list[str]:
        """argv of a tiny `flowdistill train` into this case's folder."""
        return ["train", recipe, f"out_dir={self.out}", f"name={name}", *TINY, *overrides]

    def student(self, *overrides: str, name: str = "s") -> list[str]:
        """argv of a tiny NFM student trained on this case's copy of the teacher's cache."""
        return self.train(f"method.coupling.teacher={self.teacher()}", *PRECOMPUTED, *overrides, recipe=NFM,
                          name=name)

    def data(self, name: str, content: np.ndarray | bytes | str) -> Path:
        """A data file in this case's folder (an array saved as .npy/.npz, or raw bytes / text)."""
        path = self.tmp / "data" / name
        path.parent.mkdir(exist_ok=True)
        if isinstance(content, np.ndarray):
            np.save(path, content, allow_pickle=content.dtype == object)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def run(self, name: str = "r") -> Path:
        """A copy of the finished run (checkpoint at step 2, metrics at steps 1 and 2)."""
        return Path(shutil.copytree(self.built["good"], self.out / name))

    def teacher(self) -> Path:
        """This case's copy of the teacher run with its complete coupling cache."""
        path = self.out / "teacher"
        if not path.exists():
            shutil.copytree(self.built["teacher"], path)
        return path

    def cache(self) -> Path:
        """The teacher copy's coupling cache folder."""
        return self.teacher() / "couplings" / "nf_teacher-d4-s0"

    def ckpt(self, name: str = "r") -> Path:
        """The step-2 checkpoint of a copied run."""
        return self.out / name / "checkpoints" / "step_00000002"

    def pipeline(self, *overrides: str) -> list[str]:
        """argv of `flowdistill run` on this case's copy of the finished tiny pipeline (copied at first use)."""
        import yaml

        spec = self.tmp / "pipe" / "p.yaml"
        if not spec.exists():
            shutil.copytree(self.request.getfixturevalue("built_pipeline"), self.tmp / "pipe" / "p")
            spec.write_text(yaml.safe_dump({**PIPE_SPEC, "out_dir": str(self.tmp / "pipe")}))
        return ["run", str(spec), *overrides]

    def pipe(self) -> Path:
        """This case's pipeline folder."""
        return self.tmp / "pipe" / "p"

    def evaluation(self) -> Path:
        """The pipeline copy's evaluation JSON."""
        return next(self.pipe().glob("evaluation-*.json"))


def damage(path: Path, keep: int | None = None) -> None:
    """Flip a byte near the end of a file, or cut it to its first `keep` bytes."""
    raw = bytearray(path.read_bytes())
    if keep is not None:
        path.write_bytes(bytes(raw[:keep]))
        return
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def edit(path: Path, text: str) -> Path:
    """Overwrite a text file with `text`; returns its path."""
    path.write_text(text)
    return path


# ---------------------------------------------------------------- what must hold afterwards


def unchanged(env: Env, before: dict[str, str]) -> None:
    """No file or folder created, changed or removed."""
    assert snapshot(env.tmp) == before


def name_is_free(env: Env, before: dict[str, str]) -> None:
    """Nothing left behind, and the corrected command (same name) trains."""
    unchanged(env, before)
    assert cli(env.train()) == 0


def resumes_to(step: int) -> Callable[[Env, dict[str, str]], None]:
    """The last good checkpoint was kept, no temp folder is left, and `--resume` finishes the run at `step`."""
    def check(env: Env, before: dict[str, str]) -> None:
        from shared.checkpoint import latest_checkpoint, verify_checkpoint

        ckpts = env.out / "r" / "checkpoints"
        assert not list(ckpts.glob(".*")), "temporary folder left behind"
        verify_checkpoint(latest_checkpoint(ckpts))
        env.mp.setattr(shutil, "disk_usage", lambda p: DiskUsage(1 << 40, 0, 1 << 40))  # space freed
        assert cli(["train", str(env.out / "r"), "--resume", f"train.steps={step}"]) == 0
        assert verify_checkpoint(latest_checkpoint(ckpts))["step"] == step
    return check


def old_run_kept(env: Env, before: dict[str, str]) -> None:
    """The run that --overwrite would replace is whole again, and no aside folder remains."""
    unchanged(env, before)
    assert not list(env.out.glob(".*"))


def cache_repaired(env: Env, before: dict[str, str]) -> None:
    """The damaged shard was recomputed and the cache trains a student again."""
    from nfm.coupling_cache import damaged_shards

    assert damaged_shards(env.cache()) == []
    assert cli(env.student()) == 0


def torn_line_dropped(env: Env, before: dict[str, str]) -> None:
    """The resumed run's metrics have one line per step, in order."""
    import json

    steps = [json.loads(line)["step"] for line in (env.out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def resumed_from_2(env: Env, before: dict[str, str]) -> None:
    """The checkpoint moved aside by the interrupted rewrite was put back and the run went on from it."""
    from shared.checkpoint import latest_checkpoint, verify_checkpoint

    ckpts = env.out / "r" / "checkpoints"
    assert not list(ckpts.glob(".*")) and verify_checkpoint(latest_checkpoint(ckpts))["step"] == 4


def old_name_not_recreated(env: Env, before: dict[str, str]) -> None:
    """The moved run was continued where it is now; its old folder was not created again."""
    assert not (env.out / "old").exists() and (env.out / "r" / "checkpoints" / "step_00000004").is_dir()


def restore_mode(env: Env, before: dict[str, str]) -> None:
    """Nothing written into the read-only folder (its mode restored for clean-up)."""
    unchanged(env, before)
    os.chmod(env.tmp / "ro", 0o755)


def added(*names: str) -> Callable[[Env, dict[str, str]], None]:
    """Exactly the files `names` (relative to the case folder) were added; nothing else changed."""
    def check(env: Env, before: dict[str, str]) -> None:
        after = snapshot(env.tmp)
        assert sorted(set(after) - set(before)) == sorted(names), sorted(set(after) ^ set(before))
        assert {k: v for k, v in after.items() if k in before} == before
    return check


def nll_of_bom(env: Env, before: dict[str, str]) -> None:
    """All 50 rows were scored; only the two result files and the cached ODE reference were added to the run."""
    after = snapshot(env.tmp)
    new = sorted(set(after) - set(before))
    cached = [k for k in new if re.fullmatch(r"runs/r/cache/reference-[0-9a-f]{16}\.safetensors", k)]
    assert len(cached) == 1, new
    added("runs/r/nll-file-bom.json", "runs/r/nll-file-bom.csv", "runs/r/cache", *cached)(env, before)
    assert json.loads((env.out / "r" / "nll-file-bom.json").read_text())["n"] == 50


def samples_written(env: Env, before: dict[str, str]) -> None:
    """The sample files were added; the checkpoint and everything else untouched."""
    added("runs/r/samples", "runs/r/samples/steps32-euler-linear.png", "runs/r/samples/steps32-euler-linear.npz")(
        env, before)


def stale_temporary_removed(env: Env, before: dict[str, str]) -> None:
    """The old temporary file is gone, the fresh one (a write in progress elsewhere) kept, the samples written."""
    folder = env.out / "r" / "samples"
    assert not (folder / ".steps32-euler-linear.npz.k3j4h5g6.tmp").exists()
    assert (folder / ".other.npz.abcd1234.tmp").exists()
    assert (folder / "steps32-euler-linear.npz").is_file() and (folder / "steps32-euler-linear.png").is_file()
    assert sorted(p.name for p in folder.iterdir()) == [".other.npz.abcd1234.tmp", "steps32-euler-linear.npz",
                                                        "steps32-euler-linear.png"]


def resumed_to_4(env: Env, before: dict[str, str]) -> None:
    """The run went on from the checkpoint it fell back to and finished at step 4."""
    from shared.checkpoint import latest_checkpoint, verify_checkpoint

    assert verify_checkpoint(latest_checkpoint(env.out / "r" / "checkpoints"))["step"] == 4


def moved_run_resumed(env: Env, before: dict[str, str]) -> None:
    """The moved run finished where it is now, reading its input run from its new place."""
    from shared.checkpoint import latest_checkpoint, verify_checkpoint

    run = env.tmp / "moved" / "r"
    assert verify_checkpoint(latest_checkpoint(run / "checkpoints"))["step"] == 4
    assert f"init_from: {env.tmp / 'moved' / 'base'}" in (run / "config.yaml").read_text()
    assert not (env.out / "r").exists()


def released(env: Env, before: dict[str, str]) -> None:
    """Nothing changed; once the other holder lets go, no lock file is left."""
    unchanged(env, before)
    env.held.close()
    assert not list(env.tmp.rglob("*.lock"))


def evaluation_recomputed(env: Env, before: dict[str, str]) -> None:
    """The damaged evaluation JSON was recomputed to the numbers of the original, and the report rewritten."""
    original = json.loads(next(env.request.getfixturevalue("built_pipeline").glob("evaluation-*.json")).read_text())
    again = json.loads(env.evaluation().read_text())
    assert again["students"] == original["students"] and again["teacher"]["value"] == original["teacher"]["value"]
    assert (env.pipe() / "report" / "report.html").is_file()


def plan_all_done(env: Env, before: dict[str, str]) -> None:
    """The moved pipeline reuses every run, its cache, its evaluation and its report; nothing was written."""
    unchanged(env, before)
    assert "to run" not in env.seen and "partial" not in env.seen, env.seen


def report_after_evaluate(env: Env, before: dict[str, str]) -> None:
    """The plan names the damaged file and lists the report as to run after it; nothing was written."""
    unchanged(env, before)
    assert f"6/7 evaluate: to run ({env.evaluation()} is damaged: " in env.seen
    assert "7/7 report: to run (after evaluate)" in env.seen


# ---------------------------------------------------------------- setups needing more than argv


def no_free_space(env: Env) -> list[str]:
    """A disk with 4 KiB free, from the start."""
    env.mp.setattr(shutil, "disk_usage", lambda p: DiskUsage(1 << 40, (1 << 40) - 4096, 4096))
    return env.train()


def space_runs_out(env: Env) -> list[str]:
    """A disk that fills up after the first checkpoint of a 6-step run that checkpoints every 2 steps."""
    calls = []

    def usage(path: str) -> DiskUsage:
        calls.append(path)  # 1: the check before the run folder is made, 2: checkpoint 2, 3: checkpoint 4
        return DiskUsage(1 << 40, 0, 1 << 40) if len(calls) <= 2 else DiskUsage(1 << 40, (1 << 40) - 4096, 4096)

    env.mp.setattr(shutil, "disk_usage", usage)
    return env.train("train.steps=6", "train.ckpt_every=2")


def write_fails(env: Env) -> list[str]:
    """The second checkpoint's optimizer state cannot be written."""
    import torch

    save, calls = torch.save, []

    def failing(*args, **kwargs):  # optimizer.pt of the second checkpoint: what a full disk makes torch say
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4160 vs 4054")
        return save(*args, **kwargs)

    env.mp.setattr(torch, "save", failing)
    return env.train("train.steps=6", "train.ckpt_every=2")


def read_only(env: Env) -> list[str]:
    """out_dir is a folder nobody may write in."""
    folder = env.tmp / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    access = os.access  # root may write anywhere: answer as a read-only mount would

    def fake(path: str, mode: int, **kwargs) -> bool:
        return False if str(path).startswith(str(folder)) and mode & os.W_OK else access(path, mode, **kwargs)

    env.mp.setattr(os, "access", fake)
    return env.train(f"out_dir={folder}")


def ctrl_c_at_step_3(env: Env) -> list[str]:
    """SIGINT arrives during step 3 of a 10-step run."""
    from shared.trainer import Trainer

    step = Trainer._train_step

    def interrupted(self: Trainer) -> None:
        step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    env.mp.setattr(Trainer, "_train_step", interrupted)
    return env.train("train.steps=10")


def killed_before_first_checkpoint(env: Env) -> Path:
    """A run folder as a kill before the first checkpoint leaves it: config.yaml only."""
    (env.out / "r").mkdir()
    shutil.copy(env.built["good"] / "config.yaml", env.out / "r" / "config.yaml")
    return env.out / "r"


def torn_metrics(env: Env) -> list[str]:
    """The run's metrics log ends in half a line, as a kill during its write leaves it."""
    run = env.run()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    return ["train", str(run), "--resume", "train.steps=4", "train.log_every=1"]


def moved(env: Env) -> list[str]:
    """The run trained as runs/old, then moved to runs/r."""
    env.run("old").rename(env.out / "r")
    return ["train", str(env.out / "r"), "--resume", "train.steps=4"]


def images(env: Env, sizes: list[int]) -> Path:
    """A folder of black square PNGs of the given sides."""
    from PIL import Image

    folder = env.tmp / "images"
    folder.mkdir()
    for i, size in enumerate(sizes):
        Image.new("L", (size, size)).save(folder / f"{i}.png")
    return folder


def two_arrays(env: Env) -> Path:
    """An .npz holding arrays a and b."""
    path = env.tmp / "data" / "two.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, a=np.ones((10, 2)), b=np.ones((10, 2)))
    return path


def bom_csv(env: Env) -> list[str]:
    """nll --data on a 50-row CSV saved with a UTF-8 byte-order mark (as spreadsheet programs write it)."""
    rows = "\n".join(f"{i / 10:.1f},{-i / 20:.2f}" for i in range(50))
    return ["nll", str(env.run()), "--data", str(env.data("bom.csv", "\ufeff".encode() + rows.encode() + b"\n")),
            "--device", "cpu"]


def fifo(env: Env) -> list[str]:
    """nll --data on a named pipe that nobody writes to (reading it would block for ever)."""
    path = env.tmp / "data" / "pipe.csv"
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    return ["nll", str(env.run()), "--data", str(path), "--device", "cpu"]


def little_memory(env: Env) -> list[str]:
    """sample --n 200000000 of 2D points on a machine with 1 GiB of memory available."""
    import shared.evaluate

    env.mp.setattr(shared.evaluate, "available_memory", lambda: 1 << 30)
    return ["sample", str(env.run()), "--n", "200000000", "--device", "cpu"]


def manifest_names(env: Env, name: str) -> list[str]:
    """The checkpoint's manifest lists `name` (with the right size and sha256 of what it points at)."""
    from shared.checkpoint import sha256_file

    secret = env.data("secret.txt", "not for reading\n")
    ckpt = env.run() and env.ckpt()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ["sample", str(env.out / "r"), "--device", "cpu"]


def symlinked_weights(env: Env) -> list[str]:
    """model.safetensors replaced by a link to an identical file outside the checkpoint."""
    ckpt = env.run() and env.ckpt()
    outside = env.tmp / "data" / "weights.safetensors"
    outside.parent.mkdir(exist_ok=True)
    shutil.copy(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(outside)
    return ["sample", str(env.out / "r"), "--device", "cpu"]


def final_checkpoint_deleted(env: Env) -> list[str]:
    """A run with checkpoints at steps 1 and 2 whose step-2 folder was deleted; then --resume to step 4."""
    assert cli(env.train("train.ckpt_every=1")) == 0
    shutil.rmtree(env.ckpt())
    return ["train", str(env.out / "r"), "--resume", "train.steps=4"]


def only_checkpoint_deleted(env: Env) -> list[str]:
    """The run's only checkpoint folder was deleted; `latest` still names it."""
    shutil.rmtree(env.run() and env.ckpt())
    return ["sample", str(env.out / "r"), "--device", "cpu"]


def moved_with_input(env: Env) -> list[str]:
    """runs/r started from runs/base (train.init_from); the whole runs folder moved to moved/; --resume there."""
    env.run("base")
    assert cli(env.train(f"train.init_from={env.out / 'base'}")) == 0
    env.out.rename(env.tmp / "moved")
    return ["train", str(env.tmp / "moved" / "r"), "--resume", "train.steps=4"]


def moved_pipeline(env: Env) -> list[str]:
    """The finished pipeline folder copied to another place; its plan there."""
    return env.pipeline("--plan")


def torn_evaluation(env: Env, *options: str) -> list[str]:
    """The pipeline's evaluation JSON cut short, as a kill during a non-atomic write or a bad copy leaves it."""
    argv = env.pipeline(*options)
    damage(env.evaluation(), keep=200)
    return argv


def disk_full_on(env: Env, module: Any, name: str, after: int = 0) -> None:
    """`module.name` (a file writer taking the path first) raises ENOSPC from its call number `after` + 1 on."""
    original, calls = getattr(module, name), []

    def full(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, *args, **kwargs)

    env.mp.setattr(module, name, full)


def couplings_disk_full(env: Env) -> list[str]:
    """couplings into a new cache folder on a disk that is full from the first shard on."""
    import nfm.coupling_cache

    disk_full_on(env, nfm.coupling_cache, "atomic_write_bytes")
    return ["couplings", *env.student(f"method.coupling.cache={env.tmp / 'cache'}")[1:]]


def evaluation_disk_full(env: Env) -> list[str]:
    """The evaluation of the pipeline runs again (its JSON and figures deleted) and the disk fills after two figures."""
    import shared.plots

    argv = env.pipeline("--only", "evaluate")
    env.evaluation().unlink()
    for figures in env.pipe().glob("figures-*"):
        shutil.rmtree(figures)
    disk_full_on(env, shared.plots, "atomic_write_via", after=2)
    return argv


def stale_temporaries(env: Env) -> list[str]:
    """A killed `sample` left `.steps32-euler-linear.npz.<rand>.tmp` an hour ago; another write is in progress."""
    folder = env.run() / "samples"
    folder.mkdir()
    old = folder / ".steps32-euler-linear.npz.k3j4h5g6.tmp"
    old.write_bytes(b"")
    os.utime(old, (old.stat().st_atime - 3600, old.stat().st_mtime - 3600))
    (folder / ".other.npz.abcd1234.tmp").write_bytes(b"partial")
    return ["sample", str(env.out / "r"), "--device", "cpu"]


def locked_student(env: Env) -> list[str]:
    """Another process trains the pipeline's second-seed student while `flowdistill run` reaches it."""
    from flowdistill.pipeline import Pipeline
    from flowdistill.pipeline_spec import load_pipeline
    from shared.rundir import run_lock

    argv = env.pipeline("seeds=[0,1]", "--only", "students")
    pending = [r for r in Pipeline(load_pipeline(argv[1], ["seeds=[0,1]"])).students if r.status() != "done"]
    env.held.enter_context(run_lock(pending[0].dir))
    return argv


def pipeline_ctrl_c(env: Env) -> list[str]:
    """SIGINT arrives during step 1 of the student the pipeline trains (its second seed)."""
    from shared.trainer import Trainer

    step = Trainer._train_step

    def interrupted(self: Trainer) -> None:
        step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    env.mp.setattr(Trainer, "_train_step", interrupted)
    return env.pipeline("seeds=[0,1]", "--only", "students")


def pipeline_rerun_finishes(env: Env, before: dict[str, str]) -> None:
    """Rerunning the pipeline, as the message says, resumes the interrupted student and finishes every run."""
    from flowdistill.pipeline import Pipeline
    from flowdistill.pipeline_spec import load_pipeline

    env.mp.undo()
    assert cli(env.pipeline("seeds=[0,1]", "--only", "students")) == 0
    assert all(r.status() == "done" for r in Pipeline(load_pipeline(env.tmp / "pipe" / "p.yaml", ["seeds=[0,1]"])).students)


def locked_cache(env: Env) -> list[str]:
    """Another `flowdistill couplings` extracts into the same cache."""
    from shared.rundir import folder_lock

    argv = ["couplings", *env.student()[1:]]
    env.held.enter_context(folder_lock(env.cache(), "held by the test"))
    return argv


def spec(env: Env, text: str) -> str:
    """A spec file with OUT replaced by this case's run folder parent."""
    return str(env.data("spec.yaml", text.replace("OUT", str(env.out))))


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One bad input or fault: what the user does, what they see, the exit code, what is not lost."""

    id: str
    does: str  # what the user does
    message: str  # a fragment of the one line they see
    argv: Callable[[Env], list[str]]
    code: int = 2
    keeps: str = "nothing created or changed"  # what must not be left behind or lost
    check: Callable[[Env, dict[str, str]], None] = unchanged


C = Case
CASES = [
    # ---- recipes, overrides and config ranges (all refused before any folder exists)
    C("dataset-misspelt", "train with data.name=8gausians",
      "unknown data set '8gausians'; choices: 8gaussians, banana", lambda e: e.train("data.name=8gausians"),
      keeps="no run folder; the corrected command can use the name", check=name_is_free),
    C("coupling-unknown", "train with method.coupling.name=sinkhorn",
      "method.coupling.name: unknown coupling 'sinkhorn'; choices: independent, minibatch_ot",
      lambda e: e.train("method.coupling.name=sinkhorn")),
    C("steps-zero", "train.steps=0", "train.steps=0 is out of range: expected an integer >= 1",
      lambda e: e.train("train.steps=0")),
    C("steps-negative", "train.steps=-5", "train.steps=-5 is out of range: expected an integer >= 1",
      lambda e: e.train("train.steps=-5")),
    C("log-every-zero", "train.log_every=0", "train.log_every=0 is out of range: expected an integer >= 1",
      lambda e: e.train("train.log_every=0")),
    C("ckpt-every-zero", "train.ckpt_every=0", "train.ckpt_every=0 is out of range: expected an integer >= 1",
      lambda e: e.train("train.ckpt_every=0")),
    C("lr-negative", "train.lr=-1", "train.lr=-1.0 is out of range: expected a number > 0",
      lambda e: e.train("train.lr=-1")),
    C("eval-solver-unknown", "eval.solver=rk99 (refused before training, not after it)",
      "eval.solver='rk99' is out of range: expected one of euler, heun, dopri5", lambda e: e.train("eval.solver=rk99")),
    C("batch-size-zero", "train.batch_size=0", "train.batch_size=0 is out of range: expected an integer >= 1",
      lambda e: e.train("train.batch_size=0")),
    C("precision-unknown", "train.mixed_precision=fp8",
      "train.mixed_precision='fp8' is out of range: expected one of no, bf16, fp16",
      lambda e: e.train("train.mixed_precision=fp8")),
    C("eval-steps-empty", "eval.steps=[]", "eval.steps=() is out of range: expected a non-empty list of integers >= 1",
      lambda e: e.train("eval.steps=[]")),
    C("val-fraction-range", "data.val_fraction=1.5", "data.val_fraction=1.5 is out of range: expected a number in [0, 1)",
      lambda e: e.train("data.val_fraction=1.5")),
    C("test-fraction-zero", "data.test_fraction=0", "data.test_fraction=0.0 is out of range: expected a number in (0, 1)",
      lambda e: e.train("data.test_fraction=0")),
    C("eval-every-no-val", "train.eval_every=10 without a validation split",
      "train.eval_every > 0 needs a validation split: set data.val_fraction > 0", lambda e: e.train("train.eval_every=10")),
    C("keep-zero", "train.keep_checkpoints=0", "train.keep_checkpoints=0 is out of range: expected an integer >= 1",
      lambda e: e.train("train.keep_checkpoints=0")),
    C("tracker-unknown", "train.trackers=[wandb]", "train.trackers=('wandb',) is out of range: expected a list of "
      "Accelerate trackers: tensorboard", lambda e: e.train("train.trackers=[wandb]")),
    C("key-misspelt", "train.stepz=3", "unknown key(s) train.stepz; valid keys here: steps, batch_size",
      lambda e: e.train("train.stepz=3")),
    C("key-unknown-top", "bogus=1", "unknown key(s) bogus; valid keys here: name, out_dir, seed",
      lambda e: e.train("bogus=1")),
    C("type-int", "train.steps=abc", "train.steps: expected int, got 'abc'", lambda e: e.train("train.steps=abc")),
    C("type-bool", "train.progress=3", "train.progress: expected true/false, got 3", lambda e: e.train("train.progress=3")),
    C("betas-one", "train.betas=[0.9]", "train.betas: expected 2 values, got [0.9]", lambda e: e.train("train.betas=[0.9]")),
    C("override-no-equals", "an override without `=`: train.steps",
      "override 'train.steps' is not of the form key=value (e.g. train.steps=2000)", lambda e: e.train("train.steps")),
    C("override-into-value", "seed.x=2", "override seed.x: 'seed' is a value, not a section", lambda e: e.train("seed.x=2")),
    C("override-empty-part", "train..steps=3", "override 'train..steps=3' has an empty key part",
      lambda e: e.train("train..steps=3")),
    C("model-unknown", "model.name=resnet", "model.name: unknown model 'resnet'; choices: dit, ensemble, flowmap, glow, mlp",
      lambda e: e.train("model.name=resnet")),
    C("method-unknown", "method.name=gan", "method.name: unknown method 'gan'; choices: f2d2, fm",
      lambda e: e.train("method.name=gan")),
    C("key-moved", "an old flat key, method.ot_reg=0.1", "method.ot_reg has moved: it is method.coupling.reg now",
      lambda e: e.train("method.ot_reg=0.1")),
    C("name-empty", "name= (the run would be out_dir itself)", "name='' is not a run name: expected a folder name "
      "without '/'", lambda e: e.train("name=")),
    C("name-slash", "name=a/b", "name='a/b' is not a run name", lambda e: e.train("name=a/b")),
    C("name-dotdot", "name=.. (the run would be out_dir's parent)", "name='..' is not a run name",
      lambda e: e.train("name=..")),
    C("yaml-syntax", "a recipe with a YAML syntax error", "line 3, column 9: not valid YAML (expected ',' or '}', "
      "but got ':')", lambda e: ["train", str(e.data("bad.yaml", "seed: 0\nmodel: {name: mlp\n  hidden: 3\n"))]),
    C("yaml-not-mapping", "a recipe that is a YAML list", "must be a YAML mapping, got list",
      lambda e: ["train", str(e.data("list.yaml", "- a\n- b\n"))]),
    C("recipe-empty", "an empty recipe file", "is empty: a recipe sets at least model: {name: ...} and method:",
      lambda e: ["train", str(e.data("empty.yaml", ""))]),
    C("recipe-missing", "a recipe path that does not exist", "recipe 'recipes/none.yaml' not found (expected a YAML "
      "file such as recipes/toy2d/fm_independent.yaml)", lambda e: ["train", "recipes/none.yaml"]),
    C("folder-without-config", "train --resume on a folder that is not a run", "is a folder without config.yaml: "
      "pass a recipe file, or a run directory", lambda e: ["train", str(e.tmp), "--resume"]),
    C("resume-and-overwrite", "train --resume --overwrite", "--resume continues a run and --overwrite replaces it: "
      "pass one of them", lambda e: [*e.train(), "--resume", "--overwrite"]),
    # ---- data
    C("tabular-nan", "a tabular .npy with a NaN", "contains NaN or infinite values",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('nan.npy', np.array([[1.0, np.nan]] * 10))}")),
    C("tabular-inf", "a tabular .npy with an inf", "contains NaN or infinite values",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('inf.npy', np.array([[1.0, np.inf]] * 10))}")),
    C("tabular-1d", "a 1-D array", "holds an array of shape (10,); expected a 2-D array (N, D) with N >= 2",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('flat.npy', np.arange(10.0))}")),
    C("tabular-complex", "a complex-valued .npy (was: imaginary part dropped with a warning)",
      "holds complex values (complex128); expected real numbers",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('c.npy', np.ones((300, 2)) * (1 + 2j))}")),
    C("tabular-empty-file", "an empty (0-byte) .npy (was: EOFError traceback)", "as numbers: No data left in file",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('empty.npy', b'')}")),
    C("tabular-no-rows", "a .npy of shape (0, 2)", "holds an array of shape (0, 2); expected a 2-D array",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('zero.npy', np.zeros((0, 2)))}")),
    C("tabular-strings", "a .npy of strings", "holds <U1 values; expected numbers",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('s.npy', np.array([['a', 'b']] * 10))}")),
    C("tabular-pickle", "a .npy of Python objects (would need unpickling)",
      "Object arrays cannot be loaded when allow_pickle=False",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('o.npy', np.array([[1, None]] * 10, dtype=object))}")),
    C("tabular-npz-several", "an .npz with two arrays and none named x",
      "holds arrays ['a', 'b']; store the data under key 'x' or alone",
      lambda e: e.train("data.name=tabular", f"data.path={two_arrays(e)}")),
    C("tabular-csv-text", "a CSV with a word in a number column", "could not convert string 'x' to float64 at row 1",
      lambda e: e.train("data.name=tabular", "data.path=" + str(e.data("t.csv", "1,2\n3,x\n")))),
    C("tabular-suffix", "data.path=values.txt", "unsupported file type; use one of .npy, .npz, .csv",
      lambda e: e.train("data.name=tabular", f"data.path={e.data('values.txt', '1 2')}")),
    C("tabular-missing", "data.path=typo.npy", "does not exist; set data.path=... to a .npy, .npz or .csv file",
      lambda e: e.train("data.name=tabular", f"data.path={e.tmp / 'typo.npy'}")),
    C("tabular-no-path", "data.name=tabular without data.path", "data set 'tabular' needs data.path=... set to",
      lambda e: e.train("data.name=tabular")),
    C("imagefolder-empty", "an empty image folder", "no images (.png, .jpg, .jpeg, .bmp) found under",
      lambda e: e.train("data.name=imagefolder", f"data.path={(e.tmp / 'none').mkdir() or e.tmp / 'none'}")),
    C("imagefolder-unreadable", "a .png that is not an image", "cannot read image",
      lambda e: e.train("data.name=imagefolder", f"data.path={e.data('not.png', 'text').parent}")),
    C("imagefolder-sizes", "images of two sizes", "set data.image_size to resize all",
      lambda e: e.train("data.name=imagefolder", f"data.path={images(e, [8, 8, 9])}")),
    C("cifar10-missing", "data.name=cifar10 with a path that holds no CIFAR-10", "cannot load CIFAR-10 from",
      lambda e: e.train("data.name=cifar10", f"data.path={e.tmp / 'cifar'}")),
    C("cifar10-no-path", "data.name=cifar10 without data.path", "cifar10 needs a data folder: set data.path=<folder>",
      lambda e: e.train("data.name=cifar10")),
    C("toy-no-train", "data.n_train=0", "data.n_train and data.n_test must be >= 1, got 0 and 100",
      lambda e: e.train("data.n_train=0")),
    C("batch-over-data", "train.batch_size=500 on 200 points (was: the failure locked the run name)",
      "train split has 200 items, fewer than one global batch (500 x 1 processes); lower train.batch_size",
      lambda e: e.train("train.batch_size=500"), keeps="no run folder; the corrected command can use the name",
      check=name_is_free),
    C("dequantize-continuous", "data.dequantize=true on 2D points",
      "data.dequantize needs quantised image data; '8gaussians' is continuous", lambda e: e.train("data.dequantize=true")),
    C("shift-continuous", "data.shift=2 on 2D points", "data.shift=2 needs image data", lambda e: e.train("data.shift=2")),
    # ---- the run folder: exists, resume, overwrite, failures after it was made
    C("run-exists", "train the same name again without a flag", "already exists; pass --resume to continue it, "
      "--overwrite to start over, or name=<new name>", lambda e: e.run() and e.train(), keeps="the finished run untouched"),
    C("resume-config-differs", "--resume with model.hidden changed", "config differs in model.hidden (only "
      "data.storage, data.workers, train.ckpt_every, train.log_every", lambda e: e.run() and [*e.train("model.hidden=32"), "--resume"],
      keeps="the finished run untouched"),
    C("overwrite-broken-config", "--overwrite with data.path=typo.npy (was: the finished run deleted first)",
      "does not exist; set data.path=... to a .npy", lambda e: e.run() and [*e.train("data.name=tabular", f"data.path={e.tmp / 'typo.npy'}"),
                                             "--overwrite"], keeps="the finished run untouched"),
    C("diverged-before-checkpoint", "a run whose loss becomes NaN before its first checkpoint",
      "stopped without saving. Last good checkpoint: none yet", lambda e: e.train(*DIVERGES),
      keeps="no run folder; the corrected command can use the name", check=name_is_free),
    C("overwrite-diverged", "--overwrite with a new config that diverges before its first checkpoint",
      "stopped without saving. Last good checkpoint: none yet", lambda e: e.run() and [*e.train(*DIVERGES), "--overwrite"],
      keeps="the old run put back whole, no .r.replaced left", check=old_run_kept),
    C("killed-rerun", "rerun a start that was killed before its first checkpoint",
      "exists but has no checkpoint (a start that was killed); pass --resume to start it again",
      lambda e: killed_before_first_checkpoint(e) and e.train(), keeps="the folder untouched"),
    C("killed-resume-other", "--resume it with another seed", "it has no checkpoint yet, so --overwrite loses nothing",
      lambda e: killed_before_first_checkpoint(e) and [*e.train("seed=3"), "--resume"], keeps="the folder untouched"),
    C("metrics-bad-middle", "--resume with a damaged line in the middle of metrics.jsonl",
      "metrics.jsonl, line 1: not valid JSON (Expecting ',' delimiter: line 1 column 12 (char 11)); repair or delete",
      lambda e: edit(e.run() / "metrics.jsonl", '{"step": 1 "loss": 2}\n{"step": 2}\n') and
      ["train", str(e.out / "r"), "--resume", "train.steps=4"], keeps="the run untouched"),
    C("metrics-torn-last", "--resume after a kill tore the last metrics line",
      "metrics.jsonl: dropped a torn last line (Unterminated string", torn_metrics, code=0,
      keeps="every complete line; one line per step afterwards", check=torn_line_dropped),
    C("killed-mid-rewrite", "--resume after a kill between the two renames of a checkpoint rewrite "
      "(was: \"names step_00000002, which does not exist\")", "resumed at step 2",
      lambda e: os.replace(e.run() / "checkpoints" / "step_00000002", e.ckpt().parent / ".step_00000002.previous")
      or ["train", str(e.out / "r"), "--resume", "train.steps=4"], code=0,
      keeps="the moved-aside checkpoint put back and resumed from", check=resumed_from_2),
    C("resume-moved", "mv runs/A runs/B, then train runs/B --resume", "resumed at step 2", moved, code=0,
      keeps="nothing recreated under the old name", check=old_name_not_recreated),
    C("out-dir-file", "out_dir=<a file>", "is a file, not a folder; choose another location",
      lambda e: e.train(f"out_dir={e.data('afile', 'x')}")),
    C("out-dir-read-only", "out_dir=<a read-only folder>", "(read-only or no permission); choose a writable folder",
      read_only, keeps="nothing written", check=restore_mode),
    C("disk-full-before", "train with less free disk than one checkpoint needs",
      "not enough free disk space for the next checkpoint in", no_free_space),
    C("disk-full-mid-run", "the disk fills up between checkpoints",
      "not enough free disk space for the next checkpoint (step 4) in", space_runs_out,
      keeps="checkpoint 2, no temp folder; --resume finishes", check=resumes_to(6)),
    C("write-fails", "a checkpoint write fails (torch: enforce fail at inline_container.cc)",
      "the last good checkpoint (step_00000002) is kept", write_fails,
      keeps="checkpoint 2, no temp folder; --resume finishes", check=resumes_to(6)),
    C("ctrl-c", "Ctrl-C during training", "interrupted at step 3; checkpoint saved, continue with --resume",
      ctrl_c_at_step_3, code=130, keeps="a checkpoint at step 3; --resume finishes", check=resumes_to(10)),
    C("init-from-missing", "train.init_from=<no such run>", "no checkpoint there (not a run directory written by",
      lambda e: e.train(f"train.init_from={e.tmp / 'nope'}")),
    C("teacher-unset", "method.coupling.name=nf_teacher without a teacher",
      "needs method.coupling.teacher = a trained teacher run directory", lambda e: e.train("method.coupling.name=nf_teacher")),
    C("teacher-missing", "method.coupling.teacher=<no such run>", "is not one",
      lambda e: e.train("method.coupling.name=nf_teacher", f"method.coupling.teacher={e.tmp / 'nope'}")),
    C("debug-traceback", "the same misspelt data set with --debug", "unknown data set 'nope'",
      lambda e: [*e.train("data.name=nope"), "--debug"], code=TRACEBACK, keeps="no run folder"),
    # ---- reading a run: sample, eval, nll, f2d2-eval
    C("sample-n-negative", "sample --n -5", "argument --n: expected a positive integer, got -5",
      lambda e: ["sample", str(e.run()), "--n", "-5"], keeps="the run untouched"),
    C("sample-n-zero", "sample --n 0 (was: silently drew 2000)", "argument --n: expected a positive integer, got 0",
      lambda e: ["sample", str(e.run()), "--n", "0"], keeps="the run untouched"),
    C("sample-steps-zero", "sample --steps 0", "argument --steps: expected a positive integer, got 0",
      lambda e: ["sample", str(e.run()), "--steps", "0"], keeps="the run untouched"),
    C("sample-solver", "sample --solver rk99", "unknown solver 'rk99'; choices: euler, heun",
      lambda e: ["sample", str(e.run()), "--solver", "rk99", "--device", "cpu"], keeps="the run untouched"),
    C("sample-grid", "sample --grid cubic", "argument --grid: invalid choice: 'cubic'",
      lambda e: ["sample", str(e.run()), "--grid", "cubic"], keeps="the run untouched"),
    C("sample-weights-best", "sample --weights best of a run trained without validation",
      "no best-on-validation weights under", lambda e: ["sample", str(e.run()), "--weights", "best"],
      keeps="the run untouched"),
    C("device-unknown", "sample --device foo (was: a torch traceback)",
      "device 'foo' is not a device: expected auto, cpu, cuda or cuda:<index>",
      lambda e: ["sample", str(e.run()), "--device", "foo"], keeps="the run untouched"),
    C("device-absent", "sample --device cuda:99", "device 'cuda:99' is not available",
      lambda e: ["sample", str(e.run()), "--device", "cuda:99"], keeps="the run untouched"),
    C("sample-out-under-file", "sample --out <a file>/x.png (was: FileExistsError traceback)",
      "is a file, not a folder; choose another location",
      lambda e: ["sample", str(e.run()), "--out", str(e.data("afile", "x") / "x.png")], keeps="the run untouched"),
    C("sample-missing-run", "sample a path that does not exist", "is not a run directory (no config.yaml)",
      lambda e: ["sample", str(e.tmp / "no-such-run")]),
    C("sample-folder-not-run", "sample a folder without config.yaml", "is not a run directory (no config.yaml)",
      lambda e: ["sample", str(e.tmp)]),
    C("config-yaml-broken", "sample a run whose config.yaml is torn (was: a YAML traceback)",
      "config.yaml', line 2, column 1: not valid YAML", lambda e: ["sample", str(edit(e.run() / "config.yaml",
                                                                                       "seed: [\n").parent)],
      keeps="the run untouched"),
    C("config-yaml-empty", "sample a run whose config.yaml is empty (was: TypeError traceback)",
      "config.yaml': model: a section with a `name` is required",
      lambda e: ["sample", str(edit(e.run() / "config.yaml", "").parent)], keeps="the run untouched"),
    C("config-yaml-key", "sample a run whose config.yaml has a key added by hand",
      "config.yaml': unknown key(s) bogus; valid keys here",
      lambda e: ["sample", str(edit(e.run() / "config.yaml", (e.built["good"] / "config.yaml").read_text()
                                    + "bogus: 1\n").parent)], keeps="the run untouched"),
    C("weights-bit-flip", "sample a run with one byte of model.safetensors flipped",
      "model.safetensors is corrupt (sha256 differs from the manifest)",
      lambda e: e.run() and damage(e.ckpt() / "model.safetensors") or ["sample", str(e.out / "r")],
      keeps="the run untouched"),
    C("weights-truncated", "sample a run with a truncated ema.safetensors",
      "ema.safetensors is truncated or corrupt (100 bytes, manifest says",
      lambda e: e.run() and damage(e.ckpt() / "ema.safetensors", keep=100) or ["sample", str(e.out / "r")],
      keeps="the run untouched"),
    C("manifest-missing", "sample a checkpoint without manifest.json", "has no manifest.json: it is incomplete",
      lambda e: e.run() and (e.ckpt() / "manifest.json").unlink() or ["sample", str(e.out / "r")],
      keeps="the run untouched"),
    C("manifest-torn", "sample a checkpoint whose manifest.json is cut short",
      "manifest.json is unreadable (", lambda e: e.run() and damage(e.ckpt() / "manifest.json", keep=50)
      or ["sample", str(e.out / "r")], keeps="the run untouched"),
    C("latest-dangling", "checkpoints/latest names a missing folder (was: refused, the run blocked)",
      "names step_00000099, which does not exist; using step_00000002, the newest complete checkpoint",
      lambda e: edit(e.run() / "checkpoints" / "latest", "step_00000099\n") and ["sample", str(e.out / "r")],
      code=0, keeps="the checkpoints untouched; samples written", check=samples_written),
    C("latest-none-left", "the run's only checkpoint folder deleted", "names step_00000002, which does not exist, "
      "and no other complete checkpoint is there: the run directory is incomplete; train it again with --overwrite",
      only_checkpoint_deleted, keeps="the run untouched"),
    C("no-checkpoint", "sample a run that has no checkpoint", "has no checkpoint yet; train it first",
      lambda e: ["sample", str(killed_before_first_checkpoint(e))], keeps="the folder untouched"),
    C("optimizer-corrupt", "--resume with a damaged optimizer.pt", "optimizer.pt is truncated or corrupt (7 bytes",
      lambda e: e.run() and damage(e.ckpt() / "optimizer.pt", keep=7) or
      ["train", str(e.out / "r"), "--resume", "train.steps=4"], keeps="the run untouched"),
    C("eval-steps-zero", "eval --steps 0,1", "argument --steps: step counts must be positive integers, got '0,1'",
      lambda e: ["eval", str(e.run()), "--steps", "0,1"], keeps="the run untouched"),
    C("eval-steps-text", "eval --steps a", "expected comma-separated integers such as 1,2,4,8, got 'a'",
      lambda e: ["eval", str(e.run()), "--steps", "a"], keeps="the run untouched"),
    C("eval-n-negative", "eval --n -5 (was: a torch.cat error)",
      "argument --n: expected an integer >= 0 (0: the default), got -5",
      lambda e: ["eval", str(e.run()), "--n", "-5"], keeps="the run untouched"),
    C("eval-grid", "eval --grid cubic", "unknown time grid 'cubic'; choices: linear, quadratic, geometric",
      lambda e: ["eval", str(e.run()), "--grid", "cubic", "--device", "cpu"], keeps="the run untouched"),
    C("eval-no-val", "eval --split val of a run without a validation split",
      "cannot score against split 'val' of data set '8gaussians'; choices: test, val, train (val needs data.val_fraction > 0 in the run's recipe)",
      lambda e: ["eval", str(e.run()), "--split", "val", "--device", "cpu"], keeps="the run untouched"),
    C("nll-no-val", "nll --split val of a run without a validation split (was: TypeError traceback)",
      "no 'val' split in this run's data; choices: train, test (val needs data.val_fraction > 0)",
      lambda e: ["nll", str(e.run()), "--split", "val", "--device", "cpu"], keeps="the run untouched"),
    C("nll-divergence", "nll --divergence bogus", "unknown divergence 'bogus'; choices: auto, exact, hutchinson",
      lambda e: ["nll", str(e.run()), "--divergence", "bogus", "--device", "cpu"], keeps="the run untouched"),
    C("nll-n-negative", "nll --n -3 (was: silently scored all but 3 points)",
      "argument --n: expected an integer >= 0 (0: the default), got -3",
      lambda e: ["nll", str(e.run()), "--n", "-3"], keeps="the run untouched"),
    C("f2d2-eval-fm-run", "f2d2-eval on a flow-matching run", "is a 'fm' run; f2d2-eval needs an f2d2 run",
      lambda e: ["f2d2-eval", str(e.run()), "--device", "cpu"], keeps="the run untouched"),
    C("f2d2-eval-batch", "f2d2-eval --batch-size 0", "argument --batch-size: expected a positive integer, got 0",
      lambda e: ["f2d2-eval", str(e.run()), "--batch-size", "0"], keeps="the run untouched"),
    # ---- coupling caches
    C("couplings-no-teacher-pairs", "couplings on a recipe with the independent coupling",
      "extracts teacher pairs: the recipe's method.coupling is 'independent', expected nf_teacher or nf_teacher_ot",
      lambda e: ["couplings", TOY, *TINY]),
    C("couplings-manifest-torn", "couplings again after its manifest.json was cut short",
      "manifest.json is unreadable (", lambda e: damage(e.cache() / "manifest.json", keep=300) or
      ["couplings", *e.student()[1:]], keeps="the cache untouched"),
    C("student-manifest-torn", "train a precomputed student on a cut-short cache manifest",
      "coupling cache manifest", lambda e: damage(e.cache() / "manifest.json", keep=300) or e.student(),
      keeps="no student folder, the cache untouched"),
    C("student-shard-damaged", "train a precomputed student on a cache with a damaged shard",
      "shard_00001.safetensors is missing or corrupt (sha256 mismatch)",
      lambda e: damage(e.cache() / "shard_00001.safetensors") or e.student(),
      keeps="no student folder, the cache untouched"),
    C("couplings-shard-repaired", "couplings again on a complete cache with a damaged shard (was: \"already complete\")",
      "shard_00001.safetensors missing or corrupt (sha256 differs from the manifest); recomputing them",
      lambda e: damage(e.cache() / "shard_00001.safetensors") or ["couplings", *e.student()[1:]], code=0,
      keeps="the shard recomputed; a student trains on the cache", check=cache_repaired),
    C("couplings-other-setup", "couplings into a cache folder of another setup",
      "already holds a coupling cache for another setup (draws: cache has 4, recipe needs 2)",
      lambda e: ["couplings", *e.student("method.coupling.draws=2", f"method.coupling.cache={e.cache()}")[1:]],
      keeps="the cache untouched"),
    C("student-no-cache", "train a precomputed student before `couplings` ran",
      "run `flowdistill couplings <recipe>` first, or set method.coupling.mode=online",
      lambda e: e.student("method.coupling.draws=2"), keeps="no student folder"),
    # ---- comparison and pipeline specs, the command line itself
    C("compare-missing", "compare nope.yaml", "comparison spec 'nope.yaml' not found", lambda e: ["compare", "nope.yaml"]),
    C("compare-no-students", "a comparison spec without students", "lists no students",
      lambda e: ["compare", spec(e, "out_dir: OUT\nstudents: []\n")]),
    C("compare-unknown-key", "a comparison spec with a misspelt key", "unknown key(s) studnets; valid keys here",
      lambda e: ["compare", spec(e, "studnets: [a]\n")]),
    C("compare-bad-student", "a comparison spec whose student recipe does not exist",
      "recipe 'recipes/none.yaml' not found", lambda e: ["compare", spec(e, "out_dir: OUT\nstudents: [recipes/none.yaml]\n")],
      keeps="no comparison folder"),
    C("run-missing", "run nope.yaml", "pipeline 'nope.yaml' not found", lambda e: ["run", "nope.yaml"]),
    C("run-stage-unknown", "run --only foo --plan (was: --plan ignored the bad stage)",
      "unknown stage 'foo'; stages: teacher, couplings, students", lambda e: ["run", PIPELINE, f"out_dir={e.out}",
                                                                          "--only", "foo", "--plan"]),
    C("run-from-after-until", "run --from report --until teacher", "--from report comes after --until teacher",
      lambda e: ["run", PIPELINE, f"out_dir={e.out}", "--from", "report", "--until", "teacher"]),
    C("run-unknown-key", "a pipeline override with a misspelt key", "unknown key(s) seedz; valid keys here",
      lambda e: ["run", PIPELINE, "seedz=[0]"]),
    C("run-no-teacher", "a pipeline without a teacher entry", "needs a teacher and a student entry",
      lambda e: ["run", PIPELINE, f"out_dir={e.out}", "teacher="]),
    C("run-f2d2-half", "a pipeline with f2d2_u but no f2d2_joint", "set both f2d2_u and f2d2_joint, or neither",
      lambda e: ["run", PIPELINE, f"out_dir={e.out}", "f2d2_joint="]),
    C("run-bad-student", "a pipeline whose student recipe does not exist", "recipe 'recipes/none.yaml' not found",
      lambda e: ["run", PIPELINE, f"out_dir={e.out}", "student=recipes/none.yaml"], keeps="no pipeline folder"),
    # ---- faults a wider probe found
    C("csv-bom", "nll --data on a CSV with a UTF-8 byte-order mark (was: its first row silently dropped)",
      "(50 points,", bom_csv, code=0, keeps="all 50 rows scored; only nll-file-bom.json/.csv and the cached reference added",
      check=nll_of_bom),
    C("data-fifo", "nll --data on a named pipe with no writer (was: hung for ever)",
      "pipe.csv' is a named pipe (FIFO), not a regular file; data must be a .npy, .npz or .csv file", fifo,
      keeps="the run untouched; the pipe never opened"),
    C("sample-too-large", "sample --n 200000000 with 1 GiB of memory available (was: started, looked like a hang)",
      "--n 200000000: the samples need about 11.9 GiB of memory while they are drawn and written, more than the "
      "1.0 GiB available; draw at most --n 16777216 at a time", little_memory, keeps="the run untouched"),
    C("sample-estimate", "sample --n 100000: a large draw is estimated first (with a progress bar while it runs)",
      "drawing 100,000 samples: about", lambda e: ["sample", str(e.run()), "--n", "100000", "--device", "cpu"],
      code=0, keeps="the checkpoints untouched; samples written", check=samples_written),
    C("manifest-outside", "a checkpoint manifest lists ../../../../secret.txt with its right hash (was: read, accepted)",
      "manifest.json names '../../../../data/secret.txt', which is outside", lambda e: manifest_names(
          e, "../../../../data/secret.txt"), keeps="the run untouched; the file outside never read"),
    C("manifest-absolute", "a checkpoint manifest lists an absolute path", "which is outside",
      lambda e: manifest_names(e, str(e.tmp / "data" / "secret.txt")), keeps="the run untouched"),
    C("weights-symlink-out", "model.safetensors is a link to a file outside the checkpoint",
      "manifest.json names 'model.safetensors', which is outside", symlinked_weights, keeps="the run untouched"),
    C("checkpoint-deleted", "--resume after the final checkpoint folder was deleted (was: refused, the run blocked)",
      "names step_00000002, which does not exist; using step_00000001, the newest complete checkpoint",
      final_checkpoint_deleted, code=0, keeps="resumed from step 1 to step 4", check=resumed_to_4),
    C("resume-moved-with-input", "mv runs moved (a run and the run it started from), then --resume it there "
      "(was: config differs in train.init_from)", "resumed at step 2", moved_with_input, code=0,
      keeps="the run finishes in its new place, reading its input there", check=moved_run_resumed),
    C("pipeline-moved", "the finished pipeline folder copied elsewhere, then run --plan there (was: 6 of 8 runs "
      "to retrain)", "6/7 evaluate: done", moved_pipeline, code=0, keeps="every run, the cache and the evaluation "
      "reused; nothing written", check=plan_all_done),
    C("evaluation-torn-plan", "run --plan with a cut-short evaluation-<key>.json (was: \"evaluate: done\", then a "
      "bare JSON error on every rerun)", "; it is recomputed)", lambda e: torn_evaluation(e, "--plan"), code=0,
      keeps="nothing written; report listed as to run after evaluate", check=report_after_evaluate),
    C("evaluation-torn-rerun", "run again with a cut-short evaluation-<key>.json", "; it is recomputed)",
      lambda e: torn_evaluation(e, "--from", "evaluate"), code=0,
      keeps="the evaluation recomputed to the same numbers; the report rewritten", check=evaluation_recomputed),
    C("evaluation-torn-report", "run --only report with a cut-short evaluation-<key>.json",
      "with its evaluate stage to recompute it", lambda e: torn_evaluation(e, "--only", "report"),
      keeps="nothing written"),
    C("couplings-disk-full", "couplings into a new cache on a full disk (was: a bare [Errno 28], an empty cache "
      "folder left)", "no space left on the disk while writing coupling cache", couplings_disk_full,
      keeps="no cache folder left"),
    C("evaluation-disk-full", "the pipeline's evaluation on a disk that fills up (was: a bare [Errno 28], a partial "
      "figures-<key>/ left)", "no space left on the disk while writing the evaluation in",
      evaluation_disk_full, keeps="no figures folder left; the runs untouched"),
    C("stale-temporary", "sample after a killed sample left .steps32-euler-linear.npz.<rand>.tmp (was: never cleaned)",
      "wrote", stale_temporaries, code=0, keeps="the old temporary removed; a fresh one (a write in progress) kept",
      check=stale_temporary_removed),
    C("sample-out-folder", "sample --out <a folder> (was: [Errno 21] naming the temporary file)",
      "data is a folder; pass a file path such as", lambda e: ["sample", str(e.run()), "--out",
                                                               str(e.data("x", "x").parent)], keeps="the run untouched"),
    C("seed-huge", "seed=2^70 (was: \"Overflow when unpacking long long\")",
      "seed=1180591620717411303424 is out of range: expected an integer that fits in 64 bits",
      lambda e: e.train(f"seed={2 ** 70}")),
    C("seed-negative", "seed=-1", "seed=-1 is out of range: expected an integer >= 0", lambda e: e.train("seed=-1")),
    C("n-train-huge", "data.n_train=10^12 (was: a traceback, cannot allocate 8 TB)",
      "data.n_train=1000000000000 is out of range: expected an integer <= 100000000",
      lambda e: e.train("data.n_train=1000000000000")),
    C("pipeline-run-locked", "run reaches a student another process is training (was: \"continue with --resume\")",
      "wait for it to finish or stop it, then rerun `flowdistill run", locked_student,
      keeps="nothing written; no lock left once the other process ends", check=released),
    C("pipeline-ctrl-c", "Ctrl-C while `flowdistill run` trains a student (was: \"continue with --resume\")",
      "interrupted at step 1; checkpoint saved, rerun `flowdistill run", pipeline_ctrl_c, code=130,
      keeps="a checkpoint at step 1; rerunning the pipeline finishes it", check=pipeline_rerun_finishes),
    C("couplings-locked", "couplings while another couplings extracts into the same cache (was: both computed "
      "every pair)", "is being extracted by another process (it holds", locked_cache,
      keeps="the cache untouched; no lock left once the other process ends", check=released),
    C("command-unknown", "flowdistill trian", "invalid choice: 'trian'", lambda e: ["trian"]),
    C("option-unknown", "train --bogus", "unrecognized arguments: --bogus", lambda e: [*e.train(), "--bogus"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, built, tmp_path, monkeypatch, capsys, request):
    """The user sees the row's message in one line and gets its exit code; the row's check holds afterwards."""
    env = Env(tmp_path, monkeypatch, built, request)
    with env.held:
        run_case(case, env, capsys)


def run_case(case: Case, env: Env, capsys: pytest.CaptureFixture) -> None:
    """Run one case in `env`: its command, its message and exit code, then its check."""
    tmp_path = env.tmp
    argv = case.argv(env)
    before = snapshot(tmp_path)
    capsys.readouterr()
    if case.code == TRACEBACK:
        with pytest.raises(Exception, match=re.escape(case.message)):
            main(argv)
        case.check(env, before)
        return
    with warnings.catch_warnings():  # printed to stderr as outside pytest, in the CLI's format
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        code = cli(argv)
    out, err = capsys.readouterr()
    seen = err if case.code == 2 else out + err
    assert case.message in seen, seen
    assert code == case.code, seen
    assert "Traceback" not in out + err
    env.seen = out + err; print("\nSEEN[" + case.id + "]" + (out + err).replace(str(tmp_path) + "/", "") + "ENDSEEN")
    if case.code == 2:  # one line: ours, or argparse's after its usage text
        lines = err.strip().splitlines()
        assert case.message in lines[-1] and re.match(r"flowdistill( [a-z0-9-]+)?: error: ", lines[-1]), err
        assert len(lines) == 1 or lines[0].startswith("usage:"), err
    case.check(env, before)


def test_every_case_is_in_the_reliability_table_with_its_message():
    """docs/reliability.md has a row for every case, and that row shows the case's message."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 6 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[2].replace("\\|", "|")
    assert len({c.id for c in CASES}) == len(CASES) >= 60
    missing = [c.id for c in CASES if c.id not in rows]
    assert not missing, f"cases missing from {DOC.name}: {missing}"
    differ = [c.id for c in CASES if c.message not in rows[c.id]]
    assert not differ, f"rows of {DOC.name} whose message lacks the case's fragment: {differ}"
