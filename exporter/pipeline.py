"""The export pipeline: checkpoint -> reference -> export model -> quantize/lower per target -> bundle -> validate."""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mobilellm.validation.parity import GOLDEN_FILE, ReferenceRuntime, compute_golden, resolve_thresholds, run_parity
from mobilellm.validation.reports import report_dict, write_reports
from mobilellm.validation.sequences import TorchRuntime

from .assets import DEFAULT_MODEL_DIR, heldout_text
from .atomic import OutputLock, install, recover, staging
from .bundle import (
    MANIFEST,
    MANIFEST_SCHEMA_VERSION,
    artifact_bytes,
    file_entries,
    manifest_schema_problem,
    tool_versions,
    write_json,
)
from .checkpoint import Checkpoint, load_checkpoint
from .errors import ParityError, UserError
from .export_model import ExportModel, ExportSettings
from .memory import human
from .progress import stage
from .quantize import (
    QuantizedModel,
    calibration_windows,
    collect_hessians,
    fake_quantized_twin,
    quantize_model,
)
from .recipe import ExportOptions
from .targets import RunnerMetadata, Target, TargetOptions, load_target
from .tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, load_tokenizer, parity_tokens, write_tokenizer_json


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bundle_name(options: ExportOptions, ckpt: Checkpoint, target: str) -> str:
    base = options.name or ("default" if options.checkpoint is None else ckpt.name)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("._-").rstrip("-")[:96] or "model"
    return f"{base}-{target}-{options.quant.bits}bit"


def failed_path(final: Path) -> Path:
    """Where a bundle that failed parity goes: beside the last good one, which it never replaces."""
    return final.with_name(final.name + ".failed")


def check_replaceable(final: Path) -> None:
    """`final` may be replaced only if it is a bundle (a folder with a manifest.json): an export
    never replaces a file or a folder of the user's that happens to have the bundle's name."""
    if final.is_symlink() or (final.exists() and not (final.is_dir() and (final / MANIFEST).is_file())):
        raise UserError(
            f"{final}: exists and is not a bundle (no {MANIFEST}); an export replaces only a bundle it wrote. "
            "Move it away, or pass another --output or --name"
        )


def check_group_size(ckpt: Checkpoint, opts: TargetOptions) -> None:
    cfg = ckpt.config
    if opts.group_size <= 0:
        raise UserError(f"--group-size must be positive, got {opts.group_size}")
    if opts.bits == 4 or opts.resolved_embedding_bits() == 4:
        for what, width in (("hidden size", cfg.dim), ("ffn width", cfg.ffn_dim)):
            if width % opts.group_size:
                raise UserError(
                    f"--group-size {opts.group_size} does not divide the {what} {width}; every int4 layer needs it "
                    f"(try {_divisor_hint(cfg.dim, cfg.ffn_dim)})"
                )


def _divisor_hint(*widths: int) -> str:
    from math import gcd

    g = 0
    for w in widths:
        g = gcd(g, w)
    return " or ".join(str(d) for d in (128, 64, 32, 16) if g % d == 0) or str(g)


def quantize(model: ExportModel, scheme: Any, hessians: dict[str, Any], act_order: bool, target: str) -> QuantizedModel:
    t0 = time.time()
    quantized = quantize_model(model, scheme, act_order=act_order, hessians=hessians)
    log(f"[{target}] quantized the weights ({quantized.method}) in {time.time() - t0:.1f}s")
    return quantized


