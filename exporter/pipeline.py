"""The export pipeline: checkpoint -> reference -> export model -> quantize/lower per target -> bundle -> validate."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

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
from .mixed_precision import selected_blocks
from .progress import log, stage
from .quantize import (
    QuantizedModel,
    calibration_windows,
    collect_hessians,
    fake_quantized_twin,
    quantize_model,
)
from .recipe import ExportOptions
from .targets import RunnerMetadata, Target, TargetOptions, load_target
from .threads import one_openmp_thread_outside_torch
from .tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, load_tokenizer, parity_tokens, write_tokenizer_json


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
    check_export_memory(ckpt.config, options.targets)
    check_layer_selectors(ckpt.config, options.quant)
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
    calibration = calibration_windows(ckpt, opts.method, opts.max_seq_len)
    # The fp32 export model's layer inputs are the same for every target: collected once.
    hessians = collect_hessians(ExportModel.from_reference(ckpt.model, settings), calibration) if calibration else {}
    groups = export_groups([m.NAME for m in modules], export_jobs(options.jobs, ckpt.config, len(modules)))
    if len(groups) == 1:
        outcomes = _export_targets(options, modules, ckpt, settings, thresholds, tokens, hessians)
    else:
        outcomes = _export_in_parallel(options, groups, modules, ckpt, settings, thresholds, tokens, hessians)
    failed = [failure for _, failure in outcomes if failure]
    if failed:
        raise ParityError(
            " | ".join(failed) + " (see parity.md in the NAME.failed bundle; the previous good bundle, if any, is kept)"
        )
    return [path for path, _ in outcomes]


# The ExecuTorch lowering is single-threaded Python and the longest part of `--target all` (a 125M model:
# ~2.5 min of ~4), so on 2+ cores it runs in this process while the other targets run in another.
EXPORT_COST = {"executorch": 6.0, "coreml": 2.0, "onnx": 1.0}
# Peak RSS of one export process: a base plus a multiple of the model's fp32 weight bytes, from measured
# exports (`/usr/bin/time -v`, random weights, one target per process): ExecuTorch
# 1B (4.02 GB of fp32 weights) 13.15 GB and 1.5B (6.04 GB) 18.6 GB, down from 19.6 GB and an OOM kill at
# 24.2 GB once the Hessians were summed in place in float32, freed after the last quantization, and the
# export model became the twin instead of being copied; Core ML 1.5B was killed by the OOM killer after
# reaching 22.5 GB in coremltools' conversion. The real 135M model, every target in one process: 5.6 GB (before the
# savings). ExecuTorch's line runs above its two points; Core ML and ONNX (not measured at 1.5B) keep the
# earlier, higher line, which refuses the 1.5B Core ML export that was killed.
PROCESS_BASE_BYTES = 4.0e9
PROCESS_BYTES_PER_WEIGHT_BYTE = {"executorch": 2.6, "coreml": 3.6, "onnx": 3.6}


def export_process_peak_bytes(cfg: Any, targets: Sequence[str] = tuple(PROCESS_BYTES_PER_WEIGHT_BYTE)) -> int:
    """The peak RSS one export process is expected to reach for this model and these targets (default: any)."""
    factor = max(PROCESS_BYTES_PER_WEIGHT_BYTE[t] for t in targets)
    return int(PROCESS_BASE_BYTES + factor * 4 * cfg.unique_params())


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_layer_selectors(cfg: Any, opts: TargetOptions) -> None:
    """Refuse block selectors (--layer-bits ROLE@BLOCK, --sensitivity picks) naming a block the model lacks:
    a ranking measured on another model would otherwise silently pick nothing."""
    named = selected_blocks(tuple(opts.layer_bits or ()) + opts.sensitive_layer_bits)
    if named and max(named) >= cfg.n_layers:
        fix = (
            "rank this checkpoint with `mobilellm-export inspect CHECKPOINT --sensitivity`"
            if max(named) in selected_blocks(opts.sensitive_layer_bits)
            else f"name blocks 0-{cfg.n_layers - 1} in --layer-bits"
        )
        raise UserError(f"block {max(named)} picked for more bits, but the model has {cfg.n_layers} blocks; {fix}")


def check_export_memory(cfg: Any, targets: Sequence[str] = tuple(PROCESS_BYTES_PER_WEIGHT_BYTE)) -> None:
    """Refuse up front an export this machine's RAM cannot hold, instead of meeting the OOM killer later."""
    need, total = export_process_peak_bytes(cfg, targets), _meminfo("MemTotal")
    if total is not None and need > total:
        alone = [t for t in targets if len(targets) > 1 and export_process_peak_bytes(cfg, [t]) <= total]
        hint = f"; --target {alone[0]} alone fits" if alone else ""
        raise UserError(
            f"exporting this model ({cfg.unique_params() / 1e9:.2f}B parameters) to {', '.join(targets)} needs about "
            f"{human(need)} of RAM and this machine has {human(total)}{hint}; or use a machine with more memory"
        )


