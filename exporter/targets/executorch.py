"""ExecuTorch target: one `model.pte` that ExecuTorch's stock LLM runner (Android/iOS) runs as is.

Lowering: torch.export (dynamic prefill length 1..max_seq_len-1, KV cache as mutable buffers) ->
`to_edge_transform_and_lower(XnnpackPartitioner)` -> `to_executorch`, with the metadata methods the
stock `TextLLMRunner` reads (`get_max_seq_len`, `get_bos_id`, `get_eos_ids`, ...).

Precision (`--bits`):
- 4: int4 symmetric group-wise weights on every linear, the output projection included, with int8
  dynamic per-token activations ("8da4w", XNNPACK's qd8-f32-qb4w GEMMs). XNNPACK stores the group
  scales as bf16 and has no weight zero points, so the quantizer picks codes for bf16 scales.
- 8: int8 symmetric per-output-channel weights ("8da8w"), fp32 scales.
- 16: fp32 weights and fp32 compute. XNNPACK's fp16 GEMMs are not exercised on the x86 validation
  host the way a phone runs them, and fp32 makes the artifact checkable bit-for-bit against the
  reference; so --bits 16 means "reference precision" (4 bytes a weight), not fp16 storage.
- Embedding table: int8 per row (default), int4 group-wise (`--embedding-bits 4`) or fp32 (16);
  ExecuTorch's quant-fusion pass turns it into `quantized_decomposed::embedding_byte` /
  `embedding_4bit` (portable kernels, fp32 scales).

The codes and scales are the exporter's one quantizer's (`quantize.quantize_model`), handed to
torchao's `IntxUnpackedToInt8Tensor` as they are, so the .pte holds exactly what the twin
dequantizes; the twin also applies XNNPACK's own per-token activation rounding.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import operator
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..export_model import Attend, ExportModel, decode_stack
from ..memory import StorageBreakdown, norm_bytes, quantized_storage, rope_table_bytes, size_report
from ..progress import stage
from ..quantize import QuantizedModel, QuantizedWeight, QuantScheme, WeightQuant, nbytes
from ..threads import one_openmp_thread
from .base import (
    ExportedArtifact,
    FunctionTarget,
    GenerationRequest,
    GenerationResult,
    RunnerMetadata,
    TargetOptions,
    TargetRuntime,
    TextSink,
    apply_chat_template,
)

NAME = "executorch"
PTE_NAME = "model.pte"

# Attention through llama::update_cache + llama::custom_sdpa (kernels registered in the pip runtime
# and in the TextLLMRunner binding). Measured decode tok/s, 4-bit, 125M widths (dim 576, 9/3 heads,
# ffn 1536, vocab 32000) with 4 layers, max_seq_len 512, best of 4 on a loaded 2-core x86 box:
# custom ops 205 / 182 / 232 at context 32 / 128 / 384 vs plain graph 85 / 30 / 19 (the plain graph
# repeats K/V for GQA and attends over the whole cache every step); prefill about equal.
# MOBILELLM_ET_CUSTOM_OPS=0/1 forces a path (export(..., custom_ops=) overrides both).
_CUSTOM_OPS_ENV = "MOBILELLM_ET_CUSTOM_OPS"
DEFAULT_CUSTOM_OPS = True


# ============================================================================ quantization scheme
def _check_bits(opts: TargetOptions) -> None:
    if opts.bits not in (4, 8, 16):
        raise UserError(f"--bits must be 4, 8 or 16 for the executorch target, got {opts.bits}")
    if embedding_bits(opts) not in (4, 8, 16):
        raise UserError(f"--embedding-bits must be 4, 8 or 16, got {embedding_bits(opts)}")
    if output_bits(opts) not in (4, 8, 16):
        raise UserError(f"--output-bits must be 4, 8 or 16, got {output_bits(opts)}")


def _linear_widths(model_cfg: Any) -> dict[str, int]:
    """Input width of every quantized linear (the group size must divide each)."""
    return {
        "attention q/k/v and o projections, feed-forward gate/up, output projection (hidden size)": model_cfg.dim,
        "feed-forward down projection (ffn width)": model_cfg.ffn_dim,
    }


def check_group_size(model_cfg: Any, opts: TargetOptions) -> None:
    """Refuse a group size that would leave a layer unquantized (torchao would silently skip it)."""
    uses_groups = 4 in (opts.bits, embedding_bits(opts), output_bits(opts))
    if not uses_groups:
        return
    g = opts.group_size
    if g <= 0:
        raise UserError(f"--group-size must be positive, got {g}")
    for layer, width in _linear_widths(model_cfg).items():
        if width % g:
            divisors = [d for d in (256, 128, 64, 32, 16) if model_cfg.dim % d == 0 and model_cfg.ffn_dim % d == 0]
            raise UserError(
                f"--group-size {g} does not divide the input width {width} of the {layer}; "
                f"use a divisor of every width (e.g. {divisors[0] if divisors else 'a smaller power of two'})"
            )


def _separate_output(opts: TargetOptions) -> bool:
    """Whether a shared embedding's output projection is its own (differently rounded) weight: always
    except fp32 linears over an fp32 table, where both read the one fp32 tensor."""
    return output_bits(opts) != 16 or embedding_bits(opts) != 16


# At 4 bits the shared table is stored twice (XNNPACK has no gather; see _output_note), so the bytes go
# where they count: measured on the real 135M model (grid-broken copy, GPTQ, perplexity vs fp32), an
# int4 output projection with an int8 table costs +21.9%, an int8 output projection with an int4 table
# +11.7%, for the same bytes. The int4 table uses groups of up to 128 (the largest multiple of the
# group size that divides the width: 96 at width 576) so that the .pte stays within the size of
# llama.cpp's Q4_K_M file of the same model (105.5 MB).
DEFAULT_EMBEDDING_BITS = {4: 4, 8: 8, 16: 16}
DEFAULT_OUTPUT_BITS = {4: 8, 8: 8, 16: 16}
EMBEDDING_4BIT_GROUP = 128


def embedding_bits(opts: TargetOptions) -> int:
    return opts.embedding_bits if opts.embedding_bits is not None else DEFAULT_EMBEDDING_BITS[opts.bits]


def _embedding_quant(opts: TargetOptions) -> WeightQuant:
    bits = embedding_bits(opts)
    if bits == 16:
        return WeightQuant(16, float_dtype=torch.float32)
    # embedding_byte / embedding_4bit keep fp32 scales; 8-bit is one scale per row.
    group = opts.group_size if bits == 4 else None
    wq = WeightQuant(
        bits, group_size=group, scale_dtype=torch.float32, negative_scales=False, group_size_cap=EMBEDDING_4BIT_GROUP
    )
    return opts.method.apply(wq, has_zero_points=False)


def _linear_quant(bits: int, opts: TargetOptions) -> WeightQuant:
    if bits == 16:
        return WeightQuant(16, float_dtype=torch.float32)
    if bits == 8:
        return opts.method.apply(
            WeightQuant(8, group_size=None, scale_dtype=torch.float32, negative_scales=False), has_zero_points=False
        )
    # XNNPACK serializes per-channel-group scales as bf16 (node_visitor.get_quant_params).
    return opts.method.apply(
        WeightQuant(4, group_size=opts.group_size, scale_dtype=torch.bfloat16, negative_scales=False),
        has_zero_points=False,
    )


def output_bits(opts: TargetOptions) -> int:
    """The separately stored output projection's precision: `--output-bits`, else the default for the bits."""
    return opts.output_bits if opts.output_bits is not None else DEFAULT_OUTPUT_BITS[opts.bits]


