"""The numpy Core ML evaluator, op by op: tiny MIL programs built with coremltools' builder, saved as
.mlpackage, evaluated from the saved files, compared with numpy/torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mobilellm.validation.coreml_eval import BlobFile, CoreMLEvaluator, UnsupportedOpError  # noqa: E402

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
    assert set(ev.op_types) >= {"pow", "reduce_mean", "rsqrt", "add", "mul", "linear", "silu", "split", "reshape", "transpose", "tile", "concat", "cast", "softmax"}
    x = RNG.normal(size=(1, 3, 8)).astype(np.float16)
    out = ev.predict({"x": x})
    tiled, sm = (out[n] for n in ev.output_names)
    assert tiled.dtype == np.float16  # fp16 where the program says fp16
    xt = torch.from_numpy(x.astype(np.float32))
    normed = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-3 + 1e-6) * torch.from_numpy(g.astype(np.float32))
    act = torch.nn.functional.silu(torch.nn.functional.linear(normed, torch.from_numpy(w.astype(np.float32)), torch.from_numpy(b.astype(np.float32))))
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
        begin = mb.concat(values=[np.array([0, 0], np.int32), mb.expand_dims(x=start, axes=[0]), np.array([0], np.int32)], axis=0)
        end = mb.concat(values=[np.array([1, 2], np.int32), np.array([5], np.int32), np.array([4], np.int32)], axis=0)
        upd = mb.tile(x=mb.expand_dims(x=emb, axes=[0]), reps=[1, 2, 1, 1])  # [1, 2, 3, 4]
        new = mb.slice_update(x=mb.read_state(input=cache), update=upd, begin=begin, end=end)
        updated = mb.coreml_update_state(state=cache, value=new)  # serialized as write_state + read_state
        keys = mb.slice_by_index(x=updated, begin=[0, 0, 0, 0], end=[1, 2, 5, 4], end_mask=[True, True, False, True])
        att = mb.scaled_dot_product_attention(query=q, key=keys, value=keys, attn_mask=mask)
        row = mb.squeeze(x=mb.slice_by_index(x=emb, begin=[0, 1, 0], end=[1, 2, 4], squeeze_mask=[True, False, False]), axes=[0])
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
    ref = torch.nn.functional.scaled_dot_product_attention(torch.from_numpy(q.astype(np.float32)), keys, keys, attn_mask=allowed)
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
            return mb.mul(x=v, y=mb.rsqrt(x=mb.add(x=mb.reduce_mean(x=mb.pow(x=v, y=2.0 if v.dtype == types.fp32 else np.float16(2.0)), axes=[-1], keep_dims=True), y=eps)))

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