def manifest_for(
    name: str,
    module: Target,
    ckpt: Checkpoint,
    opts: TargetOptions,
    quantized: QuantizedModel,
    artifact: Any,
    files: dict[str, Any],
    parity: dict[str, Any] | None,
    tokenizer_name: str | None,
) -> dict[str, Any]:
    cfg = ckpt.config
    scheme = quantized.scheme
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "target": module.NAME,
        "artifact": artifact.files[0],
        "artifacts": artifact.files,
        "tokenizer": tokenizer_name,
        "bits": opts.bits,
        "embedding_bits": scheme.embedding.bits,
        "group_size": opts.group_size,
        **RunnerMetadata.of(cfg, opts.max_seq_len).manifest_fields(),
        "model": {
            "dim": cfg.dim,
            "n_layers": cfg.n_layers,
            "n_applied": cfg.n_applied,
            "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "ffn_dim": cfg.ffn_dim,
            "vocab_size": cfg.vocab_size,
            "layer_sharing": cfg.sharing,
            "share_embedding": cfg.share_embedding,
            "rope_theta": cfg.rope_theta,
            "norm_eps": cfg.norm_eps,
            "unique_params": cfg.unique_params(),
        },
        "source": {
            "checkpoint": ckpt.hub_id or ckpt.source.name,
            "format": ckpt.source_format,
            "dtype": ckpt.source_dtype,
        },
        "quantization": {
            "method": opts.method.to_dict(),
            "output_bits": scheme.output.bits,
            "layer_bits": {role: wq.bits for role, wq in scheme.overrides},
        },
        "io": artifact.io,
        "size": artifact.info["size"],
        "target_info": {key: value for key, value in artifact.info.items() if key != "size"},
        "files": files,
        "tool": tool_versions(),
        "parity": parity,
    }


def run_export(options: ExportOptions) -> list[Path]:
    modules = [load_target(name) for name in options.targets]  # fail fast, before any work
    thresholds = resolve_thresholds(options.quant.bits, options.thresholds)
    ckpt = load_checkpoint(options.checkpoint or DEFAULT_MODEL_DIR, options.config, options.tokenizer)
    if options.recipe is not None:
        options.recipe.check_matches(ckpt.config)
    if ckpt.tokenizer_path is None:
        raise UserError(
            f"{ckpt.source}: no tokenizer.model or tokenizer.json beside the checkpoint; pass --tokenizer PATH"
        )
    opts = options.quant
    settings = opts.export_settings()
    check_group_size(ckpt, opts)
    with torch.device("meta"):  # validates --max-seq-len before any target work, allocating nothing
        ExportModel(ckpt.config, settings)
    tokens = parity_tokens(
        load_tokenizer(ckpt.tokenizer_path), heldout_text(), 512, ckpt.config.vocab_size, ckpt.config.bos_id
    )
    # One lock per output name, taken before any work: a second export of the same name fails now.
    with contextlib.ExitStack() as locks:
        for module in modules:
            final = options.output / bundle_name(options, ckpt, module.NAME)
            locks.enter_context(OutputLock(final))  # covers NAME and NAME.failed
            for path in (final, failed_path(final)):
                done = recover(path)
                if done:
                    log(done)
                check_replaceable(path)
        return _export_all(options, modules, ckpt, opts, settings, thresholds, tokens)


