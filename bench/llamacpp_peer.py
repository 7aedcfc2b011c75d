"""llama.cpp as a quality/size peer, run on the same weights and token ids as our exporter.

This module writes a GGUF file straight from a Hugging Face Llama directory
(``config.json`` + ``model.safetensors`` + ``tokenizer.json``), quantizes it with
llama.cpp's own quantizer, and measures perplexity / greedy continuations with
llama.cpp through ``llama-cpp-python``.  Token ids are always supplied by the
caller, so llama.cpp's tokenizer never decides what is measured.

Needs (not project dependencies): ``llama-cpp-python`` (builds llama.cpp from
source, CPU only) and ``gguf``; plus ``numpy``, ``safetensors`` and
``tokenizers``.

CLI::

    python -m bench.llamacpp_peer HF_DIR --out DIR [--text FILE] [--ctx 512] [--windows 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

#: Quant kinds accepted by :func:`quantize_gguf`, mapped to llama.cpp ftype constant names.
QUANT_KINDS: dict[str, str] = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}

# gguf token types (gguf.TokenType): NORMAL=1, USER_DEFINED=4, CONTROL=3.
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------- GGUF writing


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one.

    HF stores each head's rows as [first halves of the rotary pairs..., second halves...];
    llama.cpp (LLM_ARCH_LLAMA, "normal" RoPE) rotates adjacent pairs (2i, 2i+1).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_tokenizer_vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    """Read tokens, token types and merges from ``tokenizer.json`` (byte-level BPE)."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") not in (None, "BPE"):
        raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added: dict[int, dict[str, Any]] = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    if id_to_tok and max(id_to_tok) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(id_to_tok)} >= config vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in id_to_tok:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_USER_DEFINED)
        elif i in added:
            tokens.append(id_to_tok[i])
            types.append(_TOKEN_CONTROL if added[i].get("special", False) else _TOKEN_USER_DEFINED)
        else:
            tokens.append(id_to_tok[i])
            types.append(_TOKEN_NORMAL)
    merges_raw = model.get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges_raw]
    return tokens, types, merges, tok


def _tokenizer_adds_bos(hf_dir: Path, tok: dict[str, Any], bos_id: int | None) -> bool:
    """Whether the HF tokenizer itself prepends BOS (tokenizer_config.json, else the post-processor)."""
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if "add_bos_token" in cfg:
            return bool(cfg["add_bos_token"])
    post = tok.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and bos_id is not None:
        single = post.get("single", [])
        if single and "SpecialToken" in single[0]:
            special = post.get("special_tokens", {}).get(single[0]["SpecialToken"]["id"], {})
            return bos_id in special.get("ids", [])
    return False


