"""Weight rounding rules and the fake-quantized twin of an export model.

Each target's quantizer rounds weights its own way (scale rule, range, scale storage dtype). The
twin applies *exactly* that rounding in PyTorch, so validation can tell lowering error (artifact vs
twin) from quantization error (twin vs fp32 reference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import UserError
from .export_model import ExportModel

# How a symmetric int-N scale is chosen from a group:
# - "torchao": scale = amax / ((qmax - qmin) / 2), q in [qmin, qmax] (torchao MappingType.SYMMETRIC)
# - "signed_extreme": the signed value of largest magnitude maps to qmin exactly (onnxruntime MatMulNBits)
# - "restricted": scale = amax / qmax, q in [-qmax, qmax] (coremltools linear_symmetric)
ScaleRule = Literal["torchao", "signed_extreme", "restricted"]


@dataclass(frozen=True)
class WeightQuant:
    bits: int  # 4, 8 or 16 (16 = store as `float_dtype`, no integer rounding)
    group_size: int | None = None  # None: one scale per output row
    scale_rule: ScaleRule = "torchao"
    scale_dtype: torch.dtype = torch.float32  # the dtype the runtime keeps scales in
    float_dtype: torch.dtype = torch.float32  # for bits == 16
    # The runtime rounds this layer's *input* to symmetric int8 per block of `act_block` along the
    # input dim (scale amax/127), e.g. onnxruntime MatMulNBits accuracy_level 4. None: not rounded.
    act_block: int | None = None

    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes [rows, cols] and scales [rows, groups] (already rounded to scale_dtype)."""
        rows, cols = w.shape
        group = self.group_size or cols
        if cols % group:
            raise UserError(f"group size {group} does not divide input width {cols}; pick a divisor of every layer width (e.g. 32)")
        g = w.float().reshape(rows, cols // group, group)
        qmin, qmax = self.qrange()
        amax = g.abs().amax(dim=-1, keepdim=True)
        if self.scale_rule == "torchao":
            scale = amax / ((qmax - qmin) / 2)
        elif self.scale_rule == "restricted":
            scale = amax / qmax
        else:
            idx = g.abs().argmax(dim=-1, keepdim=True)
            scale = g.gather(-1, idx) / qmin
        eps = torch.finfo(torch.float32).eps
        scale = torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)
        q = torch.clamp(torch.round(g / scale), qmin, -qmin - 1 if self.scale_rule != "restricted" else qmax)
        scale = scale.to(self.scale_dtype).float()
        return q.reshape(rows, cols).to(torch.int8), scale.squeeze(-1)

    def fake(self, w: Tensor) -> Tensor:
        if self.bits >= 16:
            return w.to(self.float_dtype).to(w.dtype)
        q, scale = self.quantize(w)
        rows, cols = w.shape
        group = self.group_size or cols
        deq = q.float().reshape(rows, cols // group, group) * scale.unsqueeze(-1)
        return deq.reshape(rows, cols).to(w.dtype)


def fake_quant_int8_per_token(x: Tensor) -> Tensor:
    """Dynamic asymmetric int8 per-token activation rounding (XNNPACK's 8da4w / torchao)."""
    x32 = x.float()
    lo = x32.amin(-1, keepdim=True).clamp(max=0)
    hi = x32.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = torch.clamp(-128 - torch.round(lo / scale), -128, 127)
    q = torch.clamp(torch.round(x32 / scale) + zero, -128, 127)
    return ((q - zero) * scale).to(x.dtype)


def fake_quant_int8_blockwise(x: Tensor, block: int) -> Tensor:
    """Symmetric int8 activation rounding per block of `block` along the last dim (amax/127)."""
    x32 = x.float()
    g = x32.reshape(*x32.shape[:-1], x32.shape[-1] // block, block)
    scale = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.clamp(torch.round(g * inv), -127, 127) * scale).reshape(x32.shape).to(x.dtype)


@dataclass(frozen=True)
class QuantScheme:
    """How one target stores and computes: the twin follows it exactly."""

    linear: WeightQuant
    embedding: WeightQuant
    output: WeightQuant  # the output projection (same tensor as the embedding when shared and stored once)
    int8_dynamic_activations: bool = False
    compute_dtype: torch.dtype = torch.float32


class _ActivationFakeQuant(nn.Module):
    def __init__(self, linear: nn.Module, block: int | None = None) -> None:
        super().__init__()
        self.linear, self.block = linear, block

    def forward(self, x: Tensor) -> Tensor:
        if self.block is not None:
            return self.linear(fake_quant_int8_blockwise(x, self.block))
        return self.linear(fake_quant_int8_per_token(x))


@torch.no_grad()
def fake_quantized_twin(model: ExportModel, scheme: QuantScheme) -> ExportModel:
    """A copy of `model` whose weights (and activations, where the target quantizes them) are rounded
    exactly as the target rounds them. Shared weights stay shared in the twin."""
    twin = copy.deepcopy(model)  # deepcopy keeps aliasing: shared blocks stay one module
    for block in twin.blocks:
        for name, child in list(block.named_children()):
            if isinstance(child, nn.Linear):
                child.weight.copy_(scheme.linear.fake(child.weight))
                if scheme.int8_dynamic_activations:
                    setattr(block, name, _ActivationFakeQuant(child))
                elif scheme.linear.act_block is not None:
                    setattr(block, name, _ActivationFakeQuant(child, scheme.linear.act_block))
    emb = twin.tok_embeddings.weight
    if twin.output is None and scheme.output != scheme.embedding:
        # Separately stored output projection: its own rounding, its own tensor.
        twin.output = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        twin.output.weight = nn.Parameter(scheme.output.fake(emb), requires_grad=False)
    elif twin.output is not None:
        twin.output.weight.copy_(scheme.output.fake(twin.output.weight))
    emb.copy_(scheme.embedding.fake(emb))
    if scheme.int8_dynamic_activations and twin.output is not None:
        twin.output = _ActivationFakeQuant(twin.output)
    elif scheme.output.act_block is not None and twin.output is not None:
        twin.output = _ActivationFakeQuant(twin.output, scheme.output.act_block)
    return twin.to(scheme.compute_dtype)
