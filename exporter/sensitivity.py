"""`inspect CKPT --sensitivity`: how much quantizing each linear layer alone moves perplexity.

Each stored linear weight (and the untied output projection) is rounded alone to `bits` the way an
export rounds it (`--quant-method`: by default GPTQ with the export's Hessians from the shipped
calibration text, symmetric groups of `group_size` with searched clipping), every other weight stays
fp32, and the reference model's perplexity on the calibration text is measured; for a shared block,
each application is also rounded alone (the other applications keep the fp32 weight). The ranking is
what a mixed-precision choice reads (`export --sensitivity`): the layers at the top are the ones to keep
at more bits. Rows are written as `sensitivity.json`, the chart as `sensitivity.png`.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilellm.validation.plots import plot_json, sensitivity_png

from .assets import DEFAULT_MODEL_DIR, calibration_text
from .atomic import check_writable, write_atomic
from .checkpoint import Checkpoint, load_checkpoint
from .errors import UserError, loading
from .export_model import ExportModel, ExportSettings
from .mixed_precision import ROLE_OF_LINEAR
from .model import DecoderLayer, MobileLLM
from .quantize import QuantMethod, WeightQuant, calibration_windows, collect_hessians
from .tokenizer import load_tokenizer, parity_tokens

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SENSITIVITY_PICTURE, SENSITIVITY_DATA = "sensitivity.png", "sensitivity.json"


@dataclass(frozen=True)
class Probe:
    layer: str  # e.g. layers.3.mlp.down_proj, or lm_head
    block: int | None
    application: int | None  # the application (position in the block schedule) rounded alone; None: all of them


class _Prefix:
    """The fp32 model's hidden state entering every block application, per window batch: a probe that
    changes application `slot` (or block b, first applied at `slot`) reruns only the slots from there on,
    about half the work of a full forward pass on average."""

    def __init__(self, model: MobileLLM, batches: list[Tensor]) -> None:
        self.model, self.batches = model, batches
        self.inputs: list[list[Tensor]] = []
        for tokens in batches:
            cos, sin = self._rope(tokens)
            h, per_slot = model.embed_tokens(tokens), []
            for block in model.config.schedule():
                per_slot.append(h)
                h, _ = model.layers[block](h, cos, sin, None)
            self.inputs.append(per_slot + [h])  # [-1]: the last block's output (an lm_head probe starts there)

    def _rope(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seqlen = tokens.shape[1]
        return self.model.rope_cos[:seqlen], self.model.rope_sin[:seqlen]

    def nll(self, start: int = 0, swap: dict[int, DecoderLayer] | None = None) -> float:
        """Mean next-token NLL with application `slot` run by `swap[slot]`; slots before `start` unchanged."""
        model, total, count = self.model, 0.0, 0
        schedule = model.config.schedule()
        for tokens, per_slot in zip(self.batches, self.inputs):
            cos, sin = self._rope(tokens)
            h = per_slot[start]
            for slot in range(start, len(schedule)):
                h, _ = (swap or {}).get(slot, model.layers[schedule[slot]])(h, cos, sin, None)
            logits = F.linear(model.norm(h), model.output_weight())[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))
            count += tokens[:, 1:].numel()
        return total / count


def _batches(windows: list[Tensor]) -> list[Tensor]:
    """Windows of equal length stacked into one batch (one forward pass instead of several)."""
    by_len: dict[int, list[Tensor]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    return [torch.stack(ws) for _, ws in sorted(by_len.items(), reverse=True)]


def sensitivity_windows(ckpt: Checkpoint, tokens: int) -> list[Tensor]:
    cfg = ckpt.config
    ids = parity_tokens(
        load_tokenizer(ckpt.tokenizer_path), calibration_text(), tokens, cfg.vocab_size, cfg.bos_id
    ).tolist()
    step = max(2, min(256, cfg.max_context))
    return [torch.tensor(ids[i : i + step]) for i in range(0, len(ids) - 1, step) if len(ids[i : i + step]) >= 2]


def _probes(model: MobileLLM) -> list[Probe]:
    schedule = model.config.schedule()
    out = []
    for b in range(len(model.layers)):
        slots = [s for s, blk in enumerate(schedule) if blk == b]
        for name in LINEARS:
            out.append(Probe(f"layers.{b}.{name}", b, None))
            if len(slots) > 1:
                out += [Probe(f"layers.{b}.{name}", b, s) for s in slots]
    if model.lm_head is not None:
        out.append(Probe("lm_head", None, None))
    return out


def _export_hessians(ckpt: Checkpoint, method: QuantMethod) -> dict[str, Tensor]:
    """The Hessians an export's GPTQ reads (same calibration windows), keyed by reference layer name."""
    context = min(512, ckpt.config.max_context)
    windows = calibration_windows(ckpt, method, context)
    if not windows:
        return {}
    model = ExportModel.from_reference(ckpt.model, ExportSettings(max_seq_len=context, fuse=False))
    by_export = collect_hessians(model, windows)
    out = {
        f"layers.{b}.{ref}": by_export[f"blocks.{b}.{name}.weight"]
        for b in range(ckpt.config.n_layers)
        for ref, (name, _fused) in ROLE_OF_LINEAR.items()
    }
    if "output.weight" in by_export:
        out["lm_head"] = by_export["output.weight"]
    return out


