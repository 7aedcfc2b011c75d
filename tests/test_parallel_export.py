"""`--target all` exports in two processes on two cores (the ExecuTorch lowering is single-threaded
Python): the bundles must be the ones a single process writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

from mobilellm.exporter.pipeline import export_groups, export_jobs, run_export
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


def _export(out: Path, jobs: int) -> dict[str, bytes]:
    options = export_options_from_recipe(None, target="onnx", output=out, max_seq_len=128)
    options.targets = ["onnx", "coreml"]
    options.jobs = jobs
    bundles = run_export(options)
    assert [b.name for b in bundles] == ["default-onnx-4bit", "default-coreml-4bit"]
    return {
        str(f.relative_to(out)): f.read_bytes()
        for b in bundles
        for f in sorted(b.rglob("*"))
        if f.is_file()
    }


def test_two_processes_write_the_bundles_one_process_writes(tmp_path):
    assert _export(tmp_path / "parallel", 2) == _export(tmp_path / "serial", 1)
