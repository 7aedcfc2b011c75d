"""ONNX target: one onnxruntime model in the I/O layout onnxruntime-genai expects.

Why the graph is built directly (onnx.helper over the ExportModel's own tensors) instead of
`torch.onnx.export(dynamo=True)` + onnxruntime's transformer optimizer + the MatMulNBits quantizer:

- every stored weight becomes exactly one initializer by construction: a shared block is emitted
  once per *application* as nodes, but its weights are read once per *stored* block (the
  ExportModel's aliased parameters, deduplicated by storage), and the shared embedding is one
  quantized tensor read by both GatherBlockQuantized and the output MatMulNBits. The torch.onnx
  route folds `Transpose(W)` per call site, duplicates shared weights, and the int4 quantizer then
  skips MatMuls whose weight is no longer a plain initializer;
- the fused contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding,
  MatMulNBits, GatherBlockQuantized) are emitted directly rather than hoped for from pattern
  matching, which is also what onnxruntime-genai's own model builder does;
- the rounding is ours: weights are quantized with `WeightQuant.quantize` (the twin's code) and
  packed into MatMulNBits' layout, so the twin describes the artifact exactly. The scale rule is
  onnxruntime's symmetric blockwise rule (signed value of largest magnitude -> -2^(b-1)); see
  `quant_scheme` for the two tie cases where onnxruntime's own quantizer differs.

What the fused ops buy (125M-LS, 60 block applications, 4-bit, decode at past length 200, 1 thread,
onnxruntime profiler; the shared 2-core machine was loaded, MatMulNBits time alone swung 66-195 ms
between identical kernels, so only large differences are meaningful): non-MatMulNBits kernel time
per token was 74 ms with GroupQueryAttention(do_rotary) + RMSNormalization/SkipSimplifiedLayerNorm
(610 nodes), 92 ms with a separate RotaryEmbedding op (790 nodes), and 167-284 ms with MatMul/Softmax
attention (2654-4104 nodes). GroupQueryAttention is the fusion that clearly pays; rotary inside it
beats the RotaryEmbedding op; the norm fusion's gain was below the noise here. onnxruntime itself
fuses x*Sigmoid(x) into QuickGelu. The default graph is therefore fully fused; `GraphOptions`
emits the others for measurement and as a fallback.

Graph I/O (onnxruntime-genai "decoder" layout, one KV pair per block *application*):
  input_ids int64 [batch, seq], attention_mask int64 [batch, total_seq], position_ids int64 [batch, seq],
  past_key_values.{i}.key/value float32 [batch, n_kv_heads, past_seq, head_dim]
  (+ optional logits_to_keep int64 [1], default 1)
  -> logits float32 [batch, 1, vocab] (the last logits_to_keep positions), present.{i}.key/value float32 [batch, n_kv_heads, total_seq, head_dim]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..export_model import ExportModel
from ..memory import StorageBreakdown, size_report
from ..model import rope_tables
from ..quantize import QuantizedModel, QuantizedWeight, QuantMethod, QuantScheme, WeightQuant
from ..tokenizer import write_tokenizer_json
from .base import (
    ExportedArtifact,
    FunctionTarget,
    GenerationRequest,
    GenerationResult,
    RunnerMetadata,
    TargetOptions,
    TargetRuntime,
    TextSink,
)

NAME = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 23  # RMSNormalization (the one norm without a residual) is a standard op from opset 23
MS = "com.microsoft"
# MatMulNBits accuracy_level, chosen by measurement (onnxruntime 1.32 CPU, 125M shapes, 1 thread):
# level 4 rounds each MatMulNBits input to int8 per block of `group_size` (symmetric, amax/127) and
# runs integer dot products; level 0 computes in float32 with activations untouched.
# - 8-bit: level 0 has no optimized CPU kernel (it dequantizes the whole weight on every call:
#   660 ms vs 9 ms for the 32000x576 output projection at M=1), so 8-bit always uses level 4.
# - 4-bit: level 4 decodes 2.6x faster (38.6 vs 11-15 tok/s for random 125M weights) and its rounding
#   is in the twin (`WeightQuant.act_block`). On the trained default model (heldout text, 320
#   positions) it flipped 1 of 320 top-1 tokens vs the twin and left quality unchanged: top-1 vs fp32
#   98.4% (level 0: 98.1%), perplexity 65.61 -> 65.83 (level 0: 65.85).
#   GraphOptions(accuracy_level_4bit=0) gives the float32-activation model.
DEFAULT_ACCURACY_LEVEL_4BIT = 4
DEFAULT_ACCURACY_LEVEL_8BIT = 4
_BLOCK_SIZES = (16, 32, 64, 128, 256)
# 8-bit weights inside a 4-bit export (the embedding table, mixed-precision layers) use blocks of up to
# 128, which keeps the file within llama.cpp's Q4_K_M size. A --bits 8 export keeps blocks of 32: at
# accuracy_level 4 the block is also the activation-rounding block, and on the real 135M model blocks
# of 128 measured +1.05% perplexity (142.4 MB) against +0.15% with 32 (151.7 MB; Q8_0: +0.76%).
EIGHT_BIT_BLOCK = 128
# Mixed precision by default, measured on the real 135M model (grid-broken copy, GPTQ, perplexity vs
# fp32): uniform 4-bit +7.4%; every down projection at 8 bits +3.5% but 107.6 MB, over the 105.5 MB of
# llama.cpp's Q4_K_M file of the same model (+6.8%); so the down projections of the blocks Q4_K_M gives
# more bits (first and last eighth, every third between: 15 of 30) go to 8 bits.
DEFAULT_LAYER_BITS: dict[int, tuple[tuple[str, int], ...]] = {4: (("w2@q4km", 8),)}


@dataclass(frozen=True)
class DecoderIO:
    """The graph's I/O names (onnxruntime-genai's "decoder" layout), declared once for the graph, the
    manifest's io, genai_config.json and the runtime."""

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    # Optional input (an overridable initializer, default [1]): logits are computed for the last
    # `logits_to_keep` positions only. onnxruntime-genai never feeds it (it reads the last row); the
    # validation runtime feeds the sequence length to get every position's logits.
    logits_to_keep: str = "logits_to_keep"

    def past(self, i: int) -> tuple[str, str]:
        return self.past_key % i, self.past_value % i

    def present(self, i: int) -> tuple[str, str]:
        return self.present_key % i, self.present_value % i


