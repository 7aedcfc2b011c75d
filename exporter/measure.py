"""Runtime measurement of one bundle: `mobilellm-export bench BUNDLE`, and the primitives the repo's
benchmark scripts (bench/speed.py, bench/peers.py, not installed) time every runtime with.

Each measurement runs in a fresh Python process (`run_fresh_process`) so load time and peak RSS are
the runtime's own, not what earlier work left in this process.

    python -m mobilellm.exporter.measure --one BUNDLE [--threads N] [--prompt-tokens N] [--decode-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .bundle import artifact_bytes, read_manifest
from .targets import TargetRuntime, load_target

_RSS_UNIT = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS


def peak_rss() -> int:
    """This process's peak RSS. On Linux VmHWM, which restarts at exec; ru_maxrss would carry over the
    forking parent's peak into the child."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def time_decode(runtime: TargetRuntime, prompt: np.ndarray, decode_tokens: int) -> dict[str, float]:
    """Prefill `prompt`, then greedy-decode `decode_tokens` tokens; tokens/s and seconds of each phase."""
    # Timed on the last position's logits, as a generation runner reads them (ExecuTorch's program
    # returns only that row; its `forward` reconstructs every position).
    step = runtime.forward_last
    runtime.reset()
    t0 = time.perf_counter()
    logits = step(prompt, 0)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(decode_tokens):
        nxt = np.asarray([int(np.argmax(logits[-1]))], dtype=np.int64)
        logits = step(nxt, len(prompt) + i)
    decode_s = time.perf_counter() - t1
    return {
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
    }


# The SIMD features runtimes choose kernels by (x86: XNNPACK, MLAS, llama.cpp; ARM: dot product, i8mm).
_SIMD_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)


# Flags a CPUID mask hides from this process (the bench's emulated older CPUs, bench/cpu_profiles.py):
# every runtime then picks kernels without them, but /proc/cpuinfo still lists them.
HIDDEN_CPU_FLAGS_ENV = "MOBILELLM_HIDDEN_CPU_FLAGS"


def cpu_flags() -> list[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them, minus any a CPUID mask hides from this
    process ([] where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    # x86 lists "flags", ARM "Features"
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    hidden = set(filter(None, os.environ.get(HIDDEN_CPU_FLAGS_ENV, "").split(",")))
    return [f for f in line.split(":", 1)[1].split() if f not in hidden] if ":" in line else []


def cpu_description(flags: Sequence[str] | None = None) -> str:
    """Machine, core count and the SIMD features that decide kernels, e.g. 'x86_64, 2 cores [avx2, fma, ...]'."""
    import platform

    flags = cpu_flags() if flags is None else flags
    present = [f for f in _SIMD_FLAGS if f in flags]
    simd = ", ".join(present) if present else ("no /proc/cpuinfo" if not flags else "none of note")
    return f"{platform.machine()}, {os.cpu_count()} cores [{simd}]"


def bench_prompt(vocab: int, n: int) -> np.ndarray:
    """The fixed (seed 0) random prompt every measurement uses: `n` token ids in [3, vocab)."""
    return np.random.default_rng(0).integers(3, vocab, n).astype(np.int64)


def run_fresh_process(module: str, args: list[str], pythonpath: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process; its last stdout line is the JSON result.

    `pythonpath` is put in front of the child's PYTHONPATH (a module outside the installed package,
    e.g. the repo's `bench.*`, is then found whatever the working directory)."""
    env = None
    if pythonpath:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    # OpenMP set up as in the CLI before the module (and torch) loads: see threads.py.
    bootstrap = (
        "import runpy, mobilellm.exporter.threads as t; t.one_openmp_thread_outside_torch(); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run([sys.executable, "-c", bootstrap, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark subprocess failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_bundle(bundle: Path, threads: int, prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """In-process measurement (call in a fresh process: see bench_bundle_subprocess)."""
    torch.set_num_threads(threads)
    # Alone in its process, a runtime may spin its threads between ops as the apps' clients do
    # (onnxruntime-genai's default); validation beside a second export process keeps them parked.
    os.environ.setdefault("MOBILELLM_ORT_SPIN", "1")
    manifest = read_manifest(bundle)
    module = load_target(manifest["target"])
    base_rss = current_rss()
    t0 = time.perf_counter()
    runtime = module.open_runtime(bundle, manifest)
    load_s = time.perf_counter() - t0
    load_rss = current_rss() - base_rss
    prompt = bench_prompt(manifest["vocab_size"], min(prompt_tokens, manifest["max_context"] - decode_tokens - 1))
    time_decode(runtime, prompt[:8], 2)  # warm-up (first-call allocations, kernel packing)
    timing = time_decode(runtime, prompt, decode_tokens)
    size = artifact_bytes(manifest["files"], manifest["artifact"])
    return {
        "bundle": manifest["name"],
        "target": manifest["target"],
        "bits": manifest["bits"],
        "threads": threads,
        "load_s": load_s,
        **timing,
        "peak_rss_bytes": peak_rss(),
        "rss_over_baseline_bytes": peak_rss() - base_rss,
        "rss_after_load_bytes": load_rss,
        "artifact_bytes": size,
        "prompt_tokens": len(prompt),
        "decode_tokens": decode_tokens,
        "cpu": cpu_description(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **runtime.details(),
    }


def bench_summary(row: dict[str, Any]) -> str:
    """What `mobilellm-export bench` prints: one bundle's figures, with the CPU they were measured on."""
    mb = 1 << 20
    return "\n".join(
        [
            f"{row['bundle']}: {row['target']}, {row['bits']}-bit, {row['artifact_bytes'] / mb:.1f} MB",
            f"  CPU        {row['cpu']}, {row['threads']} threads",
            f"  load       {row['load_s']:.2f} s",
            f"  prefill    {row['prefill_tokens_per_s']:.0f} tokens/s ({row['prompt_tokens']} tokens)",
            f"  decode     {row['decode_tokens_per_s']:.1f} tokens/s ({row['decode_tokens']} greedy tokens)",
            f"  peak RSS   {row['peak_rss_bytes'] / mb:.0f} MB ({row['rss_over_baseline_bytes'] / mb:.0f} MB over "
            "the Python process before loading)",
        ]
    )


def bench_bundle_subprocess(
    bundle: Path, threads: int = 2, prompt_tokens: int = 128, decode_tokens: int = 64
) -> dict[str, Any]:
    """measure_bundle in a fresh process (clean load time and RSS baseline)."""

    read_manifest(bundle)  # a clear error for a bad path before spawning anything
    return run_fresh_process(
        "mobilellm.exporter.measure",
        [
            "--one",
            str(bundle),
            "--threads",
            str(threads),
            "--prompt-tokens",
            str(prompt_tokens),
            "--decode-tokens",
            str(decode_tokens),
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Measure one bundle in this process and print JSON (mobilellm-export bench runs it in a fresh one)"
    )
    ap.add_argument("--one", type=Path, required=True, help="bundle folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(measure_bundle(args.one, args.threads, args.prompt_tokens, args.decode_tokens)))


if __name__ == "__main__":
    main()
