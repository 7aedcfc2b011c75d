"""Report pictures: parity per step, where a bundle's bytes go, bench speed and size per runtime.

Each picture is a PNG rendered headless and byte-deterministic, with the data it shows written beside it
as JSON (what tests and tools read; the picture is for people):
- no pyplot and no global backend: a Figure of our own on the Agg canvas;
- every rcParam at matplotlib's defaults plus fixed ones (DejaVu Sans, the font matplotlib ships; size; dpi),
  whatever matplotlibrc or style the machine has;
- PNG metadata without `Software` (matplotlib's version), and no timestamps in the image;
so identical data gives identical bytes for a given matplotlib (its wheels bundle their own FreeType), and
reproducible bundles stay byte-identical.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mobilellm.exporter.memory import human

DPI = 100
_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "svg.hashsalt": "mobilellm-export",
    "svg.fonttype": "path",
}
_COLORS = {"reference": "#1f77b4", "twin": "#ff7f0e"}
_FAIL = "#d62728"
# The parity metrics drawn per step, with the direction their threshold goes.
PARITY_METRICS = {"kl_divergence": "<=", "top1_decisive": ">="}
KL_FLOOR = 1e-6  # a KL of 0 drawn on the log axis
# The manifest's size breakdown, in drawing order (exporter/memory.py StorageBreakdown).
SIZE_PARTS = ("codes", "scales", "zero_points", "embedding", "norms", "rope_tables", "graph")
_PART_COLORS = ("#4c72b0", "#dd8452", "#937860", "#c44e52", "#55a868", "#8172b3", "#8c8c8c")


class RenderSettings:
    """matplotlib's defaults plus `_RC` for the duration of one rendering (whatever the machine's rc says)."""

    def __enter__(self) -> None:
        self._ctx = matplotlib.rc_context()
        self._ctx.__enter__()
        matplotlib.rcParams.update({k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"})
        matplotlib.rcParams.update(_RC)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def plot_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------------------------------ parity
def _violates(value: float, op: str, threshold: float) -> bool:
    return value > threshold + 1e-12 if op == "<=" else value < threshold - 1e-12


def parity_plot_data(report: dict[str, Any]) -> dict[str, Any]:
    """What parity.png shows: parity.json's per-step rows and thresholds as they are, and the points
    marked as failures (a step whose value is on the wrong side of its metric's threshold)."""
    marked = []
    for who, rows in report["steps"].items():
        for metric, op in PARITY_METRICS.items():
            threshold = report["thresholds"].get(f"{who}.{metric}")
            if threshold is None:
                continue
            marked += [
                {"against": who, "metric": metric, "step": r["step"], "value": r[metric]}
                for r in rows
                if _violates(r[metric], op, threshold)
            ]
    return {
        "bundle": report["bundle"],
        "passed": report["passed"],
        "thresholds": report["thresholds"],
        "steps": report["steps"],
        "marked": marked,
    }


def parity_png(data: dict[str, Any]) -> bytes:
    """Per step (the prefill's mean, then each decode step): KL and top-1 against the reference and the
    twin, thresholds as dashed lines, failing points crossed out."""
    with RenderSettings():
        fig = Figure(figsize=(8.5, 5.6), layout="constrained")
        ax_kl, ax_top = fig.subplots(2, 1, sharex=True)
        steps = next(iter(data["steps"].values()))
        x = list(range(len(steps)))
        for who, rows in data["steps"].items():
            color = _COLORS.get(who, "#2ca02c")
            kl = [max(r["kl_divergence"], KL_FLOOR) for r in rows]
            ax_kl.plot(x, kl, marker="o", ms=3, lw=1.2, color=color, label=f"vs {who}")
            ax_top.plot(
                x,
                [r["top1_decisive"] for r in rows],
                marker="o",
                ms=3,
                lw=1.2,
                color=color,
                label=f"vs {who} (decisive)",
            )
            ax_top.plot(
                x,
                [r["top1_agreement"] for r in rows],
                ls=":",
                lw=1,
                color=color,
                alpha=0.7,
                label=f"vs {who} (all positions)",
            )
            for ax, metric in ((ax_kl, "kl_divergence"), (ax_top, "top1_decisive")):
                threshold = data["thresholds"].get(f"{who}.{metric}")
                if threshold is not None:
                    ax.axhline(
                        max(threshold, KL_FLOOR), color=color, ls="--", lw=0.9, label=f"{who} threshold {threshold:g}"
                    )
        index = {r["step"]: i for i, r in enumerate(steps)}
        for ax, metric in ((ax_kl, "kl_divergence"), (ax_top, "top1_decisive")):
            pts = [m for m in data["marked"] if m["metric"] == metric]
            if pts:
                ys = [max(m["value"], KL_FLOOR) if metric == "kl_divergence" else m["value"] for m in pts]
                ax.scatter(
                    [index[m["step"]] for m in pts],
                    ys,
                    marker="x",
                    s=60,
                    lw=2,
                    color=_FAIL,
                    zorder=5,
                    label="over threshold",
                )
        ax_kl.set_yscale("log")
        ax_kl.set_ylabel(f"KL divergence (nats, floor {KL_FLOOR:g})")
        ax_top.set_ylabel("top-1 agreement")
        ax_top.set_ylim(-0.05, 1.05)
        for ax in (ax_kl, ax_top):
            ax.axvline(0.5, color="#888888", lw=0.8)
            ax.grid(True, axis="y", lw=0.4, alpha=0.5)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax_top.set_xticks(x, [f"prefill\n({steps[0]['positions']})"] + [str(i) for i in x[1:]])
        ax_top.set_xlabel("prefill (mean over its positions), then decode step")
        status = "PASS" if data["passed"] else "FAIL"
        ax_kl.set_title(f"{data['bundle']}: parity per step — {status}", color="black" if data["passed"] else _FAIL)
        return _png(fig)


# ------------------------------------------------------------------------------ size
def size_png(size: dict[str, Any], title: str) -> bytes:
    """The manifest's `size`: the artifact's bytes by kind as one stacked bar, the unique-weight minimum beside it."""
    breakdown, minimum = size["breakdown"], size["minimum_bytes"]
    scale, unit = _unit(max(breakdown["total"], minimum))
    with RenderSettings():
        fig = Figure(figsize=(8.5, 2.8), layout="constrained")
        ax = fig.subplots()
        left = 0.0
        for part, color in zip(SIZE_PARTS, _PART_COLORS):
            value = breakdown.get(part, 0)  # bundles from before a part existed lack its key
            share = value / breakdown["total"] * 100 if breakdown["total"] else 0.0
            ax.barh(
                1,
                value / scale,
                left=left,
                color=color,
                height=0.6,
                label=f"{part.replace('_', ' ')} {human(value)} ({share:.0f}%)",
            )
            left += value / scale
        ax.barh(
            0,
            minimum / scale,
            color="#cccccc",
            edgecolor="#555555",
            hatch="//",
            height=0.6,
            label=f"unique-weight minimum {human(minimum)}",
        )
        ax.text(left, 1, f"  {human(breakdown['total'])} = {size['over_minimum']:.2f}x minimum", va="center")
        ax.text(minimum / scale, 0, f"  {human(minimum)}", va="center")
        ax.set_yticks([0, 1], ["minimum", "artifact"])
        ax.set_xlim(0, max(left, minimum / scale) * 1.6)
        ax.set_xlabel(unit)
        ax.set_title(f"{title}: where the bytes go")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return _png(fig)


def _unit(n: float) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "KB")):
        if n >= scale:
            return float(scale), unit
    return 1.0, "bytes"


