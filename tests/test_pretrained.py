"""The shipped teachers: hashes, cards, sizes, their configs equal to their recipes, `pretrained:<name>` wherever a
run is named, a damaged copy refused; recipes reachable by name from any folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flowdistill.api import load_run, resolve_config, train
from flowdistill.cli import main
from flowdistill.components import CATALOG, PRETRAINED
from flowdistill.packed import CARD, read_card
from flowdistill.pipeline import Pipeline
from flowdistill.pipeline_spec import load_pipeline
from flowdistill.runs import ReadyRun
from flowdistill.recipes import BUNDLED_ROOT, pipeline_spec, resolve_recipe
from nfm.coupling_cache import cache_dir_of
from shared.checkpoint import CheckpointError, verify_checkpoint
from shared.config import ConfigError, flatten, to_dict

ROOT = Path(__file__).resolve().parents[1]
CARD_KEYS = ("recipe", "command", "data_fingerprint", "test_bits_per_dim", "sample_fd", "sample_fd_n", "features",
             "parameters", "train_seconds", "machine")
UNSTORED = ("name", "out_dir")  # cleared when a run is packed


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_shipped_files_verify_and_fit_the_size_limits(name):
    folder = PRETRAINED[name]
    manifest = verify_checkpoint(folder)  # every file's sha256 and size
    assert set(manifest["files"]) == {"config.yaml", "model.safetensors", CARD}
    assert all(p.stat().st_size <= 8 * 2 ** 20 for p in folder.iterdir())
    total = sum(p.stat().st_size for f in PRETRAINED.values() for p in f.iterdir())
    assert total <= 25 * 2 ** 20


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_card_states_its_figures_and_recipe(name):
    card = read_card(PRETRAINED[name])
    missing = [k for k in CARD_KEYS if k not in card]
    assert not missing, f"model card of {name} lacks {missing}"
    assert card["parameters"] == sum(p.numel() for p in load_run(f"pretrained:{name}").model.parameters())
    assert card["command"].split()[-1] == card["recipe"]
    assert card["data_fingerprint"] == load_run(f"pretrained:{name}").dataset.base_fingerprint


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_shipped_config_is_its_recipe_retrained(name, tmp_path):
    """A few steps of the card's recipe write the same config as the shipped one (but for name, folder, steps)."""
    recipe = read_card(PRETRAINED[name])["recipe"]
    run_dir = train(resolve_config(ROOT / recipe, [f"out_dir={tmp_path}", "name=again", "train.steps=2",
                                                   "train.progress=false", "train.sample_grid=false",
                                                   "train.eval_every=1", "train.ckpt_every=2"]))
    again = flatten(to_dict(resolve_config(run_dir)))  # both with today's defaults for keys added since
    shipped = flatten(to_dict(resolve_config(PRETRAINED[name])))
    differ = {k for k in set(again) | set(shipped) if again.get(k) != shipped.get(k)}
    assert differ <= {*UNSTORED, "train.steps", "train.eval_every", "train.ckpt_every", "train.progress",
                      "train.sample_grid"}


def test_pretrained_name_loads_and_unknown_names_are_refused():
    run = load_run("pretrained:digits-tarflow")
    assert run.dir == PRETRAINED["digits-tarflow"] and run.config.model.name == "tarflow"
    with pytest.raises(ValueError, match="names no shipped run; pretrained runs: digits-tarflow"):
        CATALOG.resolve_run("pretrained:nope")


def test_a_damaged_copy_is_refused(tmp_path):
    copy = shutil.copytree(PRETRAINED["digits-tarflow"], tmp_path / "copy")
    load_run(copy)  # an intact copy loads from any folder
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_run(copy)


def test_pipeline_on_a_shipped_teacher_plans_no_teacher_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDISTILL_CACHE", str(tmp_path / "cache"))
    spec = load_pipeline(ROOT / "recipes" / "digits" / "pipeline.yaml", [f"out_dir={tmp_path}"])
    pipeline = Pipeline(spec)
    assert isinstance(pipeline.teacher, ReadyRun) and pipeline.runs_of("teacher") == []
    assert "teacher: shipped (pretrained:digits-tarflow)" in pipeline.plan()
    nfm = next(r for r in pipeline.students if r.role["coupling"] == "nf_teacher")
    assert nfm.config.method.coupling.teacher == "pretrained:digits-tarflow"  # the key holds no install path
    assert cache_dir_of(nfm.config.method.coupling).is_relative_to(tmp_path / "cache")  # not inside the package
    other = Pipeline(load_pipeline(ROOT / "recipes" / "digits" / "pipeline.yaml", [f"out_dir={tmp_path / 'moved'}"]))
    assert [r.key for r in other.students] == [r.key for r in pipeline.students]


def test_recipes_resolve_from_the_spec_folder_then_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here: bundled recipes are still found
    assert resolve_recipe("recipes/digits/teacher.yaml") == BUNDLED_ROOT / "digits" / "teacher.yaml"
    (tmp_path / "mine").mkdir()
    own = tmp_path / "mine" / "teacher.yaml"
    own.write_text("seed: 1\n")
    assert resolve_recipe("teacher.yaml", tmp_path / "mine") == own  # next to the spec that names it
    assert pipeline_spec("digits") == BUNDLED_ROOT / "digits" / "pipeline.yaml"
    with pytest.raises(ConfigError, match="not found .*flowdistill recipes"):
        resolve_recipe("recipes/digits/none.yaml")
    with pytest.raises(ConfigError, match="bundled pipeline name"):
        pipeline_spec("nowhere")


def test_pretrained_and_recipes_commands(capsys):
    assert main(["pretrained", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "pretrained:digits-tarflow" in out and " ok: " in out and "recipes/digits/teacher.yaml" in out
    assert main(["recipes"]) == 0
    assert "recipes/digits/pipeline.yaml" in capsys.readouterr().out


@pytest.mark.slow
def test_digits_pipeline_on_the_shipped_teacher_reports_findings_from_its_evaluation(tmp_path, monkeypatch):
    """The main job at tiny budgets: no teacher training, and the report's verdicts are those of its JSON."""
    import json

    from flowdistill.findings import findings

    monkeypatch.setenv("FLOWDISTILL_CACHE", str(tmp_path / "cache"))
    tiny = "train.steps=4 train.batch_size=32 train.ckpt_every=4 train.progress=false train.sample_grid=false"
    overrides = [f"out_dir={tmp_path}", f"student=fm_mlp.yaml data.dequantize=false model.hidden=32 {tiny}",
                 "couplings=[minibatch_ot,nf_teacher]", "coupling_overrides={}", "seeds=[0,1]", "f2d2_u=",
                 "f2d2_joint=", "f2d2_on=[]", "compact=", "compact_init=false", "steps=[1,2]", "n_samples=60",
                 "curvature_samples=10", "curvature_steps=4"]
    assert main(["run", "digits", *overrides]) == 0
    pipeline = Pipeline(load_pipeline(pipeline_spec("digits"), overrides))
    assert not list((tmp_path / "digits-pipeline" / "runs").glob("teacher-*"))  # nothing trained for the teacher
    result = json.loads(pipeline.evaluation_path().read_text())
    assert result["teacher"]["run"] == "pretrained:digits-tarflow" and result["teacher"]["card"]["sample_fd_500"]
    report = (pipeline.root / "report" / "report.md").read_text()
    for f in findings(result):
        assert f"| {f.claim} |" in report and f"| {f.verdict.upper()} |" in report
    assert report.index("## Findings") < report.index("## Teacher")
