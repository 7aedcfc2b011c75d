"""The numpy Core ML evaluator, op by op: tiny MIL programs built with coremltools' builder, saved as
.mlpackage, evaluated from the saved files, compared with numpy/torch; and one end-to-end export of a
model whose vocab (49152) exceeds int16, which makes coremltools emit the greater_equal/select index guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mobilellm.exporter.targets.coreml_eval import BlobFile, CoreMLEvaluator, UnsupportedOpError  # noqa: E402

RNG = np.random.default_rng(0)


def _save(prog, path: Path, states: bool = False) -> CoreMLEvaluator:
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=ct.PassPipeline.EMPTY,  # keep exactly the ops written here
        skip_model_load=True,
    )
    model.save(str(path))
    return CoreMLEvaluator(path)


def _close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-3) -> None:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_allclose(a, e, atol=tol * max(1.0, float(np.abs(e).max())), rtol=tol)


def test_elementwise_norm_linear_ops(tmp_path: Path) -> None:
    w = RNG.normal(size=(6, 8)).astype(np.float16)
    b = RNG.normal(size=(6,)).astype(np.float16)
    g = RNG.uniform(0.5, 1.5, size=(8,)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        sq = mb.pow(x=x, y=np.float16(2.0))
        mean = mb.reduce_mean(x=sq, axes=[-1], keep_dims=True)
        r = mb.rsqrt(x=mb.add(x=mean, y=np.float16(1e-3)), epsilon=np.float16(1e-6))
        normed = mb.mul(x=mb.mul(x=x, y=r), y=g)
        lin = mb.linear(x=normed, weight=w, bias=b)
        act = mb.silu(x=lin)
        a, c = mb.split(x=act, split_sizes=[2, 4], axis=-1)
        d = mb.sub(x=mb.real_div(x=c, y=np.float16(2.0)), y=np.float16(1.0))
        t = mb.transpose(x=mb.reshape(x=d, shape=[1, 3, 2, 2]), perm=[0, 2, 1, 3])
        tiled = mb.tile(x=t, reps=[1, 2, 1, 1])
        cat = mb.concat(values=[a, mb.cast(x=mb.cast(x=a, dtype="fp32"), dtype="fp16")], axis=-1)
        sm = mb.softmax(x=cat, axis=-1)
        return tiled, sm

    ev = _save(prog, tmp_path / "p.mlpackage")
    assert set(ev.op_types) >= {
        "pow",
        "reduce_mean",
        "rsqrt",
        "add",
        "mul",
        "linear",
        "silu",
        "split",
        "reshape",
        "transpose",
        "tile",
        "concat",
        "cast",
        "softmax",
    }
    x = RNG.normal(size=(1, 3, 8)).astype(np.float16)
    out = ev.predict({"x": x})
    tiled, sm = (out[n] for n in ev.output_names)
    assert tiled.dtype == np.float16  # fp16 where the program says fp16
    xt = torch.from_numpy(x.astype(np.float32))
    normed = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-3 + 1e-6) * torch.from_numpy(g.astype(np.float32))
    act = torch.nn.functional.silu(
        torch.nn.functional.linear(
            normed, torch.from_numpy(w.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
        )
    )
    a, c = act[..., :2], act[..., 2:]
    t = (c / 2 - 1).reshape(1, 3, 2, 2).permute(0, 2, 1, 3)
    _close(tiled, t.repeat(1, 2, 1, 1).numpy())
    _close(sm, torch.softmax(torch.cat([a, a], -1), -1).numpy())


def test_state_slice_update_sdpa_gather(tmp_path: Path) -> None:
    table = RNG.normal(size=(10, 4)).astype(np.float16)
    cache_shape = (1, 2, 8, 4)

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(1, 3), dtype=types.int32),
            mb.TensorSpec(shape=(1, 2, 3, 4), dtype=types.fp16),
            mb.TensorSpec(shape=(1, 1, 3, 5), dtype=types.fp16),
            mb.StateTensorSpec(shape=cache_shape, dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(ids, q, mask, cache):
        emb = mb.gather(x=table, indices=mb.cast(x=ids, dtype="uint16"), axis=0)  # [1, 3, 4]
        n = mb.gather(x=mb.shape(x=ids), indices=1, axis=0)
        start = mb.sub(x=np.int32(5), y=n)
        begin = mb.concat(
            values=[np.array([0, 0], np.int32), mb.expand_dims(x=start, axes=[0]), np.array([0], np.int32)], axis=0
        )
        end = mb.concat(values=[np.array([1, 2], np.int32), np.array([5], np.int32), np.array([4], np.int32)], axis=0)
        upd = mb.tile(x=mb.expand_dims(x=emb, axes=[0]), reps=[1, 2, 1, 1])  # [1, 2, 3, 4]
        new = mb.slice_update(x=mb.read_state(input=cache), update=upd, begin=begin, end=end)
        updated = mb.coreml_update_state(state=cache, value=new)  # serialized as write_state + read_state
        keys = mb.slice_by_index(x=updated, begin=[0, 0, 0, 0], end=[1, 2, 5, 4], end_mask=[True, True, False, True])
        att = mb.scaled_dot_product_attention(query=q, key=keys, value=keys, attn_mask=mask)
        row = mb.squeeze(
            x=mb.slice_by_index(x=emb, begin=[0, 1, 0], end=[1, 2, 4], squeeze_mask=[True, False, False]), axes=[0]
        )
        return att, row

    ev = _save(prog, tmp_path / "s.mlpackage")
    assert ev.state_names == ["cache"]
    assert {"write_state", "read_state", "slice_update", "scaled_dot_product_attention"} <= set(ev.op_types)
    state = ev.make_state()
    state["cache"][...] = RNG.normal(size=cache_shape).astype(np.float16)
    before = state["cache"].copy()
    ids = np.array([[3, 7, 1]], np.int32)
    q = RNG.normal(size=(1, 2, 3, 4)).astype(np.float16)
    mask = np.where(np.arange(5)[None] <= 2 + np.arange(3)[:, None], 0.0, -3e4).astype(np.float16)[None, None]
    out = ev.predict({"ids": ids, "q": q, "mask": mask}, state)
    att, row = (out[n] for n in ev.output_names)
    expected_cache = before.copy()
    expected_cache[:, :, 2:5] = table[ids[0]][None, None]
    np.testing.assert_array_equal(state["cache"], expected_cache)  # written in place, exactly
    keys = torch.from_numpy(expected_cache[:, :, :5].astype(np.float32))
    allowed = torch.from_numpy(mask.astype(np.float32))
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q.astype(np.float32)), keys, keys, attn_mask=allowed
    )
    _close(att, ref.numpy())
    np.testing.assert_array_equal(row, table[7])


def test_blockwise_dequant_and_blob_reader(tmp_path: Path) -> None:
    codes = RNG.integers(-7, 8, size=(6, 64)).astype(np.int8)
    scale = RNG.uniform(0.01, 0.1, size=(6, 2)).astype(np.float16)
    codes8 = RNG.integers(-127, 128, size=(6, 64)).astype(np.int8)
    scale8 = RNG.uniform(0.01, 0.1, size=(6, 1)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        w4 = mb.constexpr_blockwise_shift_scale(data=codes.astype(types.np_int4_dtype), scale=scale)
        w8 = mb.constexpr_blockwise_shift_scale(data=codes8, scale=scale8)
        return mb.linear(x=x, weight=w4), mb.linear(x=x, weight=w8)

    ev = _save(prog, tmp_path / "q.mlpackage")
    assert ev.op_types.count("constexpr_blockwise_shift_scale") == 2
    x = RNG.normal(size=(2, 64)).astype(np.float16)
    y4, y8 = (ev.predict({"x": x})[n] for n in ev.output_names)
    w4 = (codes.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)).astype(np.float16)
    w8 = (codes8.astype(np.float32) * scale8.astype(np.float32)).astype(np.float16)
    _close(y4, x.astype(np.float32) @ w4.astype(np.float32).T)
    _close(y8, x.astype(np.float32) @ w8.astype(np.float32).T)
    # Our blob parser agrees with coremltools' own reader on the packed int4 data.
    from coremltools.libmilstoragepython import _BlobStorageReader

    weight_bin = tmp_path / "q.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    blob = BlobFile(weight_bin)
    reader = _BlobStorageReader(str(weight_bin))
    i4 = next(i for i, op in enumerate(ev.block.operations) if op.type == "constexpr_blockwise_shift_scale")
    off = ev.block.operations[i4].inputs["data"].arguments[0].value.blobFileValue.offset
    ours = blob.read(off, (6, 64), 25)
    np.testing.assert_array_equal(ours, codes)
    np.testing.assert_array_equal(np.asarray(reader.read_int4_data(off)).reshape(6, 64), codes)


def test_fp16_overflow_of_rms_statistics(tmp_path: Path) -> None:
    """x^2 overflows fp16 for |x| > 255.9: the same norm in fp16 gives inf/0, in fp32 (as exported) the right value."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        def norm(v, eps):
            return mb.mul(
                x=v,
                y=mb.rsqrt(
                    x=mb.add(
                        x=mb.reduce_mean(
                            x=mb.pow(x=v, y=2.0 if v.dtype == types.fp32 else np.float16(2.0)),
                            axes=[-1],
                            keep_dims=True,
                        ),
                        y=eps,
                    )
                ),
            )

        x32 = mb.cast(x=x, dtype="fp32")
        return norm(x, np.float16(1e-5)), mb.cast(x=norm(x32, np.float32(1e-5)), dtype="fp16")

    ev = _save(prog, tmp_path / "o.mlpackage")
    x = np.array([[300.0, -500.0, 20.0, 1000.0]], np.float16)
    half, full = (ev.predict({"x": x})[n] for n in ev.output_names)
    ref = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean() + 1e-5)
    assert not np.allclose(half.astype(np.float64), ref, atol=1e-2)  # fp16 statistics break
    _close(full, ref)


