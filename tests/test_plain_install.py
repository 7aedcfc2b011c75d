"""A plain `pip install` works like `make export`: the wheel, installed without extras into a fresh venv,
exports the embedded model to ONNX with a complete bundle (tokenizer.json included) and validates it.

Long (a venv with torch and the runtimes): it runs on its own xdist worker beside the rest of the suite."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("plain_install")


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=1200, **kwargs)  # type: ignore[call-overload]


def test_wheel_in_a_fresh_venv_exports_a_complete_bundle(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)])
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("mobilellm_export-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    extras = _run([str(python), "-m", "pip", "list", "--format=json"])
    names = {p["name"].lower() for p in json.loads(extras.stdout)}
    assert "pytest" not in names and "ruff" not in names  # no test extras: what a user gets

    cli = env_dir / "bin" / "mobilellm-export"
    out = tmp_path / "dist"
    exported = _run([str(cli), "--target", "onnx", "--bits", "4", "--output", str(out)], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    bundle = out / "default-onnx-4bit"
    manifest = json.loads((bundle / "manifest.json").read_text())
    expected = {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {"tokenizer.model", "golden.npz"} <= set(manifest["files"])
    assert manifest["parity"]["passed"]
    # nothing of the package came from the source tree: the installed copy ran
    where = _run([str(python), "-c", "import mobilellm.exporter as m; print(m.__file__)"], cwd=tmp_path)
    assert str(env_dir) in where.stdout, where.stdout

    validated = _run([str(cli), "validate", str(bundle), "--report-dir", str(tmp_path / "reports")], cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr[-2000:]
    generated = _run([str(cli), "generate", str(bundle), "And God said", "--max-new-tokens", "8"], cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
