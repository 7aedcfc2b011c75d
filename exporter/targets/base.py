"""The small interface every target implements (see `exporter/targets/executorch.py` for one).

A target module defines:

    NAME: str
    def quant_scheme(opts: TargetOptions) -> QuantScheme
        How this target rounds weights/activations; the fake-quant twin follows it exactly.
    def export(model: ExportModel, quantized: QuantizedModel, ckpt: Checkpoint, opts: TargetOptions, bundle_dir: Path) -> ExportedArtifact
        Lower the fp32 export model, storing exactly the codes/scales in `quantized`, and write the artifact file(s) into `bundle_dir` (a temp dir the
        pipeline renames into place when everything succeeded).
    def open_runtime(bundle_dir: Path, manifest: dict) -> TargetRuntime
        Load the written artifact with the target's real runtime (or its Linux evaluator).
    def speed_unmeasurable_reason() -> str | None          (optional)
        Why `make bench` cannot time this target's runtime here (e.g. Core ML off Apple OSes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..checkpoint import Checkpoint
from ..export_model import ExportModel
from ..quantize import QuantizedModel, QuantMethod, QuantScheme


@dataclass(frozen=True)
class TargetOptions:
    bits: int = 4
    group_size: int = 32
    embedding_bits: int | None = None  # None: the target's default (8, or 16 with --bits 16)
    output_bits: int | None = None  # a separately stored output projection; None: the target's default
    # Mixed precision: (block linear role, bits) pairs, e.g. (("w2", 8),); None: the target's default.
    layer_bits: tuple[tuple[str, int], ...] | None = None
    max_seq_len: int = 512
    fuse: bool = True
    method: QuantMethod = field(default_factory=QuantMethod)  # how codes are chosen within the format

    def resolved_layer_bits(self, default: dict[int, tuple[tuple[str, int], ...]]) -> tuple[tuple[str, int], ...]:
        """(role, bits) of the block linears not at `bits`: the options', else the target's default for these bits."""
        chosen = self.layer_bits if self.layer_bits is not None else default.get(self.bits, ())
        return tuple((role, bits) for role, bits in chosen if bits != self.bits)

    def resolved_embedding_bits(self) -> int:
        if self.embedding_bits is not None:
            return self.embedding_bits
        return 16 if self.bits == 16 else 8


@dataclass
class ExportedArtifact:
    target: str
    files: list[str]  # paths relative to the bundle dir, the main artifact first
    io: dict[str, Any] = field(default_factory=dict)  # input/output names, shapes, dtypes
    info: dict[str, Any] = field(default_factory=dict)  # quantization details, measured sizes, notes


class TargetRuntime(Protocol):
    def reset(self) -> None:
        """Forget all cached state (start a new sequence)."""

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Run `tokens` (int64 [S]) at positions start..start+S-1; return float32 logits [S, vocab]."""


class TargetModule(Protocol):
    NAME: str

    def quant_scheme(self, opts: TargetOptions) -> QuantScheme: ...

    def export(
        self,
        model: ExportModel,
        quantized: QuantizedModel,
        ckpt: Checkpoint | None,
        opts: TargetOptions,
        bundle_dir: Path,
    ) -> ExportedArtifact: ...

    def open_runtime(self, bundle_dir: Path, manifest: dict[str, Any]) -> TargetRuntime: ...
