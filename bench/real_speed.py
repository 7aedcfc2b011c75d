"""`make bench`: the real 135M model (SmolLM2-135M, MobileLLM-125M's shape, grid-broken copy) at 4 bits,
ours beside the peers on the same weights, in one run on one machine:

- ours: `mobilellm-export --target all --bits 4` (one CLI process: its wall seconds, per-target seconds
  and peak RSS), then the .pte and the ONNX model timed (ONNX both through onnxruntime and through
  onnxruntime-genai, the client apps run it with); Core ML: export seconds and size only (no Apple OS);
- llama.cpp Q4_0 and Q4_K_M (llama-cpp-python, GGUFs written from the same HF dir);
- onnxruntime-genai's model builder (int4) on the same HF dir, timed through genai like ours;
- ExecuTorch's export_llama (8da4w, group 32) on the same weights;
- layer sharing: random-weight 125M and 125M-LS exported to ExecuTorch and ONNX, LS over plain.

Every runtime: 2 threads, the same 128 token ids, 64 greedy decode tokens, a warm-up first, each timing
in a fresh process (peak RSS is the runtime's own), rows measured round-robin `--repeats` times and
the median kept. Quality: perplexity of each artifact through its own runtime on 2 x 512 held-out
tokens, beside its speed. The CPU's SIMD features head the report: kernels differ by CPU.

    python -m bench.real_speed [--output bench-results/] [--repeats 3] [--no-ls] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "mobilellm-export" / "real"
THREADS, PROMPT, DECODE = 2, 128, 64
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "load_s")


# ----------------------------------------------------------------------------- llama.cpp timing
def llamacpp_speed(gguf: Path, vocab: int, threads: int, prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """llama.cpp prefill/greedy decode of the bench prompt (call in a fresh process)."""
    from llama_cpp import Llama

    from mobilellm.exporter.measure import bench_prompt, peak_rss

    prompt = bench_prompt(vocab, prompt_tokens).tolist()
    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=prompt_tokens + decode_tokens + 8,
        n_batch=prompt_tokens + decode_tokens + 8,
        n_ubatch=prompt_tokens + decode_tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    def run(ids: list[int], n_new: int) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return prefill, time.perf_counter() - t

    run(prompt[:8], 2)  # warm-up
    prefill_s, decode_s = run(prompt, decode_tokens)
    llm.close()
    return {
        "load_s": load_s,
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "peak_rss_bytes": peak_rss(),
    }


def genai_perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    """Perplexity through onnxruntime-genai, one token a step (its Generator exposes the last logits)."""
    import onnxruntime_genai as og

    from mobilellm.validation.metrics import log_softmax

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    model = og.Model(config)
    nll, count = 0.0, 0
    for window in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window))
        gen = og.Generator(model, params)
        for i, token in enumerate(window[:-1]):
            gen.append_tokens([token])
            logits = np.asarray(gen.get_logits(), dtype=np.float64).reshape(-1)
            nll -= float(log_softmax(logits[None])[0, window[i + 1]])
            count += 1
    return math.exp(nll / count)


def fresh(args: list[str]) -> dict[str, Any]:
    from mobilellm.exporter.measure import run_fresh_process

    return run_fresh_process("bench.real_speed", args, pythonpath=[REPO])


# ----------------------------------------------------------------------------- exports
def export_ours(
    checkpoint: Path, out: Path, name: str, targets: str = "all", reuse: bool = False, extra: list[str] = ()
) -> dict[str, Any]:
    """One `mobilellm-export` process: wall seconds, per-target seconds (its own log), peak RSS."""
    marker = out / f".{name}-{targets}-export.json"
    if reuse and marker.is_file():
        return json.loads(marker.read_text())
    cmd = [str(Path(sys.executable).with_name("mobilellm-export")), "-c", str(checkpoint), "--target", targets]
    cmd += ["--bits", "4", "--output", str(out), "--name", name, *extra]
    out.mkdir(parents=True, exist_ok=True)
    log_out, log_err = out / f".{name}-export.stdout", out / f".{name}-export.stderr"
    t0 = time.perf_counter()
    with open(log_out, "w") as so, open(log_err, "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    stdout, stderr = log_out.read_text(), log_err.read_text()
    if code not in (0, 1):
        raise RuntimeError(f"export failed ({code}): {stderr.strip().splitlines()[-1:]}")
    per_target = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(executorch|coreml|onnx)\s.*exported in ([\d.]+)s", stdout, re.M)
    }
    phases = {m.group(1): m.group(2) for m in re.finditer(r"^\[(\w+)\] timings: (.*)$", stderr, re.M)}
    result = {
        "wall_s": wall,
        "per_target_s": per_target,
        "phases": phases,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "parity": re.findall(r"parity (PASS|FAIL)", stdout),
    }
    marker.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- rows
def median_rows(timers: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, dict[str, Any]]:
    """Every timer `repeats` times, round-robin (so machine load falls on all rows alike); medians."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in timers}
    for r in range(repeats):
        for key, timer in timers.items():
            runs[key].append(timer())
            last = runs[key][-1]
            print(
                f"  [{r + 1}/{repeats}] {key}: prefill {last['prefill_tokens_per_s']:.0f} tok/s, "
                f"decode {last['decode_tokens_per_s']:.1f} tok/s",
                flush=True,
            )
    out = {}
    for key, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows if r.get(k) is not None) for k in SPEED_KEYS if rows[0].get(k)}
        med["decode_runs"] = [round(r["decode_tokens_per_s"], 1) for r in rows]
        med["prefill_runs"] = [round(r["prefill_tokens_per_s"]) for r in rows]
        out[key] = med
    return out


