"""Size and memory estimates from a config alone (no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def linear_weight_bytes(n_weights: int, rows: int, bits: int, group_size: int) -> int:
    """Storage of a quantized linear weight: packed values plus one fp16 scale per group/row."""
    if bits == 16:
        return n_weights * 2
    if bits == 8:
        return n_weights + rows * 2
    return n_weights // 2 + (n_weights // group_size) * 2


def estimate_memory(
    cfg: ModelConfig,
    bits: int,
    context: int | None = None,
    group_size: int = 32,
    embedding_bits: int = 8,
    kv_bytes_per_value: int = 2,
) -> MemoryEstimate:
    """Weights stored once (sharing aliased, embedding shared) plus the KV cache of every application."""
    context = context or cfg.max_context
    per_block_linear = cfg.block_params() - 2 * cfg.dim
    rows_per_block = cfg.dim + 2 * cfg.kv_dim + cfg.dim + 2 * cfg.ffn_dim + cfg.dim
    weights = cfg.n_layers * (linear_weight_bytes(per_block_linear, rows_per_block, bits, group_size) + 2 * cfg.dim * 4)
    emb = cfg.vocab_size * cfg.dim
    weights += linear_weight_bytes(emb, cfg.vocab_size, embedding_bits, group_size)
    if not cfg.share_embedding:
        weights += linear_weight_bytes(emb, cfg.vocab_size, bits, group_size)
    weights += cfg.dim * 4
    kv = cfg.n_applied * 2 * cfg.kv_dim * context * kv_bytes_per_value
    return MemoryEstimate(weights, kv)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