def test_unknown_op_is_a_loud_error(tmp_path: Path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.sin(x=x)

    with pytest.raises(UnsupportedOpError, match="sin"):
        _save(prog, tmp_path / "u.mlpackage")


def test_remaining_supported_ops(tmp_path: Path) -> None:
    """Ops the evaluator supports beyond what the exporter emits today, so none is untested."""

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 3, 4), dtype=types.fp32), mb.TensorSpec(shape=(4,), dtype=types.int32)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, i):
        y = mb.matmul(x=x, y=x, transpose_y=True)  # [2, 3, 3]
        m = mb.maximum(x=mb.minimum(x=x, y=0.5), y=-0.5)
        r = mb.reduce_sum(x=mb.sqrt(x=mb.mul(x=x, y=x)), axes=[-1], keep_dims=False)
        s = mb.reduce_max(x=mb.sigmoid(x=x), axes=[1], keep_dims=True)
        return y, mb.identity(x=m), r, s, mb.floor_div(x=i, y=np.int32(3))

    ev = _save(prog, tmp_path / "r.mlpackage")
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    i = np.array([-4, 5, 9, 2], np.int32)
    y, m, r, s, f = (ev.predict({"x": x, "i": i})[n] for n in ev.output_names)
    _close(y, x @ np.swapaxes(x, -1, -2), 1e-5)
    _close(m, np.clip(x, -0.5, 0.5), 1e-6)
    _close(r, np.abs(x).sum(-1), 1e-5)
    _close(s, (1 / (1 + np.exp(-x))).max(1, keepdims=True), 1e-5)
    np.testing.assert_array_equal(f, i // 3)


# ----------------------------------------------------------------------------- vocab > int16: the guard ops
def test_greater_equal(tmp_path: Path) -> None:
    """MIL greater_equal: T in {fp16, fp32, int32} -> bool, numpy broadcasting, compared exactly."""

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(2, 3), dtype=types.fp16),
            mb.TensorSpec(shape=(3,), dtype=types.fp16),
            mb.TensorSpec(shape=(1, 6), dtype=types.int32),
            mb.TensorSpec(shape=(2, 1), dtype=types.fp32),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(x, y, i, f):
        return (
            mb.greater_equal(x=x, y=y),  # [2, 3] vs [3]
            mb.greater_equal(x=i, y=np.int32(0)),  # the guard's sign test
            mb.greater_equal(x=i, y=np.int32(16777217)),  # 2^24 + 1: a float32 compare says 16777216 >= it
            mb.greater_equal(x=f, y=np.array([[-1.5, 0.0, 2.5]], np.float32)),  # [2, 1] vs [1, 3] -> [2, 3]
        )

    ev = _save(prog, tmp_path / "ge.mlpackage")
    assert ev.op_types.count("greater_equal") == 4
    x = np.array([[1.0, -2.0, np.nan], [0.5, 3.0, -0.0]], np.float16)
    y = np.array([0.5, -2.0, 0.0], np.float16)
    i = np.array([[-49152, -1, 0, 49151, 16777216, 16777217]], np.int32)
    f = np.array([[0.0], [np.nan]], np.float32)
    # The results are bool in the program; coremltools casts bool *outputs* to fp32 (1.0 / 0.0).
    assert all(op.outputs[0].type.tensorType.dataType == 1 for op in ev.block.operations if op.type == "greater_equal")
    out = [ev.predict({"x": x, "y": y, "i": i, "f": f})[n] for n in ev.output_names]
    assert all(np.isin(o, [0.0, 1.0]).all() for o in out)
    out = [o.astype(bool) for o in out]
    np.testing.assert_array_equal(out[0], x >= y)  # NaN >= anything is False; -0.0 >= 0.0 is True
    np.testing.assert_array_equal(out[1], i >= 0)
    np.testing.assert_array_equal(out[2], [[False, False, False, False, False, True]])
    np.testing.assert_array_equal(out[3], f >= np.array([[-1.5, 0.0, 2.5]], np.float32))


