"""`flowdistill run`: stage keys and reuse, stage selection, kill-and-rerun identity, the report, 2 processes."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowdistill.cli import main
from flowdistill.pipeline import Pipeline, select_stages
from flowdistill.pipeline_spec import load_pipeline
from flowdistill.runs import config_key
from shared.checkpoint import STALE_SECONDS
from shared.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "recipes" / "toy2d"
SMALL = "data.n_train=600 data.n_test=300 train.log_every=10 train.ckpt_every=10 train.progress=false"


def tiny_spec(tmp_path: Path, name: str = "p", **changes) -> Path:
    """A toy pipeline that trains in seconds: two couplings, one F2D2 chain, one compact flow, few samples."""
    spec = {
        "name": name, "out_dir": str(tmp_path),
        "teacher": f"{TOY / 'teacher.yaml'} train.steps=30 train.batch_size=128 model.blocks=2 {SMALL}",
        "student": f"{TOY / 'fm_independent.yaml'} train.steps=30 train.batch_size=128 model.hidden=32 {SMALL}",
        "couplings": ["independent", "nf_teacher"],
        "coupling_overrides": {"nf_teacher": ["method.coupling.draws=2", "method.coupling.shard=256"]},
        "f2d2_u": f"{TOY / 'f2d2_u.yaml'} train.steps=20 train.batch_size=128 model.backbone.hidden=32 {SMALL}",
        "f2d2_joint": f"{TOY / 'f2d2_joint.yaml'} train.steps=20 train.batch_size=128 model.backbone.hidden=32 {SMALL}",
        "f2d2_on": ["nf_teacher"],
        "compact": f"{TOY / 'tarflow_student_kd.yaml'} train.steps=20 train.batch_size=128 model.width=16 "
                   f"model.head_dim=16 model.blocks=1 method.mapping=[1] {SMALL}",
        "steps": [1, 2], "n_samples": 200, "curvature_steps": 8,
        "curvature_samples": 50, "nll_points": 50,
    }
    spec.update(changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def numbers(evaluation: dict) -> dict:
    """The evaluation's numbers without timings and without names that hold the output folder."""
    drop = re.compile(r"seconds|per_s|speedup|hardware|^run$|^runs$|^key$|^figures$|^reference$|^name$")

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not drop.search(k)}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(evaluation)


def test_keys_follow_the_config_and_the_inputs(tmp_path):
    base = Pipeline(load_pipeline(tiny_spec(tmp_path)))
    again = Pipeline(load_pipeline(tiny_spec(tmp_path)))
    assert [r.dir for r in base.students] == [r.dir for r in again.students]
    changed = Pipeline(load_pipeline(tiny_spec(tmp_path), ["teacher=" + base.spec.teacher.replace("steps=30", "steps=31")]))
    assert changed.teacher.key != base.teacher.key
    by_coupling = {r.role["coupling"]: r for r in changed.students}
    old = {r.role["coupling"]: r for r in base.students}
    assert by_coupling["independent"].key == old["independent"].key  # does not read the teacher
    assert by_coupling["nf_teacher"].key != old["nf_teacher"].key  # reads it: its config names the teacher dir
    assert all(a.key != b.key for a, b in zip(changed.f2d2, base.f2d2))  # downstream of the NFM student
    assert all(a.key != b.key for a, b in zip(changed.compact, base.compact))  # distilled from the teacher
    moved = Pipeline(load_pipeline(tiny_spec(tmp_path / "elsewhere")))  # the same spec in another folder
    assert [r.key for r in moved.trained_runs()] == [r.key for r in base.trained_runs()]
    assert moved.evaluation_key() == base.evaluation_key()
    cfg = base.teacher.config
    cfg_logging = Pipeline(load_pipeline(tiny_spec(tmp_path))).teacher.config
    cfg_logging.train.log_every = 7  # logging settings do not change what is trained
    assert config_key(cfg) == config_key(cfg_logging)


def test_stage_selection():
    assert select_stages() == ["teacher", "couplings", "students", "f2d2", "compact", "evaluate", "report"]
    assert select_stages(until="students") == ["teacher", "couplings", "students"]
    assert select_stages(start="f2d2") == ["f2d2", "compact", "evaluate", "report"]
    assert select_stages(only=["report", "teacher"]) == ["teacher", "report"]
    with pytest.raises(ConfigError, match="unknown stage 'studnets'"):
        select_stages(only=["studnets"])
    with pytest.raises(ConfigError, match="comes after"):
        select_stages(start="report", until="teacher")


def test_bad_specs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="f2d2_on"):
        load_pipeline(tiny_spec(tmp_path, f2d2_on=["minibatch_ot"]))
    with pytest.raises(ConfigError, match="both f2d2_u and f2d2_joint"):
        load_pipeline(tiny_spec(tmp_path, f2d2_joint=""))
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(ConfigError, match="compact stage needs method nf_kd"):
        Pipeline(load_pipeline(tiny_spec(tmp_path, compact=str(TOY / "teacher.yaml"))))
    with pytest.raises(ConfigError, match=r"pipeline steps \[3\]: a Shortcut F2D2 map"):
        Pipeline(load_pipeline(tiny_spec(tmp_path, steps=[1, 3])))


