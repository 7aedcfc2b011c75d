"""Bundle folders: artifact(s), tokenizer, golden parity data, reports and `manifest.json`.

Writing: a bundle is assembled in a temp dir beside its final place and swapped into place only when
complete (`exporter/atomic.py`), so an interrupted or failed export never leaves a half-written bundle.

Reading (`open_bundle`): a bundle may come from another machine, so nothing in it is trusted. The
folder holds regular files and folders only (no links, devices, pipes); `manifest.json` is bounded and
checked against its schema (the name is a plain identifier, every path a plain relative path); the
artifact, its weight files, the tokenizer and golden.npz are listed in `files` with their size and
sha256, and each is checked against them before any loader parses it; a file the manifest does not
list is refused; an ONNX model's external-data locations must name listed files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UserError, loading

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
MANIFEST_SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
GOLDEN_FILE = "golden.npz"
# Written next to the artifact by export and validate, never read by a loader: not in `files`
# (validation/reports.py ALL_REPORT_FILES: the reports, their pictures and the pictures' data).
REPORT_FILES = (
    "parity.json",
    "parity.md",
    "parity.junit.xml",
    "parity.png",
    "parity_plot.json",
    "size.png",
    "size.json",
)
# A bundle name: what lands in report titles, JUnit suite names and terminal output.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# One component of a path inside a bundle: no leading dot (so no '.', '..' or hidden files), no separators.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
# A report being written when its process was killed (`atomic.write_atomic`): never read, removed by the next write.
_REPORT_TEMP = re.compile(r"^\.(" + "|".join(map(re.escape, REPORT_FILES)) + r")\.tmp-\d+-[0-9a-f]{8}$")
MAX_MANIFEST_BYTES = 4 << 20
MAX_BUNDLE_ENTRIES = 10_000
# matplotlib renders the report pictures (their bytes depend on its version).
_VERSIONED_PACKAGES = (
    "mobilellm-export",
    "torch",
    "executorch",
    "torchao",
    "coremltools",
    "onnx",
    "onnxruntime",
    "matplotlib",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(bundle_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file, walking into directory artifacts such as .mlpackage."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        path = bundle_dir / name
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in paths:
            out[p.relative_to(bundle_dir).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def artifact_bytes(files: dict[str, dict[str, Any]], artifact: str) -> int:
    """Bytes of the artifact with its weight files (model.onnx + model.onnx.data, model.mlpackage/...)."""
    return sum(e["bytes"] for name, e in files.items() if name.startswith(artifact))


def tool_versions() -> dict[str, str]:
    versions = {}
    for pkg in _VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return versions


def printable(text: str, limit: int = 200) -> str:
    """`text` with control characters escaped (a file name or manifest value from elsewhere must not
    move the cursor or repaint a terminal line), cut to `limit` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed every check of `open_bundle`: `root` is its resolved folder."""

    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.root / name


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The manifest of a bundle that passed every check of `open_bundle`."""
    return open_bundle(bundle_dir).manifest


