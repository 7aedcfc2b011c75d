"""Recipes: every file parses; unknown keys/values are refused by name; flags override; model checked."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.config import preset
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*.toml"))


def _export_choices(path: Path) -> tuple:
    recipe = load_recipe(path)
    return (
        tuple(
            sorted(
                (k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                for k, v in recipe.export.items()
                if k != "max_seq_len"
            )
        ),
        tuple(sorted(recipe.thresholds.items())),
    )


# Recipes differ in the model (checked by test_recipe_refuses_another_model) and in max_seq_len; the
# other export choices fall into a few groups, each exported once below.
RECIPE_GROUPS: dict[tuple, list[Path]] = {}
for _path in RECIPES:
    RECIPE_GROUPS.setdefault(_export_choices(_path), []).append(_path)


def test_one_recipe_per_model_target_bits() -> None:
    models = {p.parent.name for p in RECIPES}
    assert models == {
        "MobileLLM-125M",
        "MobileLLM-350M",
        "MobileLLM-600M",
        "MobileLLM-1B",
        "MobileLLM-1.5B",
        "MobileLLM-LS-125M",
        "MobileLLM-LS-350M",
    }
    assert len(RECIPES) == len(models) * 3 * 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    target, bits = path.stem.split("-")
    assert recipe.export["target"] == target and f"{recipe.export['bits']}bit" == bits
    assert recipe.export["max_seq_len"] <= recipe.config().max_context
    assert recipe.config() == preset(recipe.preset)
    assert recipe.thresholds  # every choice is written down, thresholds included


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown key export.grup_size"):
        load_recipe(_write(tmp_path, '[model]\npreset = "125M"\n[export]\ngrup_size = 32\n'))
    with pytest.raises(UserError, match=r"unknown section \[quant\]"):
        load_recipe(_write(tmp_path, '[model]\npreset = "125M"\n[quant]\nbits = 4\n'))


def test_bad_values_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="export.bits = 5 is not one of 4, 8, 16"):
        load_recipe(_write(tmp_path, '[model]\npreset = "125M"\n[export]\nbits = 5\n'))
    with pytest.raises(UserError, match="export.fuse must be bool"):
        load_recipe(_write(tmp_path, '[model]\npreset = "125M"\n[export]\nfuse = "yes"\n'))
    with pytest.raises(UserError, match="unknown preset"):
        load_recipe(_write(tmp_path, '[model]\npreset = "7B"\n'))
    with pytest.raises(UserError, match="unknown threshold 'twin.speed'"):
        load_recipe(_write(tmp_path, '[model]\npreset = "125M"\n[parity.thresholds]\n"twin.speed" = 1.0\n'))


def test_recipe_refuses_another_model(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = next(p for p in RECIPES if p.parent.name == "MobileLLM-125M" and p.stem == "onnx-4bit")
    code, _, err = run_cli(["--recipe", str(recipe), "--no-parity"], capsys)  # the embedded model is not 125M
    assert code == 2 and "the checkpoint is not MobileLLM-125M" in err and "dim 192 (recipe: 576)" in err


def test_flags_override_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options the CLI resolves: flag if given, else the recipe's value, else the default."""
    import mobilellm.exporter.pipeline as pipeline

    recipe = _write(
        tmp_path,
        '[model]\npreset = "125M"\n[export]\ntarget = "onnx"\nbits = 8\nmax_seq_len = 2048\n'
        '[parity.thresholds]\n"twin.top1_agreement" = 0.9\n',
    )
    seen: dict = {}
    monkeypatch.setattr(pipeline, "run_export", lambda options: seen.update(vars(options)) or [])
    code, _, err = run_cli(
        ["--recipe", str(recipe), "--bits", "4", "--max-seq-len", "256", "--threshold", "twin.min_cosine=0.9"], capsys
    )
    assert code == 0, err
    quant = seen["quant"]
    assert (quant.bits, seen["targets"], quant.max_seq_len, quant.group_size) == (4, ["onnx"], 256, 32)
    assert seen["thresholds"] == {"twin.top1_agreement": 0.9, "twin.min_cosine": 0.9}
    assert seen["recipe"].preset == "125M"


@pytest.mark.parametrize("recipes", list(RECIPE_GROUPS.values()), ids=lambda g: g[0].stem)
def test_recipe_exports_a_bundle_matching_the_schema(
    recipes: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each group's export choices, through `--recipe` as users run it, on a tiny checkpoint (the
    model check is lifted: real sizes are exported by `make bench`); the manifest meets the schema."""
    from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
    from mobilellm.exporter.checkpoint import save_checkpoint
    from mobilellm.exporter.recipe import Recipe

    ckpt = save_checkpoint(
        random_model(tiny_config(n_layers=1)), tmp_path / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )
    monkeypatch.setattr(Recipe, "check_matches", lambda self, cfg: None)
    recipe = load_recipe(recipes[0])
    code, out, err = run_cli(
        [
            "--recipe",
            str(recipes[0]),
            "--checkpoint",
            str(ckpt),
            "--max-seq-len",
            "64",
            "--no-parity",
            "--output",
            str(tmp_path / "dist"),
        ],
        capsys,
    )
    assert code == 0, err
    (bundle,) = [p for p in (tmp_path / "dist").iterdir() if not p.name.startswith(".")]  # beside .NAME.lock
    manifest = json.loads((bundle / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((ROOT / "exporter" / "schemas" / "manifest.schema.json").read_text()))
    assert bundle.name == f"{recipe.name}-{recipe.export['target']}-{recipe.export['bits']}bit"
    assert (manifest["target"], manifest["bits"], manifest["group_size"], manifest["embedding_bits"]) == (
        recipe.export["target"],
        recipe.export["bits"],
        recipe.export["group_size"],
        recipe.export["embedding_bits"],
    )
    assert manifest["max_context"] == 64  # the flag overrides the recipe
