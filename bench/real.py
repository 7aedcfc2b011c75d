"""`make bench-real`: the real 135M model (SmolLM2-135M, MobileLLM-125M's shape) through every target
at 4 and 8 bits, next to llama.cpp run on the same weights and the same token ids.

For each model copy (`original`: weights on their Q4_1 storage grid, `gridbroken`: moved off it, as
a bf16-trained checkpoint's are) it measures:
- llama.cpp Q4_0 / Q4_K_M / Q8_0 written from the same HF dir: perplexity on the eval windows, bytes;
- each export (our CLI pipeline, parity included): perplexity of the *artifact* through its own
  runtime on the same eval windows, artifact bytes, the parity verdict, export seconds.
Perplexity: 2 windows of 512 tokens of `exporter/assets/heldout.txt` (BOS + 511 text tokens each),
every token after the first predicted from its prefix.

    python -m bench.real [--copies gridbroken,original] [--targets onnx,coreml,executorch] [--bits 4,8]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVAL_WINDOWS, EVAL_LENGTH = 2, 512


def cpu_features() -> str:
    """The CPU as the package's bench describes it, with an emulated profile's features hidden."""
    from bench.cpu_profiles import active_profile
    from mobilellm.exporter.measure import cpu_description

    described = cpu_description()
    if active_profile():
        described += f", emulated {active_profile()} CPU (CPUID masked on this machine: bench/cpu_profiles.py)"
    return described


def eval_windows(hf_dir: Path) -> list[list[int]]:
    from bench.llamacpp_peer import heldout_windows
    from mobilellm.exporter.assets import heldout_text

    bos = json.loads((hf_dir / "config.json").read_text())["bos_token_id"]
    return heldout_windows(hf_dir / "tokenizer.json", heldout_text(), EVAL_LENGTH, EVAL_WINDOWS, bos)


def runtime_perplexity(runtime: Any, windows: list[list[int]]) -> float:
    from mobilellm.validation.metrics import log_softmax

    nll, count = 0.0, 0
    for window in windows:
        runtime.reset()
        # The last position's logits predict nothing here; leaving it out keeps a window of the full
        # context length within a program whose prefill takes at most max_seq_len - 1 tokens.
        logits = runtime.forward(np.asarray(window[:-1], dtype=np.int64), 0)
        lp = log_softmax(logits)
        nll -= float(lp[np.arange(len(window) - 1), np.asarray(window[1:])].sum())
        count += len(window) - 1
    return math.exp(nll / count)


def reference_perplexity(hf_dir: Path, windows: list[list[int]]) -> float:
    from mobilellm.exporter.checkpoint import load_checkpoint
    from mobilellm.validation.parity import ReferenceRuntime

    return runtime_perplexity(ReferenceRuntime(load_checkpoint(hf_dir).model), windows)


def llamacpp_rows(hf_dir: Path, work: Path, windows: list[list[int]], base_ppl: float) -> list[dict[str, Any]]:
    from bench.llamacpp_peer import gguf_tensor_type_counts, llamacpp_perplexity, quantize_gguf, write_gguf_from_hf

    f32 = work / "f32.gguf"
    if not f32.is_file():
        write_gguf_from_hf(hf_dir, f32)
    rows = [
        {
            "runtime": "llama.cpp",
            "method": "F32",
            "bits": 32,
            "bytes": f32.stat().st_size,
            "ppl": llamacpp_perplexity(f32, windows),
        }
    ]
    for kind, bits in (("Q8_0", 8), ("Q4_K_M", 4), ("Q4_0", 4)):
        out = work / f"{kind}.gguf"
        if not out.is_file():
            quantize_gguf(f32, out, kind)
        rows.append(
            {
                "runtime": "llama.cpp",
                "method": kind,
                "bits": bits,
                "bytes": out.stat().st_size,
                "ppl": llamacpp_perplexity(out, windows),
                "tensor_types": gguf_tensor_type_counts(out),
            }
        )
    for row in rows:
        row["ppl_delta"] = row["ppl"] / base_ppl - 1
    return rows


def export_row(
    reuse: bool,
    hf_dir: Path,
    copy: str,
    target: str,
    bits: int,
    method_name: str,
    out: Path,
    windows: list[list[int]],
    base_ppl: float,
) -> dict[str, Any]:
    from mobilellm.exporter.bundle import artifact_bytes, read_manifest
    from mobilellm.exporter.errors import ParityError
    from mobilellm.exporter.pipeline import ExportOptions, run_export
    from mobilellm.exporter.quantize import QuantMethod
    from mobilellm.exporter.targets import TargetOptions, load_target

    name = f"{copy}-{method_name}"
    options = ExportOptions(
        checkpoint=hf_dir,
        targets=[target],
        quant=TargetOptions(bits=bits, method=QuantMethod.named(method_name)),
        output=out,
        name=name,
    )
    t0 = time.time()
    parity_error = None
    bundle = out / f"{name}-{target}-{bits}bit"
    reused = reuse and (bundle / "manifest.json").is_file()
    if not reused:
        try:
            run_export(options)
        except ParityError as exc:
            parity_error = str(exc)
            bundle = bundle.with_name(bundle.name + ".failed")  # a failed bundle never replaces the last good one
    seconds = None if reused else round(time.time() - t0, 1)
    manifest = read_manifest(bundle)
    parity = manifest["parity"] or {}
    if reused:  # the verdict of today's gate, from the bundle's own golden data
        from mobilellm.exporter.validate import validate_bundle

        result, _ = validate_bundle(bundle)
        parity = {
            "passed": result.passed,
            "failures": result.failures(),
            "ppl_delta_vs_reference": result.perplexity["delta_vs_reference"],
        }
        parity_error = None if result.passed else "; ".join(result.failures())
    runtime = load_target(target).open_runtime(bundle, manifest)
    ppl = runtime_perplexity(runtime, windows)
    return {
        "runtime": f"ours {target}",
        "method": method_name,
        "bits": bits,
        "bytes": artifact_bytes(manifest["files"], manifest["artifact"]),
        "ppl": ppl,
        "ppl_delta": ppl / base_ppl - 1,
        "export_seconds": seconds,
        "parity": "PASS" if parity.get("passed") else "FAIL",
        "parity_failures": parity.get("failures", []) if parity_error else [],
        "parity_ppl_delta": parity.get("ppl_delta_vs_reference"),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Real-model bench (SmolLM2-135M, MobileLLM-125M's shape)",
        "",
        f"CPU: {results['cpu']}. Perplexity: {EVAL_WINDOWS} x {EVAL_LENGTH} tokens of held-out text, same token ids for every runtime.",
        "",
    ]
    for copy, block in results["copies"].items():
        lines += [
            f"## {copy} copy (fp32 perplexity {block['fp32_ppl']:.3f})",
            "",
            "| runtime | method | bits | bytes | MB | perplexity | delta vs fp32 | parity | export s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in block["rows"]:
            lines.append(
                f"| {r['runtime']} | {r['method']} | {r['bits']} | {r['bytes']:,} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} "
                f"| {r['ppl_delta'] * 100:+.2f}% | {r.get('parity', '-')} | {r.get('export_seconds', '-')} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from mobilellm.exporter.threads import one_openmp_thread_outside_torch

    one_openmp_thread_outside_torch()  # the CLI's OpenMP setup (in-process runtimes), before torch loads
    sys.path.insert(0, str(REPO))
    from bench.real_model import build_real_checkpoints

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mobilellm-export" / "real")
    ap.add_argument("--output", type=Path, default=REPO / "bench-results")
    ap.add_argument("--copies", default="gridbroken,original")
    ap.add_argument("--targets", default="onnx,coreml,executorch")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--methods", default="gptq", help="comma list of gptq, mse, rtn")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--reuse-bundles", action="store_true", help="keep bundles already exported into --output")
    ap.add_argument("--tag", default="real", help="name of the result files (TAG.json, TAG.md)")
    args = ap.parse_args(argv)

    dirs = build_real_checkpoints(args.cache_dir)
    args.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpu": cpu_features(), "copies": {}}
    out_json = args.output / f"{args.tag}.json"
    for copy in args.copies.split(","):
        hf_dir = dirs[copy]
        windows = eval_windows(hf_dir)
        base = reference_perplexity(hf_dir, windows)
        block = results["copies"][copy] = {"fp32_ppl": base, "rows": []}
        print(f"[{copy}] fp32 perplexity {base:.4f}", flush=True)
        if not args.no_peers:
            work = args.cache_dir / f"gguf-{copy}"
            work.mkdir(parents=True, exist_ok=True)
            for row in llamacpp_rows(hf_dir, work, windows, base):
                block["rows"].append(row)
                print(
                    f"[{copy}] llama.cpp {row['method']}: {row['ppl']:.4f} ({row['ppl_delta'] * 100:+.2f}%), {row['bytes']:,} B",
                    flush=True,
                )
        for target in args.targets.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                for method in args.methods.split(","):
                    row = export_row(
                        args.reuse_bundles,
                        hf_dir,
                        copy,
                        target,
                        bits,
                        method,
                        args.output / "real-bundles",
                        windows,
                        base,
                    )
                    block["rows"].append(row)
                    print(
                        f"[{copy}] {target} {bits}-bit {method}: {row['ppl']:.4f} ({row['ppl_delta'] * 100:+.2f}%), "
                        f"{row['bytes']:,} B, parity {row['parity']}, {row['export_seconds']} s",
                        flush=True,
                    )
                    out_json.write_text(json.dumps(results, indent=2) + "\n")
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    (args.output / f"{args.tag}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
