"""Report pictures: every bundle's parity.png and size.png, and make bench's bench.png, exist, are valid
PNGs, the data written beside each equals what the reports hold, and the bytes do not depend on the
machine's matplotlib settings (reproducible bundles stay byte-identical: tests/test_reproducible.py)."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter import bundle as bundle_module
from mobilellm.exporter.assets import DEFAULT_MODEL_DIR
from mobilellm.exporter.bundle import MANIFEST, open_bundle
from mobilellm.exporter.checkpoint import load_checkpoint, save_checkpoint
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.mixed_precision import ROLE_OF_LINEAR
from mobilellm.exporter.quantize import QuantMethod, QuantScheme, WeightQuant, calibration_windows, quantize_model
from mobilellm.exporter.sensitivity import sensitivity_windows
from mobilellm.validation import plots, reports


def check_png(path: Path) -> tuple[int, int]:
    """A PNG: the signature, an IHDR first whose CRC holds, and an image Pillow decodes. Returns (w, h)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert b"tEXtSoftware" not in data and b"tIME" not in data  # no version or time stamped in
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        img.load()
        assert img.size == (width, height) and img.format == "PNG"
    assert 400 < width < 2000 and 150 < height < 2000
    return width, height


@pytest.fixture
def bundle(tiny_onnx_bundle: Path) -> Path:
    return tiny_onnx_bundle


def _check_report_pictures(folder: Path, manifest: dict) -> None:
    report = json.loads((folder / "parity.json").read_text())
    check_png(folder / "parity.png")
    plot = json.loads((folder / "parity_plot.json").read_text())
    assert plot["steps"] == report["steps"] and plot["thresholds"] == report["thresholds"]
    assert [r["step"] for r in plot["steps"]["reference"]][:2] == ["prefill", "decode_1"]
    assert plot["passed"] == report["passed"] and plot["bundle"] == report["bundle"]
    check_png(folder / "size.png")
    assert json.loads((folder / "size.json").read_text()) == manifest["size"]
    md = (folder / "parity.md").read_text()
    assert "](parity.png)" in md and "](size.png)" in md


