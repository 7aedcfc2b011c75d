"""Benchmarks on an older x86 CPU, emulated on this one: kernels are chosen from CPUID, so hide features.

Every runtime in the bench picks its kernels from CPUID at run time (XNNPACK and torch through
cpuinfo, onnxruntime's MLAS, numpy). `cpuid_mask.c`, preloaded, makes CPUID trap (Linux CPUID
faulting) and clears a profile's feature bits, so those runtimes run the kernels that CPU would run;
llama.cpp picks its kernels when it is compiled, so it gets its own build with only the profile's
features. Cores, caches, memory and clock stay this machine's: the emulation answers "which kernels,
and how fast are they here", not "how fast is that CPU". glibc picks its string functions before the
shim loads (they keep this CPU's); the rest of the process sees the profile.
`python -m bench.cpu_profiles avx2 COMMAND...` runs any one command that way.

    PROFILES: name -> the /proc/cpuinfo flags it removes
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from bench.llamacpp_peer import cmake_args
from mobilellm.exporter import measure

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "cpuid_mask.c"
CACHE = Path.home() / ".cache" / "mobilellm-export" / "cpu-profiles"
LLAMA_CPP_PYTHON = "llama-cpp-python>=0.3.30,<0.4"

_NEWER = {"avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx512ifma"}
_NEWER |= {"avx512_bitalg", "avx512_vpopcntdq", "avx512_vp2intersect", "avx_ifma", "avx_vnni_int8", "avx_ne_convert"}
_NEWER |= {"amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "amx_complex", "avx10"}
_AVX512 = {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512pf", "avx512er"}
PROFILES: dict[str, frozenset[str]] = {
    # Haswell to Zen 2 class: AVX2 + FMA + F16C
    "avx2": frozenset(_NEWER | _AVX512),
    # Skylake-SP/X class: AVX-512 without VNNI (XNNPACK's int4 GEMMs measured no faster there than on AVX2)
    "avx512-no-vnni": frozenset(_NEWER),
}
ENV_PROFILE = "MOBILELLM_CPUID_MASK"


def active_profile() -> str | None:
    """The profile this process runs under (set by `emulation_env`), or None."""
    return os.environ.get(ENV_PROFILE) or None


def check_supported(profile: str) -> None:
    """Raise SystemExit with one line when this machine cannot emulate `profile`."""
    if profile not in PROFILES:
        raise SystemExit(f"unknown CPU profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    flags = measure.cpu_flags()
    if "cpuid_fault" not in flags:
        raise SystemExit("this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo): cannot emulate")
    if "avx2" not in flags:
        raise SystemExit(f"the {profile} profile needs AVX2 on this CPU")


def build_shim(cache: Path = CACHE) -> Path:
    """Compile cpuid_mask.c once (cached by its source hash); the shared library's path."""
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:16]
    lib = cache / f"libcpuid_mask-{digest}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".tmp")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SHIM_SOURCE)], check=True)
        tmp.replace(lib)
    return lib


def llama_cpp_for(profile: str) -> Path:
    """llama-cpp-python compiled for the profile's SIMD features only, installed (once) into its own folder:
    put it first on PYTHONPATH. llama.cpp's CPU kernels are fixed at compile time, CPUID does not move them."""
    flags = [f for f in measure.cpu_flags() if f not in PROFILES[profile]]
    args = cmake_args(flags, force=True)
    target = CACHE / f"llama-cpp-python-{profile}-{hashlib.sha256(args.encode()).hexdigest()[:12]}"
    if not (target / "llama_cpp").is_dir():
        print(f"building llama-cpp-python for {profile} ({args}) ...", flush=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**os.environ, "CMAKE_ARGS": args}
        env.pop("LD_PRELOAD", None)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps", "--target", str(tmp)]
        subprocess.run([*cmd, LLAMA_CPP_PYTHON], check=True, env=env)
        tmp.replace(target)
    return target


def emulation_env(profile: str, pythonpath: Sequence[Path] = (), shim: Path | None = None) -> dict[str, str]:
    """os.environ plus what runs a process (and its children) under `profile`."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim or build_shim()), env.get("LD_PRELOAD")]))
    env[ENV_PROFILE] = profile
    env[measure.HIDDEN_CPU_FLAGS_ENV] = ",".join(sorted(PROFILES[profile]))
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return env


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.cpu_profiles PROFILE COMMAND...`: run one command with the profile's kernels,
    e.g. `python -m bench.cpu_profiles avx2 mobilellm-export bench dist/model-executorch-4bit`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit(f"usage: python -m bench.cpu_profiles {{{','.join(PROFILES)}}} COMMAND [ARGS...]")
    profile, command = args[0], args[1:]
    check_supported(profile)
    try:
        os.execvpe(command[0], command, emulation_env(profile))
    except OSError as e:
        raise SystemExit(f"cannot run {command[0]!r}: {e.strerror}") from None


if __name__ == "__main__":
    main()