def quant_scheme(opts: TargetOptions) -> QuantScheme:
    _check_bits(opts)
    linear = _linear_quant(opts.bits, opts)
    # The output projection is a separately stored linear (see _separate_output), quantized like the
    # linears unless --output-bits says otherwise; int8 dynamic activations wherever weights are ints.
    overrides = tuple((role, _linear_quant(bits, opts)) for role, bits in opts.resolved_layer_bits({}))
    return QuantScheme(
        linear=linear,
        embedding=_embedding_quant(opts),
        output=_linear_quant(output_bits(opts), opts),
        activations="none" if opts.bits == 16 else "int8_per_token",
        separate_output=_separate_output(opts),
        overrides=overrides,
    )


# ============================================================================ custom-op attention
class _CustomOpModel(nn.Module):
    """The ExportModel (same modules, same weights) with attention through `llama::update_cache` +
    `llama::custom_sdpa`: caches laid out [1, max_seq_len, n_kv_heads, head_dim], GQA inside the kernel."""

    def __init__(self, model: ExportModel) -> None:
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers torch.ops.llama)

        self.model = model
        cfg, settings = model.config, model.settings
        shape = (1, settings.max_seq_len, cfg.n_kv_heads, cfg.head_dim)
        for slot in range(len(model.schedule)):
            self.register_buffer(f"k_cache_{slot}", torch.zeros(shape, dtype=settings.dtype), persistent=False)
            self.register_buffer(f"v_cache_{slot}", torch.zeros(shape, dtype=settings.dtype), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        model = self.model
        seqlen = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seqlen <= model.settings.max_seq_len)
        cos, sin = model.rope_at(start, seqlen)
        dim = model.config.dim

        def attention(slot: int) -> Attend:
            k_cache, v_cache = getattr(self, f"k_cache_{slot}"), getattr(self, f"v_cache_{slot}")

            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                torch.ops.llama.update_cache(k, k_cache, start)
                torch.ops.llama.update_cache(v, v_cache, start)
                return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True).reshape(1, seqlen, dim)

            return attend

        return decode_stack(model, tokens, cos, sin, attention, model.settings.last_logits_only, seqlen)


def _use_custom_ops(override: bool | None) -> bool:
    if override is not None:
        return override
    env = os.environ.get(_CUSTOM_OPS_ENV)
    return DEFAULT_CUSTOM_OPS if env is None else env not in ("0", "false", "no")


# ============================================================================ export
def _metadata(runner: RunnerMetadata, custom_ops: bool) -> dict[str, Any]:
    """The constant methods ExecuTorch's TextLLMRunner (and Android's LlmModule) read."""
    return {
        "get_max_seq_len": runner.max_seq_len,
        "get_max_context_len": runner.max_seq_len,
        "get_bos_id": runner.bos_id,
        "get_eos_ids": list(runner.eos_ids),
        "get_vocab_size": runner.vocab_size,
        "get_n_layers": runner.n_applied,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": custom_ops,
        "enable_dynamic_shape": True,
    }


