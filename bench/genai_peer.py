"""onnxruntime-genai's own model builder as the ONNX peer, both timed by onnxruntime-genai's Generator.

Our ONNX bundle is run by onnxruntime-genai in the apps, so the fair peer is the ONNX file that
onnxruntime-genai's model builder writes from the same Hugging Face weights
(`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu`), run by the same client
on the same token ids and thread count.

    python -m bench.genai_peer --hf-dir HF_DIR --ours BUNDLE [--out DIR] [--repeats 5]   (from the repo root)

The builder row uses the builder's defaults for `-p int4 -e cpu` (onnxruntime-genai 0.18, read from
its source, see BUILDER_DEFAULTS): MatMulNBits int4, blocks of 32, symmetric, round to nearest,
accuracy_level 4 (int8 activations per block) on every linear including the LM head; a tied table is
one int4 tensor read by GatherBlockQuantized and the LM head; logits for every position
(`prune_lm_head=false`); fp32 KV cache, past_present_share_buffer true.

Measurement (`time_genai`, always in a fresh process): onnxruntime-genai `og.Config` with
`session_options` overlaid (intra_op_num_threads = threads, inter_op_num_threads = 1, for both
models) and `max_length` = prompt + decode + 1 (so both allocate the same KV buffer); one short
warm-up generation, then prefill = `append_tokens(prompt)` + the first `generate_next_token` (which
only picks from the prefill logits), decode = `decode_tokens` more `generate_next_token` calls (one
model run each), greedy. `--profile DIR` turns on onnxruntime's profiler in the session and prints
kernel time per op type per decode token.

Needs (not project dependencies): `onnx-ir` (the builder imports it) and transformers (a project
dependency through the test extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mobilellm.exporter.measure import bench_prompt, current_rss, peak_rss, run_fresh_process

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDECAR = "genai_peer.json"
# The builder's defaults for `-p int4 -e cpu` (onnxruntime_genai/models/builder.py, 0.18): we pass none
# of these; they are listed so the peer row says what it is.
BUILDER_DEFAULTS = {
    "precision": "int4",
    "execution_provider": "cpu",
    "block_size": 32,
    "accuracy_level": 4,
    "is_symmetric": True,
    "algo_config": "default (round to nearest)",
    "shared_embeddings": "true for tied models (GatherBlockQuantized + LM head read one int4 tensor)",
    "prune_lm_head": False,
}


# ----------------------------------------------------------------------------- the peer export
def build_genai_peer(
    hf_dir: Path, out_dir: Path, precision: str = "int4", extra_options: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run onnxruntime-genai's model builder on `hf_dir` in a subprocess (timed); reuse OUT when its
    sidecar says it was built with the same arguments. Returns path, export seconds, artifact bytes."""
    out_dir = Path(out_dir).resolve()
    extra = dict(extra_options or {})
    side_path = out_dir / SIDECAR
    if side_path.is_file() and (out_dir / "model.onnx").is_file():
        side = json.loads(side_path.read_text())
        if side.get("hf_dir") == str(Path(hf_dir).resolve()) and side.get("precision") == precision:
            if side.get("extra_options", {}) == extra:
                return side
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(Path(hf_dir).resolve()),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(out_dir / "cache_dir"),
    ]
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    t0 = time.perf_counter()
    with open(out_dir / "build.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    export_s = time.perf_counter() - t0
    if rc != 0 or not (out_dir / "model.onnx").is_file():
        raise RuntimeError(f"onnxruntime-genai's builder failed (exit {rc}); see {out_dir / 'build.log'}")
    side = {
        "path": str(out_dir),
        "hf_dir": str(Path(hf_dir).resolve()),
        "precision": precision,
        "extra_options": extra,
        "builder_defaults": BUILDER_DEFAULTS,
        "export_s": export_s,
        "artifact_bytes": _artifact_bytes(out_dir),
        "command": cmd,
    }
    side_path.write_text(json.dumps(side, indent=2) + "\n")
    return side


def _artifact_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.name.startswith("model.onnx"))


# ----------------------------------------------------------------------------- timing
def _generator(og: Any, model: Any, max_length: int) -> Any:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length)
    return og.Generator(model, params)


def time_genai(
    model_dir: Path, prompt_ids: list[int], decode_tokens: int, threads: int, profile: Path | None = None
) -> dict[str, Any]:
    """Time one genai model folder in this process (call it in a fresh one: `time_genai_subprocess`)."""
    import onnxruntime_genai as og

    model_dir = Path(model_dir)
    max_length = len(prompt_ids) + decode_tokens + 1
    session: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if profile is not None:
        Path(profile).mkdir(parents=True, exist_ok=True)
        session["enable_profiling"] = str(Path(profile).resolve() / "ort_profile")
    base_rss = current_rss()
    t0 = time.perf_counter()
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    warm = _generator(og, model, 12)  # first-call allocations, weight prepacking
    warm.append_tokens(prompt_ids[:8])
    while not warm.is_done():
        warm.generate_next_token()
    del warm

    gen = _generator(og, model, max_length)
    t0 = time.perf_counter()
    gen.append_tokens(prompt_ids)
    gen.generate_next_token()  # picks the first token from the prefill logits: no model run
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        gen.generate_next_token()
    decode_s = time.perf_counter() - t1
    tokens = [int(t) for t in gen.get_sequence(0)[len(prompt_ids) :]]
    del gen, model  # the profiler writes its file when the session closes
    return {
        "model_dir": str(model_dir),
        "threads": threads,
        "load_s": load_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "peak_rss_bytes": peak_rss(),
        "rss_over_baseline_bytes": peak_rss() - base_rss,
        "artifact_bytes": _artifact_bytes(model_dir),
        "prompt_tokens": len(prompt_ids),
        "decode_tokens": decode_tokens,
        "generated": tokens,
    }


