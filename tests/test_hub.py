"""Hugging Face ids as checkpoints: resolved from the local hub cache (laid out on disk here, offline),
and a one-line error naming the id and the cache when it is not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.checkpoint import load_checkpoint, save_checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding facebook/MobileLLM-Tiny at one revision, as huggingface_hub lays it out."""
    ckpt = save_checkpoint(
        random_model(tiny_config()), tmp_path / "src", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--MobileLLM-Tiny"
    shutil.copytree(ckpt, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache must be enough: no network in this test
    return cache


def test_hub_id_resolves_from_the_cache(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = load_checkpoint("facebook/MobileLLM-Tiny")
    assert ckpt.hub_id == "facebook/MobileLLM-Tiny" and ckpt.name == "MobileLLM-Tiny"
    assert ckpt.source == hub_cache / "models--facebook--MobileLLM-Tiny" / "snapshots" / REVISION
    assert ckpt.config == tiny_config()

    out = tmp_path / "dist"
    args = ["--checkpoint", "facebook/MobileLLM-Tiny", "--target", "onnx", "--bits", "8"]
    code, _, err = run_cli([*args, "--max-seq-len", "32", "--no-parity", "--output", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / "MobileLLM-Tiny-onnx-8bit" / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == "facebook/MobileLLM-Tiny"

    code, text, err = run_cli(["inspect", "facebook/MobileLLM-Tiny", "--no-ops"], capsys)
    assert code == 0 and str(hub_cache) in text, err


def test_unknown_hub_id_is_one_line(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--checkpoint", "facebook/MobileLLM-None", "--target", "onnx"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "facebook/MobileLLM-None: not in the Hugging Face cache" in err and str(hub_cache) in err


def test_a_local_folder_wins_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_checkpoint(random_model(tiny_config()), tmp_path / "facebook" / "MobileLLM-Tiny")
    ckpt = load_checkpoint("facebook/MobileLLM-Tiny")
    assert ckpt.hub_id is None and ckpt.source == Path("facebook/MobileLLM-Tiny")
