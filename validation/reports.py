"""Parity reports: `parity.json` (versioned schema), `parity.md` (for reviewers, with its pictures),
`parity.junit.xml` (for CI); `parity.png` (per step, its data in `parity_plot.json`) and, given the
manifest's `size`, `size.png` (where the bytes go, its data in `size.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from mobilellm.exporter.atomic import remove_stale_temps, write_atomic

from .parity import ParityResult
from .plots import parity_plot_data, parity_png, plot_json, size_png

REPORT_SCHEMA = "mobilellm-export/parity"
REPORT_SCHEMA_VERSION = 2
REPORT_FILES = ("parity.json", "parity.md", "parity.junit.xml")
PARITY_PICTURE, PARITY_PICTURE_DATA = "parity.png", "parity_plot.json"
SIZE_PICTURE, SIZE_PICTURE_DATA = "size.png", "size.json"
# Every file `write_reports` may write (exporter/bundle.py REPORT_FILES allows the same in a bundle).
ALL_REPORT_FILES = (*REPORT_FILES, PARITY_PICTURE, PARITY_PICTURE_DATA, SIZE_PICTURE, SIZE_PICTURE_DATA)
SCHEMA_PATH = Path(__file__).resolve().parent / "parity.schema.json"


def report_dict(result: ParityResult, meta: dict[str, Any], thresholds: dict[str, float]) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        **meta,
        "thresholds": dict(sorted(thresholds.items())),
        **result.to_dict(),
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def markdown(report: dict[str, Any], size: dict[str, Any] | None = None) -> str:
    status = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"### Parity: {report['bundle']} — **{status}**",
        "",
        f"target `{report['target']}`, {report['bits']}-bit weights, {report['embedding_bits']}-bit embedding; "
        f"compared with the fp32 reference and the fake-quant twin on prefill ({report['steps']['reference'][0]['positions']} held-out tokens) "
        f"+ {len(report['steps']['reference']) - 1} decode steps. Top-1 (decisive): only positions whose expected top-1 leads by "
        "more than the tie margin; KL over the expected top-64 tokens plus the rest; cosine and max abs on the decode steps.",
        "",
        "| against | top-1 | top-1 (decisive) | top-5 overlap | KL (mean / max) | min cosine | max abs |",
        "|---|---|---|---|---|---|---|",
    ]
    for who, m in report["overall"].items():
        lines.append(
            f"| {who} | {m['top1_agreement'] * 100:.1f}% | {m['top1_decisive'] * 100:.1f}% of {m['decisive_positions']} "
            f"| {m['top5_overlap'] * 100:.1f}% | {_fmt(m['kl_divergence'])} / {_fmt(m['max_kl_divergence'])} "
            f"| {m['min_cosine']:.6f} | {_fmt(m['max_abs'])} |"
        )
    p, g = report["perplexity"], report["generation"]
    lines += [
        "",
        f"Perplexity on {p['tokens']} held-out tokens: reference {p['reference']:.3f}, twin {p['twin']:.3f}, "
        f"artifact {p['artifact']:.3f} ({p['delta_vs_reference'] * 100:+.2f}% vs reference, {p['delta_vs_twin'] * 100:+.2f}% vs twin).",
        f"Greedy generation, {g['tokens']} tokens: matches the reference for {g['match_vs_reference']}, the twin for {g['match_vs_twin']}.",
        "",
        "| check | value | threshold | step | result |",
        "|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(
            f"| {c['name']} | {_fmt(c['value'])} | {c['op']} {c['threshold']:g} | {c['step']} | {'pass' if c['passed'] else '**FAIL**'} |"
        )
    if report["integrity_problems"]:
        lines += ["", "Integrity: " + ", ".join(report["integrity_problems"]) + " differ from manifest.json sha256."]
    lines += [
        "",
        f"![KL and top-1 per step against the reference and the twin, thresholds dashed, failures crossed]({PARITY_PICTURE})",
        "",
        f"Per step: the prefill's mean, then each decode step; data in `{PARITY_PICTURE_DATA}`.",
    ]
    if size is not None:
        b = size["breakdown"]
        lines += [
            "",
            f"![where the artifact's bytes go, beside the unique-weight minimum]({SIZE_PICTURE})",
            "",
            f"Artifact {b['total']} bytes = {size['over_minimum']:.2f}x the unique-weight minimum ({size['minimum_bytes']} bytes): "
            + ", ".join(
                f"{k.replace('_', ' ')} {b[k]}"
                for k in ("codes", "scales", "zero_points", "norms", "rope_tables", "graph")
            )
            + f"; data in `{SIZE_PICTURE_DATA}`.",
        ]
    return "\n".join(lines) + "\n"


def junit(report: dict[str, Any]) -> str:
    checks = report["checks"]
    failures = sum(not c["passed"] for c in checks) + len(report["integrity_problems"])
    suite = ET.Element(
        "testsuite", name=f"parity.{report['bundle']}", tests=str(len(checks) + 1), failures=str(failures), errors="0"
    )
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{report['target']}", name=c["name"])
        if not c["passed"]:
            msg = f"{c['name']} = {c['value']:.6g} (threshold {c['op']} {c['threshold']:g}) at step {c['step']}"
            ET.SubElement(case, "failure", message=msg, type="ParityFailure").text = msg
    case = ET.SubElement(suite, "testcase", classname=f"parity.{report['target']}", name="integrity.sha256")
    if report["integrity_problems"]:
        msg = "files differ from manifest.json: " + ", ".join(report["integrity_problems"])
        ET.SubElement(case, "failure", message=msg, type="IntegrityFailure").text = msg
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_reports(report: dict[str, Any], out_dir: Path, size: dict[str, Any] | None = None) -> list[Path]:
    """Each report through a temp file and a rename (`atomic.write_atomic`): never half-written, and a
    symbolic link at a report's name is replaced, never written through. `size` (the manifest's entry)
    adds the bytes picture."""

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    plot = parity_plot_data(report)
    files: dict[str, str | bytes] = {
        "parity.json": json.dumps(report, indent=2, sort_keys=True) + "\n",
        "parity.md": markdown(report, size),
        "parity.junit.xml": junit(report),
        PARITY_PICTURE: parity_png(plot),
        PARITY_PICTURE_DATA: plot_json(plot),
    }
    if size is not None:
        files[SIZE_PICTURE] = size_png(size, report["bundle"])
        files[SIZE_PICTURE_DATA] = plot_json(size)
    return [write_atomic(out_dir / name, data) for name, data in files.items()]
