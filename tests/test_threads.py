"""OpenMP set up for the pip ExecuTorch runtime (exporter/threads.py), checked in fresh processes: the
setting only exists before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, threading
from mobilellm.exporter import threads
changed = threads.one_openmp_thread_outside_torch()
import torch
lib = threads._libgomp()
seen = []
t = threading.Thread(target=lambda: seen.append(lib.omp_get_max_threads())); t.start(); t.join()
with threads.one_openmp_thread():
    inside = [torch.get_num_threads(), lib.omp_get_max_threads()]
print(json.dumps({"changed": changed, "torch": torch.get_num_threads(), "cores": threads.physical_cores(),
    "new_thread": seen[0], "inside": inside, "env": os.environ.get("OMP_NUM_THREADS"),
    "again": threads.one_openmp_thread_outside_torch()}))
"""


def _probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_threads_torch_did_not_start_get_one_openmp_thread_and_torch_keeps_its_count():
    got = _probe()
    assert got["changed"] and not got["again"]  # once, before torch loads
    assert got["torch"] == got["cores"]  # torch's own default, not the 1 it would read from the variable
    assert got["new_thread"] == 1
    assert got["inside"] == [1, 1]
    assert got["env"] is None  # child processes see the environment the user set


def test_a_users_omp_num_threads_is_left_alone():
    got = _probe(OMP_NUM_THREADS="2")
    assert not got["changed"]
    assert got["new_thread"] == 2 and got["env"] == "2"
    assert got["inside"] == [got["torch"]] * 2  # no one-thread calls into a runtime whose workers run teams