def _torchao_weight(qw: QuantizedWeight, activations: bool) -> Tensor:
    """Our codes and scales as torchao's unpacked intx tensor (what `quantize_` would have built),
    which ExecuTorch lowers to XNNPACK's blockwise GEMM (linears) or the quantized embedding kernels."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    zeros = qw.zeros if qw.zeros is not None else torch.zeros_like(qw.scales, dtype=torch.int8)
    return IntxUnpackedToInt8Tensor(
        qdata=qw.codes.to(torch.int8),
        scale=qw.scales.float(),
        zero_point=zeros.to(torch.int8),
        target_dtype=getattr(torch, f"int{qw.wq.bits}"),
        block_size=(1, qw.group_size),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
        if activations
        else None,
    )


def _quantize_for_export(model: ExportModel, quantized: QuantizedModel) -> ExportModel:
    """A copy holding torchao tensors built from the quantizer's codes; the output projection becomes
    its own linear (quantized like every linear) unless --bits 16."""
    scheme = quantized.scheme
    m = copy.deepcopy(model)
    m.settings = dataclasses.replace(m.settings, last_logits_only=True)  # the runners read the last row only
    if scheme.separate_output and m.output is None:
        m.output = nn.Linear(m.config.dim, m.config.vocab_size, bias=False)

    def put(module: nn.Module, key: str, activations: bool) -> None:
        value = quantized[key]
        tensor = _torchao_weight(value, activations) if isinstance(value, QuantizedWeight) else value.float()
        module.weight = nn.Parameter(tensor, requires_grad=False)

    for b, block in enumerate(m.blocks):
        for name, child in block.named_children():
            if isinstance(child, nn.Linear):
                put(child, f"blocks.{b}.{name}.weight", scheme.int8_dynamic_activations)
    put(m.tok_embeddings, "tok_embeddings.weight", False)
    if m.output is not None:
        put(m.output, "output.weight", scheme.int8_dynamic_activations)
    return m


def _pattern_targets(patterns: Any) -> list[set[Any]]:
    return [{n.target for n in p.graph.nodes if n.op == "call_function"} for p in patterns]


@contextlib.contextmanager
def skip_inapplicable_xnnpack_passes() -> Iterator[collections.Counter[str]]:
    """XNNPACK's preprocess runs 17 graph passes on every partition, each re-tracing the partition
    (~25-60 ms a pass at 125M widths, 150-300 partitions). Sixteen rewrite only ops or patterns a
    MobileLLM graph does not have (batch norm, convolution, pooling, prelu, padding, relu/hardtanh,
    the upsample and SDPA patterns, dtype and dim-order copies, mm/addmm/bmm, concatenations of more
    than five, custom meta to propagate, channels-last tensors, ops on constants alone); here each is
    skipped on a partition that holds none of what it rewrites (checked before each pass, on the
    graph the previous passes left). The .pte is byte-identical to the stock lowering's
    (tests/test_target_executorch.py). Yields how many partitions each pass ran on."""
    from executorch.backends.xnnpack import _passes as xp
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_quant
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.dialects.edge._ops import EdgeOpOverload
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsMap
    from executorch.exir.program._program import _transform

    aten = exir_ops.edge.aten
    batch_norm = {aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default}
    # A pass applies when the graph holds any of its trigger ops; for the pattern-matching passes,
    # when it holds every op of one of their patterns (SubgraphMatcher matches node targets exactly).
    any_of: dict[type, set[Any]] = {
        xp.FuseBatchNormPass: batch_norm,
        xp.DecomposeBatchNorm: batch_norm,
        xp.FuseActivationPass: {aten.relu.default, aten.hardtanh.default},
        xp.InsertPadQDQPass: {aten.constant_pad_nd.default},
        xp.Conv1dUnsqueezePass: {aten.convolution.default},
        xp.PReLUReshapePass: {aten._prelu_kernel.default},
        xp.RemoveRedundantCopyPass: {aten._to_copy.default},
        xp.ConvertToLinearPass: set(xp.ConvertToLinearPass.targets),
        xp.DimOrderOpsRevertPass: {op for op in MemoryFormatOpsMap if isinstance(op, EdgeOpOverload)},
        xp.RemoveGetItemPass: {aten.max_pool2d_with_indices.default, aten.max.dim},
    }
    channels_last = xp.ChannelsLastTaggedReshapePass

    def nhwc_tensor(node: Any) -> bool:
        val = node.meta.get("val")
        return isinstance(val, torch.Tensor) and val.dim() == 4 and channels_last._is_nhwc_tensor(val)

    # Passes whose trigger is more than an op: what each one's `call` looks for.
    when: dict[type, Callable[[Any], bool]] = {
        xp.DecomposeConcatenate: lambda n: n.target == aten.cat.default and len(n.args[0]) > 5,
        xp.PropagateCustomMetaPass: lambda n: (
            (is_quant(n) or is_dequant(n)) and isinstance(n.args[0], torch.fx.Node) and "custom" in n.args[0].meta
        ),
        # it converts layouts around the ops that need NHWC, and for channels-last tensors only
        channels_last: lambda n: n.target in channels_last.memory_sensitive_ops_nhwc or nhwc_tensor(n),
        # it folds ops whose inputs are all real tensors: in a partition those are get_attr constants
        # (lifted weights arrive as placeholders, traced as fake tensors)
        ConstPropPass: lambda n: n.op == "call_function" and all(a.op == "get_attr" for a in n.all_input_nodes),
    }
    all_of: dict[type, list[set[Any]]] = {
        xp.ConvertToUpsampleBilinear2d: _pattern_targets(bilinear_2d.get_graphs_dict()),
        xp.ConvertToSDPAPass: _pattern_targets(sdpa.get_graphs()),
    }

    def applies(pass_: type, ep: Any) -> bool:
        if pass_ in when:
            return any(when[pass_](n) for n in ep.graph.nodes)
        if pass_ not in any_of and pass_ not in all_of:
            return True
        present = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        if pass_ in any_of:
            return bool(any_of[pass_] & present)
        return any(targets <= present for targets in all_of[pass_])

    ran: collections.Counter[str] = collections.Counter()

    def transform(self: Any) -> Any:  # XNNPACKPassManager.transform, minus inapplicable passes
        ep = self.exported_program
        for pass_ in self.passes:
            if applies(pass_, ep):
                ran[pass_.__name__] += 1
                ep = _transform(ep, pass_(ep) if issubclass(pass_, xp.XNNPACKPass) else pass_())
        return ep

    original = xp.XNNPACKPassManager.transform
    xp.XNNPACKPassManager.transform = transform
    try:
        yield ran
    finally:
        xp.XNNPACKPassManager.transform = original


@contextlib.contextmanager
def _recompile_deferred(gm: Any) -> Iterator[None]:
    """`gm.recompile()` (regenerating the Python code of the whole graph and of every child graph
    module) becomes a no-op inside, and runs once on the way out. Code generation reads the graph
    without changing it, so the code afterwards is what the last skipped recompile would have made."""
    gm.recompile = lambda: None  # an instance attribute shadows GraphModule.recompile
    try:
        yield
    finally:
        del gm.recompile
        gm.recompile()


class _SharedConstantCopies:
    """ExecuTorch's `_maybe_duplicate_constant_nodes(program, tag)` (called once per partition tag),
    with the same graph edits in the same order but without its whole-program work per copied
    constant: `duplicate_constant_node` scans every node to find the constant by name, deep-copies
    every input spec, regenerates the program's Python code (and every delegate submodule's) and runs
    the verifier, once per constant read by two partitions: 360 times on a 125M-LS graph (each block's
    weights, scales and zero points feed both of its applications), 190 s profiled. Here the
    placeholders are indexed by tag once, the signature is rebuilt from the placeholders, and the
    recompile and verification run once, in `flush` (before the partitions are cut)."""

    def __init__(self) -> None:
        self.index: dict[int, tuple[Any, dict[str, list[Any]], dict[Any, Any]]] = {}
        self.pending: dict[int, Any] = {}
        self.made = 0  # copies placed

    def _indexed(self, ep: Any) -> tuple[dict[str, list[Any]], dict[Any, Any]]:
        entry = self.index.get(id(ep))
        if entry is None or entry[0] is not ep:
            placeholders = ep.graph.find_nodes(op="placeholder")
            by_tag: dict[str, list[Any]] = {}
            for node in placeholders:
                tag = node.meta.get("delegation_tag", "")
                if tag:
                    by_tag.setdefault(tag, []).append(node)
            specs = dict(zip(placeholders, ep.graph_signature.input_specs, strict=True))
            entry = self.index[id(ep)] = (ep, by_tag, specs)
        return entry[1], entry[2]

    def __call__(self, ep: Any, tag: str) -> None:
        from executorch.exir.backend.canonical_partitioners.duplicate_constant_node_pass import (
            _get_attribute_or_constants,
        )
        from executorch.exir.backend.utils import _assign_new_tag
        from torch.export.exported_program import InputSpec, TensorArgument
        from torch.export.graph_signature import InputKind

        by_tag, specs = self._indexed(ep)
        # the stock candidate set, filled in graph order (its iteration order decides the edit order)
        candidates: set[str] = set()
        nodes: dict[str, Any] = {}
        for node in by_tag.get(tag, ()):
            if node.meta.get("delegation_tag", "") != tag:
                continue
            for user in node.users:
                if user.meta.get("delegation_tag", None) != tag:
                    if node.meta.get("no_copy", False):
                        raise RuntimeError(
                            f"constant data node ({node}) is tagged with ({tag}) but has user ({user}) "
                            f"which has tag ({user.meta.get('delegation_tag', None)})"
                        )
                    candidates.add(node.name)
                    nodes[node.name] = node
        if not candidates:
            return
        copied: set[str] = set()
        retag: list[Any] = []
        for name in candidates:  # duplicate_constant_node(ep, name), minus the whole-program work
            node = nodes[name]
            spec = specs[node]
            value = _get_attribute_or_constants(ep, node)
            if value is None:
                raise RuntimeError(
                    f"placeholder node for non-params, non-buffer, and non-tensor constants should not be tagged: {node} "
                )
            users = list(node.users.keys())
            for ith in range(1, len(node.users)):
                fqn = node.name + f"_copy_{ith - 1}"
                with ep.graph.inserting_before(node):
                    copy_node = ep.graph.placeholder(fqn)
                    copied.add(fqn)
                    for k, v in node.meta.items():
                        copy_node.meta[k] = v
                    copy_node.meta["val"] = node.meta["val"]
                    users[ith].args = tuple(copy_node if arg == node else arg for arg in users[ith].args)
                    users[ith].kwargs = {k: copy_node if v == node else v for k, v in users[ith].kwargs.items()}
                    if spec.kind == InputKind.CONSTANT_TENSOR or (
                        spec.kind == InputKind.BUFFER and spec.persistent is False
                    ):
                        ep.constants[fqn] = copy.deepcopy(value)
                    else:
                        ep.state_dict[fqn] = copy.deepcopy(value)
                    specs[copy_node] = InputSpec(
                        kind=spec.kind, arg=TensorArgument(name=fqn), target=spec.target, persistent=spec.persistent
                    )
                    retag.append(copy_node)
                    self.made += 1
            retag.append(node)
        ep.graph_signature.input_specs = [specs[n] for n in ep.graph.find_nodes(op="placeholder")]
        self.pending[id(ep)] = ep
        names = candidates | copied
        if any(n.name not in names for n in retag):  # a copy renamed by the graph's namespace: stock scan
            _assign_new_tag(ep, names)
            return
        for node in retag:  # _assign_new_tag on the nodes it would find by name
            users_tag = {user.meta.get("delegation_tag", None) for user in node.users}
            if len(users_tag) == 1:
                node.meta["delegation_tag"] = users_tag.pop()

    def flush(self, ep: Any) -> None:
        """What the last duplicate_constant_node call ends with: recompile and verify the program."""
        if self.pending.pop(id(ep), None) is not None:
            ep.graph_module.recompile()
            ep._validate()


def _can_merge_partitions(self: Any, p1: int, p2: int, partitions_by_id: dict[int, Any]) -> bool:
    """GroupBasedPartitioner._can_merge_partitions with its inner test `any(n in combined for n in
    downstream)` (a Python loop over the transitive downstream set of each external user, i.e. over
    most of the graph: 857 M steps at 125M-LS, 86 M at 125M) as `not downstream.isdisjoint(combined)`,
    which probes the smaller set; same answer for every pair."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    combined = set(partitions_by_id[p1].nodes.keys()) | set(partitions_by_id[p2].nodes.keys())
    external = [user for node in combined for user in node.users if user not in combined]
    for node in external:
        if not self.dependency_viewer.downstreams_of(node).isdisjoint(combined):
            return False
    return bool(validate_partition(list(combined)))


