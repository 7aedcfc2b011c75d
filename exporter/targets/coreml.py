"""Core ML target: a stateful ML Program (.mlpackage) for iOS 18 / macOS 15 (MLModel + MLState).

Lowering (see `CoreMLModule`):
- torch.jit.trace of a Core ML-facing wrapper that reuses the export model's block modules (same
  weights, so shared blocks stay one const each), then `ct.convert` to an ML Program with
  `minimum_deployment_target=iOS18`.
- KV cache: one fp16 Core ML state per cache tensor per block application (`k_cache_{i}`,
  `v_cache_{i}`, i = application index, layer sharing unrolled), written with `slice_update` at
  positions `start..start+S-1` and read back as `[:E]`, E = start + S.
- Flexible length: `ct.RangeDim` on the query length S and on the key length E. The position is
  carried by the shapes (`start = E - S`, the Hugging Face / Apple Llama-on-Core-ML pattern), so the
  program has no scalar position input and no data-dependent control flow. Enumerated shapes cannot
  express decode (E takes every value 1..max_seq_len at S = 1), so RangeDim is the only single-program
  choice that covers prefill and decode.
- Inputs: `input_ids` int32 [1, S]; `causal_mask` fp16 [1, 1, S, E] additive (0 attend, -3e4 masked;
  the caller builds it, see `causal_mask`). Output: `logits` fp16 [1, S, vocab].
- Precision: fp16 compute, except the RMSNorm statistics (square, mean, +eps, rsqrt, x*rsqrt) which
  are kept in fp32 through an `FP16ComputePrecision` op selector: x^2 overflows fp16 once |x| > 255.9.
  The norm is the export model's explicit formula (pow/reduce_mean/add/rsqrt/mul), not coremltools'
  max-rescaled rms_norm lowering.
- Attention: the iOS 18 fused `scaled_dot_product_attention` op (GQA K/V repeated with tile/reshape).
- Weights: `--bits 4` int4 per-block (block = group size, along the input axis) and `--bits 8` int8
  per-channel, both `constexpr_blockwise_shift_scale` with fp16 scales, rounded by coremltools'
  linear_symmetric rule (scale = max|w| / qmax, q in [-qmax, qmax]; verified against
  `coremltools.optimize._utils` in the tests). The codes are computed from the fp32 weights by the
  twin's own `WeightQuant.quantize` and inserted by a small MIL graph pass (see `_quantize`), so the
  package and the twin hold identical integers. `--bits 16`: fp16. The embedding (shared with the
  output projection: one const read by `gather` and `linear`) uses `embedding_bits` (8 by default).
- Shared weights: every application of a shared block reads the same const, so weight.bin holds each
  stored block once (LS and non-LS packages differ only by a few zero-bias consts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import struct
import sys
import time
import uuid
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..export_model import Attend, ExportModel, decode_stack, sdpa_attention
from ..memory import StorageBreakdown, size_report
from ..progress import quiet_progress_bars, stage
from ..quantize import QuantizedModel, QuantizedWeight, QuantMethod, QuantScheme, WeightQuant
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
    sample_tokens,
)
from .coreml_eval import CoreMLEvaluator, UnsupportedOpError, read_spec

NAME = "coreml"
PACKAGE = "model.mlpackage"
MASK_VALUE = -3.0e4  # additive mask for masked positions (coremltools' own bool->float mask value)
_EMBED_CONST = "tok_embeddings_weight_to_fp16"
_OUTPUT_CONST = "output_weight_to_fp16"


# ----------------------------------------------------------------------------- quantization scheme
# Mixed precision by default at 4 bits: every down projection at 8 bits (per channel). Measured on the
# real 135M model with ONNX's identical choice: +7.4% -> +3.5% perplexity for +10 MB.
DEFAULT_LAYER_BITS: dict[int, tuple[tuple[str, int], ...]] = {4: (("w2", 8),)}


def _weight_quant(bits: int, group_size: int | None, method: QuantMethod) -> WeightQuant:
    if bits == 16:
        return WeightQuant(bits=16, float_dtype=torch.float16)
    if bits not in (4, 8):
        raise UserError(f"the coreml target supports --bits 4, 8 or 16, got {bits}")
    # constexpr_blockwise_shift_scale: int4/int8 codes, fp16 scales (the weight dtype after fp16
    # conversion), an optional int offset (zero point) per block. scale_rule "restricted" with a
    # symmetric method is coremltools' own linear_symmetric rule (tested).
    return method.apply(WeightQuant(bits=bits, group_size=group_size, scale_dtype=torch.float16), has_zero_points=True)


def quant_scheme(opts: TargetOptions) -> QuantScheme:
    """int4 per-block (group_size) / int8 per-channel / fp16 linears; embedding (= output projection
    when shared, stored once) at `embedding_bits`, per-channel at 8 bits, per-block at 4."""
    if opts.bits not in (4, 8, 16):
        raise UserError(f"the coreml target supports --bits 4, 8 or 16, got {opts.bits}")
    linear = _weight_quant(opts.bits, opts.group_size if opts.bits == 4 else None, opts.method)
    eb = opts.resolved_embedding_bits()
    embedding = _weight_quant(eb, opts.group_size if eb == 4 else None, opts.method)
    overrides = tuple(
        (role, _weight_quant(bits, opts.group_size if bits == 4 else None, opts.method))
        for role, bits in opts.resolved_layer_bits(DEFAULT_LAYER_BITS)
    )
    # compute_dtype stays fp32: the twin isolates *weight rounding*; fp16 arithmetic is part of the
    # lowering error measured artifact-vs-twin (RMSNorm statistics are fp32 in both).
    return QuantScheme(
        linear=linear, embedding=embedding, output=embedding, compute_dtype=torch.float32, overrides=overrides
    )


# ----------------------------------------------------------------------------- Core ML-facing module
class CoreMLModule(nn.Module):
    """`forward(input_ids [1, S] int32, causal_mask [1, 1, S, E]) -> logits [1, S, V]`, E = start + S.

    Holds the export model's modules (not copies) plus one cache buffer pair per block application,
    named `k_cache_{i}` / `v_cache_{i}` (these names become the Core ML state names)."""

    def __init__(self, model: ExportModel) -> None:
        super().__init__()
        cfg = model.config
        self.config, self.schedule = cfg, list(model.schedule)
        self.max_seq_len = model.settings.max_seq_len
        self.tok_embeddings, self.blocks, self.norm, self.output = (
            model.tok_embeddings,
            model.blocks,
            model.norm,
            model.output,
        )
        self.register_buffer("rope_cos", model.rope_cos.detach().float().clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.detach().float().clone(), persistent=False)
        shape = (1, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
        for i in range(len(self.schedule)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def state_names(self) -> list[str]:
        return [f"{kv}_cache_{i}" for i in range(len(self.schedule)) for kv in "kv"]

    def forward(self, input_ids: Tensor, causal_mask: Tensor) -> Tensor:
        seqlen, end = input_ids.shape[-1], causal_mask.shape[-1]
        start = end - seqlen
        cos, sin = self.rope_cos[start:end].unsqueeze(1), self.rope_sin[start:end].unsqueeze(1)
        n_rep = self.config.n_heads // self.config.n_kv_heads

        def attention(slot: int) -> Attend:
            k_cache, v_cache = getattr(self, f"k_cache_{slot}"), getattr(self, f"v_cache_{slot}")

            def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
                k_cache[:, :, start:end] = k
                v_cache[:, :, start:end] = v
                return k_cache[:, :, :end], v_cache[:, :, :end]

            return lambda q, k, v: sdpa_attention(q, k, v, update, causal_mask, n_rep, self.config.dim)

        return decode_stack(self, input_ids, cos, sin, attention, last_only=False)


def causal_mask(start: int, seqlen: int, dtype: Any = np.float16) -> np.ndarray:
    """The `causal_mask` input for tokens at positions start..start+seqlen-1: [1, 1, S, start+S]."""
    end = start + seqlen
    allowed = np.arange(end)[None, :] <= (start + np.arange(seqlen))[:, None]
    return np.where(allowed, 0.0, MASK_VALUE).astype(dtype)[None, None]


# ----------------------------------------------------------------------------- fp32 islands
def _in_rms_statistics(op) -> bool:
    """True for the ops of x * rsqrt(mean(x^2) + eps): pow/mul(x,x) -> reduce_mean -> add -> rsqrt -> mul."""

    def producer(var) -> Any:
        return getattr(var, "op", None)

    def is_mean_of_squares(op_) -> bool:
        if op_ is None or op_.op_type != "reduce_mean":
            return False
        src = producer(op_.x)
        return src is not None and (src.op_type == "pow" or (src.op_type == "mul" and src.x is src.y))

    def is_eps_add(op_) -> bool:
        return (
            op_ is not None
            and op_.op_type == "add"
            and (is_mean_of_squares(producer(op_.x)) or is_mean_of_squares(producer(op_.y)))
        )

    def is_rsqrt(op_) -> bool:
        return op_ is not None and op_.op_type == "rsqrt" and is_eps_add(producer(op_.x))

    t = op.op_type
    if t == "reduce_mean":
        return is_mean_of_squares(op)
    if t in ("pow", "mul"):
        if any(is_mean_of_squares(child) for child in op.outputs[0].child_ops):
            return True
        if t == "mul":
            return is_rsqrt(producer(op.x)) or is_rsqrt(producer(op.y))
        return False
    if t == "add":
        return is_eps_add(op)
    if t == "rsqrt":
        return is_rsqrt(op)
    return False


def _fp16_op_selector(op) -> bool:
    """FP16ComputePrecision selector: True = compute in fp16."""
    return not _in_rms_statistics(op)


# ----------------------------------------------------------------------------- export
def _metadata(model: ExportModel, ckpt: Checkpoint, opts: TargetOptions) -> dict[str, str]:
    cfg = model.config
    try:
        tool_version = version("mobilellm-export")
    except Exception:  # pragma: no cover - not installed
        tool_version = "unknown"
    tokenizer = ckpt.tokenizer_path
    runner = RunnerMetadata.of(cfg, model.settings.max_seq_len)
    meta = {
        "com.mobilellm.tool": f"mobilellm-export {tool_version}",
        "com.mobilellm.source": ckpt.hub_id or ckpt.source.name,
        "com.mobilellm.source_format": ckpt.source_format,
        "com.mobilellm.tokenizer": tokenizer.name if tokenizer else "",
        "com.mobilellm.tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer else "",
        "com.mobilellm.bos_id": str(runner.bos_id),
        "com.mobilellm.eos_id": ",".join(map(str, runner.eos_ids)),
        "com.mobilellm.max_context": str(cfg.max_context),
        "com.mobilellm.max_seq_len": str(runner.max_seq_len),
        "com.mobilellm.vocab_size": str(runner.vocab_size),
        "com.mobilellm.layer_sharing": cfg.sharing,
        "com.mobilellm.schedule": ",".join(map(str, model.schedule)),
        "com.mobilellm.bits": str(opts.bits),
        "com.mobilellm.embedding_bits": str(opts.resolved_embedding_bits()),
        "com.mobilellm.group_size": str(opts.group_size),
        "com.mobilellm.mask_value": str(MASK_VALUE),
        "com.mobilellm.inputs": "input_ids int32 [1,S]; causal_mask fp16 [1,1,S,start+S] additive (0 attend, mask_value masked)",
    }
    return meta


def _license(ckpt: Checkpoint) -> str:
    src = ckpt.source if ckpt.source.is_dir() else ckpt.source.parent
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (src / name).is_file():
            first = next((ln.strip() for ln in (src / name).read_text(errors="replace").splitlines() if ln.strip()), "")
            return first[:200]
    return "unspecified: see the checkpoint's license"


def _quant_targets(model: ExportModel, quantized: QuantizedModel) -> dict[str, QuantizedWeight]:
    """MIL const name -> the codes/scales/zero points the quantizer computed for that weight."""
    names: dict[str, str] = {}
    for i, block in enumerate(model.blocks):
        for name, child in block.named_children():
            if isinstance(child, nn.Linear):
                names[f"blocks_{i}_{name}_weight_to_fp16"] = f"blocks.{i}.{name}.weight"
    names[_EMBED_CONST] = "tok_embeddings.weight"
    if model.output is not None:
        names[_OUTPUT_CONST] = "output.weight"
    return {const: quantized[key] for const, key in names.items() if isinstance(quantized[key], QuantizedWeight)}  # type: ignore[misc]


def _quantize(mlmodel, model: ExportModel, quantized: QuantizedModel) -> tuple[Any, dict[str, Any]]:
    """Replace each weight const with constexpr_blockwise_shift_scale(int codes, fp16 scales[, offsets]).

    The codes, scales and zero points are the one quantizer's (`quantize.quantize_model`, from the
    fp32 weights), the very numbers the twin dequantizes, so artifact and twin hold identical
    integers. (Running `ct.optimize.coreml.linear_quantize_weights` instead quantizes the fp16-cast
    weights: ~0.1% of int4 and ~1.5% of int8 codes then differ by one step from any fp32-derived twin.)"""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.models.utils import _apply_graph_pass

    targets = _quant_targets(model, quantized)
    if not targets:
        return mlmodel, {"quantized_consts": 0}
    done: list[str] = []

    def ints(x: Tensor, bits: int) -> np.ndarray:
        arr = x.numpy()
        return arr.astype(types.np_int4_dtype) if bits == 4 else arr.astype(np.int8)

    class ExactBlockwiseQuantize(AbstractGraphPass):
        def apply(self, prog) -> None:
            @block_context_manager
            def apply_block(block) -> None:
                for op in list(block.operations):
                    if op.op_type != "const" or op.name not in targets:
                        continue
                    qw = targets[op.name]
                    bits = qw.wq.bits
                    data = ints(qw.codes, bits)
                    scale_np = qw.scales.numpy().reshape(data.shape[0], -1).astype(np.float16)
                    offset = None if qw.zeros is None else ints(qw.zeros.reshape(data.shape[0], -1), bits)
                    if tuple(op.outputs[0].shape) != data.shape:
                        raise RuntimeError(
                            f"coreml export: const {op.name} has shape {op.outputs[0].shape}, weight {data.shape}"
                        )
                    new = mb.constexpr_blockwise_shift_scale(
                        data=data, scale=scale_np, offset=offset, before_op=op, name=op.name + "_quantized"
                    )
                    op.enclosing_block.replace_uses_of_var_after_op(
                        anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
                    )
                    op.enclosing_block.remove_ops([op])
                    done.append(op.name)

            for f in prog.functions.values():
                apply_block(f)

    out = _apply_graph_pass(
        mlmodel, ExactBlockwiseQuantize(), spec_version=mlmodel.get_spec().specificationVersion, skip_model_load=True
    )
    missing = sorted(set(targets) - set(done))
    if missing:
        raise RuntimeError(
            f"coreml export: weight const(s) {missing} not found in the converted program; the converter's naming changed"
        )
    return out, {
        "quantized_consts": len(done),
        "embedding_consts": [n for n in done if n in (_EMBED_CONST, _OUTPUT_CONST)],
    }


def _blob_breakdown(package: Path) -> dict[str, int]:
    """Bytes of weight.bin data per kind of const, from the saved spec (what is really stored)."""

    spec, spec_path = read_spec(package)
    data = (spec_path.parent / "weights" / "weight.bin").read_bytes()
    out: Counter[str] = Counter()
    seen: set[int] = set()
    fn = spec.mlProgram.functions["main"]
    for op in fn.block_specializations[fn.opset].operations:
        vals = [("val", v) for v in op.attributes.values() if v.WhichOneof("value") == "blobFileValue"]
        for key, arg in op.inputs.items():
            vals += [
                (key, b.value)
                for b in arg.arguments
                if b.WhichOneof("binding") == "value" and b.value.WhichOneof("value") == "blobFileValue"
            ]
        for key, v in vals:
            off = v.blobFileValue.offset
            if off in seen:
                continue
            seen.add(off)
            size = struct.unpack_from("<IIQ", data, off)[2]
            name = op.outputs[0].name if op.outputs else op.type
            if name.startswith("tok_embeddings"):
                kind = "embedding"  # the table's codes, scales and offsets together
            elif key == "scale":
                kind = "scales"
            elif key == "offset":
                kind = "zero_points"
            elif "rope" in name:
                kind = "rope_tables"
            elif "bias" in name:
                kind = "zero_biases"
            elif "norm" in name and "weight" not in name:
                kind = "norms"
            else:
                kind = "codes"
            out[kind] += size
            out["blobs"] += 1
    return dict(sorted(out.items()))


def _deterministic_spec(package: Path) -> None:
    """The saved Model protobuf again, its map fields (op inputs, attributes, metadata) in key order:
    coremltools writes them in insertion order, which differs from one process to the next, so two
    runs on the same input gave the same program in different bytes."""
    spec, spec_path = read_spec(package)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))


def _stable_package_ids(package: Path) -> None:
    """coremltools names the package's items with random UUIDs (and writes them in that random
    order); derive them from the item paths and sort, so identical inputs give byte-identical
    packages (Core ML only needs the ids consistent)."""
    manifest_path = package / "Manifest.json"
    data = json.loads(manifest_path.read_text())
    renamed = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, "mobilellm-export/" + entry.get("path", old)))
        for old, entry in data.get("itemInfoEntries", {}).items()
    }
    data["itemInfoEntries"] = {renamed[k]: v for k, v in data.get("itemInfoEntries", {}).items()}
    if data.get("rootModelIdentifier") in renamed:
        data["rootModelIdentifier"] = renamed[data["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")


def export(
    model: ExportModel, quantized: QuantizedModel, ckpt: Checkpoint | None, opts: TargetOptions, bundle_dir: Path
) -> ExportedArtifact:
    import coremltools as ct

    quant_scheme(opts)  # validates bits
    cfg = model.config
    n = model.settings.max_seq_len
    if model.settings.dtype != torch.float32:
        raise UserError("the coreml target converts the fp32 export model (precision is chosen by the converter)")
    if cfg.vocab_size > 65535:
        raise UserError(f"vocab size {cfg.vocab_size} exceeds Core ML's uint16 gather indices")
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    module = CoreMLModule(model).eval()
    example = (torch.zeros(1, 2, dtype=torch.int32), torch.from_numpy(causal_mask(1, 2, np.float32)))
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    seq, end = ct.RangeDim(1, n, default=1, symbol="seq_len"), ct.RangeDim(1, n, default=1, symbol="end_pos")
    kv_shape = (1, cfg.n_kv_heads, n, cfg.head_dim)
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=kv_shape, dtype=np.float16), name=s) for s in module.state_names()
    ]
    inputs = [
        ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
        ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16),
    ]

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with stage("[coreml] ct.convert (MIL, fp16 passes)"), quiet_progress_bars():
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
            states=states,
            minimum_deployment_target=ct.target.iOS18,
            convert_to="mlprogram",
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=_fp16_op_selector),
            skip_model_load=True,
        )
    t_convert = time.perf_counter() - t0
    with stage("[coreml] storing the quantized weights"), quiet_progress_bars():
        mlmodel, qdetail = _quantize(mlmodel, model, quantized)
    t_quant = time.perf_counter() - t0 - t_convert

    meta = _metadata(model, ckpt, opts)
    mlmodel.author = meta["com.mobilellm.tool"]
    mlmodel.license = _license(ckpt)
    mlmodel.version = meta["com.mobilellm.tool"].split(" ", 1)[1]
    mlmodel.short_description = f"MobileLLM ({cfg.dim}d x {cfg.n_applied} applied layers, sharing={cfg.sharing}) {opts.bits}-bit, stateful KV cache"
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.input_description["input_ids"] = "token ids, int32 [1, S], 1 <= S"
    mlmodel.input_description["causal_mask"] = (
        f"additive mask fp16 [1, 1, S, start+S]: 0 = attend, {MASK_VALUE} = masked (row i may see keys 0..start+i)"
    )
    mlmodel.output_description["logits"] = "next-token logits fp16 [1, S, vocab]"
    package = bundle_dir / PACKAGE
    if package.exists():
        shutil.rmtree(package)
    mlmodel.save(str(package))
    _stable_package_ids(package)
    _deterministic_spec(package)
    files = [PACKAGE]  # the tokenizer is copied into the bundle by the pipeline; its name/sha256 are in the metadata

    saved = CoreMLEvaluator(package)  # also proves every emitted op is one the evaluator knows
    op_counts = Counter(t for t in saved.op_types)
    fp32_ops = sum(
        1
        for op in saved.block.operations
        if op.type in ("pow", "reduce_mean", "rsqrt") and op.outputs and op.outputs[0].type.tensorType.dataType == 11
    )
    weight_bin = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    breakdown = _blob_breakdown(package)
    eb = opts.resolved_embedding_bits()
    package_bytes = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    parts = {
        kind: breakdown.get(kind, 0) for kind in ("codes", "scales", "zero_points", "embedding", "norms", "rope_tables")
    }
    io = {
        "inputs": [
            {"name": "input_ids", "dtype": "int32", "shape": [1, f"1..{n}"]},
            {
                "name": "causal_mask",
                "dtype": "float16",
                "shape": [1, 1, f"1..{n}", f"start+S (1..{n})"],
                "description": f"additive: 0 attend, {MASK_VALUE} masked; row i sees keys 0..start+i",
                "masked_value": MASK_VALUE,
            },
        ],
        "outputs": [{"name": "logits", "dtype": "float16", "shape": [1, "S", cfg.vocab_size]}],
        "states": [{"name": s, "dtype": "float16", "shape": list(kv_shape)} for s in module.state_names()],
        "flexible_shapes": "RangeDim (decode needs every start+S in 1..max_seq_len)",
    }
    info = {
        "format": "mlprogram",
        "minimum_deployment_target": "iOS18",
        "spec_version": mlmodel.get_spec().specificationVersion,
        "coremltools": ct.__version__,
        "compute_precision": "fp16; RMSNorm statistics (pow/reduce_mean/add/rsqrt/mul) fp32",
        "fp32_norm_ops": fp32_ops,
        "quantization": {
            "linear": {
                4: f"int4 per-block (block {opts.group_size}, input axis), fp16 scales",
                8: "int8 per-channel, fp16 scales",
                16: "fp16",
            }[opts.bits],
            "method": opts.method.describe(),
            "zero_points": quantized.scheme.linear.zero_points,
            "embedding": {4: f"int4 per-block ({opts.group_size})", 8: "int8 per-channel (per vocab row)", 16: "fp16"}[
                eb
            ]
            + (" (shared with the output projection, stored once)" if cfg.share_embedding else ""),
            "op": "constexpr_blockwise_shift_scale" if opts.bits != 16 or eb != 16 else None,
            **qdetail,
        },
        "weight_bin_bytes": weight_bin.stat().st_size,
        "weight_bin_breakdown": breakdown,
        "size": size_report(cfg, opts.bits, eb, StorageBreakdown.with_graph(package_bytes, **parts)),
        "mil_ops": dict(sorted(op_counts.items())),
        "state_count": len(module.state_names()),
        "metadata": meta,
        "license": mlmodel.license,
        "convert_seconds": round(t_convert, 2),
        "quantize_seconds": round(t_quant, 2),
        "notes": [
            "Linux parity runs exporter/targets/coreml_eval.py (numpy, per-op fp16 rounding) on the saved package; "
            "on macOS open_runtime uses MLModel.predict with make_state().",
            "int codes/scales/offsets are computed once by the exporter's quantizer from the fp32 weights (the numbers the twin dequantizes) and stored as constexpr_blockwise_shift_scale.",
        ],
    }
    # Timings vary run to run; the bundle keeps only what identical inputs reproduce byte for byte.
    stable_info = {k: v for k, v in info.items() if not k.endswith("_seconds")}
    (bundle_dir / "coreml_info.json").write_text(
        json.dumps({"io": io, "info": stable_info}, indent=2, default=str) + "\n"
    )
    files.append("coreml_info.json")
    return ExportedArtifact(target=NAME, files=files, io=io, info=info)


# ----------------------------------------------------------------------------- runtimes
class CoreMLEvalRuntime(TargetRuntime):
    """TargetRuntime over the numpy evaluator of the saved package (any OS)."""

    def __init__(self, package: Path) -> None:

        self.package = Path(package)
        self.evaluator = CoreMLEvaluator(self.package)
        self.state = self.evaluator.make_state()

    def reset(self) -> None:
        self.state = self.evaluator.make_state()

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        out = self.evaluator.predict(
            {"input_ids": tokens.astype(np.int32)[None], "causal_mask": causal_mask(start, len(tokens))}, self.state
        )
        return np.asarray(out["logits"][0], dtype=np.float32)


class CoreMLDeviceRuntime(TargetRuntime):  # pragma: no cover - needs macOS 15+; cannot run on Linux
    """TargetRuntime over the real Core ML runtime: MLModel.predict with an MLState."""

    def __init__(self, package: Path, compute_units: str = "ALL") -> None:
        import coremltools as ct

        self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.state = self.model.make_state()

    def reset(self) -> None:
        self.state = self.model.make_state()

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        out = self.model.predict(
            {"input_ids": tokens.astype(np.int32)[None], "causal_mask": causal_mask(start, len(tokens))},
            state=self.state,
        )
        return np.asarray(out["logits"][0], dtype=np.float32)


def _package_path(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    name = manifest.get("artifact") if isinstance(manifest, dict) else None
    if not isinstance(name, str):
        files = manifest.get("artifacts") if isinstance(manifest, dict) else None
        name = files[0] if isinstance(files, list) and files else PACKAGE
    return Path(bundle_dir) / name


def _device_available() -> bool:
    return sys.platform == "darwin" and int(platform.mac_ver()[0].split(".")[0] or 0) >= 15


def speed_unmeasurable_reason() -> str | None:
    """Why speed/RAM of this target cannot be benchmarked on this machine (None: it can).

    The Linux evaluator checks numbers, not speed: timing it would say nothing about a phone."""
    return (
        None
        if _device_available()
        else "Core ML runs only on Apple OSes (macOS 15 / iOS 18); this machine can convert and check parity, not time it"
    )


def open_runtime(bundle_dir: Path, manifest: dict[str, Any], device: bool | None = None):
    """The numpy evaluator on Linux; on macOS 15+ (or `device=True`) the real MLModel + MLState runtime.

    A missing or unreadable package is a UserError (corrupt bundle); an op the evaluator does not
    implement stays an UnsupportedOpError (a bug in this tool, never skipped)."""

    package = _package_path(bundle_dir, manifest)
    if not package.exists():
        raise UserError(f"{package}: Core ML package not found; re-run the export")
    use_device = _device_available() if device is None else device
    if use_device:  # pragma: no cover - macOS only
        return CoreMLDeviceRuntime(package)
    try:
        return CoreMLEvalRuntime(package)
    except UnsupportedOpError:
        raise
    except Exception as exc:  # truncated/corrupt weight.bin, spec, manifest
        raise UserError(
            f"{package}: corrupt or unreadable Core ML package ({type(exc).__name__}: {exc}); re-export it"
        ) from None


def generate(
    bundle_dir: Path, manifest: dict[str, Any], request: GenerationRequest, on_text: TextSink
) -> GenerationResult:
    """MLModel + MLState (the Core ML runtime an iOS app uses), tokenized by the bundle's tokenizer.json."""
    if not _device_available():
        raise UserError(
            f"Core ML bundles run only on macOS 15+ / iOS 18+ (MLModel + MLState) and this is {platform.system()}; "
            "run `generate` on a Mac or the bundle in ios_demo/ (here, `mobilellm-export validate` checks its numbers)"
        )
    from tokenizers import Tokenizer  # macOS only from here

    tokenizer = Tokenizer.from_file(str(Path(bundle_dir) / "tokenizer.json"))
    prompt = apply_chat_template(bundle_dir, request.prompt) if request.chat else request.prompt
    ids = [int(manifest["bos_id"])] + tokenizer.encode(prompt, add_special_tokens=False).ids
    runtime = CoreMLDeviceRuntime(_package_path(bundle_dir, manifest))
    pieces: list[str] = []

    def emit(token: int) -> None:
        pieces.append(tokenizer.decode([token]))
        on_text(pieces[-1])

    start = time.perf_counter()
    out = sample_tokens(runtime, ids, request, tuple(manifest["eos_ids"]), int(manifest["max_context"]), emit)
    seconds = time.perf_counter() - start
    return GenerationResult(
        client="Core ML MLModel + MLState",
        text="".join(pieces),
        token_ids=out,
        prompt_tokens=len(ids),
        generated_tokens=len(out),
        prefill_tokens_per_s=float("nan"),  # one clock for both phases here: see decode
        decode_tokens_per_s=(len(ids) + len(out)) / seconds,
    )


TARGET = FunctionTarget(NAME, quant_scheme, export, open_runtime, generate, speed_unmeasurable_reason)
