"""A numpy reference evaluator for saved Core ML ML Programs (.mlpackage), for parity without macOS.

It reads the *saved* package only: the MIL program from the model spec protobuf
(`Data/com.apple.CoreML/model.mlmodel`) and the tensors from `weights/weight.bin` (parsed here from
the MIL blob storage format, not through coremltools' reader), then executes the program op by op.

Numeric model ("Core ML fp16 semantics" as far as they are observable in the program):
- every value is held in the dtype the program declares for it (fp16 tensors are np.float16, ints
  are their declared width, states are fp16 as declared);
- each op computes from those values in fp32 (reductions, matmuls, softmax accumulate in fp32) and its
  result is rounded once to the op's declared output dtype. Real Core ML backends may accumulate
  differently (e.g. the ANE); this is the per-op-rounding model, not a bit-exact emulation of any device.

Unknown ops raise `UnsupportedOpError` naming the op type: nothing is ever skipped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["CoreMLEvaluator", "UnsupportedOpError", "BlobFile", "read_spec", "SUPPORTED_OPS"]


class UnsupportedOpError(NotImplementedError):
    """The program contains an op (or an op variant) this evaluator does not implement."""


# ----------------------------------------------------------------------------- dtypes
# MIL.proto DataType -> numpy dtype (sub-byte ints are held unpacked in int8/uint8)
_PROTO_DTYPES: dict[int, Any] = {
    1: np.bool_,
    10: np.float16,
    11: np.float32,
    12: np.float64,
    21: np.int8,
    22: np.int16,
    23: np.int32,
    24: np.int64,
    25: np.int8,  # INT4 held in int8
    31: np.uint8,
    32: np.uint16,
    33: np.uint32,
    34: np.uint64,
    35: np.uint8,
    36: np.uint8,
    37: np.uint8,
    38: np.uint8,
    39: np.uint8,  # UINT4/2/1/6/3
}
_SUB_BYTE_BITS = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}
_SIGNED_SUB_BYTE = {25}
_STR_DTYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "bool": np.bool_,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
}
# MILBlob storage BlobDataType -> (numpy dtype, bits, signed)
_BLOB_DTYPES: dict[int, tuple[Any, int, bool]] = {
    1: (np.float16, 16, True),
    2: (np.float32, 32, True),
    3: (np.uint8, 8, False),
    4: (np.int8, 8, True),
    6: (np.int16, 16, True),
    7: (np.uint16, 16, False),
    8: (np.int8, 4, True),
    9: (np.uint8, 1, False),
    10: (np.uint8, 2, False),
    11: (np.uint8, 4, False),
    12: (np.uint8, 3, False),
    13: (np.uint8, 6, False),
    14: (np.int32, 32, True),
    15: (np.uint32, 32, False),
}
_BLOB_SENTINEL = 0xDEADBEEF


def _unpack_bits(raw: bytes, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Elements packed LSB-first (coremltools `pack_elements_into_bits`)."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: count * nbits]
    vals = bits.reshape(count, nbits).astype(np.int32) @ (1 << np.arange(nbits, dtype=np.int32))
    if signed:
        vals = np.where(vals >= 1 << (nbits - 1), vals - (1 << nbits), vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


class BlobFile:
    """MIL blob storage (weight.bin): 64-byte header {u32 count, u32 version}, then per blob a 64-byte
    metadata record {u32 sentinel 0xDEADBEEF, u32 dtype, u64 size_bytes, u64 data_offset, u64 padding_bits}
    at the offset a BlobFileValue names, and the data at data_offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data = self.path.read_bytes()
        if len(self.data) < 64:
            raise ValueError(f"{self.path}: too short for a MIL blob file")
        self.count, self.version = struct.unpack_from("<II", self.data, 0)
        if self.version != 2:
            raise ValueError(f"{self.path}: unsupported blob storage version {self.version}")

    def read(self, offset: int, shape: tuple[int, ...], proto_dtype: int) -> np.ndarray:
        sentinel, dtype, size, data_offset, padding_bits = struct.unpack_from("<IIQQQ", self.data, offset)
        if sentinel != _BLOB_SENTINEL:
            raise ValueError(f"{self.path}: no blob metadata at offset {offset} (sentinel {sentinel:#x})")
        if dtype not in _BLOB_DTYPES:
            raise UnsupportedOpError(f"{self.path}: blob dtype {dtype} at offset {offset} is not supported")
        np_dtype, nbits, signed = _BLOB_DTYPES[dtype]
        raw = self.data[data_offset : data_offset + size]
        if len(raw) != size:
            raise ValueError(f"{self.path}: blob at {offset} is truncated")
        count = int(np.prod(shape)) if shape else 1
        if nbits < 8:
            if size * 8 - padding_bits != count * nbits:
                raise ValueError(
                    f"{self.path}: blob at {offset} holds {size * 8 - padding_bits} bits, shape {shape} needs {count * nbits}"
                )
            arr = _unpack_bits(raw, nbits, count, signed)
        else:
            arr = np.frombuffer(raw, dtype=np_dtype)
            if arr.size != count:
                raise ValueError(f"{self.path}: blob at {offset} has {arr.size} elements, shape {shape} needs {count}")
        want = _PROTO_DTYPES.get(proto_dtype)
        if want is not None and np.dtype(want) != arr.dtype:
            raise ValueError(f"{self.path}: blob at {offset} is {arr.dtype}, the program declares {np.dtype(want)}")
        return arr.reshape(shape).copy()