# ------------------------------------------------------------------------------ bench
BENCH_FIELDS = ("preset", "target", "bits", "prefill_tokens_per_s", "decode_tokens_per_s", "artifact_bytes")


def bench_chart_data(rows: list[dict[str, Any]], caption: str) -> dict[str, Any]:
    """What bench.png shows: each row's runtime, prefill/decode tokens/s and size, as the bench rows hold them."""
    return {"caption": caption, "rows": [{k: r.get(k) for k in BENCH_FIELDS} for r in rows]}


def _bench_label(r: dict[str, Any]) -> str:
    bits = "" if r.get("bits") is None else f" {r['bits']}b"
    return f"{r.get('preset') or ''} {r['target']}{bits}".strip()


def bench_png(data: dict[str, Any]) -> bytes:
    """Prefill tokens/s, decode tokens/s and size per runtime, one row per bench row (peers marked)."""
    rows = data["rows"]
    labels = [_bench_label(r) for r in rows]
    y = list(range(len(rows)))[::-1]
    with RenderSettings():
        fig = Figure(figsize=(11, 1.2 + 0.32 * len(rows)), layout="constrained")
        axes = fig.subplots(1, 3, sharey=True)
        panels = (
            ("prefill_tokens_per_s", "prefill tokens/s", 1.0),
            ("decode_tokens_per_s", "decode tokens/s", 1.0),
            ("artifact_bytes", "size (MB)", float(1 << 20)),
        )
        for ax, (key, title, scale) in zip(axes, panels):
            values = [r.get(key) for r in rows]
            top = max([v / scale for v in values if v is not None] or [1.0])
            for yi, r, v in zip(y, rows, values):
                peer = "peer" in str(r["target"]) or r["target"] == "pytorch"
                color = "#8c8c8c" if peer else "#4c72b0"
                if v is None:
                    ax.text(0, yi, " not timed", va="center", color="#888888", fontsize=8)
                    continue
                ax.barh(yi, v / scale, color=color, height=0.7)
                ax.text(v / scale, yi, f" {_num(v / scale)}", va="center", fontsize=8)
            ax.set_xlim(0, top * 1.3)
            ax.set_title(title)
            ax.grid(True, axis="x", lw=0.4, alpha=0.5)
        axes[0].set_yticks(y, labels)
        fig.suptitle("make bench: ours (blue) beside eager PyTorch and peers (grey)")
        fig.supxlabel(data["caption"], fontsize=8)
        return _png(fig)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


