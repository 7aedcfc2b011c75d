"""Mixed precision: block selectors, the most specific one winning, and a sensitivity ranking read into
selectors that an export stores, its parity gate checks and `validate` rebuilds from the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.checkpoint import save_checkpoint
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.mixed_precision import more_bits_blocks, sensitive_layer_bits
from mobilellm.exporter.quantize import QuantScheme, WeightQuant

W4, W8, W16 = WeightQuant(4, group_size=32), WeightQuant(8, group_size=None), WeightQuant(16)


def test_the_most_specific_selector_wins() -> None:
    scheme = QuantScheme(
        linear=W4, embedding=W8, output=W8, overrides=(("w2@5", W16), ("w2", W8), ("w2@q4km", W4), ("wo@3", W8))
    )
    n = 30
    bits = {b: scheme.for_weight(f"blocks.{b}.w2.weight", n).bits for b in range(n)}
    assert bits[5] == 16  # block beats q4km beats every block
    assert all(bits[b] == 4 for b in more_bits_blocks(n) - {5})
    assert all(bits[b] == 8 for b in set(range(n)) - more_bits_blocks(n) - {5})
    assert [scheme.for_weight(f"blocks.{b}.wo.weight", n).bits for b in (2, 3, 4)] == [4, 8, 4]
    assert scheme.for_weight("blocks.3.w13.weight", n).bits == 4 and scheme.for_weight("output.weight", n).bits == 8


def _ranking(path: Path, bits: int = 4) -> Path:
    rows = [
        ("layers.2.mlp.down_proj", None),
        ("layers.1.self_attn.q_proj", 3),  # one application alone: not a weight of its own
        ("lm_head", None),  # the untied output projection: --output-bits' business
        ("layers.1.self_attn.q_proj", None),
        ("layers.1.self_attn.k_proj", None),  # fused: the same wqkv as q_proj
        ("layers.0.mlp.up_proj", None),
        ("layers.0.mlp.gate_proj", None),
    ]
    data = {"bits": bits, "rows": [{"layer": layer, "application": app} for layer, app in rows]}
    path.write_text(json.dumps(data))
    return path


def test_a_ranking_becomes_block_selectors(tmp_path: Path) -> None:
    ranking = _ranking(tmp_path / "sensitivity.json")
    assert sensitive_layer_bits(ranking, 3, 4, fuse=True) == (("w13@0", 8), ("w2@2", 8), ("wqkv@1", 8))
    assert sensitive_layer_bits(ranking, 2, 4, fuse=True) == (("w2@2", 8), ("wqkv@1", 8))
    assert sensitive_layer_bits(ranking, 4, 4, fuse=False) == (("w2@2", 8), ("w3@0", 8), ("wk@1", 8), ("wq@1", 8))
    assert sensitive_layer_bits(_ranking(tmp_path / "s8.json", 8), 1, 8, fuse=True) == (("w2@2", 16),)


@pytest.mark.parametrize(
    "content, layers, bits, message",
    [
        (
            None,
            8,
            4,
            "sensitivity file not found; write it with `mobilellm-export inspect CHECKPOINT --sensitivity --bits 4`",
        ),
        ("{not json", 8, 4, "not a sensitivity.json"),
        ('{"rows": []}', 8, 4, "not a sensitivity.json"),
        ('{"bits": 8, "rows": []}', 8, 4, "ranks 8-bit rounding but this export is 4-bit"),
        ('{"bits": 4, "rows": []}', 0, 4, "--sensitive-layers 0: pick at least 1 layer"),
        ('{"bits": 16, "rows": []}', 8, 16, "a 16-bit export has no more bits to give"),
    ],
)
def test_bad_rankings_are_refused(tmp_path: Path, content: str | None, layers: int, bits: int, message: str) -> None:
    path = tmp_path / "sensitivity.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sensitive_layer_bits(path, layers, bits, fuse=True)


def test_layer_bits_flag_takes_block_selectors(capsys: pytest.CaptureFixture[str]) -> None:
    from mobilellm.exporter.cli import parse_layer_bits

    assert parse_layer_bits(["w2=8", "w13@5=8", "wqkv@q4km=16"]) == {"w2": 8, "w13@5": 8, "wqkv@q4km": 16}
    for bad in ("w2@x=8", "w9=8", "w2@5=6", "w2"):
        with pytest.raises(UserError, match="expected SELECTOR=BITS"):
            parse_layer_bits([bad])


def _matmul_bits(bundle: Path) -> list[int]:
    graph = onnx.load(str(next(bundle.glob("*.onnx"))), load_external_data=False).graph
    return sorted(
        next(a.i for a in node.attribute if a.name == "bits") for node in graph.node if node.op_type == "MatMulNBits"
    )


def test_export_reads_a_sensitivity_ranking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect --sensitivity, then export with its two most sensitive layers at 8 bits: the graph stores them
    at 8 bits on top of the target's default (w2@q4km), parity passes, and validate rebuilds the scheme."""
    tokenizer = DEFAULT_MODEL_DIR / "tokenizer.model"
    ckpt = save_checkpoint(random_model(tiny_config(n_layers=2)), tmp_path / "tiny", tokenizer=tokenizer)
    code, _, err = run_cli(
        ["inspect", str(ckpt), "--sensitivity", "--tokens", "64", "--output", str(tmp_path / "s")], capsys
    )
    assert code == 0, err
    ranking = tmp_path / "s" / "sensitivity.json"
    picked = dict(sensitive_layer_bits(ranking, 2, 4, fuse=True))

    args = ["--checkpoint", str(ckpt), "--target", "onnx", "--bits", "4", "--max-seq-len", "32"]
    code, _, err = run_cli(
        [*args, "--output", str(tmp_path / "d"), "--sensitivity", str(ranking), "--sensitive-layers", "2"], capsys
    )
    assert code == 0, err
    bundle = tmp_path / "d" / "tiny-onnx-4bit"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["layer_bits"] == {"w2@q4km": 8, **picked}
    # Linears at 8 bits: the output projection (the 8-bit embedding), w2 of the q4km blocks, the picks.
    eight = {("w2", b) for b in more_bits_blocks(2)} | {tuple((s.split("@")[0], int(s.split("@")[1]))) for s in picked}
    assert len(eight) > 1  # the picks add weights beyond the default's
    assert _matmul_bits(bundle) == sorted([4] * (2 * 4 - len(eight)) + [8] * (1 + len(eight)))
    code, _, err = run_cli(
        ["validate", str(bundle), "--checkpoint", str(ckpt), "--report-dir", str(tmp_path / "r")], capsys
    )
    assert code == 0, err

    # A ranking of another model is refused before any work, in one line.
    other = save_checkpoint(random_model(tiny_config(n_layers=1)), tmp_path / "other", tokenizer=tokenizer)
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"bits": 4, "rows": [{"layer": "layers.1.mlp.down_proj", "application": None}]}))
    args = ["--checkpoint", str(other), "--target", "onnx", "--output", str(tmp_path / "o"), "--sensitivity", str(wide)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "block 1 picked for more bits, but the model has 1 blocks" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_recipe_names_its_ranking(tmp_path: Path) -> None:
    from mobilellm.exporter.recipe import export_options_from_recipe, load_recipe

    _ranking(tmp_path / "ranked.json")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\npreset = "125M"\n[export]\nsensitivity = "ranked.json"\nsensitive_layers = 1\nlayer_bits = {w2 = 8}\n'
    )
    quant = export_options_from_recipe(load_recipe(recipe)).quant
    assert quant.sensitive_layer_bits == (("w2@2", 8),)
    assert quant.resolved_layer_bits({}) == (("w2", 8), ("w2@2", 8))
    with pytest.raises(UserError, match="export.layer_bits: 'w2@last' is not ROLE"):
        recipe.write_text('[model]\npreset = "125M"\n[export]\nlayer_bits = {"w2@last" = 8}\n')
        load_recipe(recipe)
    with pytest.raises(UserError, match="--sensitive-layers needs --sensitivity"):
        export_options_from_recipe(None, sensitive_layers=3)
