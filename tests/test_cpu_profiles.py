"""The bench's emulated older CPUs (bench/cpu_profiles.py): runtimes that choose kernels from CPUID see
the profile's features and no others, real crashes still crash, and llama.cpp is built to match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpu_profiles import PROFILES, build_shim, emulation_env
from bench.llamacpp_peer import cmake_args
from mobilellm.exporter.measure import cpu_flags

if "cpuid_fault" not in cpu_flags() or "avx512f" not in cpu_flags():
    pytest.skip("needs an x86 CPU with CPUID faulting and AVX-512 to hide", allow_module_level=True)

SEEN = """
import json, torch
from numpy._core._multiarray_umath import __cpu_features__ as f
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(),
                  **{k: f[k] for k in ("AVX2", "FMA3", "F16C", "AVX512F", "AVX512_SKX", "AVX512VNNI")}}))
"""


def _seen(tmp_path: Path, profile: str | None) -> dict[str, object]:
    env = emulation_env(profile, shim=build_shim(tmp_path)) if profile else None
    out = subprocess.run([sys.executable, "-c", SEEN], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_profiles_hide_exactly_their_features(tmp_path: Path) -> None:
    base = {"AVX2": True, "FMA3": True, "F16C": True}
    assert _seen(tmp_path, None) == {"torch": "AVX512", **base, "AVX512F": True, "AVX512_SKX": True, "AVX512VNNI": True}
    assert _seen(tmp_path, "avx2") == {
        "torch": "AVX2",
        **base,
        "AVX512F": False,
        "AVX512_SKX": False,
        "AVX512VNNI": False,
    }
    no_vnni = {"torch": "AVX512", **base, "AVX512F": True, "AVX512_SKX": True, "AVX512VNNI": False}
    assert _seen(tmp_path, "avx512-no-vnni") == no_vnni


def test_the_runner_and_the_cli_report_the_emulated_cpu(tmp_path: Path) -> None:
    # The CPU line `mobilellm-export bench` prints comes from /proc/cpuinfo, which the mask cannot
    # change: the emulation tells it which flags are hidden.
    probe = "from mobilellm.exporter.measure import cpu_description; print(cpu_description())"
    run = [sys.executable, "-m", "bench.cpu_profiles", "avx2", sys.executable, "-c", probe]
    shown = subprocess.run(run, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert "avx2, fma" in shown and "avx512" not in shown and "vnni" not in shown and "amx" not in shown
    assert "avx512f" in subprocess.run(run[-3:], capture_output=True, text=True, check=True).stdout
    bad = subprocess.run([sys.executable, "-m", "bench.cpu_profiles", "avx9", "true"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "unknown CPU profile 'avx9'; choose one of: avx2, avx512-no-vnni"
    ]


def test_a_real_segfault_still_kills_and_a_bad_profile_is_refused(tmp_path: Path) -> None:
    env = emulation_env("avx2", shim=build_shim(tmp_path))
    crash = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], env=env, capture_output=True)
    assert crash.returncode == -11
    env["MOBILELLM_CPUID_MASK"] = "avx9"
    bad = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown MOBILELLM_CPUID_MASK=avx9" in bad.stderr


def test_llama_cpp_is_built_with_the_profiles_features_only() -> None:
    flags = [f for f in cpu_flags() if f not in PROFILES["avx2"]]
    args = cmake_args(flags, force=True)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX_VNNI=OFF" in args and "-DGGML_AVX512_VNNI=OFF" in args
    flags = [f for f in cpu_flags() if f not in PROFILES["avx512-no-vnni"]]
    args = cmake_args(flags, force=True)
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=OFF" in args and "-DGGML_AVX_VNNI=OFF" in args