def export_jobs(requested: int | None, cfg: Any, n_targets: int) -> int:
    """Processes exporting targets at once: `--jobs`, else 2 when 2 cores and the memory allow."""
    if requested is not None:
        return max(1, min(requested, n_targets))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = min(2, cores, n_targets)
    free = _meminfo("MemAvailable")
    extra = export_process_peak_bytes(cfg) * (jobs - 1)  # the second process's targets are not known here
    return jobs if free is None or extra <= free / 2 else 1


def export_groups(names: list[str], jobs: int) -> list[list[str]]:
    """Targets split into `jobs` groups of about equal export time, the longest group first."""
    groups: list[list[str]] = [[] for _ in range(max(1, jobs))]
    cost = [0.0] * len(groups)
    for name in sorted(names, key=lambda n: -EXPORT_COST.get(n, 1.0)):
        i = cost.index(min(cost))
        groups[i].append(name)
        cost[i] += EXPORT_COST.get(name, 1.0)
    return [g for g in groups if g]


def _export_in_parallel(
    options: ExportOptions,
    groups: list[list[str]],
    modules: list[Target],
    ckpt: Checkpoint,
    settings: ExportSettings,
    thresholds: dict[str, float],
    tokens: Any,
    hessians: dict[str, torch.Tensor],
) -> list[tuple[Path, str | None]]:
    """The first group here, every other group in a fresh (spawned) process that reloads the checkpoint
    and reads the Hessians from a file. Each process gets its share of torch's threads. GPTQ's float sums
    and the golden logits depend on the thread count, as they always have: a bundle is byte-identical to
    a one-process export run with that many threads (tests/test_parallel_export.py), and to every
    export with the same --jobs on the same machine."""
    by_name = {m.NAME: m for m in modules}
    # torch's threads spin while they wait: two processes with a thread per core each slow GPTQ ~10x.
    threads = max(1, torch.get_num_threads() // len(groups))
    with tempfile.TemporaryDirectory(prefix="mobilellm-export-") as tmp:
        hessian_file = Path(tmp) / "hessians.pt"
        torch.save(hessians, hessian_file)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            len(groups) - 1, mp_context=context, initializer=one_openmp_thread_outside_torch
        ) as pool:
            futures = [
                pool.submit(_export_group, options, group, hessian_file, thresholds, tokens, threads)
                for group in groups[1:]
            ]
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                here = _export_targets(
                    options, [by_name[n] for n in groups[0]], ckpt, settings, thresholds, tokens, hessians
                )
            finally:
                torch.set_num_threads(previous)
            outcomes = dict(zip(groups[0], here))
            for group, future in zip(groups[1:], futures):
                outcomes.update(zip(group, future.result()))
    return [outcomes[m.NAME] for m in modules]


def _export_group(
    options: ExportOptions,
    names: list[str],
    hessian_file: Path,
    thresholds: dict[str, float],
    tokens: Any,
    threads: int,
) -> list[tuple[Path, str | None]]:
    """One group of targets in a spawned process (see _export_in_parallel), with its share of the threads."""
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(options.checkpoint or DEFAULT_MODEL_DIR, options.config, options.tokenizer)
    hessians = torch.load(hessian_file, weights_only=True)
    settings = options.quant.export_settings()
    return _export_targets(options, [load_target(n) for n in names], ckpt, settings, thresholds, tokens, hessians)


def _export_targets(
    options: ExportOptions,
    modules: list[Target],
    ckpt: Checkpoint,
    settings: ExportSettings,
    thresholds: dict[str, float],
    tokens: Any,
    hessians: dict[str, torch.Tensor],
) -> list[tuple[Path, str | None]]:
    reference = ReferenceRuntime(ckpt.model)
    return [
        _export_target(options, m, ckpt, settings, thresholds, tokens, hessians, reference, last=m is modules[-1])
        for m in modules
    ]


def _export_target(
    options: ExportOptions,
    module: Target,
    ckpt: Checkpoint,
    settings: ExportSettings,
    thresholds: dict[str, float],
    tokens: Any,
    hessians: dict[str, torch.Tensor],
    reference: ReferenceRuntime,
    last: bool = True,
) -> tuple[Path, str | None]:
    """Export, bundle and check one target; the bundle path and, when parity failed, why. The last
    target of a process frees the Hessians once it has quantized (a quarter of the 1B preset's peak)."""
    opts = options.quant
    name = bundle_name(options, ckpt, module.NAME)
    final = options.output / name
    t0 = time.time()
    log(f"[{module.NAME}] exporting {ckpt.name} at {opts.bits} bits ...")
    with staging(final) as tmp:
        model = ExportModel.from_reference(ckpt.model, settings)
        quantized = quantize(model, module.quant_scheme(opts), hessians, opts.method.act_order, module.NAME)
        if last:
            hessians.clear()
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
            twin = fake_quantized_twin(model, quantized, in_place=True)  # the export model is done with
            with stage(f"[{module.NAME}] reference and twin outputs"):
                golden = compute_golden({"reference": reference, "twin": TorchRuntime(twin)}, tokens, opts.max_seq_len)
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
        return final, f"{module.NAME}: " + "; ".join(parity_summary["failures"][:3])
    return final, None