@torch.no_grad()
def measure_sensitivity(
    ckpt: Checkpoint, bits: int = 4, group_size: int = 32, tokens: int = 512, method: str = "gptq"
) -> dict[str, Any]:
    """Perplexity of the fp32 model and, per probe, with only that weight (or application) rounded."""
    model = ckpt.model.eval()
    windows = sensitivity_windows(ckpt, tokens)
    quant_method = QuantMethod.named(method)
    wq = quant_method.apply(WeightQuant(bits=bits, group_size=group_size), has_zero_points=quant_method.asymmetric)
    hessians = _export_hessians(ckpt, quant_method)
    prefix = _Prefix(model, _batches(windows))
    base = prefix.nll()
    schedule = model.config.schedule()
    rows = []
    rounded_cache: dict[str, Tensor] = {}
    for probe in _probes(model):
        linear: nn.Linear = model.get_submodule(probe.layer)
        original = linear.weight.detach().clone()
        if probe.layer not in rounded_cache:
            rounded_cache[probe.layer] = (
                wq.quantize(original, hessians.get(probe.layer)).dequantize().to(original.dtype)
            )
        rounded = rounded_cache[probe.layer]
        if probe.application is None:
            start = schedule.index(probe.block) if probe.block is not None else len(schedule)
            linear.weight.copy_(rounded)
            try:
                nll = prefix.nll(start)
            finally:
                linear.weight.copy_(original)
        else:
            copy = deepcopy(model.layers[probe.block])
            copy.get_submodule(probe.layer.split(".", 2)[2]).weight.copy_(rounded)
            nll = prefix.nll(probe.application, {probe.application: copy})
        rows.append(
            {
                "layer": probe.layer,
                "block": probe.block,
                "application": probe.application,
                "perplexity": math.exp(nll),
                "delta": math.exp(nll - base) - 1.0,
            }
        )
    rows.sort(key=lambda r: (-r["delta"], r["layer"], -1 if r["application"] is None else r["application"]))
    return {
        "checkpoint": ckpt.hub_id or str(ckpt.source),
        "bits": bits,
        "group_size": group_size,
        "method": method,
        "tokens": int(sum(len(w) for w in windows)),
        "sharing": model.config.sharing,
        "perplexity": math.exp(base),
        "rows": rows,
    }


def row_label(row: dict[str, Any]) -> str:
    return row["layer"] + ("" if row["application"] is None else f" @{row['application']}")


def ranking(result: dict[str, Any], top: int | None = None) -> str:
    lines = [
        f"sensitivity     {result['bits']}-bit {result.get('method', 'mse')} (groups of {result['group_size']}), one layer at a time; "
        f"perplexity on {result['tokens']} calibration tokens, fp32 {result['perplexity']:.3f}",
        f"  {'rank':>4}  {'layer (@application)':<36} {'perplexity':>10}  {'change':>8}",
    ]
    for i, r in enumerate(result["rows"][:top] if top else result["rows"], 1):
        lines.append(f"  {i:>4}  {row_label(r):<36} {r['perplexity']:>10.3f}  {r['delta'] * 100:>+7.2f}%")
    return "\n".join(lines)


def write_sensitivity(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_atomic(out_dir / SENSITIVITY_PICTURE, sensitivity_png(result)),
        write_atomic(out_dir / SENSITIVITY_DATA, plot_json(result)),
    ]


def run_sensitivity(
    checkpoint: Path | None,
    config: str | None,
    bits: int,
    group_size: int,
    tokens: int,
    output: Path,
    method: str = "gptq",
) -> str:
    """`inspect --sensitivity`: measure, write the chart and data into `output`, return the ranking."""
    if bits not in (4, 8):
        raise UserError(f"--bits {bits}: sensitivity rounds to 4 or 8 bits")
    if group_size <= 0 or tokens < 2:
        raise UserError("--group-size must be positive and --tokens at least 2")
    with loading(output, "output folder", "pass a writable --output"):
        output.mkdir(parents=True, exist_ok=True)
    check_writable(output, "pass a writable --output")
    ckpt = load_checkpoint(checkpoint or DEFAULT_MODEL_DIR, config)
    cfg = ckpt.config
    for what, width in (("hidden size", cfg.dim), ("ffn width", cfg.ffn_dim)):
        if width % group_size:
            raise UserError(f"--group-size {group_size} does not divide the {what} {width}")
    QuantMethod.named(method)  # an unknown method: one line before any work
    result = measure_sensitivity(ckpt, bits, group_size, tokens, method)
    written = write_sensitivity(result, output)
    return ranking(result) + "\nwrote " + ", ".join(str(p) for p in written)
