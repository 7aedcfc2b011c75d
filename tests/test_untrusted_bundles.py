"""`validate` reads bundles from elsewhere: every malicious bundle is refused with exit 2 and one line,
and nothing outside the bundle (or in it) changes. One tiny ONNX bundle is exported once; each case
copies it and does what an attacker who controls the whole bundle folder (manifest included) can."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from conftest import run_cli, snapshot
from mobilellm.exporter.bundle import MANIFEST, sha256_file
from mobilellm.validation.reports import write_reports


@pytest.fixture
def good_bundle(tiny_onnx_bundle: Path) -> Path:
    """A tiny ONNX bundle at 8 bits (it passes parity); cases copy it before changing anything."""
    return tiny_onnx_bundle


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def rehash(bundle: Path, name: str) -> None:
    """Record a changed file's size and sha256 in the manifest, as whoever made the bundle can."""
    manifest = manifest_of(bundle)
    manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    write_manifest(bundle, manifest)


def golden_members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle / "golden.npz") as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def rewrite_golden(bundle: Path, members: dict[str, bytes]) -> None:
    """golden.npz holding `members` (raw .npy bytes), its new sha256 in the manifest."""
    with zipfile.ZipFile(bundle / "golden.npz", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    rehash(bundle, "golden.npz")


def set_onnx_location(bundle: Path, location: str, offset: int | None = None) -> None:
    """Point the first external initializer of model.onnx at `location` (and re-list its sha256)."""
    path = bundle / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    path.write_bytes(proto.SerializeToString())
    rehash(bundle, "model.onnx")


# ------------------------------------------------------------------ the cases: (mutate, expected message)
def _report_link(b: Path, outside: Path) -> str:
    (b / "parity.md").unlink()
    (b / "parity.md").symlink_to(outside / "victim.txt")
    return "parity.md is a symbolic link"


def _tokenizer_link(b: Path, outside: Path) -> str:
    (b / "tokenizer.model").unlink()
    (b / "tokenizer.model").symlink_to(outside / "victim.txt")
    return "tokenizer.model is a symbolic link"


def _artifact_parent(b: Path, outside: Path) -> str:
    shutil.copy(b / "model.onnx", outside / "model.onnx")
    manifest = manifest_of(b)
    manifest["artifact"] = "../outside/model.onnx"
    write_manifest(b, manifest)
    return "artifact names '../outside/model.onnx'; every path in a bundle is relative and inside it"


def _artifact_absolute(b: Path, outside: Path) -> str:
    shutil.copy(b / "model.onnx", outside / "model.onnx")
    manifest = manifest_of(b)
    manifest["artifact"] = str(outside / "model.onnx")
    write_manifest(b, manifest)
    return "every path in a bundle is relative and inside it"


def _files_parent(b: Path, outside: Path) -> str:
    manifest = manifest_of(b)
    manifest["files"]["../outside/victim.txt"] = {"sha256": "0" * 64, "bytes": 6}
    write_manifest(b, manifest)
    return "files names '../outside/victim.txt'"


def _artifact_unlisted(b: Path, outside: Path) -> str:
    manifest = manifest_of(b)
    manifest["artifact"] = "other.onnx"
    write_manifest(b, manifest)
    return "artifact other.onnx is not listed in files with its sha256"


def _golden_unlisted(b: Path, outside: Path) -> str:
    manifest = manifest_of(b)
    del manifest["files"]["golden.npz"]
    write_manifest(b, manifest)
    return "holds file(s) its manifest does not list: golden.npz"


def _unknown_file(b: Path, outside: Path) -> str:
    (b / "run_me.py").write_text("import os\n")
    return "holds file(s) its manifest does not list: run_me.py"


def _fifo(b: Path, outside: Path) -> str:
    os.mkfifo(b / "parity.json.new")
    return "parity.json.new is not a regular file"


def _escape_codes_in_name(b: Path, outside: Path) -> str:
    manifest = manifest_of(b)
    manifest["name"] = "x\x1b[1A\x1b[2K\x1b[32mPASS\x1b[0m"
    write_manifest(b, manifest)
    return "does not match the manifest schema (at name:"


def _sha_checked_before_parse(b: Path, outside: Path) -> str:
    size = (b / "golden.npz").stat().st_size
    (b / "golden.npz").write_bytes(b"\0" * size)  # same size, not a zip: parsed first, it would say "corrupt"
    return "golden.npz: its sha256 differs from the one manifest.json recorded"


def _golden_truncated(b: Path, outside: Path) -> str:
    data = (b / "golden.npz").read_bytes()
    (b / "golden.npz").write_bytes(data[: len(data) // 3])
    rehash(b, "golden.npz")
    return "golden.npz: corrupt golden data"


def _golden_huge_shape(b: Path, outside: Path) -> str:
    members = golden_members(b)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (7, 10**9)})
    members["reference_logits.npy"] = buf.getvalue() + b"\0" * 64
    rewrite_golden(b, members)
    return "corrupt golden data (reference_logits is <f4[7, 1000000000], expected <f4[7, 160])"


def _golden_deflate_bomb(b: Path, outside: Path) -> str:
    members = golden_members(b)
    header = members["reference_logits.npy"][: -7 * 160 * 4]  # a correct header, then 256 MB of zeros
    with zipfile.ZipFile(b / "golden.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if name != "reference_logits.npy":
                zf.writestr(name, data)
                continue
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                fh.write(header)
                for _ in range(256):
                    fh.write(bytes(1 << 20))
    rehash(b, "golden.npz")
    assert (b / "golden.npz").stat().st_size < 2 << 20
    return f"corrupt golden data (reference_logits holds {len(header) + (256 << 20)} bytes, its header implies"


def _token_out_of_vocab(b: Path, outside: Path) -> str:
    members = golden_members(b)
    tokens = np.load(io.BytesIO(members["tokens.npy"]))
    tokens[3] = 160 + 7
    members["tokens.npy"] = npy(tokens)
    rewrite_golden(b, members)
    return "corrupt golden data (tokens holds ids outside the vocabulary 0..159)"


def _onnx_external_outside(b: Path, outside: Path) -> str:
    shutil.copy(b / "model.onnx.data", outside / "model.onnx.data")
    set_onnx_location(b, "../outside/model.onnx.data")
    return "keeps its data at '../outside/model.onnx.data', outside the bundle or not a plain relative path"


def _onnx_external_dev_zero(b: Path, outside: Path) -> str:
    set_onnx_location(b, "/dev/zero")
    return "keeps its data at '/dev/zero', outside the bundle"


def _onnx_external_range(b: Path, outside: Path) -> str:
    set_onnx_location(b, "model.onnx.data", offset=1 << 40)
    return "external data range lies outside model.onnx.data"


CASES = {
    f.__name__.lstrip("_"): f
    for f in (
        _report_link,
        _tokenizer_link,
        _artifact_parent,
        _artifact_absolute,
        _files_parent,
        _artifact_unlisted,
        _golden_unlisted,
        _unknown_file,
        _fifo,
        _escape_codes_in_name,
        _sha_checked_before_parse,
        _golden_truncated,
        _golden_huge_shape,
        _golden_deflate_bomb,
        _token_out_of_vocab,
        _onnx_external_outside,
        _onnx_external_dev_zero,
        _onnx_external_range,
    )
}


@pytest.mark.parametrize("case", list(CASES))
def test_malicious_bundle_is_refused_and_nothing_changes(
    case: str, good_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    shutil.copytree(good_bundle, bundle)
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me\n")
    expected = CASES[case](bundle, outside)
    before = snapshot(tmp_path)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, out, err = run_cli(["validate", str(bundle)], capsys)
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert "\x1b" not in err and "\x1b" not in out
    assert snapshot(tmp_path) == before  # no report written, nothing outside touched
    assert (outside / "victim.txt").read_text() == "keep me\n"
    # Refused from headers and sizes: no allocation of what a header claims, no inflating a bomb.
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB


def test_reports_replace_links_instead_of_writing_through_them(good_bundle: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "parity.md").symlink_to(victim)
    report = json.loads((good_bundle / "parity.json").read_text())
    write_reports(report, reports)
    assert victim.read_text() == "keep me\n"
    assert not (reports / "parity.md").is_symlink() and "PASS" in (reports / "parity.md").read_text()
    assert sorted(p.name for p in reports.iterdir()) == [
        "parity.json",
        "parity.junit.xml",
        "parity.md",
        "parity.png",
        "parity_plot.json",
    ]


def test_bundle_threads_do_not_set_the_validating_machines(good_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobilellm.exporter.targets import onnx as onnx_target

    monkeypatch.delenv("MOBILELLM_ORT_THREADS", raising=False)
    manifest = {**manifest_of(good_bundle), "threads": 64}
    runtime = onnx_target.open_runtime(good_bundle, manifest)
    assert runtime.session.get_session_options().intra_op_num_threads == 0  # onnxruntime's own default


def _make_read_only(path: Path) -> Callable[[], None]:
    """Read-only as the file system enforces it even for root: chmod for a user, the immutable
    attribute (chattr +i) as root. Returns the undo."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_bundle_needs_a_report_dir(
    good_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(good_bundle, bundle)
    before = snapshot(tmp_path)
    undo = _make_read_only(bundle)
    try:
        code, out, err = run_cli(["validate", str(bundle)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "cannot write there" in err and "the bundle is read-only: pass --report-dir DIR" in err, err
        assert snapshot(tmp_path) == before
        code, out, err = run_cli(["validate", str(bundle), "--report-dir", str(tmp_path / "reports")], capsys)
        assert code == 0, err
        assert "PASS" in out and json.loads((tmp_path / "reports" / "parity.json").read_text())["passed"]
    finally:
        undo()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("reports")} == before


def test_core_ml_evaluator_reads_nothing_outside_its_package(tmp_path: Path) -> None:
    from mobilellm.exporter.targets.coreml_eval import _inside, read_spec

    package = tmp_path / "model.mlpackage"
    (package / "Data" / "weights").mkdir(parents=True)
    (package / "Data" / "weights" / "weight.bin").write_bytes(b"\0" * 64)
    (package / "Data" / "weights" / "link.bin").symlink_to("/dev/zero")
    assert _inside(package, package / "Data" / "weights" / "weight.bin").is_file()
    for bad in ("/dev/zero", "../../outside.bin", "weights/link.bin", "weights/../../../x"):
        with pytest.raises(ValueError, match="outside the package or not a regular file"):
            _inside(package, package / "Data" / bad)
    manifest = {"rootModelIdentifier": "m", "itemInfoEntries": {"m": {"path": "../../etc/passwd"}}}
    (package / "Manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the package"):
        read_spec(package)
