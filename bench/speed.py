"""`make bench`: random-weight checkpoints of real sizes exported through their recipes to every target,
timed next to eager PyTorch (and, with --peers, ExecuTorch's own export_llama). Not installed; run
from the repo root:

    python -m bench.speed --output bench-results/ [--peers] [--presets 125M] [--targets onnx] [--bits 4]

Each measurement runs in a fresh Python process so load time and peak RSS are the runtime's own,
not what earlier work left in this process (one bundle: `mobilellm-export bench BUNDLE`,
mobilellm.exporter.measure).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.real import cpu_features
from mobilellm.exporter.atomic import write_atomic
from mobilellm.exporter.bundle import artifact_bytes
from mobilellm.exporter.measure import (
    bench_bundle_subprocess,
    bench_prompt,
    current_rss,
    measure_bundle,
    peak_rss,
    run_fresh_process,
    time_decode,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"


def measure_eager(
    checkpoint: Path, threads: int, prompt_tokens: int, decode_tokens: int, max_seq_len: int = 512
) -> dict[str, Any]:
    """The PyTorch eager reference (fp32, dynamic KV state) on the same machine."""
    import torch

    from mobilellm.exporter.checkpoint import load_checkpoint
    from mobilellm.validation.parity import ReferenceRuntime

    torch.set_num_threads(threads)
    base_rss = current_rss()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    load_s = time.perf_counter() - t0
    runtime = ReferenceRuntime(ckpt.model)
    prompt = bench_prompt(ckpt.config.vocab_size, min(prompt_tokens, max_seq_len - decode_tokens - 1))
    time_decode(runtime, prompt[:8], 2)
    timing = time_decode(runtime, prompt, decode_tokens)
    weights = sum(p.numel() * p.element_size() for p in ckpt.model.parameters())
    return {
        "bundle": "pytorch-eager-fp32",
        "target": "pytorch",
        "bits": 32,
        "threads": threads,
        "load_s": load_s,
        **timing,
        "peak_rss_bytes": peak_rss(),
        "rss_over_baseline_bytes": peak_rss() - base_rss,
        "artifact_bytes": weights,
        "prompt_tokens": len(prompt),
        "decode_tokens": decode_tokens,
    }


def bench_eager_subprocess(
    checkpoint: Path, threads: int = 2, prompt_tokens: int = 128, decode_tokens: int = 64
) -> dict[str, Any]:
    return run_fresh_process(
        "bench.speed",
        [
            "--eager",
            str(checkpoint),
            "--threads",
            str(threads),
            "--prompt-tokens",
            str(prompt_tokens),
            "--decode-tokens",
            str(decode_tokens),
        ],
        pythonpath=[REPO_ROOT],
    )


# ------------------------------------------------------------------------------ make bench
def minimum_bytes(manifest: dict[str, Any]) -> int:
    """The bundle's size yardstick (`exporter/memory.py`: unique weights at nominal bits, no scales)."""
    return manifest["size"]["minimum_bytes"]


def find_recipe(preset_name: str, target: str, bits: int) -> Path | None:
    """The repo's recipe for this preset/target/bits (bench exports what users export), if any."""
    from mobilellm.exporter.recipe import load_recipe

    for path in sorted(RECIPES_DIR.glob(f"*/{target}-{bits}bit.toml")):
        if load_recipe(path).preset == preset_name:
            return path
    return None


def export_options_for(preset_name: str, ckpt: Path, target: str, bits: int, output: Path, max_seq_len: int) -> Any:
    """The recipe's choices (its model check and quantization method included) with the bench's target,
    bits, context length and bundle name, through the CLI's own recipe mapping."""
    from mobilellm.exporter.recipe import export_options_from_recipe, load_recipe

    path = find_recipe(preset_name, target, bits)
    return export_options_from_recipe(
        load_recipe(path) if path is not None else None,
        checkpoint=ckpt,
        target=target,
        bits=bits,
        max_seq_len=max_seq_len,
        parity=False,
        output=output,
        name=preset_name,
    )


