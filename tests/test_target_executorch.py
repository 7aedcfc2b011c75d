"""ExecuTorch target: the .pte run through executorch.runtime against its fake-quant twin and the fp32
reference, the stock TextLLMRunner, layer-sharing dedupe, group-size refusal.

Each configuration is exported once (module-scoped fixtures); tiny random models from conftest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import default_model_dir, random_model, tiny_config
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.quantize import WeightQuant, fake_quantized_twin, quantize_model
from mobilellm.exporter.targets import executorch as et
from mobilellm.exporter.targets.base import TargetOptions
from mobilellm.validation.metrics import compare_logits, perplexity
from mobilellm.validation.sequences import TorchRuntime, run_runtime

MAX_SEQ = 64
VOCAB = 2048  # the embedded default tokenizer's vocabulary, so the stock runner can use it
# Parity runs on conftest's TINY widths (dim 64). With N(0, 0.08) weights a wider random model is
# chaotic (each linear has gain ~0.08*sqrt(width) > 1), so the rare int8 activation-code flips that
# XNNPACK's float ordering causes get amplified into many near-tie top-1 flips (measured at dim 384:
# 96.3% raw top-1 over 160 positions, 100% on the non-tie positions).
SMALL = dict(n_layers=2, vocab_size=VOCAB)
# The sharing-size check uses wider layers so the weights, not the per-partition XNNPACK graph headers
# (a few KB each; an unrolled shared block adds partitions), dominate the .pte as in a real model.
WIDE = dict(dim=384, n_heads=6, n_kv_heads=2, ffn_dim=1024, n_layers=2, vocab_size=VOCAB)
PREFILL, TOTAL = 24, 40  # 24-token prefill + 16 decode steps


def _tokenizer() -> Path:
    return default_model_dir() / "tokenizer.model"


def _export(tmp_path_factory: pytest.TempPathFactory, sharing: str, opts: TargetOptions, name: str, dims: dict = SMALL):
    cfg = tiny_config(**dims, sharing=sharing)
    ref = random_model(cfg)
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=opts.max_seq_len))
    bundle = tmp_path_factory.mktemp(name)
    quantized = quantize_model(model, et.quant_scheme(opts))
    art = et.export(model, quantized, None, opts, bundle)
    return model, bundle, art, quantized


def _tokens(n: int = TOTAL, seed: int = 3) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).numpy()


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    opts = TargetOptions(bits=4, group_size=32, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "none", opts, "et_q4"), opts)


# fp32 exports lower ~4x faster than quantized ones, so the sharing comparison is made at --bits 16
# (the dedupe mechanism, XNNPACK's content-hash-keyed named data, is the same at every bit width).
@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    opts = TargetOptions(bits=16, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "none", opts, "et_f32", WIDE), opts)


@pytest.fixture(scope="module")
def f32_shared(tmp_path_factory):
    opts = TargetOptions(bits=16, max_seq_len=MAX_SEQ)
    return (*_export(tmp_path_factory, "immediate", opts, "et_f32_ls", WIDE), opts)


# ----------------------------------------------------------------------------- rounding rules
def test_weight_rounding_matches_torchao_exactly():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.08
    for bits, gran, gs in ((4, PerGroup(32), 32), (8, PerAxis(0), None)):
        lin = nn.Linear(128, 96, bias=False)
        lin.weight.data.copy_(w)
        quantize_(
            lin,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=gran),
        )
        wq = WeightQuant(bits, group_size=gs, scale_rule="torchao", scale_dtype=torch.float32)
        qw = wq.quantize(w)
        q, scale = qw.codes, qw.scales
        assert torch.equal(q, lin.weight.qdata.to(torch.int8))
        assert torch.equal(scale, lin.weight.scale.float().reshape(scale.shape))


def test_our_codes_become_torchaos_tensor_unchanged():
    """The .pte is built from the quantizer's codes and scales handed to torchao's tensor type as they
    are: torchao dequantizes them to exactly the twin's weights (bf16-representable scales included)."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.08
    for wq in (WeightQuant(4, 32, "mse", scale_dtype=torch.bfloat16), WeightQuant(8, None, "mse")):
        qw = wq.quantize(w)
        tensor = et._torchao_weight(qw, activations=True)
        assert torch.equal(tensor.dequantize(), qw.dequantize())
        assert torch.equal(qw.scales.to(torch.bfloat16).float(), qw.scales) or wq.scale_dtype != torch.bfloat16


