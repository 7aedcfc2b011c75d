"""Peer rows for the benchmark: the same checkpoint exported by ExecuTorch's OWN Llama exporter
(`executorch.examples.models.llama.export_llama`), measured exactly like our bundles.

    python -m bench.peers --checkpoint DIR --out DIR --bits 4 [--measure] [--check]    (from the repo root)

The checkpoint is renamed to Meta's llama keys and kept in Hugging Face layout; `use_hf_rope` makes
ET's transformer rotate-half like our reference (no q/k permutation needed). Before spending minutes
on the export, ET's eager model is checked against our reference logits, so a wrong conversion
fails fast instead of producing a fast-but-wrong peer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mobilellm.exporter.checkpoint import Checkpoint, load_checkpoint
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.measure import bench_prompt, current_rss, peak_rss, run_fresh_process, time_decode

REPO_ROOT = Path(__file__).resolve().parents[1]

TARGET = "executorch-llama-peer"
PTE_NAME = "model.pte"
CKPT_NAME = "consolidated.pth"
SIDECAR = "peer.json"
PARITY_TOL = 1e-3
# Llama2Model switches to its pre-quantized loaders when the checkpoint PATH contains these words.
_PATH_TRIGGERS = ("int8", "8da4w")


# ----------------------------------------------------------------------------- conversion
def et_state_dict(ckpt: Checkpoint) -> dict[str, Tensor]:
    """Our reference weights under ET's llama names (fp32; ET quantizes from the checkpoint dtype)."""
    sd = {k: v.detach().float().contiguous() for k, v in ckpt.model.state_dict().items() if not k.startswith("rope_")}
    out = {
        "tok_embeddings.weight": sd["embed_tokens.weight"],
        "norm.weight": sd["norm.weight"],
        # ET's llama has no weight tying: the output projection is a second copy of the table.
        "output.weight": ckpt.model.output_weight().detach().float().clone(),
    }
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(ckpt.config.n_layers):
        for ours, theirs in names.items():
            out[f"layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    return out


def et_params(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config
    return {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_dim": cfg.ffn_dim,  # explicit: ET would otherwise derive it from dim / multiple_of
        "use_hf_rope": True,  # HF rotate-half on HF-layout q/k weights
        "use_scaled_rope": False,
        "bos_idx": cfg.bos_id,
        "eos_idx": cfg.eos_id,
    }


@torch.no_grad()
def check_eager_parity(
    ckpt: Checkpoint, state: dict[str, Tensor], params: dict[str, Any], n_tokens: int = 12
) -> dict[str, float]:
    """Max |logit difference| of ET's eager transformer vs our reference: whole sequence without a
    cache, then prefill + 3 decode steps through ET's KV cache (exercises input_pos in the RoPE)."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    tokens = torch.from_numpy(bench_prompt(ckpt.config.vocab_size, n_tokens))[None]
    ref = ckpt.model(tokens)[0]
    result: dict[str, float] = {}
    for kv in (False, True):
        # enable_dynamic_shape: input_pos is the start position [1], as in the exported program
        args = ModelArgs(
            **params,
            max_seq_len=64,
            max_context_len=64,
            use_kv_cache=kv,
            enable_dynamic_shape=kv,
            generate_full_logits=not kv,
        )
        model = construct_transformer(args).eval()
        missing, _ = model.load_state_dict(state, strict=False)
        if [k for k in missing if k.endswith(".weight")]:
            raise UserError(f"ET llama expects weights the conversion did not produce: {missing[:5]}")
        if not kv:
            result["full_seq_max_abs"] = float((model(tokens)[0] - ref).abs().max())
            continue
        split = n_tokens - 3
        diffs = [(model(tokens[:, :split], {"input_pos": torch.tensor([0])})[0] - ref[split - 1]).abs().max()]
        for p in range(split, n_tokens):
            diffs.append((model(tokens[:, p : p + 1], {"input_pos": torch.tensor([p])})[0] - ref[p]).abs().max())
        result["kv_cache_max_abs"] = float(max(diffs))
    return result


# ----------------------------------------------------------------------------- export
def export_flags(bits: int, group_size: int, embedding_bits: int, max_seq_len: int) -> list[str]:
    """ET's documented XNNPACK Llama recipe (examples/models/llama README, Llama 3.2 on XNNPACK)."""
    flags = [
        "--model",
        "llama3",
        "-kv",
        "--use_sdpa_with_kv_cache",
        "-X",
        "--xnnpack-extended-ops",
        "-d",
        "fp32",
        "--max_seq_length",
        str(max_seq_len),
        "--max_context_length",
        str(max_seq_len),
    ]
    # dynamic prefill length is export_llama's default (--disable_dynamic_shape turns it off)
    if bits == 4:
        flags += ["-qmode", "8da4w", "--group_size", str(group_size)]
    elif bits == 8:
        # `-qmode 8da8w` is refused by export_llama's argparse (choices: int8 = weight-only,
        # 8da4w, 8da4w-gptq, 4w, torchao:8daNw = torchao kernels, which refuse -X). Its XNNPACK
        # 8-bit path is PT2E: int8 per-channel weights, dynamic int8 activations (no groups).
        flags += ["--pt2e_quantize", "xnnpack_dynamic"]
    elif bits != 16:
        raise UserError(f"--bits must be 4, 8 or 16 (fp32 weights), got {bits}")
    if embedding_bits == 8:
        flags += ["-E", "8,0"]  # int8 per row, as our exporter stores the table
    elif embedding_bits == 4:
        flags += ["-E", f"4,{group_size}"]  # group-wise, like our --embedding-bits 4
    elif embedding_bits != 16:
        raise UserError(f"--embedding-bits must be 4, 8 or 16, got {embedding_bits}")
    return flags


def export_executorch_llama_peer(
    checkpoint: Path, out_dir: Path, bits: int, group_size: int = 32, embedding_bits: int = 8, max_seq_len: int = 512
) -> Path:
    """Convert `checkpoint` to ET's llama format, check ET's eager model against our reference,
    run ET's exporter in a subprocess; returns the .pte path."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.config.sharing != "none":
        raise UserError(
            f"{checkpoint}: layer sharing ({ckpt.config.sharing}) has no equivalent in ExecuTorch's llama; "
            "the peer export supports only layer_sharing=false checkpoints"
        )
    out_dir = Path(out_dir).resolve()
    if any(t in str(out_dir) for t in _PATH_TRIGGERS):
        raise UserError(
            f"{out_dir}: ET's llama loader treats a checkpoint path containing {' or '.join(_PATH_TRIGGERS)} "
            "as pre-quantized; pick another output dir"
        )
    flags = export_flags(bits, group_size, embedding_bits, max_seq_len)  # bad bits fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    state, params = et_state_dict(ckpt), et_params(ckpt)
    parity = check_eager_parity(ckpt, state, params)
    if max(parity.values()) >= PARITY_TOL:
        raise UserError(f"ET eager llama disagrees with the reference ({parity}); conversion is wrong, not exporting")
    torch.save(state, out_dir / CKPT_NAME)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    del ckpt, state  # the exporter subprocess needs the memory more than we do

    metadata = json.dumps({"get_bos_id": params["bos_idx"], "get_eos_ids": [params["eos_idx"]]})
    cmd = [
        sys.executable,
        "-m",
        "executorch.examples.models.llama.export_llama",
        "--checkpoint",
        str(out_dir / CKPT_NAME),
        "--params",
        str(out_dir / "params.json"),
        *flags,
        "--metadata",
        metadata,
        "--output-dir",
        str(out_dir),
        "--output_name",
        PTE_NAME,
    ]
    t0 = time.perf_counter()
    with open(out_dir / "export.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir).returncode
    export_s = time.perf_counter() - t0
    pte = out_dir / PTE_NAME
    if rc != 0 or not pte.is_file():
        raise UserError(f"ExecuTorch's export_llama failed (exit {rc}); see {out_dir / 'export.log'}")
    (out_dir / SIDECAR).write_text(
        json.dumps(
            {
                "bits": bits,
                "group_size": group_size,
                "embedding_bits": embedding_bits,
                "max_seq_len": max_seq_len,
                "export_s": export_s,
                "eager_parity": parity,
                "command": cmd,
            },
            indent=2,
        )
        + "\n"
    )
    return pte


# ----------------------------------------------------------------------------- runtime
def open_pte(pte: Path) -> Any:
    """ET's llama program through our ExecuTorch runtime: same inputs as ours (tokens [1, S],
    input_pos [1]), last-position logits [1, V] (`forward_last` handles both shapes)."""
    from mobilellm.exporter.targets.executorch import ExecuTorchRuntime

    return ExecuTorchRuntime(pte)


def _max_context_len(pte: Path, side: dict[str, Any]) -> int:
    """The program's KV-cache length: the sidecar our export wrote, else the program's own
    `get_max_context_len` metadata method (read before any measurement starts)."""
    if "max_seq_len" in side:
        return int(side["max_seq_len"])  # export_flags passes it as --max_context_length
    from executorch.runtime import Runtime

    return int(Runtime.get().load_program(pte).load_method("get_max_context_len").execute([])[0])


def measure_pte(pte: Path, vocab_size: int, threads: int, prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """In-process measurement with mobilellm.exporter.measure.measure_bundle's keys (call in a fresh process)."""
    torch.set_num_threads(threads)
    pte = Path(pte)
    side = json.loads((pte.parent / SIDECAR).read_text()) if (pte.parent / SIDECAR).is_file() else {}
    max_context = _max_context_len(pte, side)
    base_rss = current_rss()
    t0 = time.perf_counter()
    runtime = open_pte(pte)
    load_s = time.perf_counter() - t0
    prompt = bench_prompt(vocab_size, min(prompt_tokens, max_context - decode_tokens - 1))
    time_decode(runtime, prompt[:8], 2)  # warm-up, as measure_bundle
    timing = time_decode(runtime, prompt, decode_tokens)
    return {
        "bundle": pte.parent.name,
        "target": TARGET,
        "bits": side.get("bits"),
        "threads": threads,
        "load_s": load_s,
        **timing,
        "peak_rss_bytes": peak_rss(),
        "rss_over_baseline_bytes": peak_rss() - base_rss,
        "artifact_bytes": pte.stat().st_size,
        "prompt_tokens": len(prompt),
        "decode_tokens": decode_tokens,
    }


@torch.no_grad()
def compare_pte_logits(pte: Path, checkpoint: Path, n_tokens: int = 24, decode: int = 8) -> dict[str, Any]:
    """The peer .pte vs our reference on a prompt and greedy continuation fed to both (teacher
    forcing with the reference's tokens): max |logit diff| and top-1 agreement per position."""
    ckpt = load_checkpoint(checkpoint)
    runtime = open_pte(pte)
    prompt = bench_prompt(ckpt.config.vocab_size, n_tokens)
    seq = torch.tensor(prompt.tolist() + ckpt.model.generate(prompt.tolist(), decode))[None]
    ref = ckpt.model(seq)[0].numpy()
    got = [runtime.forward_last(prompt, 0)[-1]] + [
        runtime.forward_last(seq[0, p : p + 1].numpy(), p)[-1] for p in range(n_tokens, seq.shape[1] - 1)
    ]
    ref_rows = ref[n_tokens - 1 : seq.shape[1] - 1]
    got_arr = np.stack(got)
    return {
        "positions": len(got),
        "max_abs": float(np.abs(got_arr - ref_rows).max()),
        "top1_agreement": float((got_arr.argmax(-1) == ref_rows.argmax(-1)).mean()),
    }


# ----------------------------------------------------------------------------- CLI
def measure_pte_subprocess(
    checkpoint: Path, out: Path, threads: int, prompt_tokens: int, decode_tokens: int
) -> dict[str, Any]:
    """measure_pte of OUT/model.pte in a fresh process (clean RSS baseline), as bench.speed times our bundles."""
    return run_fresh_process(
        "bench.peers",
        [
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--measure-only",
            "--threads",
            str(threads),
            "--prompt-tokens",
            str(prompt_tokens),
            "--decode-tokens",
            str(decode_tokens),
        ],
        pythonpath=[REPO_ROOT],
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Export a MobileLLM checkpoint with ExecuTorch's own Llama exporter (benchmark peer)"
    )
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output dir (the .pte is OUT/model.pte)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--embedding-bits", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--measure", action="store_true", help="benchmark the .pte (in a fresh process)")
    ap.add_argument("--check", action="store_true", help="compare the .pte's logits with the reference")
    ap.add_argument("--skip-export", action="store_true", help="reuse OUT/model.pte")
    ap.add_argument(
        "--measure-only", action="store_true", help=argparse.SUPPRESS
    )  # the fresh-process half of --measure
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    a = ap.parse_args()
    vocab = json.loads((a.checkpoint / "config.json").read_text())["vocab_size"]
    if a.measure_only:
        print(json.dumps(measure_pte(a.out / PTE_NAME, vocab, a.threads, a.prompt_tokens, a.decode_tokens)))
        return
    pte = (
        a.out / PTE_NAME
        if a.skip_export
        else export_executorch_llama_peer(a.checkpoint, a.out, a.bits, a.group_size, a.embedding_bits, a.max_seq_len)
    )
    side = json.loads((pte.parent / SIDECAR).read_text()) if (pte.parent / SIDECAR).is_file() else {}
    row: dict[str, Any] = {
        "pte": str(pte),
        "artifact_bytes": pte.stat().st_size,
        "export_s": side.get("export_s"),
        "eager_parity": side.get("eager_parity"),
    }
    if a.check:
        row["pte_vs_reference"] = compare_pte_logits(pte, a.checkpoint)
    if a.measure:
        row.update(measure_pte_subprocess(a.checkpoint, a.out, a.threads, a.prompt_tokens, a.decode_tokens))
    print(json.dumps(row))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a bad input is one line, not a traceback
        sys.exit(f"error: {exc}")
