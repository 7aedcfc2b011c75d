"""ExecuTorch target: the .pte run through executorch.runtime against its fake-quant twin and the fp32
reference, the stock TextLLMRunner, layer-sharing dedupe, group-size refusal.

Each configuration is exported once (module-scoped fixtures); tiny random models from conftest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mobilellm.exporter.errors import UserError
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.targets import executorch as et
from mobilellm.exporter.targets.base import TargetOptions
from mobilellm.validation.metrics import compare_logits, perplexity
from mobilellm.validation.sequences import TorchRuntime, run_runtime

from conftest import default_model_dir, random_model, tiny_config

MAX_SEQ = 64
VOCAB = 2048  # the embedded default tokenizer's vocabulary, so the stock runner can use it
PREFILL, TOTAL = 24, 40  # 24-token prefill + 16 decode steps


def _tokenizer() -> Path:
    return default_model_dir() / "tokenizer.model"


def _export(tmp_path_factory: pytest.TempPathFactory, sharing: str, opts: TargetOptions, name: str):
    cfg = tiny_config(vocab_size=VOCAB, n_layers=2, sharing=sharing)
    ref = random_model(cfg)
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=opts.max_seq_len))
    bundle = tmp_path_factory.mktemp(name)
    art = et.export(model, None, opts, bundle)  # type: ignore[arg-type]
    return model, bundle, art


def _tokens(n: int = TOTAL, seed: int = 3) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).numpy()


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    opts = TargetOptions(bits=4, group_size=32, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "none", opts, "et_q4"), opts)


@pytest.fixture(scope="module")
def q4_shared(tmp_path_factory):
    opts = TargetOptions(bits=4, group_size=32, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "immediate", opts, "et_q4_ls"), opts)


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    opts = TargetOptions(bits=16, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "none", opts, "et_f32"), opts)


def _runs(model, bundle, opts, tokens):
    rt = et.open_runtime(bundle, {"files": ["model.pte"]})
    pte = run_runtime(rt, tokens, PREFILL)
    twin = run_runtime(TorchRuntime(et.fake_quantized_twin(model, opts)), tokens, PREFILL)
    ref = run_runtime(TorchRuntime(model), tokens, PREFILL)
    return pte, twin, ref


# ----------------------------------------------------------------------------- rounding rules
def test_weight_rounding_matches_torchao_exactly():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.08
    for bits, gran, gs in ((4, PerGroup(32), 32), (8, PerAxis(0), None)):
        lin = nn.Linear(128, 96, bias=False)
        lin.weight.data.copy_(w)
        quantize_(lin, Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=gran))
        wq = et.WeightQuant(bits, group_size=gs, scale_rule="torchao", scale_dtype=torch.float32)
        q, scale = et.torchao_quantize(w, wq)
        assert torch.equal(q, lin.weight.qdata.to(torch.int8))
        assert torch.equal(scale, lin.weight.scale.float().reshape(scale.shape))


def test_quant_scheme_describes_the_runtime():
    s4 = et.quant_scheme(TargetOptions(bits=4, group_size=64))
    assert (s4.linear.bits, s4.linear.group_size, s4.linear.scale_dtype) == (4, 64, torch.bfloat16)
    assert s4.int8_dynamic_activations and s4.output == s4.linear
    assert (s4.embedding.bits, s4.embedding.group_size) == (8, None)
    s8 = et.quant_scheme(TargetOptions(bits=8))
    assert (s8.linear.bits, s8.linear.group_size, s8.linear.scale_dtype) == (8, None, torch.float32)
    s16 = et.quant_scheme(TargetOptions(bits=16))
    assert s16.linear.bits == 16 and s16.embedding.bits == 16 and not s16.int8_dynamic_activations


def test_group_size_that_does_not_divide_a_width_is_refused(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)  # dim 64, ffn 96
    model = ExportModel.from_reference(random_model(cfg), ExportSettings(max_seq_len=MAX_SEQ))
    with pytest.raises(UserError, match=r"--group-size 64 does not divide the input width 96"):
        et.export(model, None, TargetOptions(bits=4, group_size=64, max_seq_len=MAX_SEQ), tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / "model.pte").exists()


# ----------------------------------------------------------------------------- 4-bit parity
def test_q4_pte_matches_twin_and_quant_error_is_the_twins(q4):
    model, bundle, art, opts = q4
    tokens = _tokens()
    pte, twin, ref = _runs(model, bundle, opts, tokens)
    lowering = compare_logits(pte, twin)
    assert lowering["top1_agreement"] >= 0.99, lowering
    assert lowering["cosine"] > 0.9999, lowering
    # quantization error: the artifact is no worse than the twin (small slack for the fp rounding
    # differences XNNPACK's kernels add on top of the twin)
    pte_vs_ref, twin_vs_ref = compare_logits(pte, ref), compare_logits(twin, ref)
    assert pte_vs_ref["top1_agreement"] >= twin_vs_ref["top1_agreement"] - 1 / len(tokens)
    targets = tokens[1:]
    ppl_ref, ppl_twin, ppl_pte = (perplexity(x[:-1], targets) for x in (ref, twin, pte))
    assert abs(ppl_pte - ppl_ref) <= abs(ppl_twin - ppl_ref) * 1.05 + 1e-3 * ppl_ref
    print(f"\nq4: pte~twin {lowering}\npte~ref {pte_vs_ref}\ntwin~ref {twin_vs_ref}\nppl ref {ppl_ref:.3f} twin {ppl_twin:.3f} pte {ppl_pte:.3f}")


def test_q4_artifact_metadata_and_sizes(q4):
    model, bundle, art, opts = q4
    assert art.files[0] == "model.pte" and (bundle / "model.pte").is_file()
    assert art.info["pte_bytes"] == (bundle / "model.pte").stat().st_size
    assert art.info["minimum_bytes"] <= art.info["pte_bytes"]
    from executorch.runtime import Runtime

    et._load_kernels()
    program = Runtime.get().load_program(bundle / "model.pte")
    names = set(program.method_names)
    for meth in ("forward", "get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids", "get_vocab_size", "use_kv_cache", "enable_dynamic_shape"):
        assert meth in names, meth
    assert program.load_method("get_max_seq_len").execute([])[0] == MAX_SEQ
    assert program.load_method("get_max_context_len").execute([])[0] == MAX_SEQ
    assert program.load_method("get_vocab_size").execute([])[0] == VOCAB


def test_stock_runner_generates_from_the_pte(q4):
    model, bundle, art, opts = q4
    tok = _tokenizer()
    if not tok.is_file():
        pytest.skip("default tokenizer asset missing")
    text = et.generate_with_runner(bundle, tok, "Once upon a time", max_new_tokens=8)
    assert isinstance(text, str) and len(text) > 0
    # greedy decoding from the runner equals greedy decoding through executorch.runtime
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    prompt = [sp.bos_id(), *sp.encode("Once upon a time")]
    rt = et.open_runtime(bundle, {})
    rt.reset()
    logits = rt.forward(np.array(prompt), 0)
    ids, pos = [int(logits[-1].argmax())], len(prompt)
    while len(ids) < 8 and ids[-1] != sp.eos_id():
        ids.append(int(rt.forward(np.array([ids[-1]]), pos)[-1].argmax()))
        pos += 1
    assert text.strip() == sp.decode(ids).strip() or sp.decode(ids).startswith(text.strip()[:8])


# ----------------------------------------------------------------------------- layer sharing
def test_immediate_sharing_pte_stores_weights_once(q4, q4_shared):
    _, _, art, _ = q4
    model_ls, bundle_ls, art_ls, opts = q4_shared
    plain, shared = art.info["pte_bytes"], art_ls.info["pte_bytes"]
    assert shared <= plain * 1.02, (plain, shared)
    tokens = _tokens(seed=5)
    pte, twin, _ = _runs(model_ls, bundle_ls, opts, tokens)
    assert compare_logits(pte, twin)["top1_agreement"] >= 0.99


# ----------------------------------------------------------------------------- 16 bits = reference
def test_f32_pte_equals_reference(f32):
    model, bundle, art, opts = f32
    tokens = _tokens()
    rt = et.open_runtime(bundle, {"files": ["model.pte"]})
    pte = run_runtime(rt, tokens, PREFILL)
    ref = run_runtime(TorchRuntime(model), tokens, PREFILL)
    m = compare_logits(pte, ref)
    assert m["top1_agreement"] == 1.0, m
    assert m["max_abs"] < 1e-3, m
    # a fresh reset really restarts the cache
    again = run_runtime(rt, tokens, PREFILL)
    np.testing.assert_array_equal(again, pte)
