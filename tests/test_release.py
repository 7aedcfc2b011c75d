"""Recipes for models that are no preset: `[model] config` names the model's config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.recipe import load_recipe


def test_recipe_config_file(tmp_path: Path) -> None:
    """`[model] config` names a config.json (relative to the recipe) for a model that is no preset."""
    from mobilellm.exporter.checkpoint import config_to_hf

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
    (tmp_path / "r").mkdir()
    recipe = tmp_path / "r" / "onnx-4bit.toml"
    recipe.write_text('[model]\nname = "Tiny"\nconfig = "../m/config.json"\n[export]\ntarget = "onnx"\n')
    assert load_recipe(recipe).config() == tiny_config()
    for model, error in [
        ('name = "Tiny"\npreset = "125M"\nconfig = "../m/config.json"', "exactly one of preset"),
        ('name = "Tiny"', "exactly one of preset"),
        ('config = "../m/config.json"', "model.name is required"),
        ('name = "Tiny"\nconfig = "missing.json"', "config file not found"),
    ]:
        recipe.write_text(f"[model]\n{model}\n")
        with pytest.raises(UserError, match=error):
            load_recipe(recipe)