IO = DecoderIO()


@dataclass(frozen=True)
class GraphOptions:
    """Which fused onnxruntime ops the graph uses (for measuring what each buys)."""

    fused_norm: bool = True  # RMSNormalization + SkipSimplifiedLayerNormalization vs. Pow/ReduceMean/... + Add
    attention: Literal["gqa", "plain"] = "gqa"  # GroupQueryAttention vs. MatMul/Softmax with Concat caches
    rotary: Literal["in_attention", "op", "plain"] = (
        "in_attention"  # GQA's do_rotary, RotaryEmbedding op, or Mul/Concat
    )
    accuracy_level_4bit: int = DEFAULT_ACCURACY_LEVEL_4BIT
    accuracy_level_8bit: int = DEFAULT_ACCURACY_LEVEL_8BIT
    # The output projection runs on the last `logits_to_keep` positions only (default 1, overridable
    # input): a 128-token prefill skips 127 of 128 rows of the largest matmul. False: every position.
    prune_logits: bool = True

    def accuracy_level(self, bits: int) -> int:
        return self.accuracy_level_4bit if bits == 4 else self.accuracy_level_8bit

    def __post_init__(self) -> None:
        if self.rotary == "in_attention" and self.attention != "gqa":
            raise ValueError("rotary='in_attention' needs attention='gqa'")
        if self.rotary == "plain" and self.attention != "plain":
            raise ValueError("rotary='plain' is only emitted with attention='plain'")

    @classmethod
    def unfused(cls, **accuracy: int) -> "GraphOptions":
        return cls(fused_norm=False, attention="plain", rotary="plain", **accuracy)


# ----------------------------------------------------------------------------- quantization
def _check_opts(opts: TargetOptions) -> None:
    if opts.bits not in (4, 8, 16):
        raise UserError(f"--bits {opts.bits} is not supported by the onnx target; use 4, 8 or 16")
    if opts.resolved_embedding_bits() not in (4, 8, 16):
        raise UserError(
            f"--embedding-bits {opts.resolved_embedding_bits()} is not supported by the onnx target; use 4, 8 or 16"
        )
    if opts.group_size not in _BLOCK_SIZES:
        raise UserError(
            f"--group-size {opts.group_size} is not supported by MatMulNBits; use one of {', '.join(map(str, _BLOCK_SIZES))}"
        )


def _weight_quant(
    bits: int, group_size: int, method: QuantMethod, accuracy_level: int = 0, widen: bool = False
) -> WeightQuant:
    if bits >= 16:
        # Stored as float16 (half the file), cast to float32 once at session load: onnxruntime's CPU
        # kernels (MatMul, GroupQueryAttention, the norms) compute in float32, so activations stay fp32.
        return WeightQuant(16, float_dtype=torch.float16)
    # MatMulNBits: blockwise codes stored unsigned (q + 2^(b-1)), fp32 scales (the activation dtype),
    # optional packed zero points. accuracy_level 4 also rounds the layer's input to symmetric int8
    # per block of `group_size` (measured: matches to 4e-7 relative).
    act_block = group_size if accuracy_level == 4 else None
    cap = EIGHT_BIT_BLOCK if bits == 8 and widen else None
    return method.apply(
        WeightQuant(bits, group_size, scale_dtype=torch.float32, act_block=act_block, group_size_cap=cap),
        has_zero_points=True,
    )


def quant_scheme(opts: TargetOptions, graph: GraphOptions | None = None) -> QuantScheme:
    """Exactly how the exported model rounds.

    Linears: `opts.bits` (4/8: MatMulNBits blockwise, block `opts.group_size`, fp32 scales, zero
    points unless the method is symmetric; 16: float16 storage, float32 compute). Embedding and
    output projection: the embedding bits, one tensor when shared (the embedding lookup never rounds
    activations; the output MatMulNBits does when its accuracy_level is 4). Activations: every
    MatMulNBits at accuracy_level 4 rounds its input to int8 per block (`WeightQuant.act_block`)
    unless `graph` says level 0; other compute (attention, norms, residuals) is float32.

    The codes come from the one quantizer (`quantize.quantize_model`) and are packed verbatim, so
    the artifact equals the twin. With `scale_rule="signed_extreme"` and a symmetric method the codes
    are onnxruntime's own quantizer's (tested), which differ only on exact ties.
    """
    _check_opts(opts)
    graph = graph or GraphOptions()
    emb_bits = opts.resolved_embedding_bits()
    linear = _weight_quant(opts.bits, opts.group_size, opts.method, graph.accuracy_level(opts.bits))
    widen = opts.bits == 4  # 8-bit weights inside a 4-bit export (EIGHT_BIT_BLOCK)
    emb = _weight_quant(emb_bits, opts.group_size, opts.method, widen=widen)
    out = _weight_quant(emb_bits, opts.group_size, opts.method, graph.accuracy_level(emb_bits), widen=widen)
    overrides = tuple(
        (role, _weight_quant(bits, opts.group_size, opts.method, graph.accuracy_level(bits), widen=widen))
        for role, bits in opts.resolved_layer_bits(DEFAULT_LAYER_BITS)
    )
    return QuantScheme(linear=linear, embedding=emb, output=out, compute_dtype=torch.float32, overrides=overrides)