def test_select(tmp_path: Path) -> None:
    """MIL select(cond, a, b): a where cond else b, cond/a/b broadcast, values copied exactly (int32 ids
    above 2048 / 32767 too)."""
    cond = np.array([[[True, False, True, False]], [[False, False, True, True]]])  # [2, 1, 4]
    b16 = RNG.normal(size=(4,)).astype(np.float16)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 3, 4), dtype=types.fp16), mb.TensorSpec(shape=(1, 6), dtype=types.int32)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, i):
        return (
            mb.select(cond=cond, a=x, b=b16),  # [2, 1, 4] / [2, 3, 4] / [4] -> [2, 3, 4]
            mb.select(cond=mb.greater_equal(x=i, y=np.int32(40000)), a=i, b=np.int32(-7)),
        )

    ev = _save(prog, tmp_path / "sel.mlpackage")
    assert ev.op_types.count("select") == 2
    x = RNG.normal(size=(2, 3, 4)).astype(np.float16)
    i = np.array([[2049, 32767, 32768, 40000, 49151, 65535]], np.int32)
    s16, sid = (ev.predict({"x": x, "i": i})[n] for n in ev.output_names)
    assert s16.dtype == np.float16 and sid.dtype == np.int32
    np.testing.assert_array_equal(s16, np.where(cond, x, b16))  # bit-exact: no arithmetic
    np.testing.assert_array_equal(sid, [[-7, -7, -7, 40000, 49151, 65535]])