def real_model_rows(args: argparse.Namespace) -> dict[str, Any]:
    from bench.genai_peer import build_genai_peer, time_genai_subprocess
    from bench.llamacpp_peer import llamacpp_perplexity, quantize_gguf, write_gguf_from_hf
    from bench.peers import PTE_NAME, SIDECAR, export_executorch_llama_peer, measure_pte_subprocess, open_pte
    from bench.real import eval_windows, reference_perplexity, runtime_perplexity
    from bench.real_model import build_real_checkpoints
    from mobilellm.exporter.bundle import artifact_bytes, read_manifest
    from mobilellm.exporter.measure import bench_bundle_subprocess
    from mobilellm.exporter.targets import load_target

    hf = build_real_checkpoints(CACHE)["gridbroken"]
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    windows = eval_windows(hf)
    base = reference_perplexity(hf, windows)
    print(f"fp32 perplexity {base:.3f}", flush=True)
    bundles = args.output / "bundles"

    print("exporting ours (all targets, 4 bits) ...", flush=True)
    ours_export = export_ours(hf, bundles, "smollm2-135m", reuse=args.reuse)
    print(f"  {ours_export}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    timers: dict[str, Callable[[], dict[str, Any]]] = {}
    for target in ("executorch", "onnx", "coreml"):
        bundle = bundles / f"smollm2-135m-{target}-4bit"
        manifest = read_manifest(bundle)
        row = rows[f"ours {target}"] = {
            "target": f"ours {target}" + (" (onnxruntime)" if target == "onnx" else ""),
            "artifact_bytes": artifact_bytes(manifest["files"], manifest["artifact"]),
            "export_s": ours_export["per_target_s"].get(target),
            "parity": "PASS" if (manifest.get("parity") or {}).get("passed") else "FAIL",
        }
        if target == "coreml":
            row["not_timed"] = "Core ML runs only on Apple OSes"
            continue
        row["ppl"] = runtime_perplexity(load_target(target).open_runtime(bundle, manifest), windows)
        timers[f"ours {target}"] = lambda b=bundle: bench_bundle_subprocess(b, THREADS, PROMPT, DECODE)
    onnx_bundle = bundles / "smollm2-135m-onnx-4bit"
    rows["ours onnx genai"] = dict(rows["ours onnx"], target="ours onnx (onnxruntime-genai)")
    timers["ours onnx genai"] = lambda: time_genai_subprocess(onnx_bundle, THREADS, PROMPT, DECODE)

    print("onnxruntime-genai builder ...", flush=True)
    builder = build_genai_peer(hf, CACHE / "genai-builder-gridbroken-int4")
    rows["genai builder"] = {
        "target": "onnxruntime-genai builder int4 (peer)",
        "artifact_bytes": builder["artifact_bytes"],
        "export_s": builder["export_s"],
        "ppl": genai_perplexity(Path(builder["path"]), windows),
    }
    rows["ours onnx genai"]["ppl"] = genai_perplexity(onnx_bundle, windows)
    timers["genai builder"] = lambda: time_genai_subprocess(Path(builder["path"]), THREADS, PROMPT, DECODE)

    print("llama.cpp ...", flush=True)
    work = CACHE / "gguf-gridbroken"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        write_gguf_from_hf(hf, f32)
    for kind in ("Q4_0", "Q4_K_M"):
        gguf = work / f"{kind}.gguf"
        if not gguf.is_file():
            quantize_gguf(f32, gguf, kind)
        rows[f"llama.cpp {kind}"] = {
            "target": f"llama.cpp {kind} (peer)",
            "artifact_bytes": gguf.stat().st_size,
            "ppl": llamacpp_perplexity(gguf, windows),
        }
        timers[f"llama.cpp {kind}"] = lambda g=gguf: fresh(["--llamacpp", str(g), "--vocab", str(vocab)])

    print("ExecuTorch export_llama ...", flush=True)
    peer_dir = CACHE / "etpeer-gridbroken-q4"
    if not (peer_dir / PTE_NAME).is_file():
        export_executorch_llama_peer(hf, peer_dir, 4)
    side = json.loads((peer_dir / SIDECAR).read_text())
    rows["export_llama"] = {
        "target": "executorch export_llama 8da4w (peer)",
        "artifact_bytes": (peer_dir / PTE_NAME).stat().st_size,
        "export_s": side.get("export_s"),
        "ppl": runtime_perplexity(open_pte(peer_dir / PTE_NAME), windows),
    }
    timers["export_llama"] = lambda: measure_pte_subprocess(hf, peer_dir, THREADS, PROMPT, DECODE)

    print(f"timing ({args.repeats} rounds) ...", flush=True)
    for key, med in median_rows(timers, args.repeats).items():
        rows[key].update(med)
    for row in rows.values():
        if row.get("ppl"):
            row["ppl_delta"] = row["ppl"] / base - 1
    return {"fp32_ppl": base, "export": ours_export, "rows": rows}


def sharing_rows(args: argparse.Namespace) -> dict[str, Any]:
    """Random-weight 125M and 125M-LS (same seed): ExecuTorch and ONNX, LS over plain."""
    from bench.genai_peer import time_genai_subprocess
    from mobilellm.exporter.measure import bench_bundle_subprocess

    out = args.output / "sharing"
    rows: dict[str, dict[str, Any]] = {}
    timers: dict[str, Callable[[], dict[str, Any]]] = {}
    exports = {}
    for preset in ("125M", "125M-LS"):
        ckpt = out / f"random-{preset}"
        if not (ckpt / "config.json").is_file():
            subprocess.run(
                [str(Path(sys.executable).with_name("mobilellm-export")), "random-checkpoint", preset, str(ckpt)],
                check=True,
            )
        for target in ("executorch", "onnx"):
            exports[f"{preset} {target}"] = export_ours(ckpt, out, preset, target, args.reuse, ["--no-parity"])
            bundle = out / f"{preset}-{target}-4bit"
            rows[f"{preset} {target}"] = {
                "preset": preset,
                "target": f"ours {target}",
                "export_s": exports[f"{preset} {target}"]["per_target_s"].get(target),
            }
            timers[f"{preset} {target}"] = lambda b=bundle: bench_bundle_subprocess(b, THREADS, PROMPT, DECODE)
        # the client apps run the ONNX bundle with (shared past/present buffers; ours copies the cache)
        bundle = out / f"{preset}-onnx-4bit"
        rows[f"{preset} onnx genai"] = dict(rows[f"{preset} onnx"], target="ours onnx (onnxruntime-genai)")
        timers[f"{preset} onnx genai"] = lambda b=bundle: time_genai_subprocess(b, THREADS, PROMPT, DECODE)
    print(f"timing sharing ({args.repeats} rounds) ...", flush=True)
    for key, med in median_rows(timers, args.repeats).items():
        rows[key].update(med)
    ratios = {
        t: {
            "decode_time_ls_over_plain": rows[f"125M {t}"]["decode_tokens_per_s"]
            / rows[f"125M-LS {t}"]["decode_tokens_per_s"],
            "peak_rss_ls_minus_plain_bytes": rows[f"125M-LS {t}"]["peak_rss_bytes"]
            - rows[f"125M {t}"]["peak_rss_bytes"],
        }
        for t in ("executorch", "onnx", "onnx genai")
    }
    return {"rows": rows, "ratios": ratios, "exports": exports}


# ----------------------------------------------------------------------------- report
def kernel_report() -> dict[str, str]:
    """What the runtimes that say so picked for this CPU (XNNPACK and MLAS say nothing; they read the
    same CPUID torch's cpuinfo does)."""
    import llama_cpp
    import torch

    info = llama_cpp.llama_print_system_info().decode().split("|")
    return {
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "llama.cpp": " ".join(f for f in (i.strip() for i in info) if f.startswith("CPU :") or "= 1" in f),
        "llama.cpp build": str(Path(llama_cpp.__file__).parent.parent),
    }


def markdown(result: dict[str, Any]) -> str:
    mb = 1 << 20

    def f(v: Any, fmt: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v / scale, fmt)

    real = result["real"]
    lines = [
        "# make bench: real 135M model (SmolLM2-135M, MobileLLM-125M's shape), 4 bits",
        "",
        f"CPU: {result['cpu']}",
        f"Kernels: {result.get('kernels', '-')}",
        f"{THREADS} threads, {PROMPT}-token prompt, {DECODE} greedy tokens; medians of {result['repeats']} "
        f"round-robin runs (each a fresh process). fp32 perplexity {real['fp32_ppl']:.3f} (2 x 512 held-out tokens).",
        "",
        "| runtime | size MB | export s | prefill tok/s | decode tok/s | decode runs | peak RSS MB | perplexity vs fp32 | parity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in real["rows"].values():
        lines.append(
            f"| {r['target']} | {r['artifact_bytes'] / mb:.1f} | {f(r.get('export_s'), '.0f')} | "
            f"{f(r.get('prefill_tokens_per_s'), '.0f')} | {f(r.get('decode_tokens_per_s'), '.1f')} | "
            f"{r.get('decode_runs', '-')} | {f(r.get('peak_rss_bytes'), '.0f', mb)} | "
            f"{f(r.get('ppl_delta'), '+.2%')} | {r.get('parity', '-')} |"
        )
    exp = real["export"]
    lines += [
        "",
        f"Our export, all three targets in one `mobilellm-export` process: {exp['wall_s']:.0f} s wall "
        f"(per target: {exp['per_target_s']}), peak RSS {f(exp.get('peak_rss_bytes'), '.0f', mb)} MB.",
        "",
    ]
    if "sharing" in result:
        sh = result["sharing"]
        lines += [
            "## Layer sharing: random-weight 125M vs 125M-LS (same widths, 30 stored blocks, 60 applied)",
            "",
            "| model | runtime | export s | prefill tok/s | decode tok/s | peak RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in sh["rows"].values():
            lines.append(
                f"| {r['preset']} | {r['target']} | {f(r.get('export_s'), '.0f')} | {f(r.get('prefill_tokens_per_s'), '.0f')} | "
                f"{f(r.get('decode_tokens_per_s'), '.1f')} | {f(r.get('peak_rss_bytes'), '.0f', mb)} |"
            )
        for t, ratio in sh["ratios"].items():
            lines.append(
                f"\n{t}: LS decode time {ratio['decode_time_ls_over_plain']:.2f}x plain; "
                f"peak RSS +{ratio['peak_rss_ls_minus_plain_bytes'] / mb:.0f} MB"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    from mobilellm.exporter.threads import one_openmp_thread_outside_torch

    one_openmp_thread_outside_torch()  # the CLI's OpenMP setup (in-process runtimes), before torch loads
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=REPO / "bench-results")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ls", action="store_true", help="skip the 125M / 125M-LS sharing rows")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles exported by an earlier run")
    ap.add_argument(
        "--sharing-only", action="store_true", help="only the LS rows, beside OUTPUT/bench.json's real rows"
    )
    ap.add_argument(
        "--emulate-cpu",
        metavar="PROFILE",
        help="time every runtime with an older CPU's kernels (avx2, avx512-no-vnni; see bench/cpu_profiles.py); "
        "writes OUTPUT/bench-PROFILE.{md,json,png}",
    )
    # fresh-process halves
    ap.add_argument("--llamacpp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp:
        print(json.dumps(llamacpp_speed(args.llamacpp, args.vocab, THREADS, PROMPT, DECODE)))
        return
    from bench import cpu_profiles

    if args.emulate_cpu and cpu_profiles.active_profile() != args.emulate_cpu:
        # this whole bench again, under the profile (in-process perplexity runs and every timed child)
        cpu_profiles.check_supported(args.emulate_cpu)
        env = cpu_profiles.emulation_env(args.emulate_cpu, [cpu_profiles.llama_cpp_for(args.emulate_cpu), REPO])
        os.execve(sys.executable, [sys.executable, "-m", "bench.real_speed", *sys.argv[1:]], env)
    from bench.real import cpu_features

    stem = f"bench-{args.emulate_cpu}" if args.emulate_cpu else "bench"
    args.output.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpu": cpu_features(), "repeats": args.repeats, "kernels": kernel_report()}
    print(f"CPU: {result['cpu']}\nkernels: {result['kernels']}", flush=True)
    if args.sharing_only:  # the real-model rows of an earlier run
        result = json.loads((args.output / f"{stem}.json").read_text())
    else:
        result["real"] = real_model_rows(args)
        (args.output / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_ls:
        result["sharing"] = sharing_rows(args)
    (args.output / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    chart_rows = [
        {"preset": "135M", **r} for r in result["real"]["rows"].values() if r.get("decode_tokens_per_s") is not None
    ]
    from bench.speed import write_bench_chart

    caption = f"CPU: {result['cpu']}; {THREADS} threads, {PROMPT}+{DECODE} tokens"
    write_bench_chart(chart_rows, args.output, caption, stem)
    (args.output / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
