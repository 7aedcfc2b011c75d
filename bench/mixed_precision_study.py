"""What a sensitivity ranking buys: size and held-out perplexity of 4-bit exports of the real model with
its N most sensitive layers at 8 bits, beside uniform 4-bit and the target's default (w2@q4km).

    python -m bench.mixed_precision_study --sensitivity DIR/sensitivity.json [--targets onnx] [--layers 0,4,8,16]

The ranking is measured on the calibration text (`inspect --sensitivity`); perplexity here is on the
held-out text (bench/real.py's windows), so a pick cannot flatter itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def study_row(
    hf_dir: Path,
    target: str,
    label: str,
    layer_bits: dict[str, int] | None,
    ranking: Path | None,
    layers: int,
    out: Path,
    windows: list[list[int]],
    base_ppl: float,
) -> dict[str, Any]:
    from bench.real import runtime_perplexity
    from mobilellm.exporter.bundle import artifact_bytes, read_manifest
    from mobilellm.exporter.pipeline import run_export
    from mobilellm.exporter.recipe import export_options_from_recipe
    from mobilellm.exporter.targets import load_target

    options = export_options_from_recipe(
        None,
        checkpoint=hf_dir,
        target=target,
        bits=4,
        layer_bits=layer_bits,
        sensitivity=ranking,
        sensitive_layers=layers if ranking else None,
        output=out,
        name=label,
    )
    t0 = time.time()
    (bundle,) = run_export(options)
    manifest = read_manifest(bundle)
    ppl = runtime_perplexity(load_target(target).open_runtime(bundle, manifest), windows)
    return {
        "target": target,
        "choice": label,
        "layer_bits": manifest["quantization"]["layer_bits"],
        "bytes": artifact_bytes(manifest["files"], manifest["artifact"]),
        "ppl": ppl,
        "ppl_delta": ppl / base_ppl - 1,
        "parity": "PASS" if (manifest["parity"] or {}).get("passed") else "FAIL",
        "export_seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    from mobilellm.exporter.threads import one_openmp_thread_outside_torch

    one_openmp_thread_outside_torch()  # the CLI's OpenMP setup (in-process runtimes), before torch loads
    from bench.real import eval_windows, reference_perplexity
    from bench.real_model import build_real_checkpoints

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.json of the grid-broken real model")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mobilellm-export" / "real")
    ap.add_argument("--output", type=Path, default=REPO / "bench-results" / "mixed")
    ap.add_argument("--targets", default="onnx")
    ap.add_argument("--layers", default="4,8,16", help="comma list of N (top-N layers at 8 bits)")
    ap.add_argument("--only", default="", help="comma list of choices to run (uniform, default, topN, default+topN)")
    args = ap.parse_args(argv)

    hf_dir = build_real_checkpoints(args.cache_dir)["gridbroken"]
    windows = eval_windows(hf_dir)
    base = reference_perplexity(hf_dir, windows)
    rows = []
    for target in args.targets.split(","):
        choices: list[tuple[str, dict[str, int] | None, Path | None, int]] = [
            ("uniform", {}, None, 0),
            ("default", None, None, 0),
        ]
        for n in (int(x) for x in args.layers.split(",")):
            choices += [(f"top{n}", {}, args.sensitivity, n), (f"default+top{n}", None, args.sensitivity, n)]
        for label, layer_bits, ranking, n in choices:
            if args.only and label not in args.only.split(","):
                continue
            row = study_row(hf_dir, target, label, layer_bits, ranking, n, args.output, windows, base)
            rows.append(row)
            print(
                f"{target:<10} {label:<16} {row['bytes'] / 1e6:7.2f} MB  ppl {row['ppl']:.3f} "
                f"({row['ppl_delta'] * 100:+.2f}%)  parity {row['parity']}  {row['export_seconds']} s",
                flush=True,
            )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"mixed_precision{'-' + args.only if args.only else ''}.json").write_text(
        json.dumps({"fp32_ppl": base, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
