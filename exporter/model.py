"""MobileLLM reference model in plain PyTorch: the source of truth every artifact is compared with.

Module names mirror the Hugging Face checkpoint keys (minus the leading `model.`), so a checkpoint
loads with a plain `load_state_dict`. Layer sharing is a schedule of stored-block indices; every
*application* of a block owns its own KV cache, exactly like the reference run with
`use_cache=False`, i.e. an unrolled 2N-layer model with tied weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """The one RMSNorm (reference and every target), kept in this exact form so backends can pattern-match it.

    Reduces in fp32 whatever the storage dtype, as the Hugging Face LlamaRMSNorm does; `weight=None` when
    the gain was folded into the next linear."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else normed * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_positions, head_dim] in the Hugging Face rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor, half: int | None = None) -> Tensor:
    # `half` as a Python int where the caller knows head_dim: traced shape arithmetic (x.shape[-1] // 2)
    # becomes NumToTensor/Int pairs that Core ML cannot convert.
    half = x.shape[-1] // 2 if half is None else half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, half: int | None = None) -> Tensor:
    """Hugging Face rotate-half RoPE; cos/sin broadcast against x ([B, H, S, D] with [S, D], or [B, S, H, D] with [S, 1, D])."""
    return x * cos + rotate_half(x, half) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        rep = self.n_heads // self.n_kv_heads
        keys, values = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Explicit softmax attention: the reference must not depend on any fused kernel.
        scores = (q @ keys.transpose(-1, -2)) / self.head_dim**0.5
        total = keys.shape[2]
        causal = torch.ones(seqlen, total, dtype=torch.bool, device=x.device).tril(total - seqlen)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), present


@dataclass
class KVState:
    """Per-application KV cache of the reference model (grows by concatenation)."""

    entries: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        first = self.entries[0] if self.entries else None
        return 0 if first is None else first[0].shape[2]


class MobileLLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.share_embedding else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_context, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens: Tensor, state: KVState | None = None) -> Tensor:
        """Logits [B, S, V] for `tokens` [B, S]; with `state`, continues from and extends it."""
        start = 0 if state is None else state.length
        seqlen = tokens.shape[1]
        if start + seqlen > self.config.max_context:
            raise ValueError(f"sequence of {start + seqlen} exceeds max context {self.config.max_context}")
        cos, sin = self.rope_cos[start : start + seqlen], self.rope_sin[start : start + seqlen]
        schedule = self.config.schedule()
        if state is not None and not state.entries:
            state.entries.extend([None] * len(schedule))
        h = self.embed_tokens(tokens)
        for slot, block_index in enumerate(schedule):
            past = None if state is None else state.entries[slot]
            h, present = self.layers[block_index](h, cos, sin, past)
            if state is not None:
                state.entries[slot] = present
        return F.linear(self.norm(h), self.output_weight())

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy generation with the incremental KV state."""
        state = KVState()
        logits = self(torch.tensor([prompt]), state)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id or state.length >= self.config.max_context:
                break
            logits = self(torch.tensor([[nxt]]), state)
        return out
