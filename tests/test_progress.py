"""Feedback on long work: one line per finished stage with its time in logs; third-party bars silenced."""

from __future__ import annotations

import pytest
from tqdm import tqdm

from mobilellm.exporter.progress import quiet_progress_bars, stage


def test_stage_lines_in_logs(capsys: pytest.CaptureFixture[str]) -> None:
    with stage("[onnx] building"):
        pass
    with pytest.raises(ValueError), stage("[onnx] saving"):
        raise ValueError("disk full")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[onnx] building", "[onnx] saving"]
    assert lines[0].endswith("s") and lines[1].endswith("s (failed)")


def test_third_party_bars_are_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    with quiet_progress_bars():
        for _ in tqdm(range(50), desc="Running MIL backend_mlprogram pipeline"):
            pass
    assert capsys.readouterr().err == ""


def test_a_core_ml_export_log_has_no_progress_bars(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from conftest import run_cli

    args = ["--target", "coreml", "--bits", "8", "--max-seq-len", "32", "--no-parity", "--output", str(tmp_path)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "Running MIL" not in err and "Converting PyTorch Frontend" not in err
    assert "[coreml] ct.convert (MIL, fp16 passes): " in err
