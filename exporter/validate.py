"""`mobilellm-export validate BUNDLE`: re-run parity on a bundle, on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilellm.validation.parity import (
    GOLDEN_FILE,
    Golden,
    ParityResult,
    ReferenceRuntime,
    compute_golden,
    resolve_thresholds,
    run_parity,
)
from mobilellm.validation.reports import report_dict, write_reports
from mobilellm.validation.sequences import TorchRuntime

from .assets import heldout_text
from .atomic import check_writable
from .bundle import Bundle, open_bundle
from .checkpoint import load_checkpoint
from .errors import UserError, loading
from .export_model import ExportModel
from .progress import log
from .quantize import QuantMethod, calibration_windows, fake_quantized_twin, quantize_model
from .targets import TargetOptions, TargetRuntime, load_target
from .tokenizer import load_tokenizer, parity_tokens


def options_from_manifest(manifest: dict[str, Any]) -> TargetOptions:
    quant = manifest.get("quantization", {})
    method = QuantMethod.from_dict(quant.get("method", {}))
    layer_bits = tuple(sorted((role, int(bits)) for role, bits in quant.get("layer_bits", {}).items()))
    return TargetOptions(
        bits=manifest["bits"],
        group_size=manifest["group_size"],
        embedding_bits=manifest["embedding_bits"],
        output_bits=quant.get("output_bits"),
        max_seq_len=manifest["max_context"],
        method=method,
        layer_bits=layer_bits,
    )


def golden_from_checkpoint(checkpoint: Path, manifest: dict[str, Any], config: str | None = None) -> Golden:
    """Recompute the golden outputs from the weights (the bundle's golden data is not trusted)."""
    module = load_target(manifest["target"])
    opts = options_from_manifest(manifest)
    ckpt = load_checkpoint(checkpoint, config)
    model = ExportModel.from_reference(ckpt.model, opts.export_settings())
    calibration = calibration_windows(ckpt, opts.method, opts.max_seq_len)
    twin = fake_quantized_twin(
        model, quantize_model(model, module.quant_scheme(opts), calibration or None, opts.method.act_order)
    )
    cfg = ckpt.config
    if cfg.vocab_size != manifest["vocab_size"]:
        raise UserError(
            f"{checkpoint}: vocabulary of {cfg.vocab_size}, the bundle's model has {manifest['vocab_size']}; "
            "pass the checkpoint this bundle was exported from"
        )
    tokens = parity_tokens(load_tokenizer(ckpt.tokenizer_path), heldout_text(), 512, cfg.vocab_size, cfg.bos_id)
    return compute_golden(
        {"reference": ReferenceRuntime(ckpt.model), "twin": TorchRuntime(twin)}, tokens, opts.max_seq_len
    )


class CheckedRuntime(TargetRuntime):
    """An artifact's runtime that is fed only ids inside the vocabulary (a native runtime may abort on
    others) and must answer with one row of `vocab` logits per token."""

    def __init__(self, runtime: TargetRuntime, vocab: int, where: Path) -> None:
        self.runtime, self.vocab, self.where = runtime, vocab, where

    def reset(self) -> None:
        self.runtime.reset()

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise UserError(f"{self.where}: token id {int(tokens.max())} is outside the vocabulary of {self.vocab}")
        logits = self.runtime.forward(tokens, start)
        if logits.shape != (len(tokens), self.vocab):
            raise UserError(
                f"{self.where}: the artifact answers logits of shape {tuple(logits.shape)}, the manifest implies "
                f"{(len(tokens), self.vocab)}; re-export the bundle"
            )
        return logits


def validate_bundle(
    bundle: Path | Bundle,
    checkpoint: Path | None = None,
    thresholds: dict[str, float] | None = None,
    report_dir: Path | None = None,
    config: str | None = None,
) -> tuple[ParityResult, dict[str, Any]]:
    """Every check of `open_bundle` first (paths, links, unknown files, sizes, sha256), then the golden
    data (bounded, range-checked) or `checkpoint`'s recomputation, then the artifact's own runtime."""
    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)  # a Bundle: already checked
    manifest, root = opened.manifest, opened.root
    module = load_target(manifest["target"])
    resolved = resolve_thresholds(manifest["bits"], thresholds)
    out_dir = Path(report_dir) if report_dir is not None else root
    if report_dir is not None:
        with loading(out_dir, "report folder", "pass a writable --report-dir"):
            out_dir.mkdir(parents=True, exist_ok=True)
        check_writable(out_dir, "pass a writable --report-dir")
    else:
        check_writable(out_dir, "the bundle is read-only: pass --report-dir DIR for the parity reports")
    vocab = manifest["vocab_size"]
    if checkpoint:
        golden = golden_from_checkpoint(checkpoint, manifest, config)
    elif GOLDEN_FILE not in manifest["files"]:
        raise UserError(f"{root}: no {GOLDEN_FILE} in the bundle; re-export it or pass --checkpoint")
    else:
        golden = Golden.load(root / GOLDEN_FILE, vocab, manifest["max_context"])
    artifact = root / manifest["artifact"]
    with loading(artifact, f"{manifest['target']} artifact", "re-export the bundle"):
        runtime = CheckedRuntime(module.open_runtime(root, manifest), vocab, artifact)
    result = run_parity(runtime, golden, resolved, lambda m: log(f"[{manifest['target']}] parity: {m}"))
    report = report_dict(
        result,
        {
            "bundle": manifest["name"],
            "target": manifest["target"],
            "bits": manifest["bits"],
            "embedding_bits": manifest["embedding_bits"],
        },
        resolved,
    )
    write_reports(report, out_dir, manifest.get("size"))
    return result, report
