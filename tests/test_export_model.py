"""The export module equals the reference; sharing is unrolled and weight-aliased; it exports."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from mobilellm.exporter.export_model import ExportModel, ExportSettings, run_sequence, unique_storages
from mobilellm.exporter.quantize import QuantScheme, WeightQuant, fake_quantized_twin, quantize_model


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("fold", [False, True])
def test_export_model_equals_reference(sharing: str, fuse: bool, fold: bool, tokens: torch.Tensor) -> None:
    ref = random_model(tiny_config(sharing=sharing))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32, fuse=fuse, fold_norm_gains=fold))
    full = ref(tokens)
    model.reset_cache()
    torch.testing.assert_close(model(tokens, torch.tensor([0])), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(run_sequence(model, tokens, prefill=5), full, atol=1e-5, rtol=0)


def test_gqa_without_repeating_kv(tokens: torch.Tensor) -> None:
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32, gqa="sdpa"))
    torch.testing.assert_close(run_sequence(model, tokens, prefill=4), ref(tokens), atol=1e-5, rtol=0)


def _checkpoint_storages(ref) -> dict[int, int]:
    return unique_storages(ref)


@pytest.mark.parametrize("fuse", [True, False])
def test_shared_layers_hold_only_unique_storages(sharing: str, fuse: bool) -> None:
    ref = random_model(tiny_config(sharing=sharing))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32, fuse=fuse))
    ckpt, ours = _checkpoint_storages(ref), unique_storages(model)
    assert sum(ours.values()) == sum(ckpt.values())  # bytes: nothing duplicated by unrolling
    cfg = ref.config
    # Unfused: the very same storages as the checkpoint; fused: q/k/v -> 1 and gate/up -> 1 per block.
    expected = len(ckpt) - (3 * cfg.n_layers if fuse else 0)
    assert len(ours) == expected
    if not fuse:
        assert set(ours) == set(ckpt)  # aliased by data pointer, never copied
    # The applied schedule is unrolled over the stored blocks, and every application has its own cache.
    assert len(model.caches) == cfg.n_applied
    assert len({c.k_cache.data_ptr() for c in model.caches}) == cfg.n_applied


def test_exported_graph_references_each_shared_weight_once(tokens: torch.Tensor) -> None:
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32))
    ep = model.export()
    params = ep.graph_signature.inputs_to_parameters
    cfg = ref.config
    # embedding (also the output projection) + final norm + 6 per stored block, not per application
    assert len(params) == 2 + 6 * cfg.n_layers
    assert len(set(params.values())) == len(params)
    functional = ep.run_decompositions({})  # what every backend lowers: mutations made explicit
    buffers = [b for b in functional.graph_signature.buffers_to_mutate.values() if "cache" in b]
    assert len(buffers) == 2 * cfg.n_applied  # K and V per application, mutated in place
    module = ep.module()
    out = [module(tokens[:, :5], torch.tensor([0]))]
    for pos in range(5, tokens.shape[1]):
        out.append(module(tokens[:, pos : pos + 1], torch.tensor([pos])))
    torch.testing.assert_close(torch.cat(out, 1), ref(tokens), atol=1e-5, rtol=0)


def test_max_seq_len_is_checked() -> None:
    from mobilellm.exporter.errors import UserError

    with pytest.raises(UserError, match="--max-seq-len"):
        ExportModel.from_reference(random_model(tiny_config()), ExportSettings(max_seq_len=4096))


def test_twin_rounds_weights_and_keeps_sharing(tokens: torch.Tensor) -> None:
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=32))
    w4, w8 = WeightQuant(4, 32, "torchao"), WeightQuant(8, scale_rule="torchao")
    twin = fake_quantized_twin(model, quantize_model(model, QuantScheme(w4, w8, w8)))
    assert len(unique_storages(twin)) == len(unique_storages(model))
    w = twin.blocks[0].wqkv.weight
    qw = w4.quantize(model.blocks[0].wqkv.weight)
    q, scale = qw.codes, qw.scales
    assert q.min() >= -8 and q.max() <= 7
    torch.testing.assert_close(w, (q.float().reshape(w.shape[0], -1, 32) * scale[..., None]).reshape(w.shape))
    # 16 distinct values at most per group
    assert all(len(torch.unique(g)) <= 16 for g in w.reshape(-1, 32)[:50])
    out = run_sequence(twin, tokens, 5)
    ref_out = ref(tokens)
    assert (out - ref_out).abs().max() > 1e-4  # rounding happened
    assert (out.argmax(-1) == ref_out.argmax(-1)).float().mean() > 0.5