def test_quant_scheme_describes_the_runtime():
    s4 = et.quant_scheme(TargetOptions(bits=4, group_size=64))
    assert (s4.linear.bits, s4.linear.group_size, s4.linear.scale_dtype) == (4, 64, torch.bfloat16)
    # At 4 bits the table's bytes go to the output projection (int8) and the lookup table is int4.
    assert s4.int8_dynamic_activations and (s4.output.bits, s4.output.group_size) == (8, None)
    assert (s4.embedding.bits, s4.embedding.group_size) == (4, 64)
    assert not (s4.linear.negative_scales or s4.output.negative_scales or s4.linear.zero_points)  # XNNPACK's limits
    s8 = et.quant_scheme(TargetOptions(bits=8))
    assert (s8.linear.bits, s8.linear.group_size, s8.linear.scale_dtype) == (8, None, torch.float32)
    s16 = et.quant_scheme(TargetOptions(bits=16))
    assert s16.linear.bits == 16 and s16.embedding.bits == 16 and not s16.int8_dynamic_activations


def test_group_size_that_does_not_divide_a_width_is_refused(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)  # dim 64, ffn 96
    model = ExportModel.from_reference(random_model(cfg), ExportSettings(max_seq_len=MAX_SEQ))
    with pytest.raises(UserError, match=r"--group-size 64 does not divide the input width 96 "):
        et.check_group_size(cfg, TargetOptions(bits=4, group_size=64, max_seq_len=MAX_SEQ))
    with pytest.raises(UserError, match=r"--group-size 48 does not divide the input width 64 "):
        et.check_group_size(cfg, TargetOptions(bits=4, group_size=48, max_seq_len=MAX_SEQ))
    with pytest.raises(UserError, match=r"group size 48 does not divide input width 64"):  # the quantizer refuses too
        quantize_model(model, et.quant_scheme(TargetOptions(bits=4, group_size=48, max_seq_len=MAX_SEQ)))
    # 8-bit weights with 8-bit embeddings are per-channel: no group size involved
    et.check_group_size(cfg, TargetOptions(bits=8, group_size=64))
    assert not (tmp_path / "model.pte").exists()


