"""Core ML target: the saved .mlpackage, run by the numpy evaluator, matches the fake-quant twin and the
fp32 reference; shared weights are stored once; metadata is in the package; tampering is caught.

Each configuration is converted once (module-scoped); tiny random models, max_seq_len 32.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from conftest import default_model_dir, random_model, tiny_config  # noqa: E402
from mobilellm.exporter.checkpoint import Checkpoint  # noqa: E402
from mobilellm.exporter.export_model import ExportModel, ExportSettings  # noqa: E402
from mobilellm.exporter.quantize import QuantMethod, fake_quantized_twin, quantize_model  # noqa: E402
from mobilellm.exporter.targets import coreml  # noqa: E402
from mobilellm.exporter.targets.base import ExportedArtifact, TargetOptions  # noqa: E402
from mobilellm.exporter.targets.coreml_eval import CoreMLEvaluator, read_spec  # noqa: E402
from mobilellm.validation.metrics import compare_logits, perplexity  # noqa: E402
from mobilellm.validation.sequences import TorchRuntime, run_runtime  # noqa: E402

MAX_SEQ = 32
PREFILL, DECODE = 16, 8
CONFIGS = {"ls4": ("immediate", 4), "ls8": ("immediate", 8), "ls16": ("immediate", 16), "none4": ("none", 4)}
RESULTS: dict[str, dict] = {}


def _cfg(sharing: str):
    return tiny_config(sharing=sharing, n_layers=2)


def _tokens() -> np.ndarray:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, _cfg("none").vocab_size, (PREFILL + DECODE,), generator=g).numpy()


class Exported:
    """One converted configuration. Conversions are shared between pytest-xdist workers through a
    file lock in the session's shared temp root, so each configuration is converted exactly once."""

    def __init__(self, key: str, root: Path) -> None:
        from filelock import FileLock

        sharing, bits = CONFIGS[key]
        cfg = _cfg(sharing)
        self.ref = random_model(cfg)
        self.model = ExportModel.from_reference(self.ref, ExportSettings(max_seq_len=MAX_SEQ))
        self.opts = TargetOptions(bits=bits, max_seq_len=MAX_SEQ)
        self.quantized = quantize_model(
            self.model, coreml.quant_scheme(self.opts)
        )  # deterministic: every worker gets the same codes
        self.bundle = root / key
        done = root / f"{key}.artifact.json"
        with FileLock(str(root / f"{key}.lock")):
            if not done.exists():
                tok = default_model_dir() / "tokenizer.model"
                ckpt = Checkpoint(cfg, self.ref, tok if tok.is_file() else None, root / "ckpt.pt", "pt", "float32")
                art = coreml.export(self.model, self.quantized, ckpt, self.opts, self.bundle)
                done.write_text(
                    json.dumps({"target": art.target, "files": art.files, "io": art.io, "info": art.info}, default=str)
                )
        raw = json.loads(done.read_text())
        self.artifact = ExportedArtifact(**raw)
        self.package = self.bundle / self.artifact.files[0]
        self.twin = fake_quantized_twin(self.model, self.quantized)


class Exports:
    def __init__(self, root: Path) -> None:
        self.root, self.cache = root, {}

    def __getitem__(self, key: str) -> Exported:
        if key not in self.cache:
            self.cache[key] = Exported(key, self.root)
        return self.cache[key]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is <run dir>/popen-gwN: the run dir is shared by the workers.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "coreml_exports"
    root.mkdir(exist_ok=True)
    return Exports(root)


def _run(runtime) -> np.ndarray:
    return run_runtime(runtime, _tokens(), PREFILL)


def _explain(actual: np.ndarray, expected: np.ndarray) -> str:
    bad = np.nonzero(actual.argmax(-1) != expected.argmax(-1))[0]
    gaps = [float(np.sort(expected[i])[-1] - np.sort(expected[i])[-2]) for i in bad]
    return f"top-1 disagrees at positions {bad.tolist()}, expected top-1/top-2 logit gaps there {gaps}"


