"""`--target all` exports in two processes on two cores (the ExecuTorch lowering is single-threaded
Python): the bundles must be the ones a single process writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import random_model, tiny_config
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.checkpoint import save_checkpoint
from mobilellm.exporter.errors import ParityError, UserError
from mobilellm.exporter.pipeline import check_export_memory, export_groups, export_jobs, run_export
from mobilellm.exporter.recipe import export_options_from_recipe


def test_export_groups_put_the_longest_target_alone():
    assert export_groups(["executorch", "coreml", "onnx"], 2) == [["executorch"], ["coreml", "onnx"]]
    assert export_groups(["onnx", "coreml"], 2) == [["coreml"], ["onnx"]]
    assert export_groups(["executorch", "coreml", "onnx"], 1) == [["executorch", "coreml", "onnx"]]


def test_jobs_follow_the_request_and_the_target_count():
    class Cfg:
        def unique_params(self) -> int:
            return 1000

    assert export_jobs(1, Cfg(), 3) == 1
    assert export_jobs(8, Cfg(), 2) == 2
    assert export_jobs(None, Cfg(), 1) == 1


def _export(checkpoint: Path, out: Path, jobs: int) -> dict[str, bytes]:
    options = export_options_from_recipe(None, checkpoint=checkpoint, output=out, max_seq_len=32)
    options.targets = ["executorch", "onnx", "coreml"]
    options.jobs = jobs
    try:
        run_export(options)
    except ParityError:
        pass  # a random 4-bit tiny model may miss the thresholds; its bundles (NAME.failed) are still written
    # (the hidden .NAME.lock files stay beside the bundles by design)
    return {
        str(f.relative_to(out)): f.read_bytes()
        for f in sorted(out.rglob("*"))
        if f.is_file() and not f.relative_to(out).parts[0].startswith(".")
    }


def test_two_processes_write_the_bundles_one_process_writes(tmp_path):
    ckpt = save_checkpoint(
        random_model(tiny_config(n_layers=1)), tmp_path / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model"
    )
    parallel = _export(ckpt, tmp_path / "parallel", 2)
    folders = {Path(name).parts[0].removesuffix(".failed") for name in parallel}
    assert folders == {f"tiny-{t}-4bit" for t in ("executorch", "onnx", "coreml")}
    assert parallel == _export(ckpt, tmp_path / "serial", 1)


def test_an_export_larger_than_the_machines_ram_is_refused_up_front():
    class Huge:
        def unique_params(self) -> int:
            return 10**12  # 4 TB of fp32 weights

    with pytest.raises(UserError, match=r"needs about .* of RAM and this machine has"):
        check_export_memory(Huge())
    check_export_memory(tiny_config())  # a tiny model fits anywhere


def test_the_memory_check_knows_which_targets_need_more() -> None:
    from mobilellm.exporter.pipeline import PROCESS_BASE_BYTES, PROCESS_BYTES_PER_WEIGHT_BYTE, _meminfo

    total = _meminfo("MemTotal")
    assert total is not None  # Linux

    class Between:  # fits ExecuTorch's measured line, not Core ML's
        def unique_params(self) -> int:
            factor = (PROCESS_BYTES_PER_WEIGHT_BYTE["executorch"] + PROCESS_BYTES_PER_WEIGHT_BYTE["coreml"]) / 2
            return int((total - PROCESS_BASE_BYTES) / (4 * factor))

    check_export_memory(Between(), ["executorch"])
    with pytest.raises(UserError, match=r"to executorch, coreml, onnx needs about .* --target executorch alone fits"):
        check_export_memory(Between(), ["executorch", "coreml", "onnx"])
