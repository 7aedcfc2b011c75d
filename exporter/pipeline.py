"""The export pipeline: checkpoint -> reference -> export model -> quantize -> lower -> bundle -> validate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .assets import DEFAULT_MODEL_DIR
from .checkpoint import load_checkpoint
from .targets import load_target


@dataclass
class ExportOptions:
    checkpoint: Path | None = None
    config: str | None = None
    tokenizer: Path | None = None
    targets: list[str] = field(default_factory=lambda: ["executorch"])
    bits: int = 4
    group_size: int = 32
    embedding_bits: int | None = None
    max_seq_len: int = 512
    fuse: bool = True
    parity: bool = True
    output: Path = Path("dist")


def run_export(options: ExportOptions) -> None:
    modules = [load_target(name) for name in options.targets]  # fail fast, before any work
    load_checkpoint(options.checkpoint or DEFAULT_MODEL_DIR, options.config, options.tokenizer)
    del modules