def run_suite(
    output: Path,
    presets: list[str],
    targets: list[str],
    bits_list: list[int],
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    max_seq_len: int = 512,
    reuse_bundles: bool = False,
    peers: bool = False,
) -> dict[str, Any]:
    """Export each preset x target x bits (through its recipe) and time it next to eager PyTorch.

    `reuse_bundles` re-times bundles an earlier run left in `output/bundles` without exporting
    again: speed ratios are only fair when every row is timed under the same machine load.
    `peers` adds ExecuTorch's own Llama exporter on the same checkpoint (unshared presets only: it
    has no layer sharing) next to every ExecuTorch row."""
    from mobilellm.exporter.bundle import read_manifest
    from mobilellm.exporter.pipeline import run_export
    from mobilellm.exporter.random_checkpoint import write_random_checkpoint
    from mobilellm.exporter.targets import available_targets, load_target

    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for preset_name in presets:
        ckpt = output / "checkpoints" / preset_name
        if not (ckpt / "config.json").is_file():
            write_random_checkpoint(preset_name, ckpt)
        eager = bench_eager_subprocess(ckpt, threads, prompt_tokens, decode_tokens)
        eager["preset"] = preset_name
        rows.append(eager)
        print(json.dumps(eager), flush=True)
        for target in [t for t in targets if t in available_targets()]:
            for bits in bits_list:
                options = export_options_for(preset_name, ckpt, target, bits, output / "bundles", max_seq_len)
                bundle = output / "bundles" / f"{preset_name}-{target}-{bits}bit"
                export_s = None
                if not (reuse_bundles and (bundle / "manifest.json").is_file()):
                    t0 = time.perf_counter()
                    (bundle,) = run_export(options)
                    export_s = time.perf_counter() - t0
                manifest = read_manifest(bundle)  # also checks it against the manifest schema
                unmeasurable = load_target(target).speed_unmeasurable_reason()
                if unmeasurable:
                    row: dict[str, Any] = {
                        "bundle": manifest["name"],
                        "target": target,
                        "bits": bits,
                        "threads": threads,
                        "artifact_bytes": artifact_bytes(manifest["files"], manifest["artifact"]),
                        "not_timed": unmeasurable,
                    }
                else:
                    row = bench_bundle_subprocess(bundle, threads, prompt_tokens, decode_tokens)
                    row.update(
                        decode_speedup_vs_eager=row["decode_tokens_per_s"] / eager["decode_tokens_per_s"],
                        prefill_speedup_vs_eager=row["prefill_tokens_per_s"] / eager["prefill_tokens_per_s"],
                        rss_vs_eager=row["rss_over_baseline_bytes"] / eager["rss_over_baseline_bytes"],
                    )
                row.update(
                    preset=preset_name,
                    export_s=export_s,
                    max_seq_len=max_seq_len,
                    recipe=str(options.recipe.path.relative_to(RECIPES_DIR.parent)) if options.recipe else None,
                    minimum_bytes=minimum_bytes(manifest),
                    size_over_minimum=row["artifact_bytes"] / minimum_bytes(manifest),
                    size_vs_eager_fp32=row["artifact_bytes"] / eager["artifact_bytes"],
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                if peers and target == "executorch" and "LS" not in preset_name:
                    rows.append(
                        peer_row(
                            preset_name,
                            ckpt,
                            bits,
                            output,
                            max_seq_len,
                            threads,
                            prompt_tokens,
                            decode_tokens,
                            eager,
                            reuse_bundles,
                            row,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
    result = {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "cpu": cpu_features(),
        "rows": rows,
    }
    (output / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_bench_chart(rows, output, bench_caption(result))
    (output / "bench.md").write_text(bench_markdown(rows) + f"\n![{BENCH_CHART_ALT}]({BENCH_CHART})\n")
    return result


BENCH_CHART = "bench.png"
BENCH_CHART_ALT = "prefill and decode tokens/s and size per runtime, ours beside eager PyTorch and the peers"


def bench_caption(result: dict[str, Any]) -> str:
    return (
        f"CPU: {result['cpu']}; {result['threads']} threads, {result['prompt_tokens']}-token prompt, "
        f"{result['decode_tokens']} decoded tokens"
    )


def write_bench_chart(rows: list[dict[str, Any]], output: Path, caption: str, stem: str = "bench") -> list[Path]:
    """STEM.png (validation/plots.py, deterministic) and the data it shows, STEM_chart.json: the rows'
    runtime, tokens/s and size as they are, and the caption naming the CPU and its SIMD features."""
    # Imported here: the fresh measuring processes (`--one`, `--eager`) never load matplotlib.
    from mobilellm.validation.plots import bench_chart_data, bench_png, plot_json

    data = bench_chart_data(rows, caption)
    return [
        write_atomic(output / f"{stem}.png", bench_png(data)),
        write_atomic(output / f"{stem}_chart.json", plot_json(data)),
    ]


def peer_row(
    preset_name: str,
    ckpt: Path,
    bits: int,
    output: Path,
    max_seq_len: int,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    eager: dict[str, Any],
    reuse: bool,
    ours: dict[str, Any],
) -> dict[str, Any]:
    """ExecuTorch's examples/models/llama exporter (export_llama) on the same weights, timed the same way."""
    from bench.peers import PTE_NAME, export_executorch_llama_peer, measure_pte_subprocess

    out = output / "peers" / f"{preset_name}-executorch-llama-{bits}bit"
    export_s = None
    if not (reuse and (out / PTE_NAME).is_file()):
        t0 = time.perf_counter()
        export_executorch_llama_peer(ckpt, out, bits, max_seq_len=max_seq_len)
        export_s = time.perf_counter() - t0
    row = measure_pte_subprocess(ckpt, out, threads, prompt_tokens, decode_tokens)
    row.update(
        preset=preset_name,
        target="executorch export_llama (peer)",
        bits=bits,
        export_s=export_s,
        minimum_bytes=ours["minimum_bytes"],
        size_over_minimum=row["artifact_bytes"] / ours["minimum_bytes"],
        decode_speedup_vs_eager=row["decode_tokens_per_s"] / eager["decode_tokens_per_s"],
        prefill_speedup_vs_eager=row["prefill_tokens_per_s"] / eager["prefill_tokens_per_s"],
        rss_vs_eager=row["rss_over_baseline_bytes"] / eager["rss_over_baseline_bytes"],
        ours_vs_peer_decode=ours["decode_tokens_per_s"] / row["decode_tokens_per_s"],
        ours_vs_peer_size=ours["artifact_bytes"] / row["artifact_bytes"],
    )
    return row


def bench_markdown(rows: list[dict[str, Any]]) -> str:
    mb = 1024 * 1024

    def num(r: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        return "-" if r.get(key) is None else format(r[key] / scale, fmt)

    lines = [
        "| model | runtime | bits | export s | size MB | size / min | load s | prefill tok/s | decode tok/s | decode vs eager | peak RSS over baseline MB | RSS vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['target']} | {r['bits']} | {num(r, 'export_s', '.0f')} | {r['artifact_bytes'] / mb:.1f} | "
            f"{num(r, 'size_over_minimum', '.2f')} | {num(r, 'load_s', '.2f')} | {num(r, 'prefill_tokens_per_s', '.0f')} | "
            f"{num(r, 'decode_tokens_per_s', '.1f')} | {num(r, 'decode_speedup_vs_eager', '.2f')}{'x' if r.get('decode_speedup_vs_eager') else ''} | "
            f"{num(r, 'rss_over_baseline_bytes', '.0f', mb)} | {num(r, 'rss_vs_eager', '.2f')} |"
        )
        if r.get("not_timed") and r["not_timed"] not in notes:
            notes.append(r["not_timed"])
    return "\n".join(lines) + "\n" + "".join(f"\nNot timed: {n}.\n" for n in notes)


def main() -> None:
    ap = argparse.ArgumentParser(description="mobilellm-export benchmarks")
    ap.add_argument("--one", type=Path, help="measure one bundle in this process and print JSON")
    ap.add_argument("--eager", type=Path, help="measure the PyTorch eager reference of a checkpoint")
    ap.add_argument("--output", type=Path, default=Path("bench-results"))
    ap.add_argument("--presets", default="125M,125M-LS")
    ap.add_argument("--targets", default="executorch,coreml,onnx")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512, help="KV-cache length of the benchmarked exports")
    ap.add_argument(
        "--reuse-bundles", action="store_true", help="time bundles already in OUTPUT/bundles instead of exporting again"
    )
    ap.add_argument(
        "--peers", action="store_true", help="also export and time ExecuTorch's own export_llama on unshared presets"
    )
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_bundle(args.one, args.threads, args.prompt_tokens, args.decode_tokens)))
    elif args.eager:
        print(json.dumps(measure_eager(args.eager, args.threads, args.prompt_tokens, args.decode_tokens)))
    else:
        result = run_suite(
            args.output,
            args.presets.split(","),
            args.targets.split(","),
            [int(b) for b in args.bits.split(",")],
            args.threads,
            args.prompt_tokens,
            args.decode_tokens,
            args.max_seq_len,
            args.reuse_bundles,
            args.peers,
        )
        print(bench_markdown(result["rows"]))


if __name__ == "__main__":
    main()