def _vocab(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"])


def time_genai_subprocess(
    model_dir: Path,
    threads: int = 2,
    prompt_tokens: int = 128,
    decode_tokens: int = 64,
    profile: Path | None = None,
) -> dict[str, Any]:
    """time_genai in a fresh process (clean load time and RSS baseline), on `bench_prompt(vocab, n)`."""
    args = ["--measure-only", str(model_dir), "--threads", str(threads)]
    args += ["--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens)]
    if profile is not None:
        args += ["--profile", str(profile)]
    return run_fresh_process("bench.genai_peer", args, pythonpath=[REPO_ROOT])


# ----------------------------------------------------------------------------- profiles
def op_times_per_decode_token(profile_json: Path, decode_tokens: int, model_path: Path) -> dict[str, float]:
    """Kernel microseconds per op type per decode token from an onnxruntime profile of one time_genai
    run: the last `decode_tokens` model runs are the decode steps."""
    events = json.loads(Path(profile_json).read_text())
    labels = _matmulnbits_labels(model_path)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode = runs[-decode_tokens:]
    start = decode[0][0]
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            totals[e["args"]["op_name"]] += e["dur"]
            if e["args"]["op_name"] == "MatMulNBits":  # split by shape and precision
                totals[labels.get(e["name"].removesuffix("_kernel_time"), "  MatMulNBits ?")] += e["dur"]
    totals["(all kernels)"] = sum(v for k, v in totals.items() if not k.startswith(" "))
    totals["(model_run wall)"] = sum(b - a for a, b in decode)
    return {k: v / decode_tokens for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _matmulnbits_labels(model_path: Path) -> dict[str, str]:
    """Node name -> '  MatMulNBits NxK b-bit block B' (the profile shows prepacked weights, not their shape)."""
    import onnx

    labels = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            labels[node.name] = f"  MatMulNBits {a['N']}x{a['K']} {a['bits']}-bit block {a['block_size']}"
    return labels


# ----------------------------------------------------------------------------- CLI
def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "load_s", "peak_rss_bytes")
    return {k: statistics.median(r[k] for r in rows) for k in keys} | {
        "all_prefill": [round(r["prefill_tokens_per_s"], 1) for r in rows],
        "all_decode": [round(r["decode_tokens_per_s"], 1) for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Our ONNX bundle vs onnxruntime-genai's model builder, both run by genai")
    ap.add_argument("--hf-dir", type=Path, help="Hugging Face Llama dir the builder exports")
    ap.add_argument("--ours", type=Path, action="append", default=[], help="our bundle folder(s)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/genai-peer"), help="builder output dir")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--profile", type=Path, help="write onnxruntime profiles here and print per-op decode times")
    ap.add_argument("--measure-only", type=Path, help=argparse.SUPPRESS)  # the fresh-process half
    a = ap.parse_args()
    if a.measure_only:
        prompt = bench_prompt(_vocab(a.measure_only), a.prompt_tokens).tolist()
        print(json.dumps(time_genai(a.measure_only, prompt, a.decode_tokens, a.threads, a.profile)))
        return
    if a.hf_dir is None:
        ap.error("--hf-dir is required")
    peer = build_genai_peer(a.hf_dir, a.out / a.precision, a.precision)
    models = {"builder": Path(peer["path"])} | {f"ours:{p}": p for p in a.ours}  # full paths: bundle names repeat
    if a.profile:
        for label, path in models.items():
            prof = a.profile / label.replace(":", "_").replace("/", "_")
            time_genai_subprocess(path, a.threads, a.prompt_tokens, a.decode_tokens, prof)
            newest = max(prof.glob("ort_profile*.json"), key=lambda p: p.stat().st_mtime)
            ops = op_times_per_decode_token(newest, a.decode_tokens, path / "model.onnx")
            print(f"## {label}: kernel us per decode token ({newest})")
            for op, us in ops.items():
                print(f"  {op:40s} {us:10.1f}")
        return
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in models}
    for i in range(a.repeats):  # alternate, so the machine's load hits every model alike
        for label, path in models.items():
            r = time_genai_subprocess(path, a.threads, a.prompt_tokens, a.decode_tokens)
            rows[label].append(r)
            print(
                f"[{i + 1}/{a.repeats}] {label}: prefill {r['prefill_tokens_per_s']:.1f} decode "
                f"{r['decode_tokens_per_s']:.1f} tok/s",
                file=sys.stderr,
            )
    base = _median_row(rows["builder"])
    print(f"builder: {json.dumps(BUILDER_DEFAULTS)}; export {peer['export_s']:.1f} s")
    print(f"median of {a.repeats}, alternated; {a.threads} threads, {a.prompt_tokens}+{a.decode_tokens} tokens\n")
    print(
        "| model | prefill tok/s | decode tok/s | prefill vs builder | decode vs builder | load s | peak RSS MB | bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, rs in rows.items():
        m = _median_row(rs)
        print(
            f"| {label} | {m['prefill_tokens_per_s']:.1f} | {m['decode_tokens_per_s']:.1f} | "
            f"{m['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x | "
            f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | {m['load_s']:.2f} | "
            f"{m['peak_rss_bytes'] / 1e6:.0f} | {rs[0]['artifact_bytes']:,} |"
        )
    print("\nall runs: " + json.dumps({label: _median_row(rs) for label, rs in rows.items()}))


if __name__ == "__main__":
    main()
