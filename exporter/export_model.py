"""The export-ready module every target lowers: fused, unrolled, weight-aliased, static KV cache.

- Fusion: Q/K/V in one linear and gate/up in one linear, built by a load hook from the checkpoint's
  separate projections (gpt-fast style); RMSNorm as one function; attention through
  `scaled_dot_product_attention`.
- Layer sharing: `forward` is straight-line code over the schedule (e.g. 0,0,1,1,... for immediate
  sharing). Each application calls the *same* block module, so every shared weight is one
  parameter (one storage) in the module and one placeholder in an exported graph, while each
  application owns its own KV-cache buffers.
- Static KV cache: `[1, n_kv_heads, max_seq_len, head_dim]` buffers updated in place at
  `input_pos`, so prefill (dynamic length) and decode are the same program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import UserError
from .model import MobileLLM, apply_rope, rms_norm, rope_tables


@dataclass(frozen=True)
class ExportSettings:
    max_seq_len: int = 512
    fuse: bool = True  # fused QKV and gate/up linears
    fold_norm_gains: bool = False  # fold RMSNorm gains into the following linear (exact in real arithmetic)
    gqa: str = "repeat"  # "repeat": repeat K/V heads; "sdpa": let SDPA broadcast (enable_gqa), no copy
    dtype: torch.dtype = torch.float32
    # Project only the last position: what a generation runner reads. A [S, vocab] output is
    # memory-planned at S = max_seq_len - 1 (fp32: 62 MB at 125M / 512 context, 250 MB at 2048).
    last_logits_only: bool = False


KVUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Store one step's k/v [1, n_kv_heads, S, head_dim] in a cache; return the keys/values attention reads."""

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""The attention kernel a target injects into the block: q [1, S, n_heads, head_dim] and k/v
[1, S, n_kv_heads, head_dim], RoPE applied, in; the attention output [1, S, dim] out. The kernel owns the
KV cache of one block application (sdpa over a static cache, ExecuTorch's custom ops, Core ML states)."""


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_update: KVUpdate,
    mask: Tensor,
    n_rep: int,
    dim: int,
    broadcast_gqa: bool = False,
    seqlen: int | torch.SymInt = -1,
) -> Tensor:
    """`scaled_dot_product_attention` over a cache [1, n_kv_heads, T, head_dim]; K/V heads repeated `n_rep`
    times unless `broadcast_gqa` lets SDPA broadcast them (no copy)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    keys, values = kv_update(k, v)
    if broadcast_gqa and n_rep > 1:
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    else:
        if n_rep > 1:
            keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return attn.transpose(1, 2).reshape(1, seqlen, dim)


class StaticKVCache(nn.Module):
    """One block application's cache, updated in place at the current position."""

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (1, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, start: int | torch.SymInt, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        seqlen = k.shape[2]
        self.k_cache.narrow(2, start, seqlen).copy_(k)
        self.v_cache.narrow(2, start, seqlen).copy_(v)
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


class ExportBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, settings: ExportSettings) -> None:
        super().__init__()
        self.cfg, self.settings = cfg, settings
        d, kv, ffn = cfg.dim, cfg.kv_dim, cfg.ffn_dim
        if settings.fuse:
            self.wqkv = nn.Linear(d, d + 2 * kv, bias=False)
            self.w13 = nn.Linear(d, 2 * ffn, bias=False)
        else:
            self.wq, self.wk, self.wv = (nn.Linear(d, n, bias=False) for n in (d, kv, kv))
            self.w1, self.w3 = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)
        folded = settings.fold_norm_gains
        self.attention_norm = None if folded else nn.Parameter(torch.ones(d))
        self.ffn_norm = None if folded else nn.Parameter(torch.ones(d))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.settings.fuse:
            return self.wqkv(x).split([self.cfg.dim, self.cfg.kv_dim, self.cfg.kv_dim], dim=-1)
        return self.wq(x), self.wk(x), self.wv(x)

    def gate_up(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.settings.fuse:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return gate, up
        return self.w1(x), self.w3(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend, seqlen: int | torch.SymInt = -1) -> Tensor:
        """x [1, S, dim]; cos/sin [S, 1, head_dim]. The one block every target lowers; only `attend` differs.

        `seqlen`: torch.export callers pass the symbolic length (XNNPACK delegates a view with it, not one
        with -1); Core ML's tracer passes -1 (traced shape arithmetic does not convert)."""
        cfg = self.cfg
        q, k, v = self.qkv(rms_norm(x, self.attention_norm, cfg.norm_eps))
        half = cfg.head_dim // 2
        q = apply_rope(q.view(1, seqlen, cfg.n_heads, cfg.head_dim), cos, sin, half)
        k = apply_rope(k.view(1, seqlen, cfg.n_kv_heads, cfg.head_dim), cos, sin, half)
        h = x + self.wo(attend(q, k, v.view(1, seqlen, cfg.n_kv_heads, cfg.head_dim)))
        gate, up = self.gate_up(rms_norm(h, self.ffn_norm, cfg.norm_eps))
        return h + self.w2(F.silu(gate) * up)


class DecoderStack(Protocol):
    """The modules a target's forward runs: ExportModel's own, held under the same names by target wrappers
    (the names become the artifacts' weight names)."""

    config: ModelConfig
    schedule: list[int]
    tok_embeddings: nn.Embedding
    blocks: nn.ModuleList
    norm: Tensor
    output: nn.Linear | None


def project(stack: DecoderStack, h: Tensor) -> Tensor:
    """Output projection; with a shared embedding, the embedding table itself."""
    return F.linear(h, stack.tok_embeddings.weight) if stack.output is None else stack.output(h)


def decode_stack(
    stack: DecoderStack,
    tokens: Tensor,
    cos: Tensor,
    sin: Tensor,
    attention: Callable[[int], Attend],
    last_only: bool,
    seqlen: int | torch.SymInt = -1,
) -> Tensor:
    """Embedding, the unrolled schedule (the same block module per application; `attention(slot)` owns each
    application's cache), final norm and output projection: the forward of every target."""
    h = stack.tok_embeddings(tokens)
    for slot, block_index in enumerate(stack.schedule):
        h = stack.blocks[block_index](h, cos, sin, attention(slot), seqlen)
    if last_only:
        h = h[:, -1:, :]
    return project(stack, rms_norm(h, stack.norm, stack.config.norm_eps))


class ExportModel(nn.Module):
    """`forward(tokens [1, S], input_pos [1]) -> logits [1, S, vocab]` over a static KV cache."""

    def __init__(self, cfg: ModelConfig, settings: ExportSettings) -> None:
        super().__init__()
        if not 1 <= settings.max_seq_len <= cfg.max_context:
            raise UserError(
                f"--max-seq-len must be between 1 and the model's max context {cfg.max_context}, got {settings.max_seq_len}"
            )
        self.config, self.settings = cfg, settings
        self.schedule = cfg.schedule()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(ExportBlock(cfg, settings) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim))
        # With a shared embedding the output projection reads tok_embeddings.weight directly, so
        # the table is one parameter and one graph placeholder; targets decide how to store it.
        self.output = None if cfg.share_embedding else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.caches = nn.ModuleList(
            StaticKVCache(cfg.n_kv_heads, settings.max_seq_len, cfg.head_dim, settings.dtype) for _ in self.schedule
        )
        cos, sin = rope_tables(cfg.head_dim, settings.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(settings.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(settings.dtype), persistent=False)
        causal = torch.ones(settings.max_seq_len, settings.max_seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_reference(cls, ref: MobileLLM, settings: ExportSettings) -> "ExportModel":
        model = cls(ref.config, settings)
        model.load_reference_state(ref)
        return model.to(settings.dtype).eval().requires_grad_(False)

    def load_reference_state(self, ref: MobileLLM) -> None:
        """Map checkpoint tensors onto this module, fusing on the way; unfused weights are aliased, not copied."""
        fold = self.settings.fold_norm_gains
        self.tok_embeddings.weight = ref.embed_tokens.weight
        if self.output is not None:
            self.output.weight = ref.lm_head.weight
        self.norm = ref.norm.weight
        for block, layer in zip(self.blocks, ref.layers):
            attn, mlp = layer.self_attn, layer.mlp
            g_attn, g_ffn = layer.input_layernorm.weight, layer.post_attention_layernorm.weight

            def prep(w: Tensor, gain: Tensor) -> Tensor:
                return w * gain if fold else w

            if self.settings.fuse:
                qkv = torch.cat(
                    [
                        prep(attn.q_proj.weight, g_attn),
                        prep(attn.k_proj.weight, g_attn),
                        prep(attn.v_proj.weight, g_attn),
                    ]
                )
                block.wqkv.weight = nn.Parameter(qkv, requires_grad=False)
                block.w13.weight = nn.Parameter(
                    torch.cat([prep(mlp.gate_proj.weight, g_ffn), prep(mlp.up_proj.weight, g_ffn)]), requires_grad=False
                )
            else:
                for dst, src in ((block.wq, attn.q_proj), (block.wk, attn.k_proj), (block.wv, attn.v_proj)):
                    dst.weight = src.weight if not fold else nn.Parameter(prep(src.weight, g_attn), requires_grad=False)
                for dst, src in ((block.w1, mlp.gate_proj), (block.w3, mlp.up_proj)):
                    dst.weight = src.weight if not fold else nn.Parameter(prep(src.weight, g_ffn), requires_grad=False)
            block.wo.weight, block.w2.weight = attn.o_proj.weight, mlp.down_proj.weight
            if not fold:
                block.attention_norm, block.ffn_norm = g_attn, g_ffn

    # ---------------------------------------------------------------- running
    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        seqlen = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seqlen <= self.settings.max_seq_len)
        cos, sin = self.rope_at(start, seqlen)
        mask = self.causal_mask.narrow(0, start, seqlen)
        n_rep, broadcast = self.config.n_heads // self.config.n_kv_heads, self.settings.gqa == "sdpa"

        def attention(slot: int) -> Attend:
            def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
                return self.caches[slot].update(start, k, v)

            return lambda q, k, v: sdpa_attention(q, k, v, update, mask, n_rep, self.config.dim, broadcast, seqlen)

        return decode_stack(self, tokens, cos, sin, attention, self.settings.last_logits_only, seqlen)

    def rope_at(self, start: int | torch.SymInt, seqlen: int | torch.SymInt) -> tuple[Tensor, Tensor]:
        """cos/sin [S, 1, head_dim] of positions start..start+S-1 (broadcast over heads)."""
        return (
            self.rope_cos.narrow(0, start, seqlen).unsqueeze(1),
            self.rope_sin.narrow(0, start, seqlen).unsqueeze(1),
        )

    def project(self, h: Tensor) -> Tensor:
        return project(self, h)

    def reset_cache(self) -> None:
        for cache in self.caches:
            cache.reset()

    def example_inputs(self, seqlen: int = 2) -> tuple[Tensor, Tensor]:
        return torch.zeros(1, seqlen, dtype=torch.long), torch.tensor([0], dtype=torch.long)

    def dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim], None]:
        # max_seq_len - 1: at exactly max_seq_len the narrows become whole-tensor views and export
        # specializes on it (as ExecuTorch's own llama export does); a full-context prefill leaves no
        # room to generate anyway.
        seq = torch.export.Dim("seq_len", min=1, max=self.settings.max_seq_len - 1)
        return {1: seq}, None

    def export(self, strict: bool = False) -> torch.export.ExportedProgram:
        # Prefill length is dynamic (1..max_seq_len-1); decode is the S=1 case of the same program.
        with torch.no_grad():
            return torch.export.export(self, self.example_inputs(), dynamic_shapes=self.dynamic_shapes(), strict=strict)


def unique_storages(module: nn.Module) -> dict[int, int]:
    """data_ptr -> bytes for every distinct parameter storage the module holds."""
    seen: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return seen


@torch.no_grad()
def run_sequence(model: ExportModel, tokens: Tensor, prefill: int) -> Tensor:
    """Prefill `tokens[:, :prefill]`, then decode the rest one token at a time; logits for every position."""
    model.reset_cache()
    outs = [model(tokens[:, :prefill], torch.tensor([0]))]
    for pos in range(prefill, tokens.shape[1]):
        outs.append(model(tokens[:, pos : pos + 1], torch.tensor([pos])))
    return torch.cat(outs, dim=1)


def graph_op_counts(model: ExportModel) -> dict[str, int]:
    """Operator counts of the exported graph: total call sites and the ones fusion changes."""
    graph = model.export().graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    names = [getattr(n.target, "__name__", str(n.target)) for n in calls]
    return {
        "total": len(calls),
        "linear": sum(name.startswith("linear") for name in names),
        "sdpa": sum("scaled_dot_product_attention" in name for name in names),
        "placeholders": sum(n.op == "placeholder" for n in graph.nodes),
    }
