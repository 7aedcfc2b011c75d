"""OpenMP's thread counts in a process that runs the pip ExecuTorch runtime beside torch.

The runtime's attention kernel (`llama::custom_sdpa`) runs OpenMP-threaded code (libgomp and MKL, the
ones torch loads) inside ExecuTorch's own pool of worker threads. OpenMP sizes each thread's team from
that thread's setting: `torch.set_num_threads` sets the calling thread's (and MKL's), and a thread
OpenMP did not start reads the process default, which libgomp fixes from OMP_NUM_THREADS once, when
torch loads it (unset: one thread per core). So by default each thread of ExecuTorch's pool opened a team
of its own on cores the pool already keeps busy. Measured on the real 135M model (4-bit .pte, 2 cores,
torch / ExecuTorch pool at 2 / 2 threads, ETDump): decode 8.3-10.7 ms/token, 4.9-6.6 of it attention; with one
OpenMP thread for threads torch did not start and torch at one thread during each call, 4.24 ms/token
(attention 1.16), prefill of 128 tokens 138 -> 84 ms.

`one_openmp_thread_outside_torch()` sets the process default (before anything imports torch: the CLI
does it first thing); `one_openmp_thread()` sets the calling thread around a call into the runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

_VARIABLE = "OMP_NUM_THREADS"


def physical_cores() -> int:
    """Cores this process may run on, hyperthreads of one core counted once (torch's default)."""
    if not hasattr(os, "sched_getaffinity"):  # macOS
        return os.cpu_count() or 1
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def one_openmp_thread_outside_torch() -> bool:
    """Load torch with OpenMP's process default at one thread, then give torch its usual thread count
    back. Threads OpenMP does not start (ExecuTorch's workers) then run its regions on themselves, and
    child processes see the environment unchanged. No effect (False) once torch is loaded or when the
    user set OMP_NUM_THREADS."""
    if "torch" in sys.modules or _VARIABLE in os.environ:
        return False
    os.environ[_VARIABLE] = "1"
    try:
        import torch
    finally:
        del os.environ[_VARIABLE]
    mkl = os.environ.get("MKL_NUM_THREADS", "")  # torch's default follows it when set
    torch.set_num_threads(int(mkl) if mkl.isdigit() and int(mkl) > 0 else physical_cores())
    return True


_loaded: list[ctypes.CDLL] = []


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (its own copy, beside libtorch), or None while none is loaded."""
    if not _loaded:
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
        except OSError:  # no /proc (macOS): torch's OpenMP there is not libgomp
            return None
        if len(paths) != 1:
            return None
        lib = ctypes.CDLL(paths.pop())
        lib.omp_get_max_threads.restype = ctypes.c_int
        _loaded.append(lib)
    return _loaded[0]


@cache
def _default_for_new_threads(lib: ctypes.CDLL) -> int:
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(lib.omp_get_max_threads()))
    probe.start()
    probe.join()
    return seen[0]


def openmp_default_for_new_threads() -> int | None:
    """The OpenMP team size a thread OpenMP did not start gets (None: no libgomp in this process).
    libgomp reads it once, at load."""
    lib = _libgomp()
    return None if lib is None else _default_for_new_threads(lib)


@contextlib.contextmanager
def one_openmp_thread() -> Iterator[None]:
    """The calling thread's OpenMP regions (and MKL's) run on itself inside, as on the runtime's pool
    threads; torch's thread count comes back on the way out (setting it costs well under a microsecond).
    No-op where OpenMP's default for new threads is not 1 (the process did not start with
    `one_openmp_thread_outside_torch`): one thread here and a team per pool thread there measured
    slower still (attention 101 ms/token)."""
    if openmp_default_for_new_threads() != 1:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