# ----------------------------------------------------------------------------- spec reading
def read_spec(package: Path):
    """The Model protobuf of a .mlpackage (or a bare .mlmodel)."""
    from coremltools.proto import Model_pb2

    package = Path(package)
    spec_path = package
    if package.is_dir():
        manifest = json.loads((package / "Manifest.json").read_text())
        root = manifest["rootModelIdentifier"]
        spec_path = _inside(package, package / "Data" / manifest["itemInfoEntries"][root]["path"])
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    return spec, spec_path


def _inside(package: Path, path: Path) -> Path:
    """`path` if it is a regular file or missing inside `package` (no link, no '..', no absolute
    path out of it, no device such as /dev/zero); a ValueError otherwise."""
    resolved, root = Path(path).resolve(), Path(package).resolve()
    outside = resolved != root and root not in resolved.parents
    if outside or Path(path).is_symlink() or (resolved.exists() and not resolved.is_file()):
        raise ValueError(f"{package}: the program reads {path}, outside the package or not a regular file")
    return resolved


def _tensor_type(vt) -> tuple[int, list[int | None]]:
    which = vt.WhichOneof("type")
    if which == "stateType":
        vt = vt.stateType.wrappedType
        which = vt.WhichOneof("type")
    if which != "tensorType":
        raise UnsupportedOpError(f"value type {which} is not supported (only tensors and states)")
    tt = vt.tensorType
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions]
    return tt.dataType, dims


def _parse_value(value, blobs: Callable[[str], BlobFile]) -> Any:
    dtype, dims = _tensor_type(value.type)
    shape = tuple(int(d) for d in dims)  # consts always have static shapes
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        fname = value.blobFileValue.fileName.replace("@model_path/", "")
        return blobs(fname).read(value.blobFileValue.offset, shape, dtype)
    if kind != "immediateValue":
        raise UnsupportedOpError(f"value kind {kind} is not supported")
    imm = value.immediateValue
    if imm.WhichOneof("value") == "list":
        return [_parse_value(v, blobs) for v in imm.list.values]
    if imm.WhichOneof("value") != "tensor":
        raise UnsupportedOpError(f"immediate value kind {imm.WhichOneof('value')} is not supported")
    tv = imm.tensor
    field = tv.WhichOneof("value")
    np_dtype = _PROTO_DTYPES.get(dtype)
    count = int(np.prod(shape)) if shape else 1
    if field == "strings":
        vals = [s.decode() if isinstance(s, bytes) else s for s in tv.strings.values]
        return vals[0] if shape == () else np.array(vals).reshape(shape)
    if field == "bytes":
        raw = tv.bytes.values
        if dtype in _SUB_BYTE_BITS:
            arr = _unpack_bits(raw, _SUB_BYTE_BITS[dtype], count, dtype in _SIGNED_SUB_BYTE)
        else:
            arr = np.frombuffer(raw, dtype=np_dtype)[:count]
    elif field in ("floats", "ints", "bools", "longInts", "doubles"):
        arr = np.array(list(getattr(tv, field).values), dtype=np_dtype)
    elif field is None:
        arr = np.zeros(0, dtype=np_dtype)
    else:
        raise UnsupportedOpError(f"tensor field {field} is not supported")
    if np_dtype is None:
        raise UnsupportedOpError(f"MIL data type {dtype} is not supported")
    return arr.astype(np_dtype).reshape(shape)