# ------------------------------------------------------------------------------ sensitivity
def sensitivity_png(result: dict[str, Any], top: int = 40) -> bytes:
    """The perplexity change of rounding each layer (or block application) alone, largest first."""
    rows = result["rows"][:top]
    labels = [r["layer"] + ("" if r["application"] is None else f" @{r['application']}") for r in rows]
    values = [r["delta"] * 100 for r in rows]
    with RenderSettings():
        fig = Figure(figsize=(8.5, 1.4 + 0.22 * len(rows)), layout="constrained")
        ax = fig.subplots()
        y = list(range(len(rows)))[::-1]
        colors = ["#c44e52" if v > 0 else "#4c72b0" for v in values]
        ax.barh(y, values, color=colors, height=0.7)
        for yi, v in zip(y, values):
            ax.text(
                v,
                yi,
                f" {v:+.3g}%" if v >= 0 else f"{v:+.3g}% ",
                va="center",
                ha="left" if v >= 0 else "right",
                fontsize=7,
            )
        ax.set_yticks(y, labels, fontsize=7)
        ax.axvline(0, color="#555555", lw=0.8)
        lo, hi = min(values + [0.0]), max(values + [0.0])
        pad = (hi - lo) * 0.25 or 1.0
        ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
        ax.set_xlabel("perplexity change when only this layer is rounded (%)")
        ax.grid(True, axis="x", lw=0.4, alpha=0.5)
        shown = (
            f"top {len(rows)} of {len(result['rows'])}" if len(result["rows"]) > len(rows) else f"{len(rows)} layers"
        )
        ax.set_title(
            f"{result['bits']}-bit {result.get('method', 'mse')} sensitivity ({shown}); "
            f"fp32 perplexity {result['perplexity']:.3f} on {result['tokens']} calibration tokens"
        )
        return _png(fig)
