"""`mobilellm-export`: export a MobileLLM checkpoint to phone runtimes and check its parity.

Exit codes: 0 success, 1 parity failed, 2 user error (bad input), 3 internal error.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer

from .errors import ParityError, UserError
from .threads import one_openmp_thread_outside_torch

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


class QuantMethodChoice(str, enum.Enum):
    gptq = "gptq"
    mse = "mse"
    rtn = "rtn"


class Bits(str, enum.Enum):
    b4 = "4"
    b8 = "8"
    b16 = "16"


@app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Hugging Face MobileLLM dir, training checkpoint-<step>/ dir, .pt/.pth state dict, or a Hugging Face "
        "id such as facebook/MobileLLM-125M (hub cache first, else downloaded). Default: the embedded default model.",
    ),
    target: Optional[TargetChoice] = typer.Option(
        None, "--target", "-t", help="Runtime to export for; 'all' exports every target. Default: all."
    ),
    bits: Optional[Bits] = typer.Option(
        None,
        "--bits",
        "-b",
        help="Weight precision: 4 (int4 group-wise), 8 (int8 per-channel) or 16 (fp16/fp32). Default: 4.",
    ),
    output: Path = typer.Option(Path("dist"), "--output", "-o", help="Directory the bundle folders are written to."),
    recipe: Optional[Path] = typer.Option(
        None,
        "--recipe",
        "-r",
        help="Recipe file (recipes/<model>/<target>-<bits>bit.toml) holding every export choice; flags override it.",
    ),
    config: Optional[str] = typer.Option(
        None, "--config", help="Preset (e.g. 125M-LS) or config.json; required for a bare .pt/.pth."
    ),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="tokenizer.model / tokenizer.json if not beside the checkpoint."
    ),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", help="Group size of int4 weights; must divide every input width. Default: 32."
    ),
    embedding_bits: Optional[Bits] = typer.Option(
        None, "--embedding-bits", help="Precision of the (shared) embedding table. Default: the target's (see README)."
    ),
    output_bits: Optional[Bits] = typer.Option(
        None,
        "--output-bits",
        help="Precision of an output projection stored apart from the embedding (ExecuTorch, untied lm_head). Default: the target's.",
    ),
    max_seq_len: Optional[int] = typer.Option(
        None,
        "--max-seq-len",
        help="KV-cache length of the exported model (up to the config's max context). Default: 512.",
    ),
    quant_method: Optional[QuantMethodChoice] = typer.Option(
        None,
        "--quant-method",
        help="How int codes are chosen: gptq (searched clipping + GPTQ rounding on the shipped calibration text), "
        "mse (searched clipping, round to nearest) or rtn (symmetric max|w|/qmax, round to nearest). Default: gptq.",
    ),
    zero_points: Optional[bool] = typer.Option(
        None,
        "--zero-points/--no-zero-points",
        help="Store a zero point per group where the format can (Core ML, ONNX). Default: the method's (gptq: no, mse: yes).",
    ),
    layer_bits: Optional[list[str]] = typer.Option(
        None,
        "--layer-bits",
        help="Mixed precision: ROLE=BITS for every block's ROLE linear (wqkv, wo, w13, w2; unfused: wq wk wv w1 w3), "
        "ROLE@q4km=BITS for the blocks llama.cpp's Q4_K_M gives more bits, ROLE@7=BITS for block 7's; the most "
        "specific wins; repeatable; 'none' for uniform. Default: the target's (README).",
    ),
    sensitivity: Optional[Path] = typer.Option(
        None,
        "--sensitivity",
        help="A sensitivity.json from `inspect CKPT --sensitivity --bits B`: its --sensitive-layers most sensitive "
        "block linears get twice the bits, on top of --layer-bits or the target's default.",
    ),
    sensitive_layers: Optional[int] = typer.Option(
        None, "--sensitive-layers", help="With --sensitivity: how many of its top layers get more bits. Default: 8."
    ),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Keep Q/K/V and gate/up projections separate (debugging)."),
    no_parity: bool = typer.Option(False, "--no-parity", help="Skip the parity run after export."),
    threshold: Optional[list[str]] = typer.Option(
        None, "--threshold", help="Override a parity threshold, e.g. reference.top1_agreement=0.9 (repeatable)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Bundle name prefix (default: the checkpoint's folder name)."
    ),
    jobs: Optional[int] = typer.Option(
        None,
        "--jobs",
        "-j",
        min=1,
        help="Targets exported at once, each in its own process. Default: 2 on 2+ cores when memory allows, else 1.",
    ),
) -> None:
    """Export a checkpoint (the default command)."""
    one_openmp_thread_outside_torch()  # every command: before anything loads torch
    if ctx.invoked_subcommand is not None:
        return
    from .pipeline import run_export
    from .recipe import export_options_from_recipe, load_recipe

    options = export_options_from_recipe(
        load_recipe(recipe) if recipe else None,
        checkpoint=checkpoint,
        config=config,
        tokenizer=tokenizer,
        target=target.value if target else None,
        bits=int(bits.value) if bits else None,
        group_size=group_size,
        embedding_bits=int(embedding_bits.value) if embedding_bits else None,
        output_bits=int(output_bits.value) if output_bits else None,
        max_seq_len=max_seq_len,
        fuse=False if no_fuse else None,
        quant_method=quant_method.value if quant_method else None,
        zero_points=zero_points,
        layer_bits=parse_layer_bits(layer_bits),
        sensitivity=sensitivity,
        sensitive_layers=sensitive_layers,
        parity=not no_parity,
        output=output,
        thresholds=parse_thresholds(threshold),
        name=name,
    )
    run_export(dataclasses.replace(options, jobs=jobs))


def parse_layer_bits(items: list[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    if items == ["none"]:
        return {}
    from .mixed_precision import ROLES, check_layer_bits

    out: dict[str, int] = {}
    for item in items:
        selector, _, bits = item.partition("=")
        try:
            check_layer_bits(selector, {"4": 4, "8": 8, "16": 16}.get(bits, bits))
        except ValueError:
            raise UserError(
                f"--layer-bits {item!r}: expected SELECTOR=BITS, SELECTOR a role ({', '.join(ROLES)}) alone (every "
                "block), ROLE@q4km (the blocks llama.cpp's Q4_K_M gives more bits) or ROLE@BLOCK, BITS 4, 8 or 16; "
                "e.g. w2=8 or w13@5=8"
            ) from None
        out[selector] = int(bits)
    return out


def parse_thresholds(items: Optional[list[str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise UserError(
                f"--threshold {item!r}: expected <reference|twin>.<metric>=<number>, e.g. twin.top1_agreement=0.99"
            ) from None
    return out


@app.command()
def inspect(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="Checkpoint dir, state dict or Hugging Face id to describe (default: the embedded model)."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="Preset or config.json for a bare .pt/.pth."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Context used for the KV-cache estimate."),
    no_ops: bool = typer.Option(
        False, "--no-ops", help="Skip the export-graph operator counts (they need a torch.export run)."
    ),
    sensitivity: bool = typer.Option(
        False,
        "--sensitivity",
        help="Instead: round each linear layer (and each application of a shared block) alone and rank them by "
        "how much that moves perplexity on the calibration text; writes sensitivity.png and sensitivity.json.",
    ),
    bits: int = typer.Option(4, "--bits", help="With --sensitivity: the bit width each layer is rounded to."),
    group_size: int = typer.Option(32, "--group-size", help="With --sensitivity: quantization group size."),
    tokens: int = typer.Option(512, "--tokens", help="With --sensitivity: calibration tokens per measurement."),
    sensitivity_method: QuantMethodChoice = typer.Option(
        QuantMethodChoice.gptq,
        "--quant-method",
        help="With --sensitivity: how each layer is rounded, as export's --quant-method (gptq reads the export's Hessians).",
    ),
    output: Path = typer.Option(Path("."), "--output", "-o", help="With --sensitivity: where the chart and data go."),
) -> None:
    """Describe a checkpoint: architecture, parameters, sharing, tokenizer, memory, export-graph op counts;
    or, with --sensitivity, which layers quantization hurts most."""
    if sensitivity:
        from .sensitivity import run_sensitivity

        typer.echo(run_sensitivity(checkpoint, config, bits, group_size, tokens, output, sensitivity_method.value))
        return
    from .inspect import describe

    typer.echo(describe(checkpoint, config, max_seq_len, ops=not no_ops))


@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="Bundle folder written by an export."),
    checkpoint: Optional[Path] = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Recompute the reference outputs from these weights instead of the bundle's golden data.",
    ),
    config: Optional[str] = typer.Option(
        None, "--config", help="Preset or config.json for a bare .pt/.pth checkpoint."
    ),
    threshold: Optional[list[str]] = typer.Option(
        None, "--threshold", help="Override a threshold, e.g. twin.top1_agreement=0.995 (repeatable)."
    ),
    report_dir: Optional[Path] = typer.Option(
        None,
        "--report-dir",
        help="Where parity.json/.md/.junit.xml and their pictures go (default: the bundle; refused if it is read-only).",
    ),
) -> None:
    """Re-run the parity check on a bundle; exit 0 pass, 1 parity failed, 2 bad input."""
    from mobilellm.exporter.validate import validate_bundle
    from mobilellm.validation.reports import markdown

    result, report = validate_bundle(bundle, checkpoint, parse_thresholds(threshold), report_dir, config)
    typer.echo(markdown(report))
    if not result.passed:
        raise ParityError("; ".join(result.failures()))


@app.command()
def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder written by an export."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (with --temperature > 0)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
) -> None:
    """Generate text with the bundle's own runtime client, streamed, then prompt/decode tokens per second."""
    from .generate import generate_from_bundle
    from .targets import GenerationRequest

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    request = GenerationRequest(prompt, max_new_tokens, temperature, top_p, seed, chat)
    result = generate_from_bundle(bundle, request, stream)
    sys.stdout.write("\n")
    typer.echo(
        f"{result.client}: prompt {result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.1f} tok/s, "
        f"{result.generated_tokens} generated at {result.decode_tokens_per_s:.1f} tok/s",
        err=True,
    )


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder written by an export."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for the runtime."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prefill length."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Tokens decoded after the prefill."),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as JSON instead."),
) -> None:
    """Load time, prefill/decode tokens/s, peak RSS and size of one bundle (run in a fresh process)."""

    from .measure import bench_bundle_subprocess, bench_summary

    row = bench_bundle_subprocess(bundle, threads, prompt_tokens, decode_tokens)
    typer.echo(json.dumps(row, indent=2) if as_json else bench_summary(row))


