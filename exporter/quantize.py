"""The one weight quantizer every target uses, and the fake-quantized twin built from its output.

Codes, scales and zero points are computed here, once per export, and each target writes them
verbatim into its format (MatMulNBits, constexpr_blockwise_shift_scale, torchao/XNNPACK tensors).
The twin dequantizes the very same numbers, so artifact vs twin is a pure lowering check and twin vs
reference is the quantization error.

What a runtime can store (bits, group size, the dtype it keeps scales in, whether it has zero
points) is a `WeightQuant`; how codes are chosen inside those limits is the scale rule plus, when a
calibration Hessian is given, GPTQ's error-compensating rounding. Measured on a real 135M model
(SmolLM2-135M, MobileLLM-125M's shape; README "Quantization" has the table), the defaults are:
searched clipping (`mse`), zero points where the format has them, GPTQ on every linear.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn

from .assets import calibration_text
from .errors import UserError
from .export_model import ExportModel
from .mixed_precision import selector_rank
from .tokenizer import load_tokenizer

# How a group's scale (and zero point) is chosen:
# - "torchao": scale = amax / ((qmax - qmin) / 2) (torchao MappingType.SYMMETRIC; clips the positive extreme)
# - "signed_extreme": the signed value of largest magnitude maps to qmin exactly (onnxruntime MatMulNBits;
#   the scale is negative where that value is positive, which XNNPACK refuses)
# - "restricted": scale = amax / qmax, q in [-qmax, qmax] (coremltools linear_symmetric)
# - "mse": searched clipping: the scale (and zero point) among a grid of clipping ratios, refined by
#   least squares, that minimizes the group's squared error weighted by the input's second moment.
ScaleRule = Literal["torchao", "signed_extreme", "restricted", "mse"]
SCALE_RULES: tuple[str, ...] = ("torchao", "signed_extreme", "restricted", "mse")
ActivationRounding = Literal["none", "int8_per_token", "int8_blockwise"]


@dataclass(frozen=True)
class WeightQuant:
    """How one weight is stored (the runtime's limits) and which rule picks its codes."""

    bits: int  # 4, 8 or 16 (16 = store as `float_dtype`, no integer rounding)
    group_size: int | None = None  # None: one scale per output row
    scale_rule: ScaleRule = "mse"
    scale_dtype: torch.dtype = torch.float32  # the dtype the runtime keeps scales in
    float_dtype: torch.dtype = torch.float32  # for bits == 16
    zero_points: bool = False  # the format stores an integer zero point per group (asymmetric codes)
    negative_scales: bool = True  # the format accepts a negative scale (XNNPACK does not)
    # Widen the group by doublings while it divides the width, up to this many.
    group_size_cap: int | None = None
    # The runtime rounds this layer's *input* to symmetric int8 per block of the weight's groups along
    # the input dim (scale amax/127), e.g. onnxruntime MatMulNBits accuracy_level 4. None: not rounded.
    act_block: int | None = None

    def qrange(self) -> tuple[int, int]:
        if self.scale_rule == "restricted" and not self.zero_points:
            return -(2 ** (self.bits - 1)) + 1, 2 ** (self.bits - 1) - 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def group(self, cols: int) -> int:
        group = self.group_size or cols
        while self.group_size_cap and group * 2 <= self.group_size_cap and cols % (group * 2) == 0:
            group *= 2  # doubling keeps a power of two a power of two (MatMulNBits needs one)
        if cols % group:
            raise UserError(
                f"group size {group} does not divide input width {cols}; pick a divisor of every layer width (e.g. 32)"
            )
        return group

    def quantize(self, w: Tensor, hessian: Tensor | None = None, act_order: bool = False) -> QuantizedWeight:
        """Codes, scales and zero points for `w` [rows, cols]; GPTQ when a Hessian [cols, cols] is given."""
        if self.bits >= 16:
            raise ValueError("a 16-bit weight is stored as floats, not quantized")
        w = w.detach().float()
        if hessian is not None:
            return gptq(w, hessian, self, act_order)
        return _round_groups(w, self, None)

    def fake(self, w: Tensor) -> Tensor:
        """`w` as the runtime holds it (round-to-nearest codes, no calibration)."""
        if self.bits >= 16:
            return w.to(self.float_dtype).to(w.dtype)
        return self.quantize(w).dequantize().to(w.dtype)


@dataclass
class QuantizedWeight:
    """What a format stores for one weight: dequantized value = (codes - zeros) * scales, per group."""

    codes: Tensor  # int8 [rows, cols], in the WeightQuant's qrange
    scales: Tensor  # float32 [rows, groups], exactly representable in the format's scale dtype
    zeros: Tensor | None  # int8 [rows, groups] in the qrange, or None (symmetric: zero point 0)
    wq: WeightQuant

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> Tensor:
        rows, cols = self.codes.shape
        g = self.codes.float().reshape(rows, -1, self.group_size)
        if self.zeros is not None:
            g = g - self.zeros.float().unsqueeze(-1)
        return (g * self.scales.unsqueeze(-1)).reshape(rows, cols)


# ----------------------------------------------------------------------------- scale rules
_MSE_GRID = torch.linspace(0.6, 1.0, 11)


def _store(scale: Tensor, wq: WeightQuant) -> Tensor:
    """The scale as the runtime will hold it (rounded to its dtype, never zero)."""
    tiny = (
        torch.finfo(torch.float32).smallest_normal
        if wq.scale_dtype == torch.float32
        else torch.finfo(wq.scale_dtype).tiny
    )
    scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny).copysign(scale), scale)
    return scale.to(wq.scale_dtype).float()