# ----------------------------------------------------------------------------- 4-bit parity
def test_q4_pte_matches_twin_and_quant_error_is_the_twins(q4):
    """Lowering error (pte vs twin) and quantization error (pte vs fp32 reference), 4 sequences x
    (24-token prefill + 16 decode steps) = 160 positions.

    XNNPACK's float ordering (RMSNorm, attention, accumulation) differs from PyTorch's by ~1e-6; once
    in a while that moves an int8 activation code across a rounding boundary, a discrete ~0.1 logit
    change. Where the twin's top-2 logits are closer than that, top-1 can flip. So: >= 99% top-1 on
    the positions that are not such near-ties (top-1 margin above the measured max |pte - twin|),
    >= 97% on all positions, and every disagreement must be a near tie.
    """
    model, bundle, art, quantized, opts = q4
    rt = et.open_runtime(bundle, {"artifact": "model.pte"})
    twin_rt, ref_rt = TorchRuntime(fake_quantized_twin(model, quantized)), TorchRuntime(model)
    pte, twin, ref, targets = [], [], [], []
    for seed in range(4):
        tokens = _tokens(seed=seed)
        pte.append(run_runtime(rt, tokens, PREFILL))
        twin.append(run_runtime(twin_rt, tokens, PREFILL))
        ref.append(run_runtime(ref_rt, tokens, PREFILL))
        targets.append(tokens[1:])
    lowering = compare_logits(np.concatenate(pte), np.concatenate(twin))
    P, T, R = np.concatenate(pte), np.concatenate(twin), np.concatenate(ref)
    top2 = np.sort(T, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    noise = float(np.abs(P - T).max())
    agree = P.argmax(-1) == T.argmax(-1)
    clear = margin > noise
    print(
        f"\nq4 pte~twin: {lowering}\n  non-tie positions {int(clear.sum())}/{len(clear)}, top-1 there {agree[clear].mean():.4f}; "
        f"disagreements {int((~agree).sum())} with twin margins {np.round(margin[~agree], 4).tolist()}"
    )
    assert agree[clear].mean() >= 0.99
    assert lowering["top1_agreement"] >= 0.97, lowering
    assert np.all(margin[~agree] <= noise)
    assert lowering["cosine"] > 0.9999 and lowering["kl_divergence"] < 1e-3, lowering
    # quantization error: the artifact's is the twin's (no worse beyond the lowering noise above)
    pte_vs_ref, twin_vs_ref = compare_logits(P, R), compare_logits(T, R)
    assert pte_vs_ref["top1_agreement"] >= twin_vs_ref["top1_agreement"] - (1 - lowering["top1_agreement"])
    ppl = {
        name: float(np.mean([perplexity(x[:-1], t) for x, t in zip(xs, targets)]))
        for name, xs in (("ref", ref), ("twin", twin), ("pte", pte))
    }
    assert abs(ppl["pte"] - ppl["ref"]) <= abs(ppl["twin"] - ppl["ref"]) * 1.05 + 1e-3 * ppl["ref"], ppl
    print(
        f"  pte~ref top-1 {pte_vs_ref['top1_agreement']:.4f} kl {pte_vs_ref['kl_divergence']:.4f}; twin~ref top-1 "
        f"{twin_vs_ref['top1_agreement']:.4f} kl {twin_vs_ref['kl_divergence']:.4f}; perplexity {ppl}"
    )


def test_q4_artifact_metadata_and_sizes(q4):
    model, bundle, art, _, opts = q4
    assert art.files[0] == "model.pte" and (bundle / "model.pte").is_file()
    assert art.info["pte_bytes"] == (bundle / "model.pte").stat().st_size
    assert art.info["size"]["minimum_bytes"] <= art.info["pte_bytes"]
    from executorch.runtime import Runtime

    et.load_kernels()
    program = Runtime.get().load_program(bundle / "model.pte")
    names = set(program.method_names)
    for meth in (
        "forward",
        "get_max_seq_len",
        "get_max_context_len",
        "get_bos_id",
        "get_eos_ids",
        "get_vocab_size",
        "use_kv_cache",
        "enable_dynamic_shape",
    ):
        assert meth in names, meth
    assert program.load_method("get_max_seq_len").execute([])[0] == MAX_SEQ
    assert program.load_method("get_max_context_len").execute([])[0] == MAX_SEQ
    assert program.load_method("get_vocab_size").execute([])[0] == VOCAB


def test_stock_runner_generates_from_the_pte(q4):
    """The stock C++ TextLLMRunner loads the .pte + SentencePiece tokenizer and its greedy tokens are
    exactly greedy decoding of the same .pte through executorch.runtime."""
    model, bundle, art, _, opts = q4
    tok = _tokenizer()
    if not tok.is_file():
        pytest.skip("default tokenizer asset missing")
    pieces: list[str] = []
    text = et.generate_with_runner(bundle, tok, "Once upon a time", max_new_tokens=8, on_piece=pieces.append)
    assert text == "".join(pieces) and len(pieces) == 8
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    prompt = [sp.bos_id(), *sp.encode("Once upon a time")]
    rt = et.open_runtime(bundle, {})
    ids, pos = [int(rt.forward(np.array(prompt), 0)[-1].argmax())], len(prompt)
    while len(ids) < 8 and ids[-1] != sp.eos_id():
        ids.append(int(rt.forward(np.array([ids[-1]]), pos)[-1].argmax()))
        pos += 1
    # the runner streams each token's piece ("▁" as a space, byte pieces verbatim)
    assert pieces == [sp.id_to_piece(i).replace("▁", " ") for i in ids]


# ----------------------------------------------------------------------------- layer sharing
def test_immediate_sharing_pte_stores_weights_once(f32, f32_shared):
    """Immediate sharing (0,0,1,1) runs each block twice: same stored weights, so the .pte may grow
    only by graph (not weights); and the unrolled shared program still equals the reference."""
    _, _, art, _, _ = f32
    model_ls, bundle_ls, art_ls, _, opts = f32_shared
    plain, shared = art.info["pte_bytes"], art_ls.info["pte_bytes"]
    print(f"\nsharing: plain {plain} B, immediate-shared {shared} B (+{(shared / plain - 1) * 100:.2f}%)")
    assert shared <= plain * 1.02, (plain, shared)
    tokens = _tokens(seed=5)
    runtime = et.open_runtime(bundle_ls, {})
    # XNNPACK's weight cache on (set and read back through libexecutorch): each shared block's
    # weights are packed once in RAM too, not once per application (`make bench` measures the RSS).
    assert runtime.xnnpack_weight_cache
    pte = run_runtime(runtime, tokens, PREFILL)
    ref = run_runtime(TorchRuntime(model_ls), tokens, PREFILL)
    m = compare_logits(pte, ref)
    assert m["top1_agreement"] == 1.0 and m["max_abs"] < 1e-3, m


# ----------------------------------------------------------------------------- 16 bits = reference
def test_f32_pte_equals_reference(f32):
    model, bundle, art, _, opts = f32
    tokens = _tokens()
    rt = et.open_runtime(bundle, {"artifact": "model.pte"})
    pte = run_runtime(rt, tokens, PREFILL)
    ref = run_runtime(TorchRuntime(model), tokens, PREFILL)
    m = compare_logits(pte, ref)
    print(
        f"\nf32 pte~ref: {m}; info: { {k: art.info[k] for k in ('pte_bytes', 'size', 'embedding_table_copies_in_pte', 'embedding_stored_once', 'extra_bytes_for_output_projection')} }"
    )
    assert m["top1_agreement"] == 1.0, m
    assert m["max_abs"] < 1e-3, m
    # A fresh reset really restarts the cache (a stale cache would differ by O(1)). Not bit-exact:
    # repeated runs of the same calls differed by up to 6e-6 (measured) in fp32 once the program
    # returned last-position logits and rows were rebuilt from several calls.
    again = run_runtime(rt, tokens, PREFILL)
    np.testing.assert_allclose(again, pte, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("bits", "sharing", "custom_ops"),
    [(4, "immediate", True), (8, "none", True)],
)
def test_fast_lowering_writes_the_stock_lowerings_bytes(bits, sharing, custom_ops, monkeypatch):
    """The skipped XNNPACK passes, the skipped decomposition round trip and the fast partitioning (shared
    constants copied in one batch, one recompile for all partition cuts, the partitioner's cycle check
    by set intersection) change nothing in the .pte."""
    cfg = tiny_config(n_layers=1, vocab_size=VOCAB, sharing=sharing)
    opts = TargetOptions(bits=bits, group_size=32, max_seq_len=32)
    model = ExportModel.from_reference(random_model(cfg), ExportSettings(max_seq_len=opts.max_seq_len))
    quantized = quantize_model(model, et.quant_scheme(opts))
    meta = {"get_max_seq_len": opts.max_seq_len}
    copiers, passes_ran = [], []
    fast_partitioning, skip_passes = et.fast_partitioning, et.skip_inapplicable_xnnpack_passes

    @contextlib.contextmanager
    def recording() -> Iterator[Any]:
        with fast_partitioning() as copier:
            copiers.append(copier)
            yield copier

    @contextlib.contextmanager
    def recording_passes() -> Iterator[Any]:
        with skip_passes() as ran:
            passes_ran.append(ran)
            yield ran

    monkeypatch.setattr(et, "fast_partitioning", recording)
    monkeypatch.setattr(et, "skip_inapplicable_xnnpack_passes", recording_passes)
    fast, _ = et.lower_to_pte(model, quantized, meta, custom_ops, fast_lowering=True)
    stock, _ = et.lower_to_pte(model, quantized, meta, custom_ops, fast_lowering=False)
    assert len(fast) == len(stock)
    assert fast == stock
    # the shortcut ran: the shared block's weights and scales feed two partitions (12 copies in 4)
    assert len(copiers) == 1
    assert (copiers[0].made > 0) == (sharing != "none"), copiers[0].made
    # every partition's passes were skipped but the one that rewrites what a MobileLLM graph holds
    assert len(passes_ran) == 1 and set(passes_ran[0]) == {"XNNPACKRemoveCloneOpsTransform"}, passes_ran


def test_the_runtime_sizes_executorchs_pool_like_torchs(q4):
    """The pip runtime's attention reads both torch's and ExecuTorch's thread pools (mismatched, it ran
    10-1000x slower on the real model): a runtime opened at 1 and at 2 torch threads runs its pool at the
    same count, and the logits agree (the split of work between threads changes the float order only)."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    _, bundle, _, _, _ = q4
    tokens, saved = _tokens(seed=5), torch.get_num_threads()
    logits = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rt = et.open_runtime(bundle, {"artifact": "model.pte"})
            assert rt.details()["executorch_threads"] == threads == _threadpool_get_thread_count()
            logits[threads] = run_runtime(rt, tokens, PREFILL)
    finally:
        torch.set_num_threads(saved)
    np.testing.assert_allclose(logits[1], logits[2], atol=1e-3)


def test_in_place_legalize_graph_leaves_what_torchs_copy_leaves():
    """The in-place re-sort leaves the graph torch's copying `legalize_graph` leaves: the node order,
    the generated code, the find_nodes order and the names the next nodes get (a namespace with holes
    from erased nodes, as after a partition cut)."""
    import copy

    from torch.fx.passes.tools_common import legalize_graph

    cfg = tiny_config(n_layers=1, vocab_size=VOCAB)
    model = ExportModel.from_reference(random_model(cfg), ExportSettings(max_seq_len=32))
    gm = torch.export.export(model, model.example_inputs(), strict=False).graph_module

    def disordered() -> Any:
        g = copy.deepcopy(gm)
        ops = [n for n in g.graph.nodes if n.op == "call_function"]
        for node in ops[3:40:7]:  # users now run before these: the order legalize_graph must repair
            g.graph.output_node().prepend(node)
        x = g.graph.find_nodes(op="placeholder")[-1]
        with g.graph.inserting_before(g.graph.output_node()):
            holes = [g.graph.call_function(torch.ops.aten.add.Tensor, (x, x)) for _ in range(3)]
        for node in holes:  # their names stay taken in this graph's namespace, not in a copy's
            g.graph.erase_node(node)
        return g

    before = [n.name for n in disordered().graph.nodes]
    stock, ours = legalize_graph(disordered()), et._legalize_graph_in_place(disordered())
    assert [n.name for n in ours.graph.nodes] == [n.name for n in stock.graph.nodes] != before
    assert ours.code == stock.code
    for op, target in [("placeholder", None), ("call_function", torch.ops.aten.linear.default)]:
        found = [[n.name for n in g.graph.find_nodes(op=op, target=target, sort=False)] for g in (ours, stock)]
        assert found[0] == found[1] and found[0]
    x = stock.graph.find_nodes(op="placeholder")[-1].name
    new_names = [
        [g.graph.call_function(torch.ops.aten.add.Tensor, (arg, arg)).name for _ in range(3)]
        for g in (ours, stock)
        for arg in [next(n for n in g.graph.nodes if n.name == x)]
    ]
    assert new_names[0] == new_names[1]
