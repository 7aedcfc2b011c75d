"""`make bench` end to end on a tiny checkpoint: rows, ratios and the minimum-size figure are right.

Timings are not asserted (tests check correctness; `make bench` reports speed)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.speed import run_suite
from conftest import random_model, tiny_config
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.checkpoint import save_checkpoint


def test_bench_suite_rows(tmp_path: Path) -> None:
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path / "checkpoints" / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model")
    result = run_suite(
        tmp_path, ["tiny"], ["onnx", "coreml"], [4], threads=1, prompt_tokens=16, decode_tokens=4, max_seq_len=64
    )
    eager, onnx, coreml = result["rows"]
    assert (eager["target"], onnx["target"], coreml["target"]) == ("pytorch", "onnx", "coreml")

    # The smallest possible storage, counted from the model's own parameters: 4-bit linears, the
    # 8-bit shared embedding once, fp16 norm gains.
    minimum = 0.0
    for name, p in model.named_parameters():
        minimum += p.numel() * (2 if "norm" in name else 1 if "embed" in name else 0.5)
    assert onnx["minimum_bytes"] == coreml["minimum_bytes"] == int(minimum)

    bundle = tmp_path / "bundles" / "tiny-onnx-4bit"
    on_disk = sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith("model.onnx"))
    assert onnx["artifact_bytes"] == on_disk and 1.0 < onnx["size_over_minimum"] == on_disk / int(minimum)
    assert onnx["decode_tokens_per_s"] > 0 and onnx["decode_tokens"] == 4
    assert onnx["decode_speedup_vs_eager"] == onnx["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
    assert onnx["rss_vs_eager"] == onnx["rss_over_baseline_bytes"] / eager["rss_over_baseline_bytes"]

    assert coreml["not_timed"] and "decode_tokens_per_s" not in coreml  # no Core ML runtime off Apple OSes
    package = tmp_path / "bundles" / "tiny-coreml-4bit" / "model.mlpackage"
    assert coreml["artifact_bytes"] == sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert coreml["export_s"] > 0
    report = (tmp_path / "bench.md").read_text()
    assert "| tiny | coreml | 4 |" in report and "Not timed: Core ML" in report

    # What a user runs on a bundle: the figures in words, the CPU they were measured on; --json for scripts.
    from typer.testing import CliRunner

    from mobilellm.exporter.cli import app
    from mobilellm.exporter.measure import cpu_description

    shown = CliRunner().invoke(app, ["bench", str(bundle), "--decode-tokens", "4", "--prompt-tokens", "16"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("tiny-onnx-4bit: onnx, 4-bit, ")
    assert lines[1].split(None, 1)[1] == f"{cpu_description()}, 2 threads"
    assert [ln.split()[0] for ln in lines[2:]] == ["load", "prefill", "decode", "peak"]
    as_json = CliRunner().invoke(app, ["bench", str(bundle), "--json", "--threads", "1", "--decode-tokens", "4"])
    row = json.loads(as_json.output)
    assert row["threads"] == 1 and row["decode_tokens"] == 4 and row["cpu"] == cpu_description()