@app.command()
def release(
    paths: list[Path] = typer.Argument(
        ...,
        metavar="RECIPE_OR_DIR",
        help="Recipes or folders of recipes; with --merge: bundles or folders of bundles.",
    ),
    checkpoint: Optional[list[str]] = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="MODEL=PATH: the checkpoint of the recipes whose [model] name is MODEL (repeatable), "
        "e.g. MobileLLM-125M=~/models/MobileLLM-125M.",
    ),
    output: Path = typer.Option(
        Path("dist"), "--output", "-o", help="Where the bundles, their logs, release.json and release.md go."
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Exports run at once, each in its own process."),
    matrix: bool = typer.Option(
        False, "--matrix", help='Print the job list as JSON ({"include": [...]}) for a CI matrix.'
    ),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="Report on bundles exported elsewhere (the final CI job), re-checking each as validate does.",
    ),
    expect: Optional[list[Path]] = typer.Option(
        None,
        "--expect",
        help="With --merge: the release's recipes (files or folders); a missing bundle fails the release.",
    ),
) -> None:
    """Export every recipe and write DIR/release.json and release.md; exit 0 all passed, 1 any parity failure, 2 bad input."""
    from .release import matrix_json, parse_checkpoints, plan_jobs
    from .release import merge as merge_bundles
    from .release import release as run_release

    if merge:
        if matrix or checkpoint or jobs != 1:
            raise UserError("--merge reports on finished bundles: --matrix, --checkpoint and --jobs do not apply")
        outcome = merge_bundles(paths, output, plan_jobs(expect) if expect else None)
    elif expect:
        raise UserError("--expect goes with --merge (a release run expects the recipes it is given)")
    elif matrix:
        typer.echo(matrix_json(plan_jobs(paths)))
        return
    else:
        planned = plan_jobs(paths)
        outcome = run_release(planned, parse_checkpoints(checkpoint, planned), output, jobs)
    for line in outcome.errors:
        typer.echo(f"error: {line}", err=True)
    c = outcome.report["counts"]
    typer.echo(
        f"release {'PASS' if outcome.report['passed'] else 'FAIL'}: {c['passed']} passed, {c['failed']} failed, "
        f"{c['missing']} missing; {output / 'release.md'}"
    )
    if outcome.code:
        raise typer.Exit(outcome.code)