def test_bundle_reports_carry_their_pictures(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    _check_report_pictures(bundle, manifest)
    # Report files, rewritten by validate: allowed in a bundle, never listed with a sha256.
    assert not {"parity.png", "parity_plot.json", "size.png", "size.json"} & set(manifest["files"])
    open_bundle(bundle)
    assert "matplotlib" in manifest["tool"]


def test_validate_report_dir_writes_the_pictures(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["validate", str(bundle), "--report-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reports.ALL_REPORT_FILES)
    _check_report_pictures(tmp_path, json.loads((bundle / MANIFEST).read_text()))
    # Same artifact, same golden data: the same pictures, byte for byte.
    for name in ("parity.png", "size.png"):
        assert (tmp_path / name).read_bytes() == (bundle / name).read_bytes(), name


def test_bundle_reader_allows_exactly_the_report_files() -> None:
    assert set(bundle_module.REPORT_FILES) == set(reports.ALL_REPORT_FILES)
    assert bundle_module._REPORT_TEMP.match(".parity.png.tmp-12-0123abcd")


def test_marked_points_are_the_steps_over_their_thresholds() -> None:
    steps = [{"step": "prefill", "positions": 20, "kl_divergence": 0.01, "top1_decisive": 0.9, "top1_agreement": 0.9}]
    steps += [
        {"step": f"decode_{i}", "positions": 1, "kl_divergence": 0.05 * i, "top1_decisive": float(i != 2)}
        | {"top1_agreement": float(i != 2)}
        for i in (1, 2, 3)
    ]
    report = {
        "bundle": "b",
        "passed": False,
        "thresholds": {"reference.kl_divergence": 0.12, "reference.top1_decisive": 0.85, "twin.ppl_delta": 0.02},
        "steps": {"reference": steps, "twin": steps},
    }
    data = plots.parity_plot_data(report)
    assert [(m["against"], m["metric"], m["step"]) for m in data["marked"]] == [
        ("reference", "kl_divergence", "decode_3"),
        ("reference", "top1_decisive", "decode_2"),
    ]
    assert plots.parity_png(data)[:8] == b"\x89PNG\r\n\x1a\n"


_RENDER = """
import sys
from pathlib import Path
from mobilellm.validation import plots
import json
data = json.loads(Path(sys.argv[1]).read_text())
Path(sys.argv[2]).write_bytes(plots.parity_png(data))
"""


def test_pictures_do_not_depend_on_the_machines_matplotlib_settings(bundle: Path, tmp_path: Path) -> None:
    """Another process with a hostile matplotlibrc (fonts, sizes, dpi, style) renders the same bytes."""
    config = tmp_path / "mplconfig"
    config.mkdir()
    (config / "matplotlibrc").write_text(
        "font.family: serif\nfont.size: 17\nfigure.dpi: 300\nsavefig.dpi: 50\naxes.facecolor: black\n"
        "lines.linewidth: 5\nsvg.hashsalt: other\n"
    )
    out = tmp_path / "parity.png"
    env = {**os.environ, "MPLCONFIGDIR": str(config), "MPLBACKEND": "svg"}
    subprocess.run([sys.executable, "-c", _RENDER, str(bundle / "parity_plot.json"), str(out)], check=True, env=env)
    assert out.read_bytes() == (bundle / "parity.png").read_bytes()


def test_bench_chart_on_synthetic_rows(tmp_path: Path) -> None:
    from bench.speed import bench_markdown, write_bench_chart

    rows = [
        {"preset": "125M", "target": "pytorch", "bits": 32, "prefill_tokens_per_s": 900.0}
        | {"decode_tokens_per_s": 30.0, "artifact_bytes": 500 << 20},
        {"preset": "125M", "target": "executorch", "bits": 4, "prefill_tokens_per_s": 1500.5}
        | {"decode_tokens_per_s": 80.25, "artifact_bytes": 80 << 20, "export_s": 60.0},
        {"preset": "125M", "target": "executorch export_llama (peer)", "bits": 4, "prefill_tokens_per_s": 1400.0}
        | {"decode_tokens_per_s": 75.0, "artifact_bytes": 90 << 20},
        {"preset": "125M", "target": "coreml", "bits": 4, "artifact_bytes": 70 << 20, "not_timed": "no Core ML"},
    ]
    caption = "CPU: x86_64 [avx2, fma]; 2 threads"
    png, data = write_bench_chart(rows, tmp_path, caption)
    assert (png.name, data.name) == ("bench.png", "bench_chart.json")
    check_png(png)
    chart = json.loads(data.read_text())
    assert chart["caption"] == caption
    assert chart["rows"] == [{k: r.get(k) for k in plots.BENCH_FIELDS} for r in rows]
    assert "| 125M | coreml | 4 |" in bench_markdown(rows)
    (tmp_path / "again").mkdir()
    assert write_bench_chart(rows, tmp_path / "again", caption)[0].read_bytes() == png.read_bytes()


def test_sensitivity_of_a_tiny_shared_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`inspect --sensitivity`: one row per linear layer and per application of a shared block, ranked,
    the chart a valid PNG and its data the rows printed."""
    cfg = tiny_config(n_layers=2, sharing="immediate", share_embedding=False)
    ckpt = save_checkpoint(random_model(cfg), tmp_path / "tiny", tokenizer=DEFAULT_MODEL_DIR / "tokenizer.model")
    args = ["inspect", str(ckpt), "--sensitivity", "--bits", "4", "--tokens", "64", "--quant-method", "rtn"]
    code, out, err = run_cli([*args, "--output", str(tmp_path / "s")], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    check_png(tmp_path / "s" / "sensitivity.png")
    rows = data["rows"]
    # 2 blocks x 7 linears, each rounded in all its applications, in its first alone, in its second alone; lm_head.
    assert len(rows) == 2 * 7 * 3 + 1 and {r["application"] for r in rows} == {None, 0, 1, 2, 3}
    assert [r["delta"] for r in rows] == sorted((r["delta"] for r in rows), reverse=True)
    assert data["bits"] == 4 and data["tokens"] == 64 and data["perplexity"] > 1
    top = rows[0]["layer"] + ("" if rows[0]["application"] is None else f" @{rows[0]['application']}")
    assert f"     1  {top}" in out
    for r in rows:
        assert abs(r["perplexity"] / data["perplexity"] - 1 - r["delta"]) < 1e-9
    # The measurement reruns only the block applications after the probed one: every whole-layer row
    # equals the reference model's own full forward pass with that weight rounded.
    loaded = load_checkpoint(ckpt, None)
    model, windows = loaded.model.eval(), sensitivity_windows(loaded, 64)

    def perplexity() -> float:
        with torch.no_grad():
            nll = sum(float(F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="sum")) for w in windows)
        return math.exp(nll / sum(len(w) - 1 for w in windows))

    assert perplexity() == pytest.approx(data["perplexity"], rel=1e-5)
    for r in (r for r in rows if r["application"] is None):
        linear = model.get_submodule(r["layer"])
        original = linear.weight.detach().clone()
        with torch.no_grad():
            linear.weight.copy_(
                QuantMethod.named("rtn").apply(WeightQuant(bits=4, group_size=32), False).fake(original)
            )
        assert perplexity() == pytest.approx(r["perplexity"], rel=1e-5), r["layer"]
        with torch.no_grad():
            linear.weight.copy_(original)

    # The default ranks the export's own rounding: GPTQ on the export model's calibration Hessians. A row
    # equals the full forward pass with the weight the export's quantizer stores for that layer.
    code, _, err = run_cli(
        ["inspect", str(ckpt), "--sensitivity", "--tokens", "64", "--output", str(tmp_path / "g")], capsys
    )
    assert code == 0, err
    gptq = json.loads((tmp_path / "g" / "sensitivity.json").read_text())
    assert (gptq["method"], data["method"]) == ("gptq", "rtn")
    method = QuantMethod.named("gptq")
    linear_quant = method.apply(WeightQuant(bits=4, group_size=32), False)
    export_model = ExportModel.from_reference(model, ExportSettings(max_seq_len=128, fuse=False))
    stored = quantize_model(
        export_model,
        QuantScheme(linear=linear_quant, embedding=linear_quant, output=linear_quant),
        calibration_windows(loaded, method, 128),
    )
    for r in (r for r in gptq["rows"] if r["application"] is None and r["layer"] != "lm_head"):
        _, block, name = r["layer"].split(".", 2)
        linear = model.get_submodule(r["layer"])
        original = linear.weight.detach().clone()
        with torch.no_grad():
            linear.weight.copy_(stored.dequantized(f"blocks.{block}.{ROLE_OF_LINEAR[name][0]}.weight"))
        assert perplexity() == pytest.approx(r["perplexity"], rel=1e-5), r["layer"]
        with torch.no_grad():
            linear.weight.copy_(original)


def test_text_is_set_in_matplotlibs_own_font() -> None:
    """A system font of the same name (Debian's DejaVu) would change the pixels from machine to machine."""
    import matplotlib
    from matplotlib import font_manager

    with plots.RenderSettings():
        family = matplotlib.rcParams["font.family"]
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert Path(path).resolve().is_relative_to(Path(matplotlib.get_data_path()).resolve()), path
