"""The one size model: what a bundle's bytes are made of, the minimum they are measured against, and RAM.

- `StorageBreakdown`: an artifact's bytes by kind (codes, scales, zero points, embedding table, norms, rope
  tables, graph), the same keys for every target; each target fills it from its own file.
- `minimum_weight_bytes`: the yardstick every size ratio uses (manifest, bench, README): each unique
  weight once at the export's nominal bits (linears and an untied output projection at `--bits`, the
  table at its embedding bits), norm gains at fp16; no scales, no graph. Layer sharing and a shared
  embedding cost nothing here, so `artifact / minimum` shows everything a format adds.
- `stored_weight_bytes`: what the weights take in a scheme's format (codes, scales, zero points), each
  shared weight once: the prediction `inspect` and the memory estimate print.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .config import ModelConfig
from .quantize import QuantizedModel, QuantizedWeight, QuantScheme, nbytes


@dataclass(frozen=True)
class StorageBreakdown:
    codes: int = 0  # quantized (or float) weight values of the linears (an untied lm_head included)
    scales: int = 0
    zero_points: int = 0
    embedding: int = 0  # the token-embedding table: its codes, scales and zero points together
    norms: int = 0  # RMSNorm gains
    rope_tables: int = 0
    graph: int = 0  # everything else in the artifact: program, metadata, alignment, copies a runtime needs

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zero_points + self.embedding + self.norms + self.rope_tables + self.graph

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    @classmethod
    def with_graph(cls, artifact_bytes: int, **parts: int) -> "StorageBreakdown":
        """The parts counted in the artifact, and the rest of its `artifact_bytes` as graph."""
        counted = cls(**parts)
        return cls(**parts, graph=max(0, artifact_bytes - counted.total))


def unique_linear_params(cfg: ModelConfig) -> int:
    return cfg.n_layers * (cfg.block_params() - 2 * cfg.dim)


def minimum_weight_bytes(cfg: ModelConfig, bits: int, embedding_bits: int) -> int:
    """Unique weights at the nominal bit widths, norms at fp16 (see the module docstring)."""
    table = cfg.vocab_size * cfg.dim
    linear_values = unique_linear_params(cfg) + (0 if cfg.share_embedding else table)
    return linear_values * bits // 8 + table * embedding_bits // 8 + norm_bytes(cfg, 2)


def size_report(cfg: ModelConfig, bits: int, embedding_bits: int, breakdown: StorageBreakdown) -> dict[str, Any]:
    """The `size` entry of every manifest: bytes by kind, the minimum, and their ratio."""
    minimum = minimum_weight_bytes(cfg, bits, embedding_bits)
    return {
        "artifact_bytes": breakdown.total,
        "breakdown": breakdown.to_dict(),
        "minimum_bytes": minimum,
        "over_minimum": round(breakdown.total / minimum, 4),
    }


def norm_bytes(cfg: ModelConfig, bytes_per_value: int) -> int:
    return (2 * cfg.n_layers + 1) * cfg.dim * bytes_per_value


def rope_table_bytes(cfg: ModelConfig, max_seq_len: int, bytes_per_value: int) -> int:
    return 2 * max_seq_len * cfg.head_dim * bytes_per_value


def quantized_storage(quantized: QuantizedModel) -> dict[str, int]:
    """Codes, scales and zero points of every stored weight as the quantizer produced them (each once)."""
    out = {"codes": 0, "scales": 0, "zero_points": 0, "embedding": 0}
    for name, value in quantized.weights.items():
        table = name == "tok_embeddings.weight"
        if not isinstance(value, QuantizedWeight):
            out["embedding" if table else "codes"] += value.numel() * value.element_size()
            continue
        bits = value.wq.bits
        parts = {
            "codes": value.codes.numel() * bits // 8,
            "scales": value.scales.numel() * value.wq.scale_dtype.itemsize,
            "zero_points": 0 if value.zeros is None else -(-value.zeros.numel() * bits // 8),
        }
        for kind, nbytes_ in parts.items():
            out["embedding" if table else kind] += nbytes_
    return out


def stored_weight_bytes(cfg: ModelConfig, scheme: QuantScheme) -> dict[str, int]:
    """Bytes every stored weight takes in `scheme`'s format (codes, scales, zero points; norms fp32),
    each shared weight once."""
    d, kv, ffn, vocab = cfg.dim, cfg.kv_dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {"wqkv": (d + 2 * kv, d), "wo": (d, d), "w13": (2 * ffn, d), "w2": (d, ffn)}
    blocks = sum(
        nbytes(rows, cols, scheme.for_weight(f"blocks.{b}.{role}.weight", cfg.n_layers))
        for b in range(cfg.n_layers)
        for role, (rows, cols) in shapes.items()
    )
    out = {
        "blocks": blocks,
        "norms": norm_bytes(cfg, 4),
        "embedding": nbytes(vocab, d, scheme.embedding),
        "output_projection": nbytes(vocab, d, scheme.output)
        if scheme.separate_output or not cfg.share_embedding
        else 0,
    }
    out["total"] = sum(out.values())
    return out


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def estimate_memory(
    cfg: ModelConfig, scheme: QuantScheme, context: int | None = None, kv_bytes_per_value: int = 2
) -> MemoryEstimate:
    """Weights stored once in `scheme`'s format (sharing aliased) plus the KV cache of every application."""
    context = context or cfg.max_context
    kv = cfg.n_applied * 2 * cfg.kv_dim * context * kv_bytes_per_value
    return MemoryEstimate(stored_weight_bytes(cfg, scheme)["total"], kv)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