def write_gguf_from_hf(
    hf_dir: Path,
    out_path: Path,
    *,
    dtype: str = "F32",
    tokenizer_pre: str = "smollm",
) -> Path:
    """Write a llama.cpp GGUF (architecture ``llama``) from a Hugging Face Llama directory.

    ``hf_dir`` must hold ``config.json`` (model_type "llama", tied embeddings),
    ``model.safetensors`` (HF key names, no ``lm_head``) and ``tokenizer.json``
    (byte-level BPE, GPT-2 style).  Weight matrices are written as ``dtype``
    ("F32", the default, or "F16"); norm vectors always stay F32.  q/k rows are
    permuted to llama.cpp's RoPE layout as ``convert_hf_to_gguf.py`` does for
    Llama.  Tokenizer metadata: model "gpt2", pre-tokenizer ``tokenizer_pre``
    ("smollm" for SmolLM/SmolLM2), tokens, types, merges, BOS/EOS (/PAD/UNK when
    known) and ``add_bos_token`` as the HF tokenizer does it.

    Returns ``out_path``.
    """
    import gguf
    from safetensors.numpy import load_file

    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    if dtype not in ("F32", "F16"):
        raise ValueError(f"dtype must be 'F32' or 'F16', not {dtype!r}")
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not 'llama'")
    n_embd = int(cfg["hidden_size"])
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads", n_head))
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    vocab_size = int(cfg["vocab_size"])
    bos_id = cfg.get("bos_token_id")
    eos_id = cfg.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if cfg.get("rope_scaling"):
        raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported by this writer")

    weights = load_file(str(hf_dir / "model.safetensors"))
    # Tied (no output.weight: llama.cpp then reuses token_embd as the output matrix) unless an
    # lm_head that differs from the embedding is present.
    tied = "lm_head.weight" not in weights or np.array_equal(
        weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    )

    tokens, toktypes, merges, tok_json = _load_tokenizer_vocab(hf_dir, vocab_size)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name(hf_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    if bos_id is not None:
        w.add_bos_token_id(int(bos_id))
    if eos_id is not None:
        w.add_eos_token_id(int(eos_id))
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(int(cfg["pad_token_id"]))
    unk = tok_json["model"].get("unk_token")
    if unk is not None and unk in tok_json["model"]["vocab"]:
        w.add_unk_token_id(int(tok_json["model"]["vocab"][unk]))
    w.add_add_bos_token(_tokenizer_adds_bos(hf_dir, tok_json, bos_id))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    mat_dtype = np.float32 if dtype == "F32" else np.float16

    def put(name: str, arr: np.ndarray, matrix: bool = True) -> None:
        a = np.ascontiguousarray(arr, dtype=mat_dtype if matrix else np.float32)
        w.add_tensor(name, a)

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        put(b + "attn_norm.weight", weights[p + "input_layernorm.weight"], matrix=False)
        put(b + "attn_q.weight", _rope_permute(weights[p + "self_attn.q_proj.weight"], n_head))
        put(b + "attn_k.weight", _rope_permute(weights[p + "self_attn.k_proj.weight"], n_head_kv))
        put(b + "attn_v.weight", weights[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        put(b + "ffn_norm.weight", weights[p + "post_attention_layernorm.weight"], matrix=False)
        put(b + "ffn_gate.weight", weights[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", weights[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", weights[p + "mlp.down_proj.weight"])
    put("output_norm.weight", weights["model.norm.weight"], matrix=False)
    if not tied:
        put("output.weight", weights["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


# --------------------------------------------------------------------------- quantization


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence file descriptor 2 (llama.cpp's quantizer also writes warnings with plain fprintf)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quantize_gguf(src: Path, dst: Path, kind: str, *, verbose: bool = False) -> Path:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's quantizer (2 threads).

    ``kind`` is one of "Q4_0", "Q4_K_M", "Q8_0" (llama.cpp's own mixed-type recipes:
    e.g. the tied token embedding and tensors whose row length is not a multiple of
    256 get other types; see :func:`gguf_tensor_type_counts`).  llama.cpp's per-tensor
    log goes to stderr only when ``verbose``.  Returns ``dst``.
    """
    import logging

    import llama_cpp

    if kind not in QUANT_KINDS:
        raise ValueError(f"kind must be one of {sorted(QUANT_KINDS)}, not {kind!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = getattr(llama_cpp, QUANT_KINDS[kind])
    # llama-cpp-python's log callback prints what passes this logger's level.
    log = logging.getLogger("llama-cpp-python")
    old_level = log.level
    log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        with contextlib.nullcontext() if verbose else _stderr_to_devnull():
            rc = llama_cpp.llama_model_quantize(
                str(src).encode("utf-8"), str(dst).encode("utf-8"), ctypes.byref(params)
            )
    finally:
        log.setLevel(old_level)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {kind}) returned {rc}")
    return dst


def gguf_tensor_type_counts(path: Path) -> dict[str, int]:
    """Count the tensors of each ggml type in a GGUF file (e.g. {"Q4_K": 120, "F32": 61})."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in r.tensors))


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Map each tensor name in a GGUF file to its ggml type name."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in r.tensors}


# --------------------------------------------------------------------------- evaluation


def _load(gguf_path: Path, n_ctx: int, n_threads: int) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


def _window_nll(llm: Any, window: list[int]) -> np.ndarray:
    """NLLs (float64) of window[1:], position t's logits predicting token t+1; fresh context."""
    n = len(window)
    llm.reset()  # n_tokens = 0: eval() drops the KV cache from position 0 on
    llm.eval(list(window))
    logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)  # rows 0..n-2
    m = logits.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    targets = np.asarray(window[1:], dtype=np.int64)
    return logz - logits[np.arange(n - 1), targets]


def llamacpp_perplexity(gguf_path: Path, windows: list[list[int]], n_threads: int = 2) -> float:
    """exp(mean NLL) of each window's tokens 1..n-1 given their prefix, by llama.cpp.

    Windows are token ids used as given (llama.cpp adds no BOS; prepend it yourself
    when wanted); each window is evaluated from an empty KV cache.  The mean is over
    all predicted tokens of all windows.  Log-softmax in float64.
    """
    if not windows or any(len(w) < 2 for w in windows):
        raise ValueError("need at least one window, each of at least 2 tokens")
    llm = _load(Path(gguf_path), max(len(w) for w in windows), n_threads)
    try:
        nll = np.concatenate([_window_nll(llm, w) for w in windows])
    finally:
        llm.close()
    return float(math.exp(nll.mean()))


def llamacpp_greedy(gguf_path: Path, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_ids`` by llama.cpp: the ``n_new`` new token ids.

    The prompt is used as given (no BOS added).  Ties resolve to the lowest id (numpy argmax).
    """
    llm = _load(Path(gguf_path), len(prompt_ids) + n_new, 2)
    out: list[int] = []
    try:
        llm.reset()
        llm.eval(list(prompt_ids))
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if len(out) == n_new:
                break
            llm.eval([nxt])
    finally:
        llm.close()
    return out


# --------------------------------------------------------------------------- CLI


def heldout_windows(tokenizer_json: Path, text: str, ctx: int, n_windows: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive windows of ``ctx`` tokens: BOS (if given) + ctx-1 (or ctx) text tokens each.

    The whole text is tokenized once with ``tokenizer.json`` (add_special_tokens=False).
    """
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    step = ctx - 1 if bos_id is not None else ctx
    if len(ids) < step * n_windows:
        raise ValueError(f"text has {len(ids)} tokens, need {step * n_windows}")
    head = [bos_id] if bos_id is not None else []
    return [head + ids[k * step : (k + 1) * step] for k in range(n_windows)]


def cmake_args(flags: Sequence[str] | None = None, force: bool = False) -> str:
    """CMAKE_ARGS building llama.cpp for this x86 CPU's SIMD features (or these /proc/cpuinfo `flags`), AMX excluded.

    llama-cpp-python 0.3.36 built with GGML_NATIVE (-march=native) segfaults in its first decode of a
    Q4_0 or Q4_K_M model on a CPU with AMX (its AMX weight buffers; seen on an AVX-512 VNNI + AMX Xeon);
    without AMX the AVX-512 / AVX2 repacked kernels run. Elsewhere (ARM, macOS; x86 without AMX unless
    `force`, as for an emulated CPU's flags) the native build is kept."""
    if flags is None:
        from mobilellm.exporter.measure import cpu_flags

        flags = cpu_flags()
    if "amx_int8" not in flags and not force:
        return ""
    features = {
        "AVX": "avx",
        "AVX2": "avx2",
        "FMA": "fma",
        "F16C": "f16c",
        "BMI2": "bmi2",
        "AVX_VNNI": "avx_vnni",
        "AVX512": "avx512f",
        "AVX512_VBMI": "avx512vbmi",
        "AVX512_VNNI": "avx512_vnni",
        "AVX512_BF16": "avx512_bf16",
    }
    on = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in features.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *on, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def main(argv: list[str] | None = None) -> int:
    """Write F32 + Q8_0/Q4_K_M/Q4_0 GGUFs from an HF dir; print sizes, tensor types and perplexity."""
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp_peer", description=main.__doc__)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output directory for the GGUF files")
    ap.add_argument(
        "--text", type=Path, default=Path(__file__).resolve().parents[1] / "exporter" / "assets" / "heldout.txt"
    )
    ap.add_argument("--ctx", type=int, default=512, help="window length in tokens, BOS included")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each window")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    cfg = json.loads((args.hf_dir / "config.json").read_text(encoding="utf-8"))
    bos = None if args.no_bos else cfg.get("bos_token_id")
    windows = heldout_windows(
        args.hf_dir / "tokenizer.json", args.text.read_text(encoding="utf-8"), args.ctx, args.windows, bos
    )

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    f32 = write_gguf_from_hf(args.hf_dir, args.out / "model-F32.gguf")
    print(f"wrote {f32} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    files = {"F32": f32}
    for kind in ("Q8_0", "Q4_K_M", "Q4_0"):
        t0 = time.perf_counter()
        files[kind] = quantize_gguf(f32, args.out / f"model-{kind}.gguf", kind)
        print(f"quantized {kind} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    rows = []
    print(f"{'kind':8} {'bytes':>12} {'MiB':>8} {'ppl':>10}  tensor types")
    for kind, path in files.items():
        t0 = time.perf_counter()
        ppl = llamacpp_perplexity(path, windows, n_threads=args.threads)
        types = gguf_tensor_type_counts(path)
        size = path.stat().st_size
        rows.append(
            {
                "kind": kind,
                "path": str(path),
                "bytes": size,
                "ppl": ppl,
                "tensor_types": types,
                "token_embd": gguf_tensor_types(path)["token_embd.weight"],
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{kind:8} {size:12d} {size / 2**20:8.2f} {ppl:10.4f}  {types}")
    if args.json:
        args.json.write_text(
            json.dumps({"hf_dir": str(args.hf_dir), "windows": [len(w) for w in windows], "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
