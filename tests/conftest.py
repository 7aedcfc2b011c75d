"""Shared fixtures: tiny configs, random models and checkpoints written in the formats users hold."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from mobilellm.exporter.threads import one_openmp_thread_outside_torch

one_openmp_thread_outside_torch()  # as the CLI sets up a process, before torch loads

import torch  # noqa: E402

from mobilellm.exporter.config import ModelConfig  # noqa: E402
from mobilellm.exporter.model import MobileLLM  # noqa: E402

torch.set_num_threads(max(1, int(os.environ.get("TEST_THREADS", "1"))))

TINY = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=160, max_context=128)


def tiny_config(**changes: object) -> ModelConfig:
    return TINY.replace(**changes)


def random_model(cfg: ModelConfig, seed: int = 0) -> MobileLLM:
    """A randomly initialised model whose norms are not all ones (so their gains matter)."""
    torch.manual_seed(seed)
    model = MobileLLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_model() -> MobileLLM:
    return random_model(TINY)


@pytest.fixture(params=["none", "immediate", "repeat_all", "reverse"])
def sharing(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY.vocab_size, (1, 12), generator=g)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` without following links: kind, mode, and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                out[str(path.relative_to(root))] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[str(path.relative_to(root))] = ("other", st.st_mode)
    return out


def default_model_dir() -> Path:
    from mobilellm.exporter.assets import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def invoke_cli(args: list[str]) -> int:
    """Run the real console entry point in-process; returns its exit code."""
    import sys

    from mobilellm.exporter.cli import main

    old = sys.argv
    sys.argv = ["mobilellm-export", *args]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """invoke_cli with captured output: (exit code, stdout, stderr)."""
    code = invoke_cli(args)
    out = capsys.readouterr()
    return code, out.out, out.err


DEFAULT_BUNDLE_TARGETS = ("executorch", "onnx", "coreml")


@pytest.fixture(scope="session")
def default_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded default model exported to every target at 4 bits through the real CLI, once per
    test run: xdist workers share it through a file lock in the run's common temp dir."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "default-bundles"
    with FileLock(str(shared / "default-bundles.lock")):
        done = out / "done.json"
        if not done.is_file():
            if (out / "failed.txt").is_file():
                pytest.fail((out / "failed.txt").read_text(), pytrace=False)
            out.mkdir(exist_ok=True)
            code = invoke_cli(["--target", "all", "--bits", "4", "--output", str(out), "--max-seq-len", "256"])
            if code != 0:
                message = f"`mobilellm-export --target all --bits 4` on the default model exited {code}"
                (out / "failed.txt").write_text(message)
                pytest.fail(message, pytrace=False)
            done.write_text(json.dumps({t: str(out / f"default-{t}-4bit") for t in DEFAULT_BUNDLE_TARGETS}))
        return {t: Path(p) for t, p in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def tiny_onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ONNX bundle at 8 bits (it passes parity), exported through the CLI; read-only for its users."""
    from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
    from mobilellm.exporter.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-onnx")
    ckpt = save_checkpoint(
        random_model(tiny_config(n_layers=1)), root / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )
    args = ["--checkpoint", str(ckpt), "--target", "onnx", "--bits", "8", "--max-seq-len", "32"]
    assert invoke_cli([*args, "--output", str(root / "dist")]) == 0
    return root / "dist" / "tiny-onnx-8bit"