def _legalize_graph_in_place(gm: Any) -> Any:
    """torch's `legalize_graph` (the topological re-sort ExecuTorch runs after cutting each partition out
    of the program) without copying the graph: the same Kahn order, the nodes moved into it in place.
    The copy re-creates every node of the program once per partition (303 x ~20k nodes at 125M-LS).
    What the copy leaves is rebuilt the same way: the name table (the copy's fresh namespace decides the
    names later nodes get) and the find_nodes table, both filled in the new order. A name the copy
    would change (none in practice) falls back to the copy."""
    from torch.fx.graph import _FindNodesLookupTable, _Namespace
    from torch.fx.passes.tools_common import legalize_graph

    graph = gm.graph
    indeg = dict.fromkeys(graph.nodes, 0)
    for node in graph.nodes:
        for user in node.users:
            indeg[user] += 1
    queue = collections.deque(node for node, n in indeg.items() if n == 0)
    order = []
    while queue:
        cur = queue.popleft()
        order.append(cur)
        for user in cur.users:
            indeg[user] -= 1
            if indeg[user] == 0:
                if user.op == "call_function" and user.target in _PRIORITIZED_OPS:
                    queue.appendleft(user)
                else:
                    queue.append(user)
    if len(order) < len(indeg):
        return legalize_graph(gm)  # a cycle: the stock error message
    names = _Namespace()
    for node in order:
        if names.create_name(node.name, None) != node.name:
            return legalize_graph(gm)
        names.associate_name_with_obj(node.name, node)
    cursor = graph._root
    for node in order:
        if cursor.next is not node:
            cursor.append(node)
        cursor = node
    graph._graph_namespace = names
    graph._find_nodes_lookup_table = _FindNodesLookupTable()
    for node in order:
        graph._find_nodes_lookup_table.insert(node)
    gm.recompile()  # what assigning the copy to gm.graph does
    return gm