@app.command("random-checkpoint")
def random_checkpoint(
    preset_name: str = typer.Argument(
        ..., metavar="PRESET", help="125M, 350M, 600M, 1B, 1.5B, or one of those with -LS."
    ),
    output: Path = typer.Argument(..., help="Directory to write (Hugging Face MobileLLM format)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32."),
    seed: int = typer.Option(0, "--seed"),
    layers: Optional[int] = typer.Option(
        None, "--layers", help="Override the stored block count (smaller test models)."
    ),
) -> None:
    """Write a randomly initialised checkpoint of a preset, for benchmarks and tests of real sizes."""
    from .random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(preset_name, output, dtype, seed, layers)
    typer.echo(f"wrote {path}")


def _quiet_library_logs() -> None:
    """torchao and torch log import-time noise (CUDA-only kernels missing, a deprecation) that says
    nothing about the user's export; keep the terminal for our own messages."""

    for name in ("torchao", "torch.utils._pytree", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation and tracing chatter from the lowering libraries, issued by their own modules.
    warnings.filterwarnings("ignore", module=r"(torch|torchao|executorch|coremltools|onnx)(\.|$)")
    # torch.export pickles pytree specs; its deprecation warning is attributed to the stdlib copyreg.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")


def _one_line(text: str) -> str:
    """A message as one line with control characters escaped: a name from a bundle or a checkpoint
    must not be able to repaint the terminal (an escape code turning FAIL into PASS)."""
    from .bundle import printable

    return printable(text, limit=2000)


def main() -> None:
    """Console entry point: maps errors to one line and an exit code (usage errors exit 2 via Typer)."""
    _quiet_library_logs()
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except ParityError as exc:
        typer.echo(f"parity failed: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except Exception as exc:  # anything else is a bug in this tool, not the user's mistake
        traceback.print_exc()
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (please report it with the traceback above)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
