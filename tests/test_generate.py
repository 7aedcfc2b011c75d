"""`generate` runs each bundle with its runtime's own client (TextLLMRunner, onnxruntime-genai), and at
temperature 0 those clients produce exactly the tokens of the project's own greedy loop; every bundle
carries tokenizer.json; a byte-level BPE tokenizer (tokenizer.json only) works on every target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR, heldout_text
from mobilellm.exporter.checkpoint import load_checkpoint, save_checkpoint
from mobilellm.exporter.export_model import ExportModel
from mobilellm.exporter.generate import generate_from_bundle
from mobilellm.exporter.quantize import calibration_windows, fake_quantized_twin, quantize_model
from mobilellm.exporter.targets import GenerationRequest, load_target
from mobilellm.exporter.targets.base import sample_tokens
from mobilellm.exporter.validate import options_from_manifest
from mobilellm.validation.sequences import TorchRuntime

pytestmark = pytest.mark.xdist_group("default_bundles")

PROMPT = "And God said unto Moses"
NEW_TOKENS = 24


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _prompt_ids(bundle: Path, text: str = PROMPT) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    return [sp.bos_id(), *sp.encode(text)]


def _greedy(bundle: Path, prompt_ids: list[int]) -> list[int]:
    """The project's own greedy loop over the artifact, through the target's TargetRuntime."""
    manifest = _manifest(bundle)
    runtime = load_target(manifest["target"]).open_runtime(bundle, manifest)
    request = GenerationRequest(PROMPT, NEW_TOKENS)
    return sample_tokens(runtime, prompt_ids, request, tuple(manifest["eos_ids"]), manifest["max_context"])


def test_every_bundle_carries_tokenizer_json(default_bundles: dict[str, Path]) -> None:
    for target, bundle in default_bundles.items():
        manifest = _manifest(bundle)
        assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(manifest["files"]), target
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        assert tok.encode(PROMPT).ids == _prompt_ids(bundle), target  # BOS first, as the model was trained


def test_onnxruntime_genai_tokens_equal_the_greedy_loop_and_the_twin(default_bundles: dict[str, Path]) -> None:
    bundle = default_bundles["onnx"]
    pieces: list[str] = []
    result = generate_from_bundle(bundle, GenerationRequest(PROMPT, NEW_TOKENS), pieces.append)
    assert result.client.startswith("onnxruntime-genai")
    prompt = _prompt_ids(bundle)
    assert result.prompt_tokens == len(prompt)  # genai's tokenizer encoded BOS + the prompt
    assert result.token_ids == _greedy(bundle, prompt)
    assert result.text == "".join(pieces) and len(result.token_ids) == NEW_TOKENS

    # The fake-quant twin (the artifact's numbers in PyTorch) picks the same tokens.
    manifest = _manifest(bundle)
    opts = options_from_manifest(manifest)
    ckpt = load_checkpoint(DEFAULT_MODEL_DIR)
    model = ExportModel.from_reference(ckpt.model, opts.export_settings())
    scheme = load_target("onnx").quant_scheme(opts)
    twin = fake_quantized_twin(model, quantize_model(model, scheme, calibration_windows(ckpt, opts.method, 256)))
    request = GenerationRequest(PROMPT, NEW_TOKENS)
    assert sample_tokens(TorchRuntime(twin), prompt, request, (2,), 256) == result.token_ids


def test_genai_tokenizer_encodes_like_the_exporter(default_bundles: dict[str, Path]) -> None:
    import onnxruntime_genai as og

    bundle = default_bundles["onnx"]
    tokenizer = og.Tokenizer(og.Model(str(bundle)))
    tokenizer.update_options(add_special_tokens="true")  # what `generate` and the README tell apps to set
    lines = [line for line in heldout_text().splitlines() if line.strip()][:40]
    # Runs of spaces and tabs are where onnxruntime-genai's tokenizer and SentencePiece differ (README: generate).
    for line in lines + ["1234.5, and (punctuation)!"]:
        assert [int(i) for i in tokenizer.encode(line)] == _prompt_ids(bundle, line), line


def test_generate_cli_streams_the_runners_text(default_bundles: dict[str, Path], capsys) -> None:
    bundle = default_bundles["executorch"]
    code, out, err = run_cli(["generate", str(bundle), PROMPT, "--max-new-tokens", str(NEW_TOKENS)], capsys)
    assert code == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    greedy = _greedy(bundle, _prompt_ids(bundle))
    # TextLLMRunner streams each token's piece; nothing of the runner's own printing reaches stdout
    assert out == "".join(sp.id_to_piece(i).replace("▁", " ") for i in greedy) + "\n"
    (line,) = err.strip().splitlines()
    assert line.startswith("executorch TextLLMRunner: prompt 6 tokens") and f"{NEW_TOKENS} generated" in line


def test_generate_rejects_what_a_client_cannot_do(default_bundles: dict[str, Path], capsys) -> None:
    cases = [
        (["generate", str(default_bundles["coreml"]), PROMPT], "Core ML bundles run only on macOS 15+"),
        (["generate", str(default_bundles["onnx"]), PROMPT, "--max-new-tokens", "0"], "--max-new-tokens must be"),
        (
            ["generate", str(default_bundles["executorch"]), PROMPT, "--temperature", "0.7", "--top-p", "0.9"],
            "drop --top-p",
        ),
        (["generate", str(default_bundles["onnx"]), PROMPT, "--chat"], "has no chat template"),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_sampling_is_seeded(default_bundles: dict[str, Path]) -> None:
    bundle = default_bundles["onnx"]
    request = GenerationRequest(PROMPT, 12, temperature=0.9, top_p=0.95, seed=7)
    first = generate_from_bundle(bundle, request, lambda piece: None).token_ids
    assert first == generate_from_bundle(bundle, request, lambda piece: None).token_ids


def test_byte_level_bpe_tokenizer_works_on_every_target(tmp_path: Path, capsys) -> None:
    """A checkpoint whose only tokenizer is a byte-level BPE tokenizer.json (as SmolLM2's) exports to
    every target, and the runtimes' clients generate the greedy loop's tokens from it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = tiny_config(vocab_size=320)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        # ASCII bytes only: ExecuTorch's Python binding hands each piece to Python as str, and a random
        # model would otherwise emit lone UTF-8 continuation bytes (see the README's generate notes).
        initial_alphabet=[c for c in pre_tokenizers.ByteLevel.alphabet() if c.isascii() or c in "ĠĊ"],
    )
    tok.train_from_iterator(heldout_text().splitlines(), trainer)
    assert tok.get_vocab_size() == cfg.vocab_size
    source = tmp_path / "tok"
    source.mkdir()
    tok.save(str(source / "tokenizer.json"))
    ckpt = save_checkpoint(random_model(cfg), tmp_path / "bpe", tokenizer=source / "tokenizer.json")
    out = tmp_path / "dist"
    code, _, err = run_cli(
        ["--checkpoint", str(ckpt), "--target", "all", "--bits", "8", "--max-seq-len", "64", "--output", str(out)],
        capsys,
    )
    assert code in (0, 1), err  # random weights: the gate's verdict is not the point here
    for target in ("executorch", "onnx", "coreml"):
        (bundle,) = [
            p for p in out.iterdir() if p.name.endswith(f"{target}-8bit") or p.name.endswith(f"{target}-8bit.failed")
        ]
        assert _manifest(bundle)["tokenizer"] == "tokenizer.json"
        assert "tokenizer.json" in _manifest(bundle)["files"]
    prompt = "And God said"
    ids = [1, *tok.encode(prompt).ids]
    for target in ("executorch", "onnx"):
        (bundle,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and target in p.name]
        result = generate_from_bundle(bundle, GenerationRequest(prompt, 8), lambda piece: None)
        greedy = _greedy_ids(bundle, ids, 8)
        assert result.prompt_tokens == len(ids), target
        assert result.text == tok.decode(greedy), target
        if result.token_ids is not None:
            assert result.token_ids == greedy


def _greedy_ids(bundle: Path, prompt_ids: list[int], count: int) -> list[int]:
    manifest = _manifest(bundle)
    runtime = load_target(manifest["target"]).open_runtime(bundle, manifest)
    request = GenerationRequest("", count)
    out = sample_tokens(runtime, prompt_ids, request, tuple(manifest["eos_ids"]), manifest["max_context"])
    return [int(t) for t in np.asarray(out)]