# The ops torch's legalize_graph schedules first (a list local to that function; copied).
_PRIORITIZED_OPS = frozenset(
    [
        operator.add,
        operator.mul,
        operator.sub,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.le,
        operator.lt,
        operator.ge,
        operator.gt,
        operator.eq,
        operator.ne,
        torch.ops.aten.sym_constrain_range.default,
        torch.ops.aten.sym_constrain_range_for_size.default,
        torch.ops.aten._assert_async.msg,
        torch.ops.aten.scalar_tensor.default,
        torch.ops.aten._assert_scalar.default,
    ]
)


@contextlib.contextmanager
def fast_partitioning() -> Iterator[_SharedConstantCopies]:
    """ExecuTorch's partition-and-lower step without the work that grows with partitions x nodes, which
    is what made 125M-LS (60 block applications, 303 XNNPACK partitions) lower 3.5x slower than 125M
    (30, 153) instead of 2x:

    - cutting each partition out of the program re-sorts the whole graph into a copy
      (`legalize_graph`), and installing the copy recompiles the program's Python code and that of
      every delegate submodule cut so far (P^2/2 submodule recompiles); here the graph is re-sorted in
      place (`_legalize_graph_in_place`) and the program recompiles once, after the last cut (nothing
      runs or reads the generated code in between);
    - the constants shared by two partitions (the LS weights) are copied one by one with a whole-program
      recompile and verification each (`_SharedConstantCopies`);
    - the partitioner's cycle check scans transitive downstream sets in Python (`_can_merge_partitions`).

    The graph edits, their order and hence the .pte bytes are the stock lowering's
    (tests/test_target_executorch.py). Yields the constant copier (`.made`: copies placed)."""
    from executorch.exir import lowered_backend_module
    from executorch.exir.backend import backend_api
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    copies = _SharedConstantCopies()
    original_create = backend_api._create_partitions

    def create_partitions(
        tagged_graph_module: Any, partition_result: Any, owning_program: Any, is_submodule: bool = False
    ) -> Any:
        copies.flush(owning_program)
        with _recompile_deferred(tagged_graph_module):
            return original_create(tagged_graph_module, partition_result, owning_program, is_submodule)

    saved = (
        backend_api._maybe_duplicate_constant_nodes,
        original_create,
        GroupBasedPartitioner._can_merge_partitions,
        lowered_backend_module.legalize_graph,
    )
    backend_api._maybe_duplicate_constant_nodes = copies
    backend_api._create_partitions = create_partitions
    GroupBasedPartitioner._can_merge_partitions = _can_merge_partitions
    lowered_backend_module.legalize_graph = _legalize_graph_in_place
    try:
        yield copies
    finally:
        (
            backend_api._maybe_duplicate_constant_nodes,
            backend_api._create_partitions,
            GroupBasedPartitioner._can_merge_partitions,
            lowered_backend_module.legalize_graph,
        ) = saved