def pack_nbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits B [N, K/block, block*bits/8] uint8 (low nibble first), scales [N, K/block] fp32 and
    zero points (uint8; 4-bit packed two per byte along the blocks, [N, ceil(K/block/2)]) or None.

    The codes are a torch linear weight's [N (out), K (in)], which is already MatMulNBits' layout."""
    bits = qw.wq.bits
    offset = 1 << (bits - 1)
    u = (qw.codes.to(torch.int32) + offset).numpy().astype(np.uint8)
    n, k = u.shape
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    block = qw.group_size
    zeros = None
    if qw.zeros is not None:
        z = (qw.zeros.to(torch.int32) + offset).numpy().astype(np.uint8)
        if bits == 4:
            if z.shape[1] % 2:
                z = np.concatenate([z, np.full((n, 1), offset, np.uint8)], axis=1)
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zeros = np.ascontiguousarray(z)
    packed = np.ascontiguousarray(u.reshape(n, k // block, block * bits // 8))
    return packed, np.ascontiguousarray(qw.scales.numpy().astype(np.float32)), zeros


def unpack_nbits(packed: np.ndarray, scales: np.ndarray, bits: int, zeros: np.ndarray | None = None) -> np.ndarray:
    """Dequantize MatMulNBits B/scales/zero points (default zero point 2^(b-1)) back to [N, K] float32."""
    n = packed.shape[0]
    blocks = scales.shape[1]
    u = packed.reshape(n, -1).astype(np.int32)
    if bits == 4:
        u = np.stack([u & 15, u >> 4], -1).reshape(n, -1)
    if zeros is None:
        z = np.full((n, blocks), 1 << (bits - 1), np.int32)
    else:
        z = zeros.astype(np.int32)
        if bits == 4:
            z = np.stack([z & 15, z >> 4], -1).reshape(n, -1)[:, :blocks]
    q = (u.reshape(n, blocks, -1) - z[..., None]).astype(np.float32)
    return (q * scales[..., None]).reshape(n, -1)


# ----------------------------------------------------------------------------- graph building
class _Graph:
    def __init__(self) -> None:
        from onnx import helper

        self.h = helper
        self.nodes: list[Any] = []
        self.inits: dict[str, Any] = {}
        self.init_kind: dict[str, str] = {}
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def node(
        self,
        op: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        outputs: list[str] | None = None,
        **attrs: Any,
    ) -> Any:
        outs = outputs or [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=self.name("/" + op), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        from onnx import numpy_helper

        out = self.name("const")
        self.nodes.append(
            self.h.make_node(
                "Constant",
                [],
                [out],
                name=self.name("/Constant"),
                value=numpy_helper.from_array(np.asarray(value, dtype=dtype)),
            )
        )
        return out

    def init(self, name: str, array: np.ndarray, kind: str) -> str:
        from onnx import numpy_helper

        if name in self.inits:
            raise AssertionError(f"initializer {name} written twice")
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.init_kind[name] = kind
        return name


@dataclass
class _Weight:
    """One stored weight matrix, written once: MatMulNBits codes/scales/zero points or a float16 matrix."""

    name: str
    wq: WeightQuant
    shape: tuple[int, int]  # torch layout [N (out), K (in)]
    codes: str = ""
    scales: str = ""
    zero_points: str = ""  # "" when symmetric (MatMulNBits' default zero point)
    floats: str = ""

    def nbits_inputs(self) -> list[str]:
        return [self.codes, self.scales] + ([self.zero_points] if self.zero_points else [])


class _Builder:
    def __init__(self, model: ExportModel, quantized: QuantizedModel, opts: TargetOptions, graph: GraphOptions) -> None:
        self.model, self.cfg, self.opts, self.graph_options = model, model.config, opts, graph
        self.quantized = quantized
        self.scheme = quant_scheme(opts, graph)
        self.g = _Graph()
        self._weights: dict[str, _Weight] = {}  # quantized-model key -> written weight
        self._norms: dict[int, str] = {}
        self._f32: dict[str, str] = {}

    # -- weights, each written once per stored tensor ------------------------------------------
    def weight(self, key: str, name: str, wq: WeightQuant) -> _Weight:
        """The stored weight `key` of the quantized model (shared blocks: the same key, written once)."""
        if key in self._weights:
            return self._weights[key]
        value = self.quantized[key]
        if isinstance(value, QuantizedWeight):
            w = _Weight(name, wq, tuple(value.codes.shape))  # type: ignore[arg-type]
            packed, scales, zeros = pack_nbits(value)
            w.codes = self.g.init(name + ".qweight", packed, "weight")
            w.scales = self.g.init(name + ".scales", scales, "weight")
            if zeros is not None:
                w.zero_points = self.g.init(name + ".zero_points", zeros, "weight")
        else:
            w = _Weight(name, wq, tuple(value.shape))  # type: ignore[arg-type]
            w.floats = self.g.init(name, value.detach().float().numpy().astype(np.float16), "weight")
        self._weights[key] = w
        return w

    def norm_gain(self, tensor: Tensor | None, name: str) -> str:
        if tensor is None:  # gains folded into the following linear
            tensor = torch.ones(self.cfg.dim)
            name = "norm_ones"
            key = -1
        else:
            key = tensor.untyped_storage().data_ptr()
        if key not in self._norms:
            self._norms[key] = self.g.init(name, tensor.detach().float().numpy(), "weight")
        return self._norms[key]

    def as_f32(self, w: _Weight) -> str:
        if w.floats not in self._f32:  # one Cast per stored weight; onnxruntime folds it at load
            self._f32[w.floats] = self.g.node("Cast", [w.floats], to=1)
        return self._f32[w.floats]

    # -- ops ------------------------------------------------------------------------------------
    def linear(self, x: str, w: _Weight) -> str:
        n, k = w.shape
        if w.wq.bits < 16:
            return self.g.node(
                "MatMulNBits",
                [x, *w.nbits_inputs()],
                domain=MS,
                K=k,
                N=n,
                bits=w.wq.bits,
                block_size=w.wq.group(w.shape[1]),
                accuracy_level=self.graph_options.accuracy_level(w.wq.bits),
            )
        # x [B, S, K] @ W^T with W [N, K] stored once: Gemm(transB) on the flattened rows.
        g = self.g
        flat = g.node("Reshape", [x, g.const([-1, k])])
        y = g.node("Gemm", [flat, self.as_f32(w)], transB=1)
        lead = g.node("Slice", [g.node("Shape", [x]), g.const([0]), g.const([-1])])
        return g.node("Reshape", [y, g.node("Concat", [lead, g.const([n])], axis=0)])

    def embed(self, ids: str, w: _Weight) -> str:
        g = self.g
        if w.wq.bits < 16:
            # The very tensor the output MatMulNBits reads: data [V, K/block, blob]; the scales get a
            # trailing unit axis (same rank as the data), a tiny node onnxruntime folds at load.
            scales3 = g.node("Unsqueeze", [w.scales, g.const([2])])
            zeros = [self._zero_points_per_row(w)] if w.zero_points else []
            e = g.node(
                "GatherBlockQuantized",
                [w.codes, ids, scales3, *zeros],
                domain=MS,
                bits=w.wq.bits,
                block_size=w.wq.group(w.shape[1]),
                gather_axis=0,
                quantize_axis=2,
            )
            return g.node("Reshape", [e, g.const([0, 0, -1])])
        return g.node("Gather", [self.as_f32(w), ids], axis=0)

    def _zero_points_per_row(self, w: _Weight) -> str:
        """GatherBlockQuantized wants one zero point byte per block ([V, blocks, 1]); MatMulNBits stores
        them packed two per byte. Unpacked from the one stored tensor by a few nodes onnxruntime folds
        at load, so the file holds the zero points once."""
        g = self.g
        blocks = w.shape[1] // w.wq.group(w.shape[1])
        if w.wq.bits != 4:
            return g.node("Unsqueeze", [w.zero_points, g.const([2])])
        low = g.node("BitwiseAnd", [w.zero_points, g.const(15, np.uint8)])
        high = g.node("BitShift", [w.zero_points, g.const(4, np.uint8)], direction="RIGHT")
        pairs = g.node(
            "Concat", [g.node("Unsqueeze", [low, g.const([2])]), g.node("Unsqueeze", [high, g.const([2])])], axis=2
        )
        flat = g.node("Reshape", [pairs, g.const([0, -1])])
        first = g.node("Slice", [flat, g.const([0]), g.const([blocks]), g.const([1])])
        return g.node("Unsqueeze", [first, g.const([2])])

    def rms(self, x: str, gain: str) -> str:
        g, eps = self.g, self.cfg.norm_eps
        if self.graph_options.fused_norm:
            return g.node("RMSNormalization", [x, gain], axis=-1, epsilon=eps)
        ms = g.node("ReduceMean", [g.node("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [ms, g.const(eps, np.float32)])])])
        return g.node("Mul", [g.node("Mul", [x, inv]), gain])

    def add_rms(self, delta: str, residual: str, gain: str) -> tuple[str, str]:
        """(norm(residual + delta), residual + delta)."""
        g = self.g
        if self.graph_options.fused_norm:
            outs = [g.name("skipnorm"), "", "", g.name("residual")]
            g.node(
                "SkipSimplifiedLayerNormalization",
                [delta, residual, gain],
                domain=MS,
                outputs=outs,
                epsilon=self.cfg.norm_eps,
            )
            return outs[0], outs[3]
        h = g.node("Add", [residual, delta])
        return self.rms(h, gain), h

    # -- the model -------------------------------------------------------------------------------
    def build(self) -> Any:
        from onnx import TensorProto, helper

        cfg, g, m = self.cfg, self.g, self.model
        n_app = len(m.schedule)
        B, S, T, P = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
        kv_shape = lambda seq: [B, cfg.n_kv_heads, seq, cfg.head_dim]  # noqa: E731
        inputs = [
            helper.make_tensor_value_info(IO.input_ids, TensorProto.INT64, [B, S]),
            helper.make_tensor_value_info(IO.attention_mask, TensorProto.INT64, [B, T]),
            helper.make_tensor_value_info(IO.position_ids, TensorProto.INT64, [B, S]),
        ]
        # genai sizes its logits buffer from this shape: a 1 there is how it knows the graph is pruned
        # (as onnxruntime-genai's builder declares it with prune_lm_head). logits_to_keep > 1 (validation
        # only) then returns more rows than declared, which onnxruntime allows.
        L = 1 if self.graph_options.prune_logits else S
        outputs = [helper.make_tensor_value_info(IO.logits, TensorProto.FLOAT, [B, L, cfg.vocab_size])]
        for i in range(n_app):
            inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, kv_shape(P)) for name in IO.past(i)]
            outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, kv_shape(T)) for name in IO.present(i)]

        sch = self.scheme
        emb = self.weight("tok_embeddings.weight", "model.embed_tokens.weight", sch.embedding)
        out_w = emb if m.output is None else self.weight("output.weight", "lm_head.weight", sch.output)
        blocks = []
        for b, blk in enumerate(m.blocks):
            p = f"model.layers.{b}."
            lin = {}
            names = ("wqkv", "wo", "w13", "w2") if m.settings.fuse else ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
            for nm in names:
                lin[nm] = self.weight(
                    f"blocks.{b}.{nm}.weight", p + nm + ".weight", self.quantized.formats[f"blocks.{b}.{nm}.weight"]
                )
            lin["attention_norm"] = self.norm_gain(blk.attention_norm, p + "attention_norm.weight")
            lin["ffn_norm"] = self.norm_gain(blk.ffn_norm, p + "ffn_norm.weight")
            blocks.append(lin)
        final_norm = self.norm_gain(m.norm, "model.norm.weight")
        cos, sin = rope_tables(cfg.head_dim, m.settings.max_seq_len, cfg.rope_theta)
        half = cfg.head_dim // 2
        rope_cos = g.init("rope.cos_cache", cos[:, :half].numpy(), "rope")
        rope_sin = g.init("rope.sin_cache", sin[:, :half].numpy(), "rope")

        # Shared per-step tensors
        if self.graph_options.attention == "gqa":
            total = g.node(
                "Cast",
                [g.node("Gather", [g.node("Shape", [IO.attention_mask]), g.const(1)], axis=0)],
                to=TensorProto.INT32,
            )
            seqlens_k = g.node(
                "Cast",
                [g.node("Sub", [g.node("ReduceSum", [IO.attention_mask, g.const([1])], keepdims=0), g.const(1)])],
                to=TensorProto.INT32,
            )
        else:
            mask = self._additive_mask()
        if self.graph_options.rotary == "plain":
            cos_full = g.node(
                "Unsqueeze",
                [
                    g.node("Gather", [g.node("Concat", [rope_cos, rope_cos], axis=-1), IO.position_ids], axis=0),
                    g.const([1]),
                ],
            )
            sin_full = g.node(
                "Unsqueeze",
                [
                    g.node("Gather", [g.node("Concat", [rope_sin, rope_sin], axis=-1), IO.position_ids], axis=0),
                    g.const([1]),
                ],
            )

        h = self.embed(IO.input_ids, emb)
        x = self.rms(h, blocks[m.schedule[0]]["attention_norm"])
        for i, b in enumerate(m.schedule):
            w = blocks[b]
            (past_k, past_v), (pres_k, pres_v) = IO.past(i), IO.present(i)
            if m.settings.fuse:
                qkv = self.linear(x, w["wqkv"])
                q_, k_, v_ = (
                    (qkv, "", "")
                    if self.graph_options.rotary == "in_attention"
                    else g.node("Split", [qkv, g.const([cfg.dim, cfg.kv_dim, cfg.kv_dim])], n_out=3, axis=-1)
                )
            else:
                q_, k_, v_ = (self.linear(x, w[n]) for n in ("wq", "wk", "wv"))
            if self.graph_options.rotary == "op":
                q_ = g.node(
                    "RotaryEmbedding",
                    [q_, IO.position_ids, rope_cos, rope_sin],
                    domain=MS,
                    interleaved=0,
                    num_heads=cfg.n_heads,
                )
                k_ = g.node(
                    "RotaryEmbedding",
                    [k_, IO.position_ids, rope_cos, rope_sin],
                    domain=MS,
                    interleaved=0,
                    num_heads=cfg.n_kv_heads,
                )
            if self.graph_options.attention == "gqa":
                extra = [rope_cos, rope_sin] if self.graph_options.rotary == "in_attention" else []
                attn = g.node(
                    "GroupQueryAttention",
                    [q_, k_, v_, past_k, past_v, seqlens_k, total, *extra],
                    domain=MS,
                    outputs=[g.name("attn"), pres_k, pres_v],
                    num_heads=cfg.n_heads,
                    kv_num_heads=cfg.n_kv_heads,
                    scale=float(cfg.head_dim**-0.5),
                    do_rotary=int(self.graph_options.rotary == "in_attention"),
                    rotary_interleaved=0,
                )[0]
            else:
                attn = self._plain_attention(
                    q_,
                    k_,
                    v_,
                    past_k,
                    past_v,
                    pres_k,
                    pres_v,
                    mask,
                    cos_full if self.graph_options.rotary == "plain" else None,
                    sin_full if self.graph_options.rotary == "plain" else None,
                )
            x, h = self.add_rms(self.linear(attn, w["wo"]), h, w["ffn_norm"])
            if m.settings.fuse:
                gate, up = g.node(
                    "Split", [self.linear(x, w["w13"]), g.const([cfg.ffn_dim, cfg.ffn_dim])], n_out=2, axis=-1
                )
            else:
                gate, up = self.linear(x, w["w1"]), self.linear(x, w["w3"])
            act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
            nxt = blocks[m.schedule[i + 1]]["attention_norm"] if i + 1 < n_app else final_norm
            x, h = self.add_rms(self.linear(act, w["w2"]), h, nxt)
        if self.graph_options.prune_logits:
            inputs.append(helper.make_tensor_value_info(IO.logits_to_keep, TensorProto.INT64, [1]))
            # Its default is an initializer of the input's name; int64_data (not raw bytes) keeps it in
            # model.onnx, so the external data file stays exactly the weights.
            g.inits[IO.logits_to_keep] = helper.make_tensor(IO.logits_to_keep, TensorProto.INT64, [1], [1])
            g.init_kind[IO.logits_to_keep] = "io"
            start = g.node("Neg", [IO.logits_to_keep])
            x = g.node("Slice", [x, start, g.const([np.iinfo(np.int64).max]), g.const([1])])
        if out_w.wq.bits < 16:
            g.node(
                "MatMulNBits",
                [x, *out_w.nbits_inputs()],
                domain=MS,
                outputs=[IO.logits],
                K=out_w.shape[1],
                N=out_w.shape[0],
                bits=out_w.wq.bits,
                block_size=out_w.wq.group(out_w.shape[1]),
                accuracy_level=self.graph_options.accuracy_level(out_w.wq.bits),
            )
        else:
            g.node("Identity", [self.linear(x, out_w)], outputs=[IO.logits])

        graph = helper.make_graph(g.nodes, "mobilellm", inputs, outputs, list(g.inits.values()))
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
            ir_version=10,
            producer_name="mobilellm-export",
        )
        return model

    def _additive_mask(self) -> str:
        """[B, 1, S, T] additive mask: key j visible from query i iff j <= position_ids[i] and attention_mask[j]."""
        from onnx import TensorProto

        g = self.g
        total = g.node("Gather", [g.node("Shape", [IO.attention_mask]), g.const(1)], axis=0)
        kpos = g.node("Range", [g.const(0), total, g.const(1)])  # [T]
        causal = g.node("LessOrEqual", [kpos, g.node("Unsqueeze", [IO.position_ids, g.const([2])])])  # [B, S, T]
        pad = g.node("Unsqueeze", [g.node("Cast", [IO.attention_mask], to=TensorProto.BOOL), g.const([1])])  # [B, 1, T]
        allowed = g.node("And", [causal, pad])
        neg = g.const(np.finfo(np.float32).min, np.float32)
        return g.node("Unsqueeze", [g.node("Where", [allowed, g.const(0.0, np.float32), neg]), g.const([1])])

    def _plain_attention(
        self,
        q: str,
        k: str,
        v: str,
        past_k: str,
        past_v: str,
        pres_k: str,
        pres_v: str,
        mask: str,
        cos: str | None,
        sin: str | None,
    ) -> str:
        cfg, g = self.cfg, self.g

        def heads(t: str, n: int) -> str:  # [B, S, n*H] -> [B, n, S, H]
            return g.node("Transpose", [g.node("Reshape", [t, g.const([0, 0, n, cfg.head_dim])])], perm=[0, 2, 1, 3])

        def rope(t: str) -> str:
            half = cfg.head_dim // 2
            x1, x2 = g.node("Split", [t, g.const([half, half])], n_out=2, axis=-1)
            rot = g.node("Concat", [g.node("Neg", [x2]), x1], axis=-1)
            return g.node("Add", [g.node("Mul", [t, cos]), g.node("Mul", [rot, sin])])

        qh, kh, vh = heads(q, cfg.n_heads), heads(k, cfg.n_kv_heads), heads(v, cfg.n_kv_heads)
        if cos is not None:
            qh, kh = rope(qh), rope(kh)
        g.node("Concat", [past_k, kh], axis=2, outputs=[pres_k])
        g.node("Concat", [past_v, vh], axis=2, outputs=[pres_v])
        keys, values = pres_k, pres_v
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:

            def repeat(t: str) -> str:  # [B, Nkv, T, H] -> [B, Nkv*rep, T, H], head j reads kv head j // rep
                shp = g.node("Shape", [t])
                b_, n_, t_, h_ = (g.node("Slice", [shp, g.const([i]), g.const([i + 1])]) for i in range(4))
                big = g.node("Concat", [b_, n_, g.const([rep]), t_, h_], axis=0)
                e = g.node("Expand", [g.node("Unsqueeze", [t, g.const([2])]), big])
                return g.node("Reshape", [e, g.const([0, cfg.n_heads, -1, cfg.head_dim])])

            keys, values = repeat(keys), repeat(values)
        scores = g.node(
            "Add",
            [
                g.node(
                    "Mul",
                    [
                        g.node("MatMul", [qh, g.node("Transpose", [keys], perm=[0, 1, 3, 2])]),
                        g.const(cfg.head_dim**-0.5, np.float32),
                    ],
                ),
                mask,
            ],
        )
        out = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), values])
        return g.node("Reshape", [g.node("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, cfg.dim])])


# ----------------------------------------------------------------------------- sizes
def initializer_report(onnx_model: Any) -> dict[str, Any]:
    """Count/bytes of weight initializers and whether any two hold identical bytes (an input's default,
    `logits_to_keep`, is not a weight and is left out)."""

    from onnx import numpy_helper

    rows = []
    digests: dict[str, str] = {}
    dupes = []
    kinds = {"codes": 0, "scales": 0, "zero_points": 0, "embedding": 0, "norms": 0, "rope_tables": 0}
    for init in onnx_model.graph.initializer:
        if init.name == IO.logits_to_keep:
            continue
        arr = numpy_helper.to_array(init)
        d = hashlib.sha256(arr.tobytes() + str(arr.shape).encode() + str(arr.dtype).encode()).hexdigest()
        if d in digests and arr.size > 1:
            dupes.append((digests[d], init.name))
        digests.setdefault(d, init.name)
        rows.append((init.name, int(arr.nbytes)))
        kinds[_initializer_kind(init.name, arr.ndim)] += int(arr.nbytes)
    return {
        "count": len(rows),
        "bytes": sum(b for _, b in rows),
        "duplicates": dupes,
        "names": [n for n, _ in rows],
        "kinds": kinds,
    }


def _initializer_kind(name: str, ndim: int) -> str:
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.endswith(".scales"):
        return "scales"
    if name.endswith(".zero_points"):
        return "zero_points"
    if name.startswith("rope."):
        return "rope_tables"
    return "norms" if ndim == 1 else "codes"  # the only 1-D float initializers are RMSNorm gains


# ----------------------------------------------------------------------------- export
def build_onnx(
    model: ExportModel, quantized: QuantizedModel, opts: TargetOptions, graph: GraphOptions | None = None
) -> Any:
    """The onnx.ModelProto for `model` holding `quantized`'s codes (weights inline)."""
    return _Builder(model, quantized, opts, graph or GraphOptions()).build()


