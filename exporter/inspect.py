"""`mobilellm-export inspect`: a human-readable description of a checkpoint."""

from __future__ import annotations

from pathlib import Path

from .assets import DEFAULT_MODEL_DIR
from .checkpoint import load_checkpoint
from .export_model import ExportModel, ExportSettings, graph_op_counts
from .memory import estimate_memory, human
from .quantize import describe_scheme
from .targets import TARGET_NAMES, TargetOptions, load_target


def describe(
    checkpoint: Path | None,
    config: str | None = None,
    max_seq_len: int = 512,
    ops: bool = True,
    detect_shared_blocks: bool = True,
) -> str:
    ckpt = load_checkpoint(checkpoint or DEFAULT_MODEL_DIR, config, detect_shared_blocks=detect_shared_blocks)
    cfg = ckpt.config
    max_seq_len = min(max_seq_len, cfg.max_context)
    sched = cfg.schedule()
    preview = ",".join(map(str, sched[:8])) + (",..." if len(sched) > 8 else "")
    unique = sum(p.numel() for p in ckpt.model.parameters())
    lines = [
        f"checkpoint      {ckpt.source} ({ckpt.source_format}, {ckpt.source_dtype})",
        f"architecture    dim {cfg.dim}, {cfg.n_layers} stored blocks, {cfg.n_applied} applied, "
        f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads (head_dim {cfg.head_dim}), ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}",
        f"layer sharing   {cfg.sharing} (block order {preview})",
    ]
    if ckpt.sharing_detected:
        lines.append(f"                detected: {ckpt.sharing_detected}")
    lines += [
        f"embedding       {'shared with output projection' if cfg.share_embedding else 'separate lm_head'}",
        f"rope / norm     theta {cfg.rope_theta:g}, rms eps {cfg.norm_eps:g}, max context {cfg.max_context}",
        f"parameters      {unique:,} unique, {cfg.applied_params():,} applied (as an unrolled, untied model)",
        f"tokenizer       {ckpt.tokenizer_path or 'none found (pass --tokenizer when exporting)'}",
        "memory          each target's default format (gptq on the shipped calibration text), weights stored once,",
        f"                + the fp16 KV cache of every block application at {max_seq_len} tokens:",
    ]
    for target in TARGET_NAMES:
        for bits in (4, 8, 16):
            scheme = load_target(target).quant_scheme(TargetOptions(bits=bits, max_seq_len=max_seq_len))
            est = estimate_memory(cfg, scheme, context=max_seq_len)
            lines.append(
                f"  {target:<10} {bits:>2}-bit  weights {human(est.weight_bytes):>9}, KV cache {human(est.kv_cache_bytes)}, "
                f"total {human(est.total_bytes):>9}  {describe_scheme(scheme)}"
            )
    if ops:
        lines.append("export graph    operator counts (torch.export, fused vs --no-fuse):")
        for fuse in (True, False):
            model = ExportModel.from_reference(
                ckpt.model, ExportSettings(max_seq_len=min(32, cfg.max_context), fuse=fuse)
            )
            counts = graph_op_counts(model)
            lines.append(
                f"  {'fused' if fuse else 'unfused':<13} {counts['total']} ops, {counts['linear']} linear, {counts['sdpa']} sdpa, "
                f"{counts['placeholders']} inputs (weights + caches + tokens)"
            )
    return "\n".join(lines)