def xnnpack_partitioner(fast: bool = True) -> Any:
    """XNNPACK's partitioner. Its op filter makes to_edge_transform_and_lower decompose the whole
    program twice more (the EDGE_DO_NOT_DECOMP round trip: ~40 s at 125M); the fast one keeps every op
    XNNPACK asks to keep (linear, torchao's quantize/dequantize/choose_qparams) without the per-node
    check, which is what the check concludes for an exporter graph: every linear is an 8da4w, 8da8w or
    fp32 linear XNNPACK takes. The .pte is byte-identical (tests/test_executorch.py)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class KeepingXnnpackPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep: Any) -> tuple[list[Any], None]:
            ops, _check = super().ops_to_not_decompose(ep)
            return ops, None

    return KeepingXnnpackPartitioner() if fast else XnnpackPartitioner()


def lower_to_pte(
    model: ExportModel,
    quantized: QuantizedModel,
    metadata: dict[str, Any],
    custom_ops: bool,
    fast_lowering: bool = True,
) -> tuple[bytes, dict[str, float]]:
    """The .pte bytes and the seconds each phase took."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    times: dict[str, float] = {}
    t = time.perf_counter()
    qm = _quantize_for_export(model, quantized)
    module: nn.Module = _CustomOpModel(qm) if custom_ops else qm
    times["quantize"] = time.perf_counter() - t
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        t = time.perf_counter()
        with stage("[executorch] torch.export"):
            ep = torch.export.export(module, qm.example_inputs(), dynamic_shapes=qm.dynamic_shapes(), strict=False)
        times["torch_export"] = time.perf_counter() - t
        t = time.perf_counter()
        fast = contextlib.ExitStack()
        if fast_lowering:
            fast.enter_context(skip_inapplicable_xnnpack_passes())
            fast.enter_context(fast_partitioning())
        with stage("[executorch] to_edge_transform_and_lower (XNNPACK partitioning)"), fast:
            edge = to_edge_transform_and_lower(
                ep,
                partitioner=[xnnpack_partitioner(fast_lowering)],
                compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
                constant_methods=metadata,
            )
        times["to_edge_transform_and_lower"] = time.perf_counter() - t
        t = time.perf_counter()
        with stage("[executorch] to_executorch (memory planning, serialization)"):
            prog = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=True,
                    do_quant_fusion_and_const_prop=True,
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                    sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                )
            )
            buf = prog.buffer
        times["to_executorch"] = time.perf_counter() - t
    return buf, {k: round(v, 1) for k, v in times.items()}


def embedding_copies(pte: bytes, quantized: QuantizedModel) -> int | None:
    """How many times the embedding table's stored bytes occur in the .pte (fp32 rows or int8 codes;
    counted on the first 4 rows, which cannot collide by chance). None for a 4-bit table (packed)."""
    table = quantized["tok_embeddings.weight"]
    if isinstance(table, QuantizedWeight):
        if table.wq.bits != 8:
            return None
        raw = table.codes[:4].contiguous().numpy().tobytes()
    else:
        raw = table[:4].float().contiguous().numpy().tobytes()
    return pte.count(raw)


def _output_note(cfg: Any, opts: TargetOptions, copies: int | None) -> str:
    if not cfg.share_embedding:
        return "untied lm_head: its own weight, quantized like the linears"
    if _separate_output(opts):
        return (
            "shared table stored twice: the lookup reads the embedding-precision table (portable "
            "embedding kernel), the output projection is an XNNPACK linear at the linears' precision. "
            "XNNPACK has no gather op and the pip runtime has no kernel that runs the projection from "
            "the portable table without materializing it, so one copy would cost decode speed or memory"
        )
    return f"fp32 table shared by lookup and projection in the graph; found {copies} time(s) in the .pte"


def export(
    model: ExportModel,
    quantized: QuantizedModel,
    ckpt: Checkpoint | None,
    opts: TargetOptions,
    bundle_dir: Path,
    *,
    custom_ops: bool | None = None,
) -> ExportedArtifact:
    cfg = model.config
    _check_bits(opts)
    check_group_size(cfg, opts)
    use_custom = _use_custom_ops(custom_ops)
    meta = _metadata(RunnerMetadata.of(cfg, opts.max_seq_len), use_custom)
    t0 = time.perf_counter()
    buf, phase_seconds = lower_to_pte(model, quantized, meta, use_custom)
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / PTE_NAME).write_bytes(buf)
    scheme = quant_scheme(opts)
    copies = embedding_copies(buf, quantized)
    # The .pte's parts are not addressable from Python: codes/scales are what the quantizer handed the
    # lowering (XNNPACK packs them as given), the rest of the file (program, extra table copies) is graph.
    breakdown = StorageBreakdown.with_graph(
        len(buf),
        **quantized_storage(quantized),
        norms=norm_bytes(cfg, 4),
        rope_tables=rope_table_bytes(cfg, opts.max_seq_len, 4),
    )
    output_bytes = nbytes(cfg.vocab_size, cfg.dim, scheme.output)
    table_bytes = nbytes(cfg.vocab_size, cfg.dim, scheme.embedding)
    info: dict[str, Any] = {
        "runtime": "executorch 1.5 (XNNPACK delegate + portable/optimized kernels), stock TextLLMRunner",
        "lowering": "torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch",
        "attention": "llama::update_cache + llama::custom_sdpa"
        if use_custom
        else "plain graph (slice copy_ cache update, decomposed SDPA)",
        "weights": {
            4: f"int4 symmetric group-wise (group {opts.group_size}, torchao scale amax/7.5, bf16 scales in XNNPACK), int8 dynamic per-token asymmetric activations (8da4w)",
            8: "int8 symmetric per-output-channel (torchao scale amax/127.5, fp32 scales), int8 dynamic per-token asymmetric activations (8da8w)",
            16: "fp32 weights and compute (reference precision; fp16 storage not used so the artifact is checkable exactly)",
        }[opts.bits],
        "embedding": {
            4: f"int4 symmetric group-wise (group {opts.group_size}), fp32 scales (quantized_decomposed::embedding_4bit)",
            8: "int8 symmetric per-row, fp32 scales (quantized_decomposed::embedding_byte)",
            16: "fp32",
        }[embedding_bits(opts)],
        "output_projection": _output_note(cfg, opts, copies),
        "group_size": opts.group_size if 4 in (opts.bits, embedding_bits(opts)) else None,
        "scale_dtype": str(scheme.linear.scale_dtype).removeprefix("torch.") if opts.bits != 16 else None,
        "pte_bytes": len(buf),
        "size": size_report(cfg, opts.bits, embedding_bits(opts), breakdown),
        "embedding_table_copies_in_pte": copies,
        "embedding_stored_once": (not _separate_output(opts)) and copies == 1,
        "extra_bytes_for_output_projection": output_bytes
        if _separate_output(opts)
        else (copies - 1) * table_bytes
        if copies
        else None,
        "export_seconds": round(time.perf_counter() - t0, 1),
        "export_phase_seconds": phase_seconds,
        "metadata": meta,
    }
    io = {
        "method": "forward",
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, f"1..{opts.max_seq_len - 1}"]},
            {"name": "input_pos", "dtype": "int64", "shape": [1]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 1, cfg.vocab_size]}],  # last position only
        "kv_cache": "internal mutable buffers, one pair per block application",
        "metadata_methods": sorted(meta),
    }
    return ExportedArtifact(target=NAME, files=[PTE_NAME], io=io, info=info)