def test_compact_stage_plans_a_distilled_flow_and_its_undistilled_twin(tmp_path):
    pipeline = Pipeline(load_pipeline(tiny_spec(tmp_path, seeds=[0, 1])))
    assert [(r.role["variant"], r.role["seed"]) for r in pipeline.compact] == [
        ("distilled", "0"), ("undistilled", "0"), ("distilled", "1"), ("undistilled", "1")]
    for r in pipeline.compact:
        method = r.config.method
        assert method.name == "nf_kd" and method.teacher == str(pipeline.teacher.dir)
        weights = (method.nll_weight, method.latent_weight, method.intermediate_weight, method.synth_weight)
        assert (weights == (1, 0, 0, 0)) == (r.role["variant"] == "undistilled")
    assert len({r.dir for r in pipeline.compact}) == 4
    assert Pipeline(load_pipeline(tiny_spec(tmp_path, compact=""))).compact == []
    with_nfm = Pipeline(load_pipeline(tiny_spec(tmp_path, compact_nfm=True)))
    distilled, _, nfm = with_nfm.compact
    assert nfm.role == {"coupling": "nf_teacher_compact", "seed": "0"}
    assert nfm.config.method.coupling.teacher == str(distilled.dir) and nfm.config.method.coupling.mode == "online"
    assert nfm.config.model == with_nfm.students[0].config.model  # the same student as every coupling's
    assert with_nfm.coupling_students()[-1] is nfm


