"""The one quantizer: scale rules, zero points, GPTQ, storage limits, calibration text."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from mobilellm.exporter.assets import calibration_text, heldout_text
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.quantize import (
    QuantMethod,
    QuantScheme,
    WeightQuant,
    collect_hessians,
    fake_quantized_twin,
    gptq,
    nbytes,
    quantize_model,
)


def _weights(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and a per-row offset, as trained weights have.
    return (
        torch.randn(rows, cols, generator=g) * 0.05
        + torch.randn(rows, 1, generator=g) * 0.01
        + torch.randn(rows, cols, generator=g).pow(3) * 0.01
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_points", [False, True])
def test_codes_fit_the_format(bits: int, scale_dtype: torch.dtype, zero_points: bool) -> None:
    wq = WeightQuant(bits, 32, "mse", scale_dtype=scale_dtype, zero_points=zero_points)
    qw = wq.quantize(_weights())
    qmin, qmax = wq.qrange()
    assert qw.codes.dtype == torch.int8 and qmin <= int(qw.codes.min()) and int(qw.codes.max()) <= qmax
    assert torch.equal(qw.scales.to(scale_dtype).float(), qw.scales)  # exactly what the runtime stores
    assert (qw.zeros is not None) == zero_points
    if qw.zeros is not None:
        assert qmin <= int(qw.zeros.min()) and int(qw.zeros.max()) <= qmax
    deq = qw.dequantize()
    g = qw.codes.float().reshape(64, -1, 32) - (qw.zeros.float().unsqueeze(-1) if qw.zeros is not None else 0)
    torch.testing.assert_close(deq, (g * qw.scales.unsqueeze(-1)).reshape(64, 128), rtol=0, atol=0)


@pytest.mark.parametrize("zero_points", [False, True])
def test_scoring_a_slice_of_rows_at_a_time_chooses_what_scoring_all_at_once_does(
    zero_points: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mobilellm.exporter import quantize

    wq = WeightQuant(4, 32, "mse", scale_dtype=torch.bfloat16, zero_points=zero_points)
    w = _weights(256, 256)
    whole = wq.quantize(w)
    monkeypatch.setattr(quantize, "_SLICE_ELEMENTS", 3 * 256)  # 3 rows a slice: 86 slices, the last one short
    sliced = wq.quantize(w)
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scales, whole.scales)
    assert (sliced.zeros is None) == (not zero_points)
    assert sliced.zeros is None or torch.equal(sliced.zeros, whole.zeros)


def test_searched_clipping_and_zero_points_lower_the_error() -> None:
    w = _weights(256, 256)

    def err(wq: WeightQuant) -> float:
        return float(((wq.quantize(w).dequantize() - w) ** 2).sum())

    plain = err(WeightQuant(4, 32, "signed_extreme"))
    torchao = err(WeightQuant(4, 32, "torchao"))
    searched = err(WeightQuant(4, 32, "mse"))
    asym = err(WeightQuant(4, 32, "mse", zero_points=True))
    assert searched < plain < torchao  # torchao's amax/7.5 clips every group's positive extreme
    assert asym < searched


def test_gptq_lowers_the_layer_output_error_for_its_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    w = _weights(96, 128)
    mix = torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128)  # correlated input features
    x = torch.randn(4096, 128, generator=g) @ mix
    hessian = x.T @ x / len(x)
    for wq in (WeightQuant(4, 32, "mse"), WeightQuant(4, 32, "mse", zero_points=True), WeightQuant(8, None, "mse")):
        rtn, data_aware = wq.quantize(w).dequantize(), gptq(w, hessian, wq).dequantize()
        out_err = lambda d: float(((x @ (d - w).T) ** 2).mean())  # noqa: E731
        assert out_err(data_aware) < 0.8 * out_err(rtn), wq
        assert torch.equal(wq.quantize(w, hessian).codes, gptq(w, hessian, wq).codes)


def test_quantize_model_stores_shared_blocks_once_and_the_twin_holds_exactly_its_weights() -> None:
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32))
    wq = WeightQuant(4, 32, "mse", zero_points=True)
    scheme = QuantScheme(wq, WeightQuant(8, None, "mse"), WeightQuant(8, None, "mse"))
    windows = [torch.randint(0, 160, (31,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantized = quantize_model(model, scheme, windows)
    assert quantized.method == "gptq"
    n_blocks = model.config.n_layers
    assert sorted(k for k in quantized.weights if k.startswith("blocks.")) == sorted(
        f"blocks.{b}.{n}.weight" for b in range(n_blocks) for n in ("wqkv", "wo", "w13", "w2")
    )
    twin = fake_quantized_twin(model, quantized)
    assert torch.equal(twin.blocks[1].w13.weight, quantized.dequantized("blocks.1.w13.weight"))
    assert torch.equal(twin.tok_embeddings.weight, quantized.dequantized("tok_embeddings.weight"))


def test_shared_block_hessian_sees_every_application() -> None:
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32))
    tokens = [torch.randint(0, 160, (20,), generator=torch.Generator().manual_seed(0))]
    hessians = collect_hessians(model, tokens)
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].wqkv.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    model.reset_cache()
    model(tokens[0][None], torch.tensor([0]))
    hook.remove()
    assert len(seen) == 2  # block 0 applied twice in a row
    x = torch.cat(seen).double()
    torch.testing.assert_close(hessians["blocks.0.wqkv.weight"], (x.T @ x / len(x)).float())


def test_storage_bytes_count_codes_scales_and_zero_points() -> None:
    assert nbytes(64, 128, WeightQuant(4, 32, scale_dtype=torch.bfloat16)) == 64 * (64 + 4 * 2)
    assert nbytes(64, 128, WeightQuant(4, 32, scale_dtype=torch.float32, zero_points=True)) == 64 * (64 + 4 * 4 + 2)
    assert nbytes(64, 128, WeightQuant(8, None, scale_dtype=torch.float16, zero_points=True)) == 64 * (128 + 2 + 1)
    assert nbytes(64, 128, WeightQuant(16, float_dtype=torch.float16)) == 64 * 128 * 2


def test_calibration_text_is_disjoint_from_the_parity_text() -> None:
    calib, held = calibration_text(), heldout_text()
    assert len(calib) > 50_000
    shingles = {held[i : i + 64] for i in range(0, len(held) - 64)}
    assert not any(calib[i : i + 64] in shingles for i in range(0, len(calib) - 64, 7))


def test_method_round_trips_through_the_manifest() -> None:
    method = QuantMethod(scale_rule="signed_extreme", asymmetric=False, gptq=False, calibration_tokens=512)
    assert QuantMethod.from_dict(method.to_dict()) == method
    assert QuantMethod.from_dict({}).to_dict() == QuantMethod().to_dict()


def test_a_target_whose_runtime_is_missing_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mobilellm.exporter.errors import UserError
    from mobilellm.exporter.targets import available_targets, load_target

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    assert available_targets() == ["executorch", "onnx"]
    with pytest.raises(UserError, match="the coreml target needs the coremltools package"):
        load_target("coreml")