def export(
    model: ExportModel,
    quantized: QuantizedModel,
    ckpt: Checkpoint | None,
    opts: TargetOptions,
    bundle_dir: Path,
    graph: GraphOptions | None = None,
) -> ExportedArtifact:
    import onnx

    graph = graph or GraphOptions()
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    proto = build_onnx(model, quantized, opts, graph)
    inits = initializer_report(proto)
    path = bundle_dir / MODEL_FILE
    # Weights in one external file (mmap-able, no 2 GB protobuf limit); the graph stays readable.
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=0
    )
    files = [MODEL_FILE, DATA_FILE]
    files += _write_genai_config(bundle_dir, RunnerMetadata.of(cfg, opts.max_seq_len), graph)
    tok_files, tok_note = _write_tokenizer(bundle_dir, getattr(ckpt, "tokenizer_path", None), cfg)
    files += tok_files

    scheme = quant_scheme(opts, graph)
    file_bytes = {f: (bundle_dir / f).stat().st_size for f in (MODEL_FILE, DATA_FILE)}
    n_app = len(model.schedule)
    kv_past = ["batch_size", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
    kv_total = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    io = {  # the manifest's list form: one entry per graph input/output, one KV pair per block application
        "inputs": [
            {"name": IO.input_ids, "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {"name": IO.attention_mask, "dtype": "int64", "shape": ["batch_size", "total_sequence_length"]},
            {"name": IO.position_ids, "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
        ]
        + [{"name": name, "dtype": "float32", "shape": kv_past} for i in range(n_app) for name in IO.past(i)]
        + (
            [
                {
                    "name": IO.logits_to_keep,
                    "dtype": "int64",
                    "shape": [1],
                    "description": "optional, default 1: logits of the last N positions (onnxruntime-genai "
                    "reads the last; feed the sequence length for every position's)",
                }
            ]
            if graph.prune_logits
            else []
        ),
        "outputs": [
            {
                "name": IO.logits,
                "dtype": "float32",
                "shape": ["batch_size", 1 if graph.prune_logits else "sequence_length", cfg.vocab_size],
            },
        ]
        + [{"name": name, "dtype": "float32", "shape": kv_total} for i in range(n_app) for name in IO.present(i)],
        "kv_pairs": n_app,
        "max_seq_len": model.settings.max_seq_len,
    }
    info = {
        "format": "onnx",
        "opset": {"ai.onnx": OPSET, MS: 1},
        "graph": asdict(graph),
        "ops": sorted({n.op_type for n in proto.graph.node}),
        "quantization": {
            "linear": _describe(scheme.linear),
            "embedding": _describe(scheme.embedding),
            "output": {
                **_describe(scheme.output),
                "tensor": "the embedding's (shared, stored once)" if model.output is None else "lm_head",
            },
            "accuracy_level": {"4bit": graph.accuracy_level_4bit, "8bit": graph.accuracy_level_8bit},
        },
        "initializers": {"count": inits["count"], "bytes": inits["bytes"], "duplicates": len(inits["duplicates"])},
        "file_bytes": file_bytes,
        "total_bytes": sum(file_bytes.values()),
        "size": size_report(
            cfg,
            opts.bits,
            scheme.embedding.bits,
            StorageBreakdown.with_graph(sum(file_bytes.values()), **inits["kinds"]),
        ),
        "tokenizer": tok_note,
    }
    return ExportedArtifact(target=NAME, files=files, io=io, info=info)


def _describe(wq: WeightQuant) -> dict[str, Any]:
    if wq.bits >= 16:
        return {"bits": 16, "storage": "float16", "compute": "float32 (Cast folded at session load)"}
    return {
        "bits": wq.bits,
        "op": "MatMulNBits",
        "block_size": wq.group_size,
        "block_size_8bit_up_to": wq.group_size_cap,
        "symmetric": not wq.zero_points,
        "scale_rule": wq.scale_rule,
        "scale_dtype": "float32",
        "zero_point": "per block (stored)" if wq.zero_points else 1 << (wq.bits - 1),
        "activations": f"int8 symmetric per {wq.act_block} (accuracy_level 4)"
        if wq.act_block
        else "float32 (accuracy_level 0)",
    }


def _write_genai_config(bundle_dir: Path, runner: RunnerMetadata, graph: GraphOptions) -> list[str]:
    conf = {
        "model": {
            "bos_token_id": runner.bos_id,
            "context_length": runner.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": runner.head_dim,
                "hidden_size": runner.dim,
                "inputs": {
                    "input_ids": IO.input_ids,
                    "attention_mask": IO.attention_mask,
                    "position_ids": IO.position_ids,
                    "past_key_names": IO.past_key,
                    "past_value_names": IO.past_value,
                },
                "outputs": {
                    "logits": IO.logits,
                    "present_key_names": IO.present_key,
                    "present_value_names": IO.present_value,
                },
                "num_attention_heads": runner.n_heads,
                "num_hidden_layers": runner.n_applied,  # KV pairs: one per block application (sharing unrolled)
                "num_key_value_heads": runner.n_kv_heads,
            },
            "eos_token_id": list(runner.eos_ids) if len(runner.eos_ids) > 1 else runner.eos_ids[0],
            "pad_token_id": runner.eos_ids[0],
            "type": "llama",
            "vocab_size": runner.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": runner.max_seq_len,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention can write into a max_length present buffer in place; the plain graph concatenates.
            "past_present_share_buffer": graph.attention == "gqa",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    (bundle_dir / "genai_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return ["genai_config.json"]


def _write_tokenizer(bundle_dir: Path, tokenizer: Path | None, cfg: Any) -> tuple[list[str], str]:
    """tokenizer.json + tokenizer_config.json (what onnxruntime-genai reads) beside the model."""
    if tokenizer is None:
        return [], "no tokenizer in the checkpoint: onnxruntime-genai needs tokenizer.json next to the model"
    return write_tokenizer_json(bundle_dir, Path(tokenizer), cfg.max_context, cfg.bos_id, cfg.eos_id)


# ----------------------------------------------------------------------------- runtime
class OnnxRuntime(TargetRuntime):
    """onnxruntime CPU session behind the `TargetRuntime` interface; present -> past between calls."""

    def __init__(self, model_path: Path, threads: int | None = None, spin: bool | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        # No spin-waiting between ops by default: beside another busy process (two export jobs) spinning
        # threads steal the cores the next op needs (measured: large decode slowdowns on a 2-core
        # machine). A speed measurement runs alone and spins (MOBILELLM_ORT_SPIN=1, set by `bench`), as
        # onnxruntime-genai does: real 135M decode 88 -> 122 tok/s on 2 threads.
        if spin is None:
            spin = os.environ.get("MOBILELLM_ORT_SPIN") == "1"
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        threads = threads if threads is not None else int(os.environ.get("MOBILELLM_ORT_THREADS", "0"))
        so.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # truncated/corrupt model.onnx or model.onnx.data, missing data file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(
                f"{model_path}: onnxruntime cannot load the model ({first}); the bundle is corrupt or incomplete, re-export it"
            ) from None
        names = [i.name for i in self.session.get_inputs()]
        self.n_pairs = sum(1 for n in names if n.startswith(IO.past_key.split("%d")[0]) and n.endswith(".key"))
        past = next(i for i in self.session.get_inputs() if i.name == IO.past(0)[0])
        self.kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.output_names = [IO.logits] + [name for i in range(self.n_pairs) for name in IO.present(i)]
        # A graph with pruned logits computes every position's only when told to (validation reads them all).
        self.prunes_logits = any(i.name == IO.logits_to_keep for i in self.session.get_overridable_initializers())
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        self.past = [empty] * (2 * self.n_pairs)
        self.length = 0

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        return self._step(tokens, start, last_only=False)

    def forward_last(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """The last position's logits [1, vocab]; a pruned graph then skips the other rows' output projection."""
        return self._step(tokens, start, last_only=True)[-1:]

    def _step(self, tokens: np.ndarray, start: int, last_only: bool) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if start > self.length:
            raise ValueError(f"position {start} is past the cached length {self.length}")
        if start < self.length:  # rewind: drop cached positions >= start
            self.past = [p[:, :, :start] for p in self.past]
        s = len(tokens)
        feed = {
            IO.input_ids: tokens[None],
            IO.attention_mask: np.ones((1, start + s), np.int64),
            IO.position_ids: np.arange(start, start + s, dtype=np.int64)[None],
        }
        if self.prunes_logits:
            feed[IO.logits_to_keep] = np.array([1 if last_only else s], np.int64)
        for i in range(self.n_pairs):
            feed[IO.past_key % i], feed[IO.past_value % i] = self.past[2 * i], self.past[2 * i + 1]
        out = self.session.run(self.output_names, feed)
        self.past = out[1:]
        self.length = start + s
        return np.asarray(out[0][0], dtype=np.float32)


def open_runtime(bundle_dir: Path, manifest: dict[str, Any] | None = None, threads: int | None = None) -> OnnxRuntime:
    """An onnxruntime CPU session over the bundle's model (`manifest["artifact"]`, else model.onnx).

    threads: intra-op threads (None: $MOBILELLM_ORT_THREADS, else onnxruntime's default of one per
    physical core). A bundle never sets the validating machine's thread count."""
    manifest = manifest or {}
    artifact = manifest.get("artifact")
    model_file = artifact if isinstance(artifact, str) and artifact else MODEL_FILE
    path = Path(bundle_dir) / model_file
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found; re-run the export with --target onnx")
    return OnnxRuntime(path, threads)


def generate(
    bundle_dir: Path, manifest: dict[str, Any], request: GenerationRequest, on_text: TextSink
) -> GenerationResult:
    """onnxruntime-genai's Generator over the bundle (genai_config.json, tokenizer.json): the client apps use."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("generate on an ONNX bundle needs onnxruntime-genai: pip install onnxruntime-genai") from None
    try:
        model = og.Model(str(bundle_dir))
        tokenizer = og.Tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - a bundle genai cannot load is bad input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"{bundle_dir}: onnxruntime-genai cannot load the bundle ({first})") from None
    # genai's tokenizer adds no special tokens unless told; MobileLLM is trained with BOS first (apps set
    # the same option, see the README).
    tokenizer.update_options(add_special_tokens="true")
    text = request.prompt
    if request.chat:
        config = json.loads((Path(bundle_dir) / "tokenizer_config.json").read_text())
        if not config.get("chat_template"):
            raise UserError(f"{bundle_dir}: the tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": request.prompt}]), add_generation_prompt=True
        )
    ids = [int(i) for i in tokenizer.encode(text)]
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": min(len(ids) + request.max_new_tokens, int(manifest["max_context"]))}
    if request.temperature > 0:
        options.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            options["random_seed"] = request.seed
    else:
        options["do_sample"] = False
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream()
    start = time.perf_counter()
    generator.append_tokens(ids)
    prefill_s = time.perf_counter() - start
    out: list[int] = []
    pieces: list[str] = []
    start = time.perf_counter()
    while not generator.is_done() and len(out) < request.max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        out.append(token)
        piece = stream.decode(token)
        pieces.append(piece)
        on_text(piece)
    decode_s = time.perf_counter() - start
    return GenerationResult(
        client=f"onnxruntime-genai {og.__version__} Generator",
        text="".join(pieces),
        token_ids=out,
        prompt_tokens=len(ids),
        generated_tokens=len(out),
        prefill_tokens_per_s=len(ids) / prefill_s if prefill_s > 0 else float("inf"),
        decode_tokens_per_s=len(out) / decode_s if decode_s > 0 and out else 0.0,
    )


TARGET = FunctionTarget(NAME, quant_scheme, export, open_runtime, generate)
