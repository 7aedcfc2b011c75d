"""`mobilellm-export`: export a MobileLLM checkpoint to phone runtimes and check its parity.

Exit codes: 0 success, 1 parity failed, 2 user error (bad input), 3 internal error.
"""

from __future__ import annotations

import enum
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from .errors import ParityError, UserError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    rich_markup_mode=None,
    help=__doc__,
)


class TargetChoice(str, enum.Enum):
    executorch = "executorch"
    coreml = "coreml"
    onnx = "onnx"
    all = "all"


class Bits(str, enum.Enum):
    b4 = "4"
    b8 = "8"
    b16 = "16"


@app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="Hugging Face MobileLLM dir, training checkpoint-<step>/ dir, or .pt/.pth state dict. "
        "Default: the embedded default model.",
    ),
    target: TargetChoice = typer.Option(TargetChoice.all, "--target", "-t", help="Runtime to export for; 'all' exports every target."),
    bits: Bits = typer.Option(Bits.b4, "--bits", "-b", help="Weight precision: 4 (int4 group-wise), 8 (int8 per-channel) or 16 (fp16/fp32)."),
    output: Path = typer.Option(Path("dist"), "--output", "-o", help="Directory the bundle folders are written to."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset (e.g. 125M-LS) or config.json; required for a bare .pt/.pth."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.model / tokenizer.json if not beside the checkpoint."),
    group_size: int = typer.Option(32, "--group-size", help="Group size of int4 weights; must divide every input width."),
    embedding_bits: Optional[Bits] = typer.Option(None, "--embedding-bits", help="Precision of the (shared) embedding table. Default: 8 (16 when --bits 16)."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="KV-cache length of the exported model (up to the config's max context)."),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Keep Q/K/V and gate/up projections separate (debugging)."),
    no_parity: bool = typer.Option(False, "--no-parity", help="Skip the parity run after export."),
) -> None:
    """Export a checkpoint (the default command)."""
    if ctx.invoked_subcommand is not None:
        return
    from .pipeline import ExportOptions, run_export

    options = ExportOptions(
        checkpoint=checkpoint,
        config=config,
        tokenizer=tokenizer,
        targets=_expand_target(target.value),
        bits=int(bits.value),
        group_size=group_size,
        embedding_bits=int(embedding_bits.value) if embedding_bits else None,
        max_seq_len=max_seq_len,
        fuse=not no_fuse,
        parity=not no_parity,
        output=output,
    )
    run_export(options)


def _expand_target(name: str) -> list[str]:
    from .targets import TARGET_NAMES

    return list(TARGET_NAMES) if name == "all" else [name]


@app.command()
def inspect(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint to describe (default: the embedded model)."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset or config.json for a bare .pt/.pth."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Context used for the KV-cache estimate."),
) -> None:
    """Describe a checkpoint: architecture, parameters, sharing, tokenizer, memory at 4/8/16 bits."""
    from .inspect import describe

    typer.echo(describe(checkpoint, config, max_seq_len))


def main() -> None:
    """Console entry point: maps errors to one line and an exit code (usage errors exit 2 via Typer)."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ParityError as exc:
        typer.echo(f"parity failed: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # anything else is a bug in this tool, not the user's mistake
        traceback.print_exc()
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (please report it with the traceback above)", err=True)
        sys.exit(3)

if __name__ == "__main__":
    main()