def open_bundle(bundle_dir: Path) -> Bundle:
    """Check a bundle from anywhere before anything in it is parsed (see the module docstring);
    every problem is a UserError naming the file."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: bundle not found (expected a folder written by mobilellm-export)")
    root = bundle_dir.resolve()
    tree, folders = _walk(root)
    path = root / MANIFEST
    if MANIFEST not in tree:
        raise UserError(f"{bundle_dir}: no {MANIFEST}; is this a bundle written by mobilellm-export?")
    if tree[MANIFEST].st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path}: {tree[MANIFEST].st_size} bytes, more than a manifest can hold; re-export the bundle")
    try:
        manifest = json.loads(_read_regular(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise UserError(f"{path}: invalid JSON ({why}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else "?"
        raise UserError(
            f"{path}: unsupported manifest (schema_version {printable(repr(version), 40)}); re-export with this version"
        )
    problem = manifest_schema_problem(manifest)
    if problem:
        raise UserError(f"{path}: does not match the manifest schema ({printable(problem, 300)}); re-export the bundle")

    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in files:
        _check_relpath(name, path, "files")
        if name in (MANIFEST, *REPORT_FILES):
            raise UserError(f"{path}: files lists {name}, which the tools rewrite; re-export the bundle")
    for key in ("artifact", "tokenizer"):
        _check_listed(manifest[key], files, path, key)
    for name in manifest["artifacts"]:
        _check_listed(name, files, path, "artifacts")

    unknown = sorted(
        n for n in tree if n not in files and n not in (MANIFEST, *REPORT_FILES) and not _REPORT_TEMP.match(n)
    )
    listed_folders = {str(p) for name in files for p in PurePosixPath(name).parents if str(p) != "."}
    unknown += sorted(f + "/" for f in folders if f not in listed_folders)
    if unknown:
        shown = ", ".join(printable(n, 80) for n in unknown[:3]) + (
            f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        )
        raise UserError(
            f"{bundle_dir}: holds file(s) its manifest does not list: {shown}; a bundle holds only what its manifest lists"
        )
    for name, entry in sorted(files.items()):
        if name not in tree:
            raise UserError(f"{bundle_dir}: {name} is missing from the bundle; re-export it")
        if tree[name].st_size != entry["bytes"]:
            raise UserError(
                f"{root / name}: {tree[name].st_size} bytes, manifest.json recorded {entry['bytes']}: "
                "the file was changed or damaged after export; re-export the bundle"
            )
    for name, entry in sorted(files.items()):
        if sha256_file(root / name) != entry["sha256"]:
            raise UserError(
                f"{root / name}: its sha256 differs from the one manifest.json recorded: the file was changed "
                "or damaged after export, and is not loaded; re-export the bundle"
            )
    if manifest["target"] == "onnx":
        _check_onnx_external_data(root, manifest["artifact"], files)
    return Bundle(root, manifest)


def _walk(root: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Regular files (relative path -> lstat) and folders under `root`; anything else is refused."""
    files: dict[str, os.stat_result] = {}
    folders: list[str] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            entries = list(os.scandir(root / rel if rel else root))
        except OSError as exc:
            raise UserError(f"{root / rel}: cannot read the bundle folder ({exc.strerror})") from None
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if len(files) + len(folders) >= MAX_BUNDLE_ENTRIES:
                raise UserError(f"{root}: more than {MAX_BUNDLE_ENTRIES} entries; this is not a bundle")
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise UserError(f"{root}: cannot read {printable(name, 120)} ({exc.strerror})") from None
            if stat.S_ISLNK(st.st_mode):
                raise UserError(
                    f"{root}: {printable(name, 120)} is a symbolic link; a bundle holds regular files only, "
                    "so that nothing is read or written outside it"
                )
            if stat.S_ISDIR(st.st_mode):
                folders.append(name)
                pending.append(name)
            elif stat.S_ISREG(st.st_mode):
                files[name] = st
            else:
                raise UserError(
                    f"{root}: {printable(name, 120)} is not a regular file; a bundle holds regular files only"
                )
    return files, folders


def _read_regular(path: Path) -> bytes:
    """The bytes of `path`, refusing a link put there since the bundle was walked."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UserError(f"{path}: not a regular file")
        return fh.read(MAX_MANIFEST_BYTES + 1)


def _check_relpath(name: Any, where: Path, key: str) -> str:
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_COMPONENT.match(p) for p in parts):
        raise UserError(
            f"{where}: {key} names {printable(repr(name), 120)}; every path in a bundle is relative and inside it "
            "(letters, digits, '._+-', no '..', no absolute path); re-export the bundle"
        )
    return name


def _check_listed(name: Any, files: dict[str, Any], where: Path, key: str) -> None:
    _check_relpath(name, where, key)
    if name not in files and not any(f.startswith(name + "/") for f in files):
        raise UserError(f"{where}: {key} {name} is not listed in files with its sha256; re-export the bundle")


def _check_onnx_external_data(root: Path, artifact: str, files: dict[str, dict[str, Any]]) -> None:
    """Every external-data location in the ONNX model names a listed file of the bundle, and every
    range lies inside it: checked here before onnxruntime opens anything (older onnxruntime releases
    follow any location, and even newer ones resolve it against the model folder only)."""
    import onnx

    model_path = root / artifact
    with loading(model_path, "ONNX model", "re-export the bundle"):
        proto = onnx.load(str(model_path), load_external_data=False)
    base = PurePosixPath(artifact).parent
    tensors = [*_onnx_tensors(proto.graph)]
    for function in proto.functions:
        tensors += _onnx_node_tensors(function.node)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{model_path}: tensor {printable(tensor.name, 80)}"
        parts = location.split("/")
        if not all(_COMPONENT.match(p) for p in parts):
            raise UserError(
                f"{where} keeps its data at {printable(repr(location), 120)}, outside the bundle or not a plain relative path; "
                "the model is refused"
            )
        name = str(base / location) if str(base) != "." else location
        if name not in files:
            raise UserError(
                f"{where} keeps its data in {printable(location, 120)}, which manifest.json does not list with its sha256; "
                "the model is refused"
            )
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise UserError(f"{where}: external-data offset/length are not integers; the model is refused") from None
        if offset < 0 or length < 0 or offset + length > files[name]["bytes"]:
            raise UserError(f"{where}: external data range lies outside {name}; the model is refused")


def _onnx_tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _onnx_node_tensors(graph.node)


def _onnx_node_tensors(nodes: Any) -> Any:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_tensors(sub)


def manifest_schema_problem(manifest: dict[str, Any]) -> str | None:
    """The first way `manifest` breaks exporter/schemas/manifest.schema.json, or None.

    Apps parse manifest.json with no error handling of their own beyond the schema's promises, so
    every reader (validate, bench, runtimes) and the exporter itself check it."""
    import jsonschema

    schema = _schema()
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(manifest))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"at {where}: {error.message}"


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(MANIFEST_SCHEMA.read_text())