# ============================================================================ runtime
def load_kernels() -> None:
    """Register the llama custom ops (update_cache, custom_sdpa) and the quantized kernels
    (embedding_byte/4bit) in the ExecuTorch runtime; their AOT libraries carry the kernels."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def match_threadpool_to_torch() -> int:
    """Size ExecuTorch's thread pool (XNNPACK's and the custom ops') to torch's intra-op thread count.

    In the pip runtime `llama::custom_sdpa` runs OpenMP regions inside ExecuTorch's pool: its speed falls
    apart when the two disagree. Measured per decode token on the real 135M model (4-bit .pte, 2-core
    x86, ETDump), OpenMP at its defaults: attention 1.4 ms with torch 1 / ExecuTorch 1 thread, 101 ms
    with torch 1 / ExecuTorch 2 (the pool's default is one thread per core, so `torch.set_num_threads(1)`
    alone hit this), 1674 ms with torch 2 / ExecuTorch 1; with OpenMP at one thread per thread
    (`threads.one_openmp_thread_outside_torch`, then `one_openmp_thread` around each call, as the
    runtime does) 1.2 ms at 2 / 2. Returns the thread count both pools now use."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    threads = torch.get_num_threads()
    if _threadpool_get_thread_count() != threads:
        _unsafe_reset_threadpool(threads)  # no method of this process is running: safe
    return threads


# executorch::runtime::BackendOption as libexecutorch lays it out (x86-64 / aarch64, libstdc++):
# char key[64]; std::variant<bool, int, std::array<char, 256>> value (storage at 64, index at 320).
_OPTION_BYTES, _OPTION_VALUE_AT, _OPTION_INDEX_AT = 324, 64, 320
_SET_OPTION = "_ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"
_GET_OPTION = "_ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"


def enable_xnnpack_weight_cache() -> bool:
    """Make XNNPACK pack each stored weight once per process, whatever number of delegates read it.

    Without the cache every delegate packs the weights it reads, so a layer-shared model holds each
    shared block's packed weights once per application (measured at 125M-LS 4-bit: +58 MB at load,
    the whole linear-weight set a second time). ExecuTorch's Android/iOS builds turn the cache on
    (pytorch/executorch#13738); the pip runtime is built without it and Python has no binding for
    backend options, so this sets the documented `weight_cache_enabled` option through
    libexecutorch's C++ `set_option` and reads it back. Returns whether the cache is on.
    `MOBILELLM_ET_WEIGHT_CACHE=0` leaves the runtime's default (for comparison)."""
    import ctypes

    import executorch.runtime

    if os.environ.get("MOBILELLM_ET_WEIGHT_CACHE", "1") == "0":
        return False
    try:
        lib = ctypes.CDLL(
            str(Path(executorch.runtime.__file__).parents[1] / "lib" / "libexecutorch.so"), mode=ctypes.RTLD_GLOBAL
        )
        set_option, get_option = getattr(lib, _SET_OPTION), getattr(lib, _GET_OPTION)
    except (OSError, AttributeError):
        return False
    for fn in (set_option, get_option):
        fn.argtypes, fn.restype = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32

    def option(value: bool | None) -> ctypes.Array:
        buf = (ctypes.c_ubyte * _OPTION_BYTES)()
        key = b"weight_cache_enabled"
        buf[: len(key)] = key
        buf[_OPTION_VALUE_AT] = int(bool(value))
        return buf

    if set_option(b"XnnpackBackend", ctypes.addressof(on := option(True)), 1) != 0:
        return False
    readback = option(False)
    return (
        get_option(b"XnnpackBackend", ctypes.addressof(readback), 1) == 0
        and readback[_OPTION_INDEX_AT] == 0
        and readback[_OPTION_VALUE_AT] == 1
        and on[_OPTION_VALUE_AT] == 1
    )


class _CapturedStderr:
    def __init__(self) -> None:

        self.file = tempfile.TemporaryFile(mode="w+b")
        self.text = io.StringIO()

    def read(self) -> str:
        self.file.seek(0)
        return self.text.getvalue() + self.file.read().decode(errors="replace")


@contextlib.contextmanager
def _native_stderr() -> Iterator[_CapturedStderr]:
    """Capture what the ExecuTorch runtime logs while loading: its C++ log goes to fd 2, and the
    Python bindings may route it through `sys.stderr` instead; catch both."""

    captured = _CapturedStderr()
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    os.dup2(captured.file.fileno(), 2)
    sys.stderr = captured.text
    try:
        yield captured
    finally:
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