# ----------------------------------------------------------------------------- ops
Op = Callable[[dict[str, Any], "CoreMLEvaluator"], Any]
_OPS: dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for n in names:
            _OPS[n] = fn
        return fn

    return register


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def _elementwise(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], float_dtype: type = np.float32) -> Op:
    """MIL elementwise binary op on x, y with numpy broadcasting: floats computed in `float_dtype`, integers
    in int64."""

    def run(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            return fn(x.astype(float_dtype), y.astype(float_dtype))
        return fn(x.astype(np.int64), y.astype(np.int64))

    return run


_op("add")(_elementwise(np.add))
_op("sub")(_elementwise(np.subtract))
_op("mul")(_elementwise(np.multiply))
_op("real_div")(_elementwise(lambda x, y: x / y))
_op("maximum")(_elementwise(np.maximum))
_op("minimum")(_elementwise(np.minimum))
_op("pow")(_elementwise(np.power))


def _compare(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Op:
    """MIL comparison (iOS15 elementwise_binary with a bool result): x, y of one type T in {fp16, fp32,
    int32}, numpy broadcasting. Compared exactly: every fp16/fp32 value is exact in float64, every
    int32 in int64 (a float32 compare would merge int32 values above 2^24)."""
    return _elementwise(fn, np.float64)


# coremltools' guard_negative_gather_indices pass (iOS17+, gather with signed dynamic indices, e.g. token
# ids once the vocab exceeds int16 so add_int16_cast leaves them int32) emits
# select(greater_equal(i, 0), i, i + D[axis]).
_op("greater_equal")(_compare(np.greater_equal))


@_op("select")
def _select(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    """MIL select (iOS15 control_flow): `a` where `cond` is True, else `b`; cond bool, a and b of one
    type T in {fp16, fp32, int32, bool}; cond, a and b broadcast numpy-style. The values are copied,
    never recomputed (int ids stay exact)."""
    if a.get("a") is None or a.get("b") is None:
        raise UnsupportedOpError("select without both `a` and `b` (the indices-of-True form) is not supported")
    cond = np.asarray(a["cond"])
    if cond.dtype != np.bool_:
        raise ValueError(f"select: cond must be bool, got {cond.dtype}")
    return np.where(cond, np.asarray(a["a"]), np.asarray(a["b"]))


@_op("floor_div")
def _floor_div(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.floor_divide(np.asarray(a["x"]), np.asarray(a["y"]))


@_op("rsqrt")
def _rsqrt(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    eps = float(a.get("epsilon", 1e-12))
    return 1.0 / np.sqrt(_f32(a["x"]) + np.float32(eps))


@_op("sqrt")
def _sqrt(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.sqrt(_f32(a["x"]))


@_op("silu")
def _silu(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = _f32(a["x"])
    return x / (1.0 + np.exp(-x))


@_op("sigmoid")
def _sigmoid(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return 1.0 / (1.0 + np.exp(-_f32(a["x"])))


@_op("softmax")
def _softmax(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _axes(a: dict[str, Any], rank: int) -> tuple[int, ...] | None:
    axes = a.get("axes")
    return None if axes is None else tuple(int(i) % rank for i in np.atleast_1d(axes))


@_op("reduce_mean", "reduce_sum", "reduce_max")
def _reduce(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = _f32(a["x"])
    fn = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max}[ev.current_op]
    return fn(x, axis=_axes(a, x.ndim), keepdims=bool(a.get("keep_dims", False)))


@_op("linear")
def _linear(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    out = _f32(a["x"]) @ _f32(a["weight"]).T
    if a.get("bias") is not None:
        out = out + _f32(a["bias"])
    return out


@_op("matmul")
def _matmul(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return x @ y


@_op("scaled_dot_product_attention")
def _sdpa(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scores = (q @ np.swapaxes(k, -1, -2)) / np.float32(np.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask.astype(np.float32)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    return (p / p.sum(axis=-1, keepdims=True)) @ v


@_op("cast")
def _cast(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    dtype = a["dtype"]
    if dtype not in _STR_DTYPES:
        raise UnsupportedOpError(f"cast to {dtype!r} is not supported")
    x = np.asarray(a["x"])
    if np.dtype(_STR_DTYPES[dtype]).kind in "iu" and x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(_STR_DTYPES[dtype])


@_op("shape")
def _shape(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.array(np.asarray(a["x"]).shape, dtype=np.int32)


@_op("gather")
def _gather(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    if int(a.get("batch_dims", 0)) != 0:
        raise UnsupportedOpError("gather with batch_dims != 0 is not supported")
    x, idx = np.asarray(a["x"]), np.asarray(a["indices"])
    if idx.dtype.kind not in "iu":
        raise ValueError(f"gather: indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64)
    axis = int(a.get("axis", 0)) % x.ndim
    # iOS17+ gather takes only indices in [0, D[axis]): negative ones are out of bounds (the converter
    # guards them with select/greater_equal); before iOS17 -D[axis] <= i < 0 counts from the end.
    low = 0 if ev.opset_version >= 7 else -x.shape[axis]
    if np.any(idx >= x.shape[axis]) or np.any(idx < low):
        raise IndexError(f"gather index out of range [{low}, {x.shape[axis]}) (opset {ev.opset})")
    return np.take(x, idx, axis=axis)


@_op("concat")
def _concat(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    if a.get("interleave", False):
        raise UnsupportedOpError("concat with interleave=True is not supported")
    vals = [np.atleast_1d(np.asarray(v)) for v in a["values"]]
    return np.concatenate(vals, axis=int(a["axis"]))


def _slices(x: np.ndarray, a: dict[str, Any]) -> tuple[tuple[slice, ...], list[int]]:
    rank = x.ndim
    begin = np.asarray(a["begin"]).astype(np.int64).tolist()
    end = np.asarray(a["end"]).astype(np.int64).tolist()
    stride = np.asarray(a["stride"]).astype(np.int64).tolist() if a.get("stride") is not None else [1] * rank
    bmask = list(np.asarray(a["begin_mask"])) if a.get("begin_mask") is not None else [False] * rank
    emask = list(np.asarray(a["end_mask"])) if a.get("end_mask") is not None else [False] * rank
    smask = list(np.asarray(a["squeeze_mask"])) if a.get("squeeze_mask") is not None else [False] * rank
    out, squeeze = [], []
    for i in range(rank):
        if smask[i]:
            b = begin[i] % x.shape[i]
            out.append(slice(b, b + 1, 1))
            squeeze.append(i)
            continue
        out.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return tuple(out), squeeze


@_op("slice_by_index")
def _slice_by_index(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.asarray(a["x"])
    sl, squeeze = _slices(x, a)
    res = x[sl]
    return np.squeeze(res, axis=tuple(squeeze)) if squeeze else res


@_op("slice_update")
def _slice_update(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.array(a["x"], copy=True)
    sl, squeeze = _slices(x, a)
    upd = np.asarray(a["update"])
    target = x[sl].shape
    if squeeze:
        upd = np.expand_dims(upd, axis=tuple(squeeze))
    if upd.shape != target:
        raise ValueError(f"slice_update: update shape {upd.shape} does not match the slice {target}")
    x[sl] = upd.astype(x.dtype)
    return x


@_op("reshape")
def _reshape(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.asarray(a["x"])
    shape = [int(s) for s in np.asarray(a["shape"]).tolist()]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("transpose")
def _transpose(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.transpose(np.asarray(a["x"]), [int(p) for p in np.asarray(a["perm"]).tolist()])


@_op("tile")
def _tile(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.tile(np.asarray(a["x"]), [int(r) for r in np.asarray(a["reps"]).tolist()])


@_op("expand_dims")
def _expand_dims(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.asarray(a["x"])
    rank = x.ndim + len(np.atleast_1d(a["axes"]))
    return np.expand_dims(x, axis=tuple(int(i) % rank for i in np.atleast_1d(a["axes"])))


@_op("squeeze")
def _squeeze(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.asarray(a["x"])
    return np.squeeze(x) if a.get("axes") is None else np.squeeze(x, axis=_axes(a, x.ndim))


@_op("split")
def _split(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    x = np.asarray(a["x"])
    axis = int(a["axis"]) % x.ndim
    if a.get("split_sizes") is not None:
        sizes = [int(s) for s in np.asarray(a["split_sizes"]).tolist()]
    else:
        n = int(a["num_splits"])
        sizes = [x.shape[axis] // n] * n
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to {x.shape[axis]}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@_op("identity")
def _identity(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.asarray(a["x"])


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    data = np.asarray(a["data"]).astype(np.float32)
    scale = np.asarray(a["scale"]).astype(np.float32)
    if scale.ndim != data.ndim:
        raise ValueError(f"constexpr_blockwise_shift_scale: scale rank {scale.ndim} != data rank {data.ndim}")
    offset = a.get("offset")
    if offset is not None:
        offset = np.asarray(offset).astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d % s:
            raise ValueError(f"constexpr_blockwise_shift_scale: axis {axis} size {d} not divisible by scale size {s}")
        scale = np.repeat(scale, d // s, axis=axis)
        if offset is not None:
            offset = np.repeat(offset, d // offset.shape[axis], axis=axis)
    return (data - offset) * scale if offset is not None else data * scale


@_op("read_state")
def _read_state(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    return np.array(a["input"], copy=True)


@_op("write_state")
def _write_state(a: dict[str, Any], ev: "CoreMLEvaluator") -> Any:
    name = ev.state_var_of(ev.current_inputs["input"])
    value = np.asarray(a["data"])
    if value.shape != ev.state[name].shape:
        raise ValueError(f"write to state {name}: shape {value.shape} != {ev.state[name].shape}")
    ev.state[name][...] = value.astype(ev.state[name].dtype)
    return ()


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted([*_OPS, "const"]))


# ----------------------------------------------------------------------------- evaluator
class CoreMLEvaluator:
    """Executes the saved ML Program of `package` (a .mlpackage dir) in numpy.

    evaluator.input_names / state_names / output_names
    state = evaluator.make_state()                      # dict name -> zeroed np.float16 array
    outputs = evaluator.predict({"x": array, ...}, state)  # dict name -> array (declared dtype); state updated in place
    """

    def __init__(self, package: str | Path, function: str = "main") -> None:
        self.package = Path(package)
        self.spec, spec_path = read_spec(self.package)
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise UnsupportedOpError(f"{self.package}: not an ML Program ({self.spec.WhichOneof('Type')})")
        self.weights_dir = spec_path.parent / "weights"
        self._blobs: dict[str, BlobFile] = {}
        prog = self.spec.mlProgram
        if function not in prog.functions:
            raise ValueError(f"{self.package}: no function {function!r}")
        fn = prog.functions[function]
        self.opset = fn.opset
        # "CoreML7" = iOS17, "CoreML8" = iOS18: op semantics that changed between opsets key on it
        self.opset_version = (
            int(fn.opset[len("CoreML") :])
            if fn.opset.startswith("CoreML") and fn.opset[len("CoreML") :].isdigit()
            else 0
        )
        self.block = fn.block_specializations[fn.opset]
        self.inputs = {i.name: _tensor_type(i.type) for i in fn.inputs if i.type.WhichOneof("type") != "stateType"}
        self.states = {i.name: _tensor_type(i.type) for i in fn.inputs if i.type.WhichOneof("type") == "stateType"}
        self.input_names = list(self.inputs)
        self.state_names = list(self.states)
        self.output_names = list(self.block.outputs)
        self.op_types = [op.type for op in self.block.operations]
        unknown = sorted({t for t in self.op_types if t not in SUPPORTED_OPS})
        if unknown:
            raise UnsupportedOpError(f"{self.package}: unsupported MIL op(s): {', '.join(unknown)}")
        for op in self.block.operations:
            if len(op.blocks):
                raise UnsupportedOpError(f"{self.package}: op {op.type} with nested blocks is not supported")
        self._consts: dict[str, Any] = {}
        self._bound: dict[int, dict[str, list[tuple[str, Any]]]] = {}  # op index -> input key -> bindings
        self.state: dict[str, np.ndarray] = {}
        self.current_op = ""
        self.current_inputs: dict[str, Any] = {}
        for i, op in enumerate(self.block.operations):
            if op.type == "const":
                self._consts[op.outputs[0].name] = _parse_value(op.attributes["val"], self._blob)
                continue
            self._bound[i] = {
                key: [
                    ("name", b.name)
                    if b.WhichOneof("binding") == "name"
                    else ("value", _parse_value(b.value, self._blob))
                    for b in arg.arguments
                ]
                for key, arg in op.inputs.items()
            }
        # constexpr_* ops are load-time constants (Core ML materializes them when loading): run them once.
        self._runtime_ops: list[int] = []
        for i, op in enumerate(self.block.operations):
            if op.type == "const":
                continue
            if op.type.startswith("constexpr_"):
                self._run(i, op, self._consts)
            else:
                self._runtime_ops.append(i)

    def op_inputs(self, op_index: int) -> dict[str, Any]:
        """The parsed inputs of the op at `op_index` (names resolved against consts only)."""
        out = {}
        for key, binds in self._bound[op_index].items():
            vals = [self._consts[v] if kind == "name" else v for kind, v in binds]
            out[key] = vals if key == "values" else vals[0]
        return out

    def _blob(self, fname: str) -> BlobFile:
        if fname not in self._blobs:
            path = _inside(self.package, self.weights_dir.parent / fname)  # never outside the package
            if not path.exists():
                path = _inside(self.package, self.weights_dir / Path(fname).name)
            self._blobs[fname] = BlobFile(path)
        return self._blobs[fname]

    def const(self, name: str) -> Any:
        return self._consts[name]

    def make_state(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (dtype, dims) in self.states.items():
            if any(d is None for d in dims):
                raise ValueError(f"state {name} has a flexible shape")
            out[name] = np.zeros(dims, dtype=_PROTO_DTYPES[dtype])
        return out

    def state_var_of(self, binding_name: str) -> str:
        if binding_name not in self.states:
            raise ValueError(f"{binding_name} is not a state input of the program")
        return binding_name

    def predict(
        self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self._consts)
        for name, (dtype, dims) in self.inputs.items():
            if name not in inputs:
                raise ValueError(f"missing input {name}")
            x = np.asarray(inputs[name])
            if len(dims) != x.ndim or any(d is not None and d != s for d, s in zip(dims, x.shape)):
                raise ValueError(f"input {name}: shape {x.shape} does not fit {dims}")
            want = np.dtype(_PROTO_DTYPES[dtype])
            if want.kind in "iu":
                # token ids and the like: never through a float (fp16 is exact only up to 2048), never wrapped
                if x.dtype.kind not in "iub":
                    raise ValueError(f"input {name}: the program declares {want}, got {x.dtype} values")
                info = np.iinfo(want)
                if x.size and (x.min() < info.min or x.max() > info.max):
                    raise ValueError(f"input {name}: values {x.min()}..{x.max()} do not fit {want}")
            env[name] = x.astype(want)
        if self.states:
            if state is None:
                raise ValueError("this program has states: pass state=evaluator.make_state()")
            self.state = state
            for name in self.states:
                env[name] = state[name]
        ops = self.block.operations
        for i in self._runtime_ops:
            self._run(i, ops[i], env)
        return {name: env[name] for name in self.output_names}

    def _run(self, index: int, op, env: dict[str, Any]) -> None:
        fn = _OPS.get(op.type)
        if fn is None:
            raise UnsupportedOpError(f"unsupported MIL op {op.type!r} ({op.outputs[0].name if op.outputs else '?'})")
        args: dict[str, Any] = {}
        self.current_inputs = {}
        for key, binds in self._bound[index].items():
            vals = [env[v] if kind == "name" else v for kind, v in binds]
            names = [v for kind, v in binds if kind == "name"]
            if names:
                self.current_inputs[key] = names[0]
            args[key] = vals if key == "values" else vals[0]
        self.current_op = op.type
        try:
            result = fn(args, self)
        except UnsupportedOpError:
            raise
        except Exception as exc:  # name the failing op
            raise RuntimeError(f"MIL op {op.type} ({op.outputs[0].name if op.outputs else '?'}) failed: {exc}") from exc
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise RuntimeError(f"MIL op {op.type}: {len(results)} results for {len(op.outputs)} outputs")
        for out, value in zip(op.outputs, results):
            dtype, dims = _tensor_type(out.type)
            np_dtype = _PROTO_DTYPES.get(dtype)
            if np_dtype is None:
                raise UnsupportedOpError(f"MIL op {op.type}: output dtype {dtype} not supported")
            arr = np.asarray(value)
            if np.dtype(np_dtype).kind in "iu" and arr.dtype.kind == "f":
                arr = np.trunc(arr)
            arr = arr.astype(np_dtype)
            if len(dims) != arr.ndim or any(d is not None and d != s for d, s in zip(dims, arr.shape)):
                raise RuntimeError(
                    f"MIL op {op.type} ({out.name}): result shape {arr.shape} contradicts declared {dims}"
                )
            env[out.name] = arr
