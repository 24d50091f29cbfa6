"""The stage table: a new stage is one module plus one table line; stages are wired by the dependency interface."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from flowdistill.pipeline import Pipeline, run_pipeline, select_stages
from flowdistill.pipeline_spec import load_pipeline
from flowdistill.pipeline_stages import STAGES
from flowdistill.stage import Stage
from test_pipeline import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def with_stage(stage: Stage, before: str = "evaluate") -> tuple[Stage, ...]:
    """The table with `stage` inserted before `before`: the one line a new stage adds."""
    at = [s.name for s in STAGES].index(before)
    return (*STAGES[:at], stage, *STAGES[at:])


@pytest.mark.slow
def test_a_stage_added_in_one_file_plans_runs_scores_and_reports(tmp_path):
    from toy_stage import WIDE

    spec = load_pipeline(tiny_spec(tmp_path, f2d2_u="", f2d2_joint="", compact="", couplings=["independent"],
                                   f2d2_on=[], coupling_overrides={}, stage_options={"wide": {"hidden": 48}}))
    table = with_stage(WIDE)
    plain, pipeline = Pipeline(spec), Pipeline(spec, table)
    assert [r.key for r in pipeline.trained_runs() if r.stage != "wide"] == [r.key for r in plain.trained_runs()]
    assert pipeline.evaluation_key() != plain.evaluation_key()  # the new run's key is part of the evaluation's
    assert "6/8 wide: 0/1 runs done" in pipeline.plan()
    names = [s.name for s in table]
    run_pipeline(pipeline, select_stages(stages=names), log=lambda line: None)
    wide = pipeline.runs_of("wide")[0]
    assert wide.status() == "done" and wide.config.model.hidden == 48
    evaluation = json.loads(pipeline.evaluation_path().read_text())
    assert evaluation["wide"]["hidden"] == 48 and math.isfinite(evaluation["wide"]["value"])
    assert evaluation["runs"]["wide-s0"] == str(wide.dir)
    report = (pipeline.root / "report" / "report.md").read_text()
    headings = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert headings.index("## Wide student") == headings.index("## Sampling trajectories (2D)") + 1  # table order
    assert headings.index("## Wide student") < headings.index("## Samples")
    assert f"{evaluation['wide']['value']:.4g}" in report
    assert "to run" not in pipeline.plan()


def test_a_stage_whose_scores_clash_with_an_earlier_stage_is_refused(tmp_path):
    from flowdistill.pipeline_eval import evaluate_pipeline

    clashing = Stage("clash", score=lambda pipeline, ctx: {"teacher": {}})
    spec = load_pipeline(tiny_spec(tmp_path, f2d2_u="", f2d2_joint="", compact="", couplings=["independent"],
                                   f2d2_on=[], coupling_overrides={}))
    pipeline = Pipeline(spec, (STAGES[0], clashing))
    pipeline.teacher.ensure_trained()
    with pytest.raises(ValueError, match="stage 'clash' scores teacher, which an earlier stage already wrote"):
        evaluate_pipeline(pipeline)


def test_stage_names_come_from_the_table():
    names = [s.name for s in STAGES]
    assert select_stages() == names
    assert select_stages(until="students", stages=[*names[:3], "extra"]) == names[:3]
    from flowdistill.cli import build_parser

    only = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions if a.dest == "only")
    assert ", ".join(names) in re.sub(r"\s+", " ", only.help)  # the help lists the bundled stages, in order


def test_no_module_answers_the_teacher_question_by_coupling_names():
    """Which runs read a teacher is answered by the components' run_dependencies() alone: no list of coupling
    names, no attribute probing, no mode comparison stands in for it anywhere in the application layer."""
    offenders = []
    for path in sorted((ROOT / "flowdistill").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"NF_COUPLINGS", r"in \(\"nf_teacher\"", r"hasattr\(coupling, \"draws\"\)",
                        r"startswith\(\"nf_"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offenders == []


def test_a_finished_run_folder_is_the_teacher_as_it_is(tmp_path):
    """A teacher trained, imported or saved elsewhere is named by its folder: nothing retrains it, its students
    read it, and the evaluation's key follows its weights."""
    import flowdistill as fd
    from flowdistill.runs import ReadyRun
    from shared.config import ConfigError
    from test_pipeline import SMALL, TOY

    folder = fd.train(str(TOY / "teacher.yaml"), ["train.steps=10", "train.batch_size=64", "model.blocks=1",
                                                  f"out_dir={tmp_path}", "name=mine", *SMALL.split()])
    spec = tiny_spec(tmp_path, teacher=str(folder), f2d2_u="", f2d2_joint="", f2d2_on=[])
    pipeline = Pipeline(load_pipeline(spec))
    assert isinstance(pipeline.teacher, ReadyRun) and pipeline.runs_of("teacher") == []
    assert f"1/7 teacher: given ({folder})" in pipeline.plan()
    nfm = next(r for r in pipeline.students if r.role["coupling"] == "nf_teacher")
    assert nfm.config.method.coupling.teacher == str(folder) and nfm.dependencies() == {"teacher": str(folder)}
    assert all(r.config.method.teacher == str(folder) for r in pipeline.compact)
    key = pipeline.evaluation_key()
    fd.train(str(TOY / "teacher.yaml"), ["train.steps=12", "train.batch_size=64", "model.blocks=1",
                                         f"out_dir={tmp_path}", "name=mine", *SMALL.split()], resume=True)
    assert Pipeline(load_pipeline(spec)).evaluation_key() != key  # new weights, new evaluation
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot be used as it is"):
        Pipeline(load_pipeline(tiny_spec(tmp_path, teacher=str(tmp_path / "empty"))))
