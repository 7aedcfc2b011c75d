"""Writes never lose data: a killed export, two exports of one name, a parity failure over a good
bundle, an interrupted two-step replacement, random-checkpoint into a full folder. Each asserts the
exit code, the one-line message, and that nothing outside the output folder changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import random_model, run_cli, snapshot, tiny_config
from mobilellm.exporter import atomic
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.checkpoint import save_checkpoint

NAME = "tiny-onnx-8bit"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("writes")
    return save_checkpoint(
        random_model(tiny_config(n_layers=1)), root / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )


def export_args(ckpt: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(ckpt),
        "--target",
        "onnx",
        "--bits",
        "8",
        "--max-seq-len",
        "32",
        "--output",
        str(output),
        *extra,
    ]


# A threshold no real artifact meets: the export completes and fails parity (exit 1).
FAIL_PARITY = ("--threshold", "reference.kl_divergence=0")


@pytest.fixture(scope="module")
def good_dist(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder holding one good bundle, exported once; tests copy it."""
    from conftest import invoke_cli

    dist = tmp_path_factory.mktemp("good") / "dist"
    assert invoke_cli(export_args(tiny_ckpt, dist)) == 0
    return dist


def copy_dist(good_dist: Path, tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    shutil.copytree(good_dist, dist, symlinks=True)
    return dist


def start_export(ckpt: Path, dist: Path) -> subprocess.Popen:
    code = "import sys; from mobilellm.exporter.cli import main; sys.argv[0] = 'mobilellm-export'; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *export_args(ckpt, dist)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the export ended first: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def temps(dist: Path) -> list[Path]:
    return [p for p in dist.iterdir() if p.name.startswith(f".{NAME}.tmp-")]


def test_parity_failure_keeps_the_good_bundle(
    tiny_ckpt: Path, good_dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = copy_dist(good_dist, tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "notes.txt").write_text("keep me")
    good = snapshot(dist / NAME)
    before = snapshot(tmp_path), snapshot(tiny_ckpt)
    code, out, err = run_cli(export_args(tiny_ckpt, dist, *FAIL_PARITY), capsys)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("parity failed: onnx: reference.kl_divergence") and "NAME.failed" in last, last
    assert snapshot(dist / NAME) == good  # the last good bundle, byte for byte
    failed = json.loads((dist / f"{NAME}.failed" / "manifest.json").read_text())
    assert failed["parity"]["passed"] is False and failed["name"] == NAME
    assert f"{NAME}.failed" in out
    assert not temps(dist)
    outside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(f"dist/{NAME}.failed")}
    assert (outside, snapshot(tiny_ckpt)) == before
    # A passing export then replaces the good bundle and retires the outdated failed one.
    code, _, err = run_cli(export_args(tiny_ckpt, dist), capsys)
    assert code == 0, err
    assert (dist / NAME / "manifest.json").is_file() and not (dist / f"{NAME}.failed").exists()


def test_concurrent_export_of_one_name_fails_fast(
    tiny_ckpt: Path, good_dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = copy_dist(good_dist, tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path / "outside"), snapshot(tiny_ckpt)
    proc = start_export(tiny_ckpt, dist)
    lock = dist / f".{NAME}.lock"
    try:
        wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid), proc)
        code, _, err = run_cli(export_args(tiny_ckpt, dist), capsys)
    finally:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert code == 2 and err.count("\n") == 1, err
    assert f"another export (pid {proc.pid}) is writing this bundle now (it holds .{NAME}.lock)" in err, err
    assert (snapshot(tmp_path / "outside"), snapshot(tiny_ckpt)) == before
    # The first export finished undisturbed: a complete bundle, no temp folder left.
    code, _, err = run_cli(["validate", str(dist / NAME), "--report-dir", str(tmp_path / "reports")], capsys)
    assert code == 0, err
    assert not temps(dist)


def test_killed_export_keeps_the_good_bundle_and_its_temp_folder_is_cleaned(
    tiny_ckpt: Path, good_dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = copy_dist(good_dist, tmp_path)
    good = snapshot(dist / NAME)
    before = snapshot(tmp_path)
    proc = start_export(tiny_ckpt, dist)
    wait_for(lambda: any((t / "model.onnx").exists() for t in temps(dist)), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    (leftover,) = temps(dist)
    assert leftover.name.startswith(f".{NAME}.tmp-{proc.pid}-")
    assert snapshot(dist / NAME) == good
    after = snapshot(tmp_path)  # the lock file holds the pid of its last holder
    assert {k: v for k, v in after.items() if not k.startswith(f"dist/.{NAME}.")} == {
        k: v for k, v in before.items() if not k.startswith(f"dist/.{NAME}.")
    }
    # The next run into the folder removes the dead process's temp folder, then exports.
    code, _, err = run_cli(export_args(tiny_ckpt, dist), capsys)
    assert code == 0, err
    assert not temps(dist) and (dist / NAME / "manifest.json").is_file()


def test_interrupted_two_step_replacement_is_recovered(
    tiny_ckpt: Path, good_dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where renameat2 cannot exchange, a replacement is two renames; a kill between them leaves
    NAME missing and .NAME.old holding the good bundle: the next run puts it back first."""
    dist = copy_dist(good_dist, tmp_path)
    good = snapshot(dist / NAME)
    os.rename(dist / NAME, dist / f".{NAME}.old")  # the state after the first rename
    code, _, err = run_cli(export_args(tiny_ckpt, dist, *FAIL_PARITY), capsys)
    assert code == 1, err
    assert f"restored {dist / NAME} from .{NAME}.old" in err
    assert snapshot(dist / NAME) == good and (dist / f"{NAME}.failed").is_dir()
    assert not (dist / f".{NAME}.old").exists()


def test_two_step_replacement_and_folder_modes(
    tiny_ckpt: Path,
    good_dist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented fallback (no renameat2) replaces the bundle completely, and bundles get the
    umask's modes (a CI uploader running as another user can read them), not mkdtemp's 0700."""
    dist = copy_dist(good_dist, tmp_path)
    monkeypatch.setattr(atomic, "_renameat2", None)
    old_umask = os.umask(0o022)
    try:
        code, _, err = run_cli(export_args(tiny_ckpt, dist), capsys)
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert sorted(p.name for p in dist.iterdir()) == [f".{NAME}.lock", NAME]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (dist / NAME).iterdir()}
    assert (dist / NAME).stat().st_mode & 0o777 == 0o755 and set(modes.values()) == {0o644}, modes


def test_exchange_swaps_atomically(tmp_path: Path) -> None:
    if atomic._renameat2 is None:
        pytest.fail("renameat2 is expected on this Linux machine")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic.exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_random_checkpoint_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "checkpoints"
    home.mkdir()
    (home / "my-model.safetensors").write_bytes(b"precious")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["random-checkpoint", "125M", str(home), "--layers", "1"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "the folder is not empty; random-checkpoint writes a new folder and never replaces one" in err
    assert snapshot(tmp_path) == before
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["random-checkpoint", "125M", str(tmp_path / "file"), "--layers", "1"], capsys)
    assert code == 2 and "exists and is not a folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(["random-checkpoint", "125M", str(empty), "--layers", "1"], capsys)
    assert code == 0, err
    assert (empty / "config.json").is_file() and (empty / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_never_replaces_a_folder_that_is_not_a_bundle(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = tmp_path / "dist"
    (dist / NAME).mkdir(parents=True)
    (dist / NAME / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = run_cli(export_args(tiny_ckpt, dist), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "exists and is not a bundle (no manifest.json)" in err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != f"dist/.{NAME}.lock"} == before
