"""Bundle folders: artifact(s), tokenizer, golden parity data, reports and `manifest.json`.

A bundle is assembled in a temp dir beside its final place and renamed into place only when
complete, so an interrupted or failed export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
MANIFEST_SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
_VERSIONED_PACKAGES = ("mobilellm-export", "torch", "executorch", "torchao", "coremltools", "onnx", "onnxruntime")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
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


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: bundle not found (expected a folder written by mobilellm-export)")
    if not path.is_file():
        raise UserError(f"{bundle_dir}: no {MANIFEST}; is this a bundle written by mobilellm-export?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise UserError(
            f"{path}: unsupported manifest (schema_version {manifest.get('schema_version') if isinstance(manifest, dict) else '?'}); re-export with this version"
        )
    problem = manifest_schema_problem(manifest)
    if problem:
        raise UserError(f"{path}: does not match the manifest schema ({problem}); re-export the bundle")
    return manifest


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


def integrity_problems(bundle_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files whose bytes differ from what the manifest recorded at export."""
    problems = []
    for name, entry in manifest.get("files", {}).items():
        path = bundle_dir / name
        if not path.is_file():
            raise UserError(f"{bundle_dir}: {name} is missing from the bundle; re-export it")
        if sha256_file(path) != entry["sha256"]:
            problems.append(name)
    return problems


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it atomically replaces `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
