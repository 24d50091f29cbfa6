"""Config system: recipes, dotted overrides, unknown keys rejected with choices, round trip."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flowdistill.api import resolve_config
from flowdistill.components import CATALOG
from shared import config
from shared.config import ConfigError, RunConfig, apply_overrides, dump_yaml

CHOICES = CATALOG.config_choices()
ROOT = Path(__file__).resolve().parents[1]
SPECS = ("compare", "pipeline")  # file-name prefixes of specs of several runs, not run recipes (test_compare.py)
RECIPES = sorted(p for p in ROOT.glob("recipes/**/*.yaml") if not p.name.startswith(SPECS))
TOY = ROOT / "recipes" / "toy2d" / "fm_independent.yaml"
MINIBATCH_OT = ROOT / "recipes" / "digits" / "fm_minibatch_ot.yaml"


def load_recipe(path, overrides=None):
    """`shared.config.load_recipe` against the application's component tables."""
    return config.load_recipe(path, overrides, CHOICES)


def build_run_config(data):
    return config.build_run_config(data, CHOICES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates_and_round_trips(recipe):
    cfg = load_recipe(recipe)
    assert isinstance(cfg, RunConfig)
    again = build_run_config(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_overrides_set_nested_values_with_types():
    cfg = load_recipe(TOY, ["train.steps=17", "seed=3", "train.lr=1e-3", "eval.steps=[1,3]", "model.name=mlp",
                                   "model.hidden=32"])
    assert cfg.train.steps == 17 and cfg.seed == 3
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.eval.steps == (1, 3)
    assert cfg.model.hidden == 32


def test_recipe_name_defaults_to_folder_and_file(tmp_path):
    recipe = tmp_path / "toyset" / "myrun.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: {name: mlp}\nmethod: {name: fm}\n")
    assert load_recipe(recipe).name == "toyset-myrun"


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("model.widht=3", "model.widht"),
])
def test_unknown_keys_are_rejected_with_valid_choices(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_recipe(TOY, [override])
    assert fragment in str(err.value) and "valid keys" in str(err.value)


def test_unknown_model_and_method_names_list_choices():
    with pytest.raises(ConfigError, match="choices: .*mlp.*unet"):
        load_recipe(TOY, ["model.name=resnet"])
    with pytest.raises(ConfigError, match="choices: .*fm"):
        load_recipe(TOY, ["method.name=gan"])


def test_no_is_a_string_in_recipes_and_overrides_and_only_true_false_are_booleans(tmp_path):
    """`train.mixed_precision=no` (the spelling the divergence message suggests) is the string "no", from the
    command line and from a recipe file; a boolean field still takes true/false and refuses yes/no."""
    cfg = load_recipe(TOY, ["train.mixed_precision=no", "train.progress=false"])
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TOY.read_text().replace("\ntrain:\n", "\ntrain:\n  mixed_precision: no\n", 1))
    assert load_recipe(recipe).train.mixed_precision == "no"
    assert build_run_config(config.load_yaml(dump_yaml(load_recipe(recipe)))).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="progress"):
        load_recipe(TOY, ["train.progress=no"])


@pytest.mark.parametrize("override", ["train.steps=abc", "train.progress=3", "eval.steps=[1,x]"])
def test_wrong_types_are_rejected(override):
    with pytest.raises(ConfigError):
        load_recipe(TOY, [override])


def test_malformed_override_and_missing_recipe():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("recipes/none/nothing.yaml")
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize("old, new", [
    ("method.ot_reg=0.1", "method.coupling.reg"),
    ("method.sdot_iters=200", "method.coupling.iters"),
    ("method.teacher=runs/t", "method.coupling.teacher"),
    ("method.teacher_mode=precomputed", "method.coupling.mode"),
    ("method.teacher_draws=3", "method.coupling.draws"),
])
def test_old_flat_coupling_keys_say_where_they_moved(old, new):
    with pytest.raises(ConfigError, match="has moved") as err:
        load_recipe(MINIBATCH_OT, [old])
    assert f"{old.split('=')[0]} has moved" in str(err.value) and f"it is {new} now" in str(err.value)


def test_new_coupling_keys_are_accepted():
    cfg = load_recipe(MINIBATCH_OT, ["method.coupling.reg=0.1"])
    assert cfg.method.coupling.name == "minibatch_ot" and cfg.method.coupling.reg == pytest.approx(0.1)
    cfg = load_recipe(TOY, ["method.coupling.name=nf_teacher_ot", "method.coupling.teacher=runs/t",
                            "method.coupling.draws=3"])
    assert (cfg.method.coupling.name, cfg.method.coupling.teacher, cfg.method.coupling.draws) == \
        ("nf_teacher_ot", "runs/t", 3)
    with pytest.raises(ConfigError, match="method.coupling.reg.*valid keys"):
        load_recipe(TOY, ["method.coupling.reg=0.1"])  # the independent coupling has no reg


def test_plain_string_coupling_is_refused_with_the_section_spelling(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(MINIBATCH_OT, ["method.coupling=minibatch_ot"])
    assert "method.coupling.name=minibatch_ot" in str(err.value) and "write the choice as a section" in str(err.value)
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model: {name: mlp}\nmethod: {name: fm, coupling: nf_teacher}\n")
    with pytest.raises(ConfigError, match="method.coupling.name=nf_teacher"):
        load_recipe(recipe)


def test_unknown_coupling_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_recipe(MINIBATCH_OT, ["method.coupling.name=sinkhorn"])
    message = str(err.value)
    assert "unknown coupling 'sinkhorn'" in message
    assert "choices: independent, minibatch_ot, nf_teacher, nf_teacher_ot, semidiscrete_ot" in message


@pytest.mark.parametrize("override,match", [
    ("train.steps=0", "train.steps=0 is out of range: expected an integer >= 1"),
    ("train.steps=-5", "train.steps=-5 is out of range"),
    ("train.log_every=0", "train.log_every=0 is out of range"),
    ("train.ckpt_every=0", "train.ckpt_every=0 is out of range"),
    ("train.lr=-1", "train.lr=-1.0 is out of range: expected a number > 0"),
    ("eval.solver=rk99", "eval.solver='rk99' is out of range: expected one of euler, heun"),
    ("train.eval_every=100", "needs a validation split"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 is out of range"),
])
def test_out_of_range_values_are_refused_before_anything_runs(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        resolve_config(TOY, [override])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nmodel: {name: mlp\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml', line \d+, column \d+: not valid YAML"):
        resolve_config(bad, [])


def test_flow_map_backbone_is_its_own_section():
    recipe = ROOT / "recipes" / "digits" / "f2d2_u_mlp.yaml"
    cfg = resolve_config(recipe, ["model.backbone.hidden=64"])
    assert cfg.model.backbone.name == "mlp" and cfg.model.backbone.hidden == 64
    with pytest.raises(ConfigError, match=r"model.hidden has moved: it is model.backbone.hidden now"):
        resolve_config(recipe, ["model.hidden=64"])
    with pytest.raises(ConfigError, match=r"model.backbone.name=unet"):
        resolve_config(recipe, ["model.backbone=unet"])