def _export_all(
    options: ExportOptions,
    modules: list[Target],
    ckpt: Checkpoint,
    opts: TargetOptions,
    settings: ExportSettings,
    thresholds: dict[str, float],
    tokens: Any,
) -> list[Path]:
    reference = ReferenceRuntime(ckpt.model)
    calibration = calibration_windows(ckpt, opts.method, opts.max_seq_len)
    # The fp32 export model's layer inputs are the same for every target: collected once.
    hessians = collect_hessians(ExportModel.from_reference(ckpt.model, settings), calibration) if calibration else {}

    written: list[Path] = []
    failed: list[str] = []
    for module in modules:
        name = bundle_name(options, ckpt, module.NAME)
        final = options.output / name
        t0 = time.time()
        log(f"[{module.NAME}] exporting {ckpt.name} at {opts.bits} bits ...")
        with staging(final) as tmp:
            model = ExportModel.from_reference(ckpt.model, settings)
            quantized = quantize(model, module.quant_scheme(opts), hessians, opts.method.act_order, module.NAME)
            artifact = module.export(model, quantized, ckpt, opts, tmp)
            export_seconds = time.time() - t0
            # Timings differ run to run: logged, kept out of the manifest so bundles are reproducible.
            timings = {k: artifact.info.pop(k) for k in [k for k in artifact.info if k.endswith("_seconds")]}
            if timings:
                log(f"[{module.NAME}] timings: {timings}")
            tok_name = ckpt.tokenizer_path.name
            shutil.copy(ckpt.tokenizer_path, tmp / tok_name)
            # Every bundle carries tokenizer.json (Hugging Face tokenizers format: what swift-transformers,
            # onnxruntime-genai and ExecuTorch's runners read) beside the original file.
            tok_files = [f for f in (TOKENIZER_JSON, TOKENIZER_CONFIG) if f in artifact.files]
            if not tok_files:
                tok_files = write_tokenizer_json(
                    tmp, ckpt.tokenizer_path, ckpt.config.max_context, ckpt.config.bos_id, ckpt.config.eos_id
                )[0]
            parity_summary = None
            if options.parity:
                twin = fake_quantized_twin(model, quantized)
                with stage(f"[{module.NAME}] reference and twin outputs"):
                    golden = compute_golden(
                        {"reference": reference, "twin": TorchRuntime(twin)}, tokens, opts.max_seq_len
                    )
                golden.save(tmp / GOLDEN_FILE)
            extra = [tok_name] + [f for f in tok_files if f not in artifact.files and f != tok_name]
            files = file_entries(tmp, [*artifact.files, *extra] + ([GOLDEN_FILE] if options.parity else []))
            manifest = manifest_for(name, module, ckpt, opts, quantized, artifact, files, None, tok_name)
            write_json(tmp / MANIFEST, manifest)
            if options.parity:
                runtime = module.open_runtime(tmp, manifest)
                with stage(f"[{module.NAME}] parity through the artifact's runtime"):
                    result = run_parity(runtime, golden, thresholds, lambda m: log(f"[{module.NAME}] parity: {m}"))
                report = report_dict(
                    result,
                    {
                        "bundle": name,
                        "target": module.NAME,
                        "bits": opts.bits,
                        "embedding_bits": quantized.scheme.embedding.bits,
                    },
                    thresholds,
                )
                write_reports(report, tmp, manifest["size"])
                parity_summary = {
                    "passed": result.passed,
                    "report": "parity.json",
                    "top1_vs_reference": result.overall["reference"]["top1_agreement"],
                    "top1_vs_twin": result.overall["twin"]["top1_agreement"],
                    "ppl_delta_vs_reference": result.perplexity["delta_vs_reference"],
                    "failures": result.failures(),
                }
                manifest["parity"] = parity_summary
                write_json(tmp / MANIFEST, manifest)
            problem = manifest_schema_problem(manifest)
            if problem:  # our own output breaking our schema is a bug: fail before the bundle lands
                raise RuntimeError(f"{name}/{MANIFEST} does not match exporter/schemas/manifest.schema.json: {problem}")
            passed = parity_summary is None or parity_summary["passed"]
            # A bundle that failed parity lands beside the last good one (NAME.failed), never over it; a
            # good one replaces NAME and retires an outdated NAME.failed.
            install(tmp, final if passed else failed_path(final))
            if passed and failed_path(final).exists():
                shutil.rmtree(failed_path(final))
        if not passed:
            final = failed_path(final)
        written.append(final)
        size = artifact_bytes(files, artifact.files[0])
        status = "skipped" if parity_summary is None else ("PASS" if parity_summary["passed"] else "FAIL")
        detail = ""
        if parity_summary:
            detail = (
                f" (top-1 vs reference {parity_summary['top1_vs_reference'] * 100:.1f}%, vs twin {parity_summary['top1_vs_twin'] * 100:.1f}%, "
                f"perplexity {parity_summary['ppl_delta_vs_reference'] * 100:+.2f}%)"
            )
        print(
            f"{module.NAME:<10} {final}  {artifact.files[0]} {human(size)}  exported in {export_seconds:.1f}s  parity {status}{detail}"
        )
        if parity_summary and not parity_summary["passed"]:
            failed.append(f"{module.NAME}: " + "; ".join(parity_summary["failures"][:3]))
    if failed:
        raise ParityError(
            " | ".join(failed) + " (see parity.md in the NAME.failed bundle; the previous good bundle, if any, is kept)"
        )
    return written