def test_gather_index_guard_pattern(tmp_path: Path) -> None:
    """What coremltools' guard_negative_gather_indices pass emits for a 49152-row embedding (iOS17+
    gather takes only indices in [0, D)): select(i >= 0, i, i + D) then gather. An unguarded negative
    index is out of bounds on iOS17+ and the evaluator says so instead of wrapping."""
    vocab = 49152
    table = RNG.normal(size=(vocab, 4)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 7), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(ids):
        safe = mb.select(cond=mb.greater_equal(x=ids, y=np.int32(0)), a=ids, b=mb.add(x=ids, y=np.int32(vocab)))
        return mb.gather(x=table, indices=safe, axis=0), mb.gather(x=table, indices=ids, axis=0), safe

    ev = _save(prog, tmp_path / "guard.mlpackage")
    ids = np.array([[0, 2049, 2051, 32767, 32768, 49150, 49151]], np.int32)
    guarded, raw, safe = (ev.predict({"ids": ids})[n] for n in ev.output_names)
    np.testing.assert_array_equal(safe, ids)
    np.testing.assert_array_equal(guarded, table[ids])
    np.testing.assert_array_equal(raw, table[ids])
    assert not np.array_equal(table[2049], table[2048])  # the rows differ: a fp16 detour (2049 -> 2048) would show
    neg = np.array([[-1, -49152, 5, -2, 0, 49151, -32769]], np.int32)
    with pytest.raises(RuntimeError, match="gather.*out of range"):  # the unguarded gather refuses negatives
        ev.predict({"ids": neg})

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 7), dtype=types.int32)], opset_version=ct.target.iOS18)
    def guarded_only(ids):
        safe = mb.select(cond=mb.greater_equal(x=ids, y=np.int32(0)), a=ids, b=mb.add(x=ids, y=np.int32(vocab)))
        return mb.gather(x=table, indices=safe, axis=0)

    ev2 = _save(guarded_only, tmp_path / "guard2.mlpackage")
    (out,) = ev2.predict({"ids": neg}).values()
    np.testing.assert_array_equal(out, table[neg % vocab])


