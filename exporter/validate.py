"""`mobilellm-export validate BUNDLE`: re-run parity on a bundle, on any machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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
from .bundle import integrity_problems, read_manifest
from .checkpoint import load_checkpoint
from .errors import UserError
from .export_model import ExportModel
from .quantize import QuantMethod, calibration_windows, fake_quantized_twin, quantize_model
from .targets import TargetOptions, load_target
from .tokenizer import load_tokenizer, parity_tokens


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    tokens = parity_tokens(load_tokenizer(ckpt.tokenizer_path), heldout_text(), 512, cfg.vocab_size, cfg.bos_id)
    return compute_golden(
        {"reference": ReferenceRuntime(ckpt.model), "twin": TorchRuntime(twin)}, tokens, opts.max_seq_len
    )


def validate_bundle(
    bundle: Path,
    checkpoint: Path | None = None,
    thresholds: dict[str, float] | None = None,
    report_dir: Path | None = None,
    config: str | None = None,
) -> tuple[ParityResult, dict[str, Any]]:
    manifest = read_manifest(bundle)
    module = load_target(manifest["target"])
    problems = integrity_problems(bundle, manifest)
    resolved = resolve_thresholds(manifest["bits"], thresholds)
    golden = golden_from_checkpoint(checkpoint, manifest, config) if checkpoint else Golden.load(bundle / GOLDEN_FILE)
    try:
        runtime = module.open_runtime(bundle, manifest)
    except UserError:
        raise
    except Exception as exc:  # an artifact its own runtime cannot load is bad input, not our bug
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{bundle / manifest['artifact']}: the {manifest['target']} runtime cannot load the artifact ({first}); re-export the bundle"
        ) from None
    result = run_parity(runtime, golden, resolved, lambda m: _log(f"[{manifest['target']}] parity: {m}"))
    result.integrity_problems = problems
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
    write_reports(report, report_dir or bundle)
    return result, report