@pytest.mark.parametrize("key", ["ls4", "ls8", "ls16", "none4"])
def test_saved_package_matches_twin_and_reference(exported: Exports, key: str) -> None:
    ex = exported[key]
    runtime = coreml.open_runtime(ex.bundle, {"artifact": ex.artifact.files[0]})
    got = _run(runtime)
    twin = _run(TorchRuntime(ex.twin))
    ref = _run(TorchRuntime(ex.model))
    vs_twin, vs_ref = compare_logits(got, twin), compare_logits(got, ref)
    toks = _tokens()
    ppl = {name: perplexity(x[:-1], toks[1:]) for name, x in (("artifact", got), ("twin", twin), ("reference", ref))}
    RESULTS[key] = {
        "vs_twin": vs_twin,
        "vs_reference": vs_ref,
        "perplexity": ppl,
        "ppl_delta_vs_reference": ppl["artifact"] - ppl["reference"],
    }
    print(f"\n[coreml {key}] " + json.dumps(RESULTS[key]))
    # Lowering error (artifact vs twin): fp16 compute + fp16-cast-before-quantization codes.
    assert vs_twin["top1_agreement"] >= 0.99, _explain(got, twin)
    assert vs_twin["cosine"] >= 0.998, vs_twin
    if ex.opts.bits == 16:
        assert vs_ref["top1_agreement"] == 1.0, _explain(got, ref)
        assert vs_ref["cosine"] >= 0.9999, vs_ref
        assert vs_ref["max_abs"] < 0.02, vs_ref
    else:
        assert abs(ppl["artifact"] - ppl["twin"]) / ppl["twin"] < 0.01, ppl


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_scheme_rule_is_coremltools_linear_symmetric(bits: int, group: int | None) -> None:
    """The "restricted" rule with a symmetric method (range [-qmax, qmax], scale = max|w|/qmax, fp16
    scales) equals coremltools' own linear_symmetric quantizer on the same fp32 weights."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import quantize_weight_by_dtype

    method = QuantMethod(scale_rule="restricted", asymmetric=False, gptq=False)
    scheme = coreml.quant_scheme(TargetOptions(bits=bits, group_size=32, method=method))
    wq = scheme.linear
    assert (wq.bits, wq.group_size, wq.scale_rule, wq.scale_dtype, wq.zero_points) == (
        bits,
        group,
        "restricted",
        torch.float16,
        False,
    )
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    w[3, :32] = 0.0  # an all-zero group
    qw = wq.quantize(w)
    q, s = qw.codes, qw.scales
    g = group or w.shape[1]
    grouped = w.numpy().reshape(48, -1, g)
    ct_q, ct_s, zp = quantize_weight_by_dtype(
        grouped, axes=(2,), dtype=types.int4 if bits == 4 else types.int8, quantization_mode="LINEAR_SYMMETRIC"
    )
    assert zp is None
    ct_s = ct_s.reshape(48, -1)
    nonzero = ct_s != 0
    np.testing.assert_allclose(s.numpy()[nonzero], ct_s.astype(np.float16).astype(np.float32)[nonzero], rtol=0)
    # coremltools rounds w/scale with the fp32 scale, then stores the scale as fp16; we round with the
    # fp16 scale the package really holds, so a code may differ by one step where w/scale sits on a
    # rounding boundary between the two (measured: well under 1% of codes).
    ours, theirs = q.numpy().reshape(48, -1, g)[nonzero], ct_q[nonzero]
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert (ours != theirs).mean() < 0.01
    assert q.min() >= -(2 ** (bits - 1) - 1)  # never -8 / -128


def test_package_holds_the_twins_exact_codes(exported: Exports) -> None:
    for key in ("ls4", "ls8"):
        ex = exported[key]
        ev = CoreMLEvaluator(ex.package)
        checked = 0
        for i, op in enumerate(ev.block.operations):
            if op.type != "constexpr_blockwise_shift_scale":
                continue
            name = op.outputs[0].name.removesuffix("_to_fp16_quantized")
            a = ev.op_inputs(i)
            if name == "tok_embeddings_weight":
                key = "tok_embeddings.weight"
            else:
                _, idx, lin, _ = name.split("_")
                key = f"blocks.{idx}.{lin}.weight"
            qw = ex.quantized[key]
            np.testing.assert_array_equal(a["data"], qw.codes.numpy())
            np.testing.assert_array_equal(a["scale"].astype(np.float32).reshape(qw.scales.shape), qw.scales.numpy())
            if qw.zeros is None:  # the default method (GPTQ) is symmetric: no offsets stored
                assert a.get("offset") is None
            else:
                np.testing.assert_array_equal(a["offset"].reshape(qw.zeros.shape), qw.zeros.numpy())
            assert a["data"].dtype == np.int8 and a["scale"].dtype == np.float16
            checked += 1
        assert checked == 4 * 2 + 1  # 4 linears per *stored* block + the shared embedding


def test_shared_weights_stored_once(exported: Exports) -> None:
    ls, plain = exported["ls4"], exported["none4"]
    size_ls, size_plain = ls.artifact.info["weight_bin_bytes"], plain.artifact.info["weight_bin_bytes"]
    print(
        f"\n[coreml sizes] LS {size_ls} B, no sharing {size_plain} B, min {ls.artifact.info['size']['minimum_bytes']} B, "
        f"breakdown LS {ls.artifact.info['weight_bin_breakdown']} / no sharing {plain.artifact.info['weight_bin_breakdown']}"
    )
    assert abs(size_ls - size_plain) / size_plain < 0.02
    # Twice the block applications, the same constexpr weights: one per stored linear + the embedding.
    assert ls.artifact.info["mil_ops"]["linear"] == plain.artifact.info["mil_ops"]["linear"] + 4 * 2
    assert ls.artifact.info["mil_ops"]["constexpr_blockwise_shift_scale"] == 4 * 2 + 1
    assert ls.artifact.info["mil_ops"]["gather"] >= 1
    for ex in (ls, plain, exported["ls8"], exported["ls16"]):
        info = ex.artifact.info
        assert info["weight_bin_bytes"] == (ex.package / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        assert info["weight_bin_bytes"] >= info["size"]["minimum_bytes"]


def test_package_io_states_metadata(exported: Exports) -> None:
    ex = exported["ls4"]
    spec, _ = read_spec(ex.package)
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 9  # iOS 18
    meta = dict(spec.description.metadata.userDefined)
    cfg = ex.model.config
    assert meta["com.mobilellm.bos_id"] == str(cfg.bos_id) and meta["com.mobilellm.eos_id"] == str(cfg.eos_id)
    assert meta["com.mobilellm.max_context"] == str(cfg.max_context)
    assert meta["com.mobilellm.schedule"] == "0,0,1,1"
    assert (
        spec.description.metadata.author
        and spec.description.metadata.license
        and spec.description.metadata.versionString
    )
    assert ex.artifact.info["metadata"] == {k: v for k, v in meta.items() if k.startswith("com.mobilellm.")}
    if (default_model_dir() / "tokenizer.model").is_file():
        assert (
            meta["com.mobilellm.tokenizer"] == "tokenizer.model" and len(meta["com.mobilellm.tokenizer_sha256"]) == 64
        )
    ev = CoreMLEvaluator(ex.package)
    assert ev.input_names == ["input_ids", "causal_mask"]
    assert ev.state_names == [f"{kv}_cache_{i}" for i in range(cfg.n_applied) for kv in "kv"]
    assert [t["name"] for t in ex.artifact.io["states"]] == ev.state_names
    assert [t["name"] for t in ex.artifact.io["inputs"]] == ev.input_names
    schema = Path(__file__).resolve().parents[1] / "exporter" / "schemas" / "manifest.schema.json"
    if schema.is_file():
        import jsonschema

        io_schema = json.loads(schema.read_text())
        jsonschema.validate(ex.artifact.io, {**io_schema["properties"]["io"], "$defs": io_schema["$defs"]})
    assert ev.output_names == ["logits"]
    ops = ex.artifact.info["mil_ops"]
    assert ops["scaled_dot_product_attention"] == cfg.n_applied
    assert ops["write_state"] == 2 * cfg.n_applied
    # RMSNorm statistics in fp32, everything else fp16
    assert ex.artifact.info["fp32_norm_ops"] == 3 * (2 * cfg.n_applied + 1)
    assert not any(op in ops for op in ("layer_norm", "l2_norm", "reduce_l2_norm"))
    assert ex.artifact.files[0] == "model.mlpackage"
    assert (ex.bundle / "coreml_info.json").is_file()


def _blob_regions(package: Path) -> list[tuple[int, int, int]]:
    """(data offset, size, dtype) of every blob in weight.bin."""
    data = (package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()
    count = struct.unpack_from("<I", data, 0)[0]
    out, off = [], 64
    for _ in range(count):
        sentinel, dtype, size, data_off = struct.unpack_from("<IIQQ", data, off)
        assert sentinel == 0xDEADBEEF
        out.append((data_off, size, dtype))
        off = -(-(data_off + size) // 64) * 64
    return out


@pytest.mark.parametrize("tamper", ["flip_int4_bytes", "scale_fp16_scales"])
def test_tampered_weights_fail_parity(exported: Exports, tmp_path: Path, tamper: str) -> None:
    ex = exported["ls4"]
    bundle = tmp_path / "bundle"
    shutil.copytree(ex.bundle, bundle)
    package = bundle / ex.artifact.files[0]
    weight_bin = package / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weight_bin.read_bytes())
    blobs = _blob_regions(package)
    if tamper == "flip_int4_bytes":
        off, size, _ = max((b for b in blobs if b[2] == 8), key=lambda b: b[1])  # largest int4 blob
        for i in range(off + size // 4, off + size // 4 + 64):
            data[i] ^= 0x88  # flip the sign bit of both nibbles
    else:  # the embedding's per-row scales (also the output projection's), x3
        ev = CoreMLEvaluator(package)
        op = next(
            o
            for o in ev.block.operations
            if o.type == "constexpr_blockwise_shift_scale" and o.outputs[0].name.startswith("tok_embeddings")
        )
        meta = op.inputs["scale"].arguments[0].value.blobFileValue.offset
        _, dtype, size, off = struct.unpack_from("<IIQQ", data, meta)
        assert dtype == 1  # fp16
        vals = np.frombuffer(bytes(data[off : off + size]), dtype=np.float16) * np.float16(3.0)
        data[off : off + size] = vals.astype(np.float16).tobytes()
    weight_bin.write_bytes(bytes(data))
    got = _run(coreml.open_runtime(bundle, {"artifact": ex.artifact.files[0]}))
    twin = _run(TorchRuntime(ex.twin))
    m = compare_logits(got, twin)
    print(f"\n[coreml tamper {tamper}] {m}")
    assert m["cosine"] < 0.998 or m["top1_agreement"] < 0.99  # the parity thresholds above fail


def test_unknown_bits_rejected() -> None:
    from mobilellm.exporter.errors import UserError

    with pytest.raises(UserError):
        coreml.quant_scheme(TargetOptions(bits=3))


def test_truncated_package_is_a_user_error(exported: Exports, tmp_path: Path) -> None:
    from mobilellm.exporter.errors import UserError

    ex = exported["ls16"]
    bundle = tmp_path / "bundle"
    shutil.copytree(ex.bundle, bundle)
    weight_bin = bundle / ex.artifact.files[0] / "Data/com.apple.CoreML/weights/weight.bin"
    weight_bin.write_bytes(weight_bin.read_bytes()[: weight_bin.stat().st_size // 3])
    with pytest.raises(UserError, match="corrupt"):
        coreml.open_runtime(bundle, {"artifact": ex.artifact.files[0]})
    with pytest.raises(UserError, match="not found"):
        coreml.open_runtime(tmp_path, {"artifact": "missing.mlpackage"})