def test_integer_inputs_never_pass_through_floats(tmp_path: Path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(ids):
        return mb.add(x=ids, y=np.int32(0))

    ev = _save(prog, tmp_path / "ids.mlpackage")
    (out,) = ev.predict({"ids": np.array([[2049, 32768, 49151]], np.int64)}).values()
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[2049, 32768, 49151]])
    with pytest.raises(ValueError, match="float16"):
        ev.predict({"ids": np.array([[2049, 32768, 49151]], np.float16)})  # would arrive as 2048, 32768, 49152
    with pytest.raises(ValueError, match="do not fit int32"):
        ev.predict({"ids": np.array([[0, 1, 2**31]], np.int64)})


def test_every_unknown_op_is_named(tmp_path: Path) -> None:
    from mobilellm.exporter.targets.coreml_eval import SUPPORTED_OPS

    assert {"greater_equal", "select"} <= set(SUPPORTED_OPS)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.cos(x=mb.sin(x=x)), mb.greater_equal(x=x, y=0.0)

    with pytest.raises(UnsupportedOpError, match=r"unsupported MIL op\(s\): cos, sin$"):
        _save(prog, tmp_path / "u2.mlpackage")


# ----------------------------------------------------------------------------- end to end: vocab 49152
BIG_VOCAB = 49152
_PROTO_NAMES = {1: "bool", 10: "fp16", 11: "fp32", 22: "int16", 23: "int32", 32: "uint16"}


def _embedding_index_path(ev: CoreMLEvaluator, vocab: int) -> list[tuple[str, str, str]]:
    """(var, dtype, producing op type or "input") of everything the embedding gather's indices are
    computed from."""
    ops = ev.block.operations
    producer = {out.name: op for op in ops for out in op.outputs}

    def dims(var_type) -> list[int]:
        return [d.constant.size for d in var_type.tensorType.dimensions]

    gather = next(
        op
        for op in ops
        if op.type == "gather"
        and op.inputs["x"].arguments[0].WhichOneof("binding") == "name"
        and dims(producer[op.inputs["x"].arguments[0].name].outputs[0].type)[:1] == [vocab]
    )
    seen, todo = [], [gather.inputs["indices"].arguments[0].name]
    inputs = {i.name: i for i in ev.spec.mlProgram.functions["main"].inputs}
    while todo:
        name = todo.pop()
        if name in inputs:
            seen.append((name, _PROTO_NAMES.get(inputs[name].type.tensorType.dataType, "?"), "input"))
            continue
        op = producer[name]
        out = next(o for o in op.outputs if o.name == name)
        seen.append((name, _PROTO_NAMES.get(out.type.tensorType.dataType, "?"), op.type))
        for arg in op.inputs.values():
            todo += [b.name for b in arg.arguments if b.WhichOneof("binding") == "name"]
    return seen