@contextlib.contextmanager
def _runner_output_silenced() -> Iterator[None]:
    """The stock runner prints every token, its stats and its logs on fds 1 and 2; keep the process's
    own `sys.stdout` (the caller's stream of pieces) on the real stdout while both fds are muted."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, io.UnsupportedOperation):
        on_fd1 = False  # a Python-level stream (e.g. captured): the muted fd does not affect it
    saved_out, saved_err, saved_stream = os.dup(1), os.dup(2), sys.stdout
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if on_fd1:
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(saved_out), "wb"), write_through=True)
    try:
        yield
    finally:
        if on_fd1:
            sys.stdout.flush()
            sys.stdout.close()
        sys.stdout = saved_stream
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, devnull):
            os.close(fd)


class ExecuTorchRuntime(TargetRuntime):
    """`model.pte` through `executorch.runtime`; `reset()` loads a fresh method (fresh KV buffers)."""

    def __init__(self, pte_path: Path) -> None:
        from executorch.runtime import Runtime

        load_kernels()
        self.xnnpack_weight_cache = enable_xnnpack_weight_cache()
        with _native_stderr():  # the pool logs its new size
            self.threads = match_threadpool_to_torch()
        if not Path(pte_path).is_file():
            raise UserError(f"{pte_path}: ExecuTorch program not found")
        # The C++ loader explains a bad file on the process's stderr (fd 2) and raises a bare error
        # code; capture its words so the user gets one line naming the problem.
        with _native_stderr() as native:
            try:
                self._program = Runtime.get().load_program(Path(pte_path))
                self._method = None
                self.reset()
            except Exception as exc:  # noqa: BLE001 - any load failure is a bad artifact
                detail = [line for line in native.read().strip().splitlines() if "cpuinfo" not in line]
                failed = [line for line in detail if "fail" in line.lower()] or detail
                reason = failed[0].split("] ", 1)[-1] if failed else str(exc)
                raise UserError(
                    f"{pte_path}: not a loadable ExecuTorch program ({reason}); re-export the bundle"
                ) from None

    def details(self) -> dict[str, Any]:
        return {"xnnpack_weight_cache": self.xnnpack_weight_cache, "executorch_threads": self.threads}

    def reset(self) -> None:
        self._method = None  # drop the old planned memory first
        self._method = self._program.load_method("forward")

    def forward_last(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """One call of the program: logits [1, V] of the last position (what the runners read)."""
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).reshape(1, -1)
        with one_openmp_thread():  # OpenMP inside the attention kernel, on every thread of the pool alike
            out = self._method.execute([t, torch.tensor([start], dtype=torch.long)])  # type: ignore[union-attr]
        logits = out[0].float()
        return logits.reshape(-1, logits.shape[-1])[-1:].numpy().copy()

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Logits [S, V] of every position. The program returns the last position's only, so rows
        0..S-2 come from one-token steps and the last row from a real prefill of all S tokens, which
        then rewrites the same cache rows as a phone's prefill would (linear in S; both paths run)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        rows = [self.forward_last(tokens[i : i + 1], start + i) for i in range(len(tokens) - 1)]
        rows.append(self.forward_last(tokens, start))
        return np.concatenate(rows, axis=0)


def open_runtime(bundle_dir: Path, manifest: dict[str, Any]) -> ExecuTorchRuntime:
    name = (manifest or {}).get("artifact") or PTE_NAME
    return ExecuTorchRuntime(Path(bundle_dir) / name)


def generate_with_runner(
    bundle_dir: Path,
    tokenizer_path: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    bos: bool = True,
    on_piece: Callable[[str], None] | None = None,
    on_stats: Callable[[Any], None] | None = None,
) -> str:
    """Generate with ExecuTorch's stock C++ TextLLMRunner (the runner the phone apps use) from the
    bundle's model.pte and a tokenizer; greedy at temperature 0. `bos` prepends the BOS token (the
    runner's `num_bos`; MobileLLM is trained with it). Returns the generated text (prompt not echoed)."""
    load_kernels()
    enable_xnnpack_weight_cache()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pte = Path(bundle_dir) / PTE_NAME
    if not pte.is_file():
        raise UserError(f"{pte}: ExecuTorch program not found")
    # The C++ tokenizer loader tries each format in turn and logs every miss on fd 2.
    with _native_stderr():
        runner = TextLLMRunner(str(pte), str(tokenizer_path))
    pieces: list[str] = []

    def collect(piece: str) -> None:
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)

    config = GenerationConfig(
        echo=False, max_new_tokens=max_new_tokens, temperature=temperature, num_bos=1 if bos else 0
    )
    with one_openmp_thread():
        runner.generate(prompt, config, token_callback=collect, stats_callback=on_stats)
    return "".join(pieces)


def generate(
    bundle_dir: Path, manifest: dict[str, Any], request: GenerationRequest, on_text: TextSink
) -> GenerationResult:
    """TextLLMRunner over the bundle: the C++ runner behind Android's LlmModule and the iOS runner."""
    if request.top_p < 1.0:
        raise UserError("ExecuTorch's TextLLMRunner samples with --temperature only; drop --top-p")
    if request.seed is not None and request.temperature > 0:
        raise UserError("ExecuTorch's TextLLMRunner does not take a seed; drop --seed (or use --temperature 0)")
    bundle_dir = Path(bundle_dir)
    tokenizer = bundle_dir / str(manifest.get("tokenizer") or "tokenizer.model")
    prompt = apply_chat_template(bundle_dir, request.prompt) if request.chat else request.prompt
    stats: list[Any] = []
    pieces: list[str] = []

    def forward_piece(piece: str) -> None:
        pieces.append(piece)
        on_text(piece)

    with _runner_output_silenced():
        text = generate_with_runner(
            bundle_dir,
            tokenizer,
            prompt,
            request.max_new_tokens,
            request.temperature,
            True,
            forward_piece,
            stats.append,
        )
    run = stats[-1]
    prefill_ms = max(run.prompt_eval_end_ms - run.inference_start_ms, 1)
    decode_ms = max(run.inference_end_ms - run.prompt_eval_end_ms, 1)
    return GenerationResult(
        client="executorch TextLLMRunner",
        text=text,
        token_ids=None,
        prompt_tokens=run.num_prompt_tokens,
        generated_tokens=len(pieces),
        prefill_tokens_per_s=1000 * run.num_prompt_tokens / prefill_ms,
        # the first token comes out of the prefill; the decode phase produced the rest
        decode_tokens_per_s=1000 * max(len(pieces) - 1, 0) / decode_ms,
    )


TARGET = FunctionTarget(NAME, quant_scheme, export, open_runtime, generate)