def _codes(
    g: Tensor, scale: Tensor, zero: Tensor | None, qmin: int, qmax: int, torchao_rounding: bool = False
) -> Tensor:
    x = g * (1.0 / scale) if torchao_rounding else g / scale
    if zero is not None:
        x += zero
    return x.round_().clamp_(qmin, qmax)


def _error(g: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, col_weight: Tensor | None) -> Tensor:
    # in place on temporaries: the clipping search calls this 22 times per group of every layer
    deq = (q - zero if zero is not None else q) * scale
    err = torch.sub(g, deq, out=deq).pow_(2)
    if col_weight is not None:
        err.mul_(col_weight)
    return err.sum(-1, keepdim=True)


def _params_for(g: Tensor, wq: WeightQuant, col_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Scale [..., 1] (stored dtype) and zero point [..., 1] (or None) for groups `g` [..., group]."""
    qmin, qmax = wq.qrange()
    rule = wq.scale_rule
    amax = g.abs().amax(-1, keepdim=True)
    if wq.zero_points:
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)

        def candidate(r: float) -> tuple[Tensor, Tensor | None]:
            scale = _store((hi - lo) * r / (qmax - qmin), wq)
            return scale, torch.clamp(torch.round(qmin - lo * r / scale), qmin, qmax)

        if rule != "mse":
            return candidate(1.0)
        candidates = [candidate(r) for r in _MSE_GRID.tolist()]
    elif rule == "torchao":
        return _store((amax / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).smallest_normal), wq), None
    elif rule == "restricted":
        return _store(amax / qmax, wq), None
    else:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        if rule == "signed_extreme":
            return _store(extreme / qmin if wq.negative_scales else amax / -qmin, wq), None
        # The signed extreme -> qmin uses the extra level whatever the extreme's sign, but needs a negative
        # scale where it is positive; without those, amax -> -qmin (extra level when the extreme is
        # negative) or amax -> qmax. Then clipped by the grid's ratios.
        first = extreme / qmin if wq.negative_scales else amax / -qmin
        candidates = [(_store(base * r, wq), None) for r in _MSE_GRID.tolist() for base in (first, amax / qmax)]
    err, scale, zero = _best_candidate(g, candidates, qmin, qmax, col_weight)
    # A least-squares step on the winner's codes, kept where it lowers the error.
    fitted, _ = _refine(g, scale, zero, wq, col_weight)
    fitted_err = _error(g, _codes(g, fitted, zero, qmin, qmax), fitted, zero, col_weight)
    return torch.where(fitted_err < err, fitted, scale), zero


# Large weights are scored a slice of rows at a time, every candidate on one slice before the next:
# each slice's intermediates stay in cache (the 49152x576 table: 8.5 -> 2.2 s; 1.5 s with `_error`
# in place), and a slice is a whole number of rows, so the result is the one of scoring all rows at once.
_SLICE_ELEMENTS = 1 << 16


def _best_candidate(
    g: Tensor, candidates: list[tuple[Tensor, Tensor | None]], qmin: int, qmax: int, col_weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The error, scale and zero point of the candidate with the least error per group (the first one
    on ties). `g` [rows, groups, group]; each candidate's scale and zero point [rows, groups, 1]."""
    step = max(1, _SLICE_ELEMENTS // max(1, g[0].numel()))
    out: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for r0 in range(0, g.shape[0], step):
        rows = slice(r0, r0 + step)
        part = g[rows]
        best: tuple[Tensor, Tensor, Tensor | None] | None = None
        for scale, zero in candidates:
            scale, zero = scale[rows], None if zero is None else zero[rows]
            err = _error(part, _codes(part, scale, zero, qmin, qmax), scale, zero, col_weight)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = (
                    torch.where(better, err, best[0]),
                    torch.where(better, scale, best[1]),
                    None if zero is None else torch.where(better, zero, best[2]),  # type: ignore[arg-type]
                )
        out.append(best)  # type: ignore[arg-type]
    if len(out) == 1:
        return out[0]
    return (
        torch.cat([e for e, _, _ in out]),
        torch.cat([sc for _, sc, _ in out]),
        None if out[0][2] is None else torch.cat([zp for _, _, zp in out]),  # type: ignore[misc]
    )


def _refine(
    g: Tensor, scale: Tensor, zero: Tensor | None, wq: WeightQuant, col_weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One least-squares step: with the codes fixed, the scale that minimizes the weighted error."""
    qmin, qmax = wq.qrange()
    q = _codes(g, scale, zero, qmin, qmax)
    centered = q - zero if zero is not None else q
    wgt = col_weight if col_weight is not None else torch.ones_like(g)
    num = (g * centered * wgt).sum(-1, keepdim=True)
    den = (centered * centered * wgt).sum(-1, keepdim=True)
    fitted = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
    fitted = torch.where(fitted.abs() > 0, fitted, scale)
    return _store(fitted, wq), zero


def _round_groups(w: Tensor, wq: WeightQuant, col_weight: Tensor | None) -> QuantizedWeight:
    rows, cols = w.shape
    group = wq.group(cols)
    g = w.reshape(rows, cols // group, group)
    cw = None if col_weight is None else col_weight.reshape(1, cols // group, group)
    scale, zero = _params_for(g, wq, cw)
    qmin, qmax = wq.qrange()
    q = _codes(g, scale, zero, qmin, qmax, torchao_rounding=wq.scale_rule == "torchao")
    return QuantizedWeight(
        codes=q.reshape(rows, cols).to(torch.int8),
        scales=scale.squeeze(-1),
        zeros=None if zero is None else zero.squeeze(-1).to(torch.int8),
        wq=wq,
    )


# ----------------------------------------------------------------------------- GPTQ
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def gptq(w: Tensor, hessian: Tensor, wq: WeightQuant, act_order: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns one by one, spreading each column's rounding error
    over the columns not yet quantized through the inverse Hessian of the layer's inputs.

    Without `act_order`, columns go left to right and a group's scale and zero point are chosen (by
    `wq.scale_rule`, weighted by diag(H)) when its first column is reached, from the error-updated
    weights. With `act_order`, columns go in order of decreasing diag(H) (the inputs with the most
    energy first) and every group's parameters are fixed up front from the original weights
    ("static groups"), since a group's columns are no longer visited together."""
    rows, cols = w.shape
    group = wq.group(cols)
    qmin, qmax = wq.qrange()
    W = w.clone().float()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = GPTQ_DAMP * torch.diag(H).mean()
    H = H + damp * torch.eye(cols)
    diag = torch.diag(H).float()
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // group)
    zeros = torch.zeros(rows, cols // group, dtype=torch.int8) if wq.zero_points else None
    if act_order:
        fixed = _round_groups(W, wq, diag)
        scales, zeros = fixed.scales.clone(), None if fixed.zeros is None else fixed.zeros.clone()
        perm = torch.argsort(diag, descending=True)
    else:
        perm = torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    for _ in range(4):  # more damping if float32 Cholesky finds H numerically indefinite
        try:
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
            break
        except torch.linalg.LinAlgError:
            H = H + damp * torch.eye(cols)
            damp = damp * 10
    else:
        raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even after damping")
    order = perm.tolist()
    scale = zero = None
    for b0 in range(0, cols, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, cols)
        Wb = W[:, b0:b1].clone()
        err_b = torch.zeros_like(Wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = order[b0 + i]  # the original column index
            if act_order:
                scale = scales[:, col // group : col // group + 1]
                zero = None if zeros is None else zeros[:, col // group : col // group + 1].float()
            elif col % group == 0:
                g_cols = Wb[:, i : i + group] if i + group <= b1 - b0 else W[:, b0 + i : b0 + i + group]
                scale, zero = _params_for(g_cols.unsqueeze(1), wq, diag[col : col + group].reshape(1, 1, -1))
                scale, zero = scale.reshape(rows, 1), None if zero is None else zero.reshape(rows, 1)
                scales[:, col // group] = scale[:, 0]
                if zeros is not None and zero is not None:
                    zeros[:, col // group] = zero[:, 0].to(torch.int8)
            x = Wb[:, i : i + 1]
            q = _codes(x, scale, zero, qmin, qmax)  # type: ignore[arg-type]
            codes[:, col] = q[:, 0].to(torch.int8)
            deq = ((q - zero) if zero is not None else q) * scale  # type: ignore[operator]
            e = (x - deq) / hb[i, i]
            Wb[:, i:] -= e @ hb[i : i + 1, i:]
            err_b[:, i : i + 1] = e
        W[:, b1:] -= err_b @ hinv[b0:b1, b1:]
    return QuantizedWeight(codes, scales, zeros, wq)


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def collect_hessians(model: ExportModel, token_windows: Iterable[Tensor]) -> dict[str, Tensor]:
    """H = sum x x^T of every linear's input over the calibration windows, keyed like `weight_names`.

    A shared block's linear sees every one of its applications, so its H covers both input
    distributions. An untied lm_head's H comes from the final normed hidden states; a tied table is
    read by the lookup too, so it is rounded to nearest and needs none."""
    # Summed in place in float32 (GPTQ works in float32): float64 sums and their float32 copy held
    # three times the bytes, 11.5 GB at the 1B preset.
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if name in sums:
            sums[name].addmm_(x.T, x)
        else:
            sums[name] = x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = []
    for b, block in enumerate(model.blocks):
        for name, child in block.named_children():
            if isinstance(child, nn.Linear):
                key = f"blocks.{b}.{name}.weight"
                hooks.append(child.register_forward_pre_hook(lambda _m, args, key=key: add(key, args[0])))
    if model.output is not None:
        hooks.append(model.output.register_forward_pre_hook(lambda _m, args: add("output.weight", args[0])))
    try:
        for window in token_windows:
            model.reset_cache()
            model(window.reshape(1, -1), torch.tensor([0]))
    finally:
        for hook in hooks:
            hook.remove()
        model.reset_cache()
    return {k: v.div_(counts[k]) for k, v in sums.items()}


# ----------------------------------------------------------------------------- a model's weights
@dataclass(frozen=True)
class QuantScheme:
    """How one target stores and computes: the quantizer and the twin follow it exactly."""

    linear: WeightQuant
    embedding: WeightQuant
    output: WeightQuant  # the output projection
    activations: ActivationRounding = "none"  # int8_per_token: XNNPACK's dynamic qd8 (8da4w/8da8w)
    compute_dtype: torch.dtype = torch.float32
    # Whether a shared embedding's output projection is stored as its own tensor (rounded by
    # `output`), or the projection reads the embedding's stored tensor (one copy).
    separate_output: bool = False
    # Mixed precision: (selector, WeightQuant) for block linears; a selector is "w2" (every block's),
    # "w2@q4km" or "w2@7" (see mixed_precision.py); the most specific match wins.
    overrides: tuple[tuple[str, WeightQuant], ...] = ()

    @property
    def int8_dynamic_activations(self) -> bool:
        return self.activations == "int8_per_token"

    def for_weight(self, name: str, n_layers: int) -> WeightQuant:
        """The WeightQuant of a parameter named as in ExportModel (blocks.{i}.{role}.weight, ...)."""
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blocks":
            matches = [
                (rank, wq)
                for selector, wq in self.overrides
                if (rank := selector_rank(selector, parts[2], int(parts[1]), n_layers)) is not None
            ]
            if matches:
                return min(matches, key=lambda m: m[0])[1]
        if name == "tok_embeddings.weight":
            return self.embedding
        if name == "output.weight":
            return self.output
        return self.linear


@dataclass(frozen=True)
class QuantMethod:
    """How codes are chosen within the format's limits (the user's choice; recipes' `method`)."""

    scale_rule: ScaleRule | None = None  # None: the default rule "mse"
    asymmetric: bool = False  # use zero points where the format stores them
    gptq: bool = True  # data-aware rounding from the calibration text
    calibration_tokens: int = 2048
    act_order: bool = False  # GPTQ visits input columns by decreasing activation energy

    def apply(self, wq: WeightQuant, has_zero_points: bool) -> WeightQuant:
        if wq.bits >= 16:
            return wq
        return replace(wq, scale_rule=self.scale_rule or "mse", zero_points=self.asymmetric and has_zero_points)

    @classmethod
    def named(cls, name: str, zero_points: bool | None = None) -> "QuantMethod":
        """The CLI's / recipes' `--quant-method` presets; `zero_points` overrides the preset's choice.

        Measured on the real 135M model (grid-broken copy, ONNX 4-bit, perplexity vs fp32): round to
        nearest +56%, searched clipping +56% symmetric / +31% with zero points, GPTQ +7.4% symmetric /
        +9.1% with zero points; so GPTQ's preset is symmetric and the round-to-nearest one is not."""
        presets = {
            "gptq": cls(scale_rule="mse", asymmetric=False, gptq=True),
            "mse": cls(scale_rule="mse", asymmetric=True, gptq=False),
            "rtn": cls(scale_rule="restricted", asymmetric=False, gptq=False),
        }
        if name not in presets:
            raise UserError(f"unknown quantization method {name!r}; use one of {', '.join(presets)}")
        preset = presets[name]
        return preset if zero_points is None else replace(preset, asymmetric=zero_points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale_rule": self.scale_rule or "mse",
            "asymmetric": self.asymmetric,
            "gptq": self.gptq,
            "calibration_tokens": self.calibration_tokens,
            "act_order": self.act_order,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "QuantMethod":
        return cls(
            scale_rule=raw.get("scale_rule"),
            asymmetric=bool(raw.get("asymmetric", False)),
            gptq=bool(raw.get("gptq", True)),
            calibration_tokens=int(raw.get("calibration_tokens", 2048)),
            act_order=bool(raw.get("act_order", False)),
        )

    def describe(self) -> str:
        parts = [self.scale_rule or "mse", "asymmetric" if self.asymmetric else "symmetric"]
        if self.gptq:
            parts.append(f"gptq{' act-order' if self.act_order else ''} ({self.calibration_tokens} calibration tokens)")
        return ", ".join(parts)


def calibration_windows(ckpt: Any, method: QuantMethod, max_seq_len: int) -> list[Tensor]:
    """GPTQ's calibration input: the shipped calibration text (disjoint from the parity text) in
    windows of at most 512 tokens, BOS first, about `method.calibration_tokens` in all."""

    if not method.gptq:
        return []
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    if tokenizer is None:
        raise UserError(
            f"{ckpt.tokenizer_path}: the tokenizer cannot be read, so GPTQ has no calibration text; "
            "fix the tokenizer or pass --quant-method rtn"
        )
    cfg = ckpt.config
    ids = [i for i in tokenizer.encode(calibration_text()) if 0 <= i < cfg.vocab_size]
    step = max(2, min(512, max_seq_len - 1)) - 1
    count = max(1, min(len(ids) // step, math.ceil(method.calibration_tokens / (step + 1))))
    return [torch.tensor([cfg.bos_id] + ids[i * step : (i + 1) * step]) for i in range(count)]


def weight_names(model: ExportModel, scheme: QuantScheme) -> dict[str, Tensor]:
    """Every stored weight matrix the scheme rounds, by parameter name (shared blocks once)."""
    out: dict[str, Tensor] = {}
    for b, block in enumerate(model.blocks):
        for name, child in block.named_children():
            if isinstance(child, nn.Linear):
                out[f"blocks.{b}.{name}.weight"] = child.weight
    out["tok_embeddings.weight"] = model.tok_embeddings.weight
    if model.output is not None:
        out["output.weight"] = model.output.weight
    elif scheme.separate_output:
        out["output.weight"] = model.tok_embeddings.weight
    return out


@dataclass
class QuantizedModel:
    """Every stored weight's codes/scales/zero points (or float storage), computed once."""

    scheme: QuantScheme
    weights: dict[str, QuantizedWeight | Tensor]  # Tensor: a float weight (16-bit), already cast
    method: str
    formats: dict[str, WeightQuant] = field(default_factory=dict)  # each weight's resolved WeightQuant

    def __getitem__(self, name: str) -> QuantizedWeight | Tensor:
        return self.weights[name]

    def dequantized(self, name: str) -> Tensor:
        value = self.weights[name]
        return value.dequantize() if isinstance(value, QuantizedWeight) else value.float()


@torch.no_grad()
def quantize_model(
    model: ExportModel,
    scheme: QuantScheme,
    calibration: list[Tensor] | None = None,
    act_order: bool = False,
    hessians: dict[str, Tensor] | None = None,
) -> QuantizedModel:
    """Quantize every stored weight of `model` as `scheme` says; GPTQ where calibration windows (or
    their `collect_hessians`, computed once for several targets) are given. A tied table, read by the
    lookup as well as the projection, is rounded to nearest, and so is a separately stored copy of it
    (ExecuTorch's output projection)."""
    if hessians is None:
        hessians = collect_hessians(model, calibration) if calibration else {}
    out: dict[str, QuantizedWeight | Tensor] = {}
    formats: dict[str, WeightQuant] = {}
    names = weight_names(model, scheme)
    for name, tensor in names.items():
        wq = formats[name] = scheme.for_weight(name, model.config.n_layers)
        if wq.bits >= 16:
            out[name] = tensor.detach().to(wq.float_dtype)
            continue
        out[name] = wq.quantize(tensor, hessians.get(name), act_order)  # none for a tied table (collect_hessians)
    return QuantizedModel(scheme, out, "gptq" if hessians else "round-to-nearest", formats)


# ----------------------------------------------------------------------------- activation rounding
def xnnpack_fake_quant_int8_per_token(x: Tensor) -> Tensor:
    """XNNPACK's dynamic qd8 quantization (xnn_f32_qd8_asymmetric_quantization_params + convert):
    inverse scale 255 / (max(0, max) - min(0, min)), zero point nudged from the side with less error,
    q = clamp(rint(x * inv_scale) + zp), dequantized as (q - zp) / inv_scale."""
    x32 = x.float()
    rmin = x32.amin(-1, keepdim=True).clamp(max=0)
    rmax = x32.amax(-1, keepdim=True).clamp(min=0)
    same = rmin == rmax
    inv = torch.where(same, torch.ones_like(rmin), 255.0 / torch.where(same, torch.ones_like(rmin), rmax - rmin))
    lo, hi = rmin * inv, rmax * inv
    zp = torch.where((-128.0 + lo) + (127.0 + hi) > 0, -128.0 - lo, 127.0 - hi).clamp(-128, 127).round()
    q = torch.clamp(torch.round(x32 * inv) + zp, -128, 127)
    return ((q - zp) * (1.0 / inv)).to(x.dtype)


def fake_quant_int8_blockwise(x: Tensor, block: int) -> Tensor:
    """Symmetric int8 activation rounding per block of `block` along the last dim (amax/127)."""
    x32 = x.float()
    g = x32.reshape(*x32.shape[:-1], x32.shape[-1] // block, block)
    scale = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.clamp(torch.round(g * inv), -127, 127) * scale).reshape(x32.shape).to(x.dtype)


class _ActivationFakeQuant(nn.Module):
    """A linear whose input the runtime rounds first (per token, or per block of the input dim)."""

    def __init__(self, linear: nn.Module, block: int | None = None) -> None:
        super().__init__()
        self.linear, self.block = linear, block

    def forward(self, x: Tensor) -> Tensor:
        if self.block is not None:
            return self.linear(fake_quant_int8_blockwise(x, self.block))
        return self.linear(xnnpack_fake_quant_int8_per_token(x))


def _with_activation_rounding(linear: nn.Module, scheme: QuantScheme, wq: WeightQuant) -> nn.Module:
    if scheme.int8_dynamic_activations and wq.bits < 16:
        return _ActivationFakeQuant(linear)
    if wq.act_block is not None and wq.bits < 16:  # per block of the weight's own groups
        return _ActivationFakeQuant(linear, wq.group(linear.in_features))
    return linear


# ----------------------------------------------------------------------------- the twin
@torch.no_grad()
def fake_quantized_twin(model: ExportModel, quantized: QuantizedModel, in_place: bool = False) -> ExportModel:
    """A copy of `model` holding exactly the weights the artifact stores (dequantized), with the
    runtime's activation rounding in front of each quantized linear. Shared blocks stay shared.
    `in_place`: `model` itself becomes the twin (its weights are rebound, never written to, so
    tensors it shares with the reference model stay as they are); for a caller done with it."""
    scheme = quantized.scheme
    twin = model if in_place else copy.deepcopy(model)  # deepcopy keeps aliasing: shared blocks stay one module
    for b, block in enumerate(twin.blocks):
        for name, child in list(block.named_children()):
            if isinstance(child, nn.Linear):
                key = f"blocks.{b}.{name}.weight"
                child.weight = nn.Parameter(quantized.dequantized(key), requires_grad=False)
                setattr(block, name, _with_activation_rounding(child, scheme, quantized.formats[key]))
    emb = nn.Parameter(quantized.dequantized("tok_embeddings.weight"), requires_grad=False)
    twin.tok_embeddings.weight = emb
    if twin.output is not None or scheme.separate_output:
        out = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        out.weight = nn.Parameter(quantized.dequantized("output.weight"), requires_grad=False)
        twin.output = _with_activation_rounding(out, scheme, scheme.output)  # type: ignore[assignment]
    elif scheme.output.act_block is not None and scheme.embedding.bits < 16:
        # The projection reads the embedding's stored tensor; the runtime rounds its input.
        out = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        out.weight = emb
        twin.output = _ActivationFakeQuant(out, scheme.output.group(emb.shape[1]))  # type: ignore[assignment]
    return twin.to(scheme.compute_dtype)


def storage_bits_per_weight(wq: WeightQuant) -> float:
    """Stored bits per weight including scales and zero points (the size model's unit)."""
    if wq.bits >= 16:
        return 8.0 * torch.tensor([], dtype=wq.float_dtype).element_size()
    scale_bits = 8 * torch.tensor([], dtype=wq.scale_dtype).element_size()
    group = wq.group_size
    per_group = scale_bits + (wq.bits if wq.zero_points else 0)
    return wq.bits + (per_group / group if group else 0.0)


def nbytes(rows: int, cols: int, wq: WeightQuant) -> int:
    """Bytes one [rows, cols] weight takes in storage (codes, scales, zero points)."""
    if wq.bits >= 16:
        return rows * cols * torch.tensor([], dtype=wq.float_dtype).element_size()
    groups = cols // wq.group(cols)
    scale_bytes = torch.tensor([], dtype=wq.scale_dtype).element_size()
    zero_bytes = math.ceil(groups * wq.bits / 8) if wq.zero_points else 0
    return rows * (cols * wq.bits // 8 + groups * scale_bytes + zero_bytes)


def describe_scheme(scheme: QuantScheme) -> str:
    """One line a person reads: what each kind of weight is stored as."""

    def fmt(wq: WeightQuant) -> str:
        if wq.bits >= 16:
            return str(wq.float_dtype).removeprefix("torch.")
        group = f"/{wq.group_size}" if wq.group_size else "/row"
        if wq.group_size and wq.group_size_cap:
            group += f"..{wq.group_size_cap}"  # widened while it divides the width
        zero = "+zp" if wq.zero_points else ""
        return f"int{wq.bits}{group}{zero} ({str(wq.scale_dtype).removeprefix('torch.')} scales)"

    parts = [f"linears {fmt(scheme.linear)}"]
    parts += [f"{selector} {fmt(wq)}" for selector, wq in scheme.overrides]
    if scheme.separate_output:
        parts += [f"table {fmt(scheme.embedding)}", f"output projection {fmt(scheme.output)}"]
    else:
        parts.append(f"table {fmt(scheme.embedding)} (= output projection)")
    if scheme.activations == "int8_per_token":
        parts.append("int8 per-token activations")
    return ", ".join(parts)