def test_vocab_49152_exports_at_4_bits_and_matches_reference(tmp_path: Path) -> None:
    """A vocab above int16 (coremltools then leaves the embedding's indices int32 and guards them with
    greater_equal/select) exports to Core ML at 4 bits; the evaluator's logits match the fp32 reference
    model holding the package's own (dequantized 4-bit) weights at the Core ML parity thresholds
    (top-1 >= 0.99, cosine >= 0.998, perplexity within 1%), with token ids up to 49151 in the prompt."""
    import copy

    from conftest import random_model, tiny_config
    from mobilellm.exporter.checkpoint import Checkpoint
    from mobilellm.exporter.export_model import ExportModel, ExportSettings
    from mobilellm.exporter.quantize import quantize_model
    from mobilellm.exporter.targets import coreml
    from mobilellm.exporter.targets.base import TargetOptions
    from mobilellm.validation.metrics import compare_logits, perplexity
    from mobilellm.validation.sequences import TorchRuntime, run_runtime

    cfg = tiny_config(vocab_size=BIG_VOCAB, n_layers=2, sharing="immediate")
    ref = random_model(cfg)
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32))
    ckpt = Checkpoint(cfg, ref, None, tmp_path / "ckpt.pt", "pt", "float32")
    opts = TargetOptions(bits=4, max_seq_len=32)
    art = coreml.export(model, quantize_model(model, coreml.quant_scheme(opts)), ckpt, opts, tmp_path / "bundle")
    ev = CoreMLEvaluator(tmp_path / "bundle" / art.files[0])

    # The ids reach the embedding gather through integer ops only (int32, or uint16 which holds 49151),
    # via the guard ops this test is about, and never through a float or int16.
    path = _embedding_index_path(ev, BIG_VOCAB)
    assert {"greater_equal", "select"} <= {kind for _, _, kind in path}, path
    assert ("input_ids", "int32", "input") in path, path
    for name, dtype, kind in path:  # bool only as the guard's condition
        assert dtype in ("int32", "uint16") or (dtype == "bool" and kind == "greater_equal"), (name, dtype, kind)

    # The fp32 reference with the package's weights: every constexpr output replaces the model weight of
    # its shape it is closest to (name-free, so it does not depend on the quantizer's const naming).
    deq = [
        np.asarray(ev.const(op.outputs[0].name), np.float32)
        for op in ev.block.operations
        if op.type == "constexpr_blockwise_shift_scale"
    ]
    pkg_model = copy.deepcopy(model)
    weighted = [m for m in pkg_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    for m in weighted:
        w = m.weight.detach().numpy()
        cands = [d for d in deq if d.shape == w.shape]
        assert cands, f"no quantized const of shape {w.shape} in the package"
        best = min(cands, key=lambda d: float(np.abs(d - w).max()))
        m.weight = torch.nn.Parameter(torch.from_numpy(best.copy()), requires_grad=False)
    assert len(deq) == 4 * 2 + 1  # 2 stored blocks x 4 linears + the shared embedding

    g = torch.Generator().manual_seed(11)
    toks = torch.randint(0, BIG_VOCAB, (24,), generator=g).numpy()
    toks[[1, 4, 9, 13, 17, 20, 22]] = [49151, 32768, 32767, 2049, 49150, 2051, 40961]  # high / fp16-inexact ids
    got = run_runtime(coreml.open_runtime(tmp_path / "bundle", {"artifact": art.files[0]}), toks, 16)
    want = run_runtime(TorchRuntime(pkg_model), toks, 16)
    fp32 = run_runtime(TorchRuntime(model), toks, 16)
    assert got.shape == (24, BIG_VOCAB)
    m = compare_logits(got, want)
    ppl = {
        "artifact": perplexity(got[:-1], toks[1:]),
        "package_weights_fp32": perplexity(want[:-1], toks[1:]),
        "reference_fp32": perplexity(fp32[:-1], toks[1:]),
    }
    print(
        f"\n[coreml vocab {BIG_VOCAB}] vs fp32-with-package-weights {m}; vs fp32 reference {compare_logits(got, fp32)}; ppl {ppl}"
    )
    assert m["top1_agreement"] >= 0.99, m
    assert m["cosine"] >= 0.998, m
    assert abs(ppl["artifact"] - ppl["package_weights_fp32"]) / ppl["package_weights_fp32"] < 0.01, ppl
