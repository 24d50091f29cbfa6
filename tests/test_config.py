"""Config system: recipes, dotted overrides, unknown keys rejected with choices, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.config import ConfigError, RunConfig, apply_overrides, build_run_config, dump_yaml, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in ROOT.glob("recipes/**/*.yaml") if p.name != "compare.yaml")  # compare: test_compare.py
TOY = ROOT / "recipes" / "toy2d" / "fm_independent.yaml"


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