@pytest.mark.slow
def test_pipeline_runs_reuses_and_reports(tmp_path, capsys):
    spec = tiny_spec(tmp_path, compact_nfm=True)
    assert main(["run", str(spec), "--until", "students"]) == 0
    pipeline = Pipeline(load_pipeline(spec))
    assert all(r.status() == "done" for r in [pipeline.teacher, *pipeline.students])
    assert all(r.status() == "to run" for r in pipeline.f2d2) and not pipeline.evaluation_path().exists()
    capsys.readouterr()
    assert main(["run", str(spec), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "3/7 students: 2/2 runs done" in plan and "4/7 f2d2: 0/2 runs done" in plan
    assert "5/7 compact: 0/3 runs done" in plan
    mtimes = {r.dir: (r.dir / "checkpoints" / "latest").stat().st_mtime_ns for r in pipeline.students}
    first_timings = json.loads((pipeline.root / "timings.json").read_text())
    assert set(first_timings) == {"teacher", "couplings", "students"}
    assert main(["run", str(spec)]) == 0
    timings = json.loads((pipeline.root / "timings.json").read_text())
    assert {k: timings[k] for k in first_timings} == first_timings  # reused stages keep the time they took
    assert set(timings) == {"teacher", "couplings", "students", "f2d2", "compact", "evaluate"}
    assert {r.dir: (r.dir / "checkpoints" / "latest").stat().st_mtime_ns for r in pipeline.students} == mtimes
    evaluation = json.loads(pipeline.evaluation_path().read_text())
    report = (pipeline.root / "report" / "report.md").read_text()
    for row in evaluation["students"]:  # every number in the report is the JSON's
        assert f"{row['mean']:.4g}" in report
    for table in evaluation["f2d2"]:
        for row in table["rows"]:
            assert f"{row['nll']:.4g}" in report and f"{row['ref_nll']:.4g}" in report
    assert f"{evaluation['teacher']['value']:.4g}" in report
    for table in evaluation["f2d2"]:  # the teacher's exact NLL of the same points
        assert all(f"{row['nf_nll']:.4g}" in report for row in table["rows"])
    assert {r["student"] for r in evaluation["students"]} == {"independent", "nf_teacher", "nf_teacher_compact"}
    compact = {e["role"]: e for e in evaluation["compact"]["summary"]}
    assert list(compact) == ["teacher", "distilled", "undistilled"] and "## Compact flow by NF distillation" in report
    assert compact["teacher"]["params"] > compact["distilled"]["params"] == compact["undistilled"]["params"]
    assert compact["teacher"]["depth"] == 2 and compact["distilled"]["depth"] == 1 and compact["teacher"]["sample_speedup"] == 1
    for entry in compact.values():
        assert all(math.isfinite(entry[c]) for c in ("nll", "quality_t1", "quality_t07", "encode_per_s"))
        assert f"{entry['nll']:.4g}" in report and f"{entry['quality_t07']:.4g}" in report
    page = (pipeline.root / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "http" not in page
    assert main(["run", str(spec), "--only", "students"]) == 0  # reused: nothing retrains
    assert "to run" not in Pipeline(load_pipeline(spec)).plan()


def test_report_page_renders_in_headless_chromium(tmp_path):
    """The committed digits report (written by `flowdistill.report`) draws text and tables in a real browser."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium): the report's rendering is unchecked")
    from PIL import Image

    from flowdistill.report import screenshot

    png = screenshot(ROOT / "docs" / "pipeline_digits" / "report.html", tmp_path / "report.png", 900, 1200)
    with Image.open(png) as img:
        assert img.size == (900, 1200)
        colours = img.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # text and tables drawn on the white page


@pytest.mark.slow
def test_killed_pipeline_reruns_to_the_same_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flowdistill", "run"]
    straight = tiny_spec(tmp_path / "a")
    assert subprocess.run([*cmd, str(straight)], cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    killed = tiny_spec(tmp_path / "b")
    rng = random.Random(0)
    for _ in range(3):  # three kills at random moments, then a run to the end
        proc = subprocess.Popen([*cmd, str(killed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run([*cmd, str(killed)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a = Pipeline(load_pipeline(straight))
    b = Pipeline(load_pipeline(killed))
    assert numbers(json.loads(a.evaluation_path().read_text())) == numbers(json.loads(b.evaluation_path().read_text()))


KILL_IN_WRITE = """
import os, re, signal, sys
import shared.checkpoint as checkpoint
target, nth = re.compile(sys.argv[1]), int(sys.argv[2])
original, seen = checkpoint.atomic_write_via, []
def killing(path, write):
    if target.search(str(path)):
        seen.append(path)
        if len(seen) == nth:
            def killed_inside(tmp):
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path, killed_inside)
    return original(path, write)
checkpoint.atomic_write_via = killing
from flowdistill.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_pipeline_killed_inside_evaluation_and_report_writes_reruns_to_the_same_numbers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    light = {"f2d2_u": "", "f2d2_joint": "", "compact": ""}  # kills here come after training: keep training short
    straight = tiny_spec(tmp_path / "a", **light)
    assert main(["run", str(straight)]) == 0
    killed = tiny_spec(tmp_path / "b", **light)
    kills = [(r"figures-\w+/", 2), (r"evaluation-\w+\.json$", 1), (r"report/report\.md$", 1),
             (r"report/report\.html$", 1)]  # inside a figure, the evaluation JSON, the report's two files
    for pattern, nth in kills:
        proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, pattern, str(nth), "run", str(killed)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    time.sleep(STALE_SECONDS + 0.5)  # from then on, a temporary file nobody holds counts as left by a killed write
    assert main(["run", str(killed)]) == 0
    a, b = Pipeline(load_pipeline(straight)), Pipeline(load_pipeline(killed))
    assert numbers(json.loads(a.evaluation_path().read_text())) == numbers(json.loads(b.evaluation_path().read_text()))
    assert not list(b.root.rglob("*.tmp")), "temporary files of the killed writes left behind"
    assert sorted(p.name for p in b.root.glob("figures-*")) == [f"figures-{b.evaluation_key()}"]
    assert (b.root / "report" / "report.html").is_file() and "to run" not in b.plan()


@pytest.mark.slow
def test_two_process_pipeline_has_the_structure_of_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    spec = tiny_spec(tmp_path, couplings=["independent", "nf_teacher"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "flowdistill", "run", str(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    pipeline = Pipeline(load_pipeline(spec))
    evaluation = json.loads(pipeline.evaluation_path().read_text())
    assert [r["student"] for r in evaluation["students"]] == ["independent"] * 2 + ["nf_teacher"] * 2
    assert all(math.isfinite(r["mean"]) for r in evaluation["students"])
    assert all(math.isfinite(r["nll"]) for t in evaluation["f2d2"] for r in t["rows"])
    assert "2 process(es)" in out.stdout
    headings = [ln for ln in (pipeline.root / "report" / "report.md").read_text().splitlines() if ln.startswith("#")]
    assert headings[:4] == ["# flowdistill report: p", "## Findings", "## Teacher", "## Students: quality vs NFE"]


@pytest.mark.parametrize("spec", sorted((ROOT / "recipes").glob("*/pipeline.yaml")), ids=lambda p: p.parent.name)
def test_every_pipeline_recipe_plans(spec):
    pipeline = Pipeline(load_pipeline(spec))
    plan = pipeline.plan()
    assert plan.startswith(f"pipeline {pipeline.spec.name}") and "1/7 teacher" in plan
    assert {r.role["coupling"] for r in pipeline.students} == set(pipeline.spec.couplings)


def test_the_teacher_question_is_answered_by_the_dependency_interface():
    """Which couplings need a teacher comes from their configs' run_dependencies(), not from a list of names."""
    import flowdistill.pipeline as pipeline_module
    from flowdistill.components import COUPLINGS, needs_teacher

    assert {c for c in COUPLINGS if needs_teacher(c)} == {"nf_teacher", "nf_teacher_ot"}
    source = Path(pipeline_module.__file__).read_text()
    assert "NF_COUPLINGS" not in source and 'in ("nf_teacher"' not in source
