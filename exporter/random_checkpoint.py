"""Randomly initialised checkpoints of any preset, written in the Hugging Face MobileLLM format."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .assets import DEFAULT_MODEL_DIR
from .atomic import install_new, staging
from .checkpoint import save_checkpoint
from .config import preset
from .errors import UserError
from .model import MobileLLM

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def write_random_checkpoint(
    preset_name: str, output: Path, dtype: str = "float16", seed: int = 0, layers: int | None = None
) -> Path:
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    output = Path(output)
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UserError(f"{output}: exists and is not a folder; random-checkpoint writes a new folder")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(
            f"{output}: the folder is not empty; random-checkpoint writes a new folder and never replaces one "
            "(pass a new or empty folder)"
        )
    cfg = preset(preset_name)
    if layers is not None:
        cfg = cfg.replace(n_layers=layers)
    torch.manual_seed(seed)
    model = MobileLLM(cfg)
    for name, p in model.named_parameters():
        if p.ndim == 2:  # GPT-2 style init, residual projections scaled by depth
            std = 0.02 / math.sqrt(2 * cfg.n_applied) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.normal_(0, std)
    # The Llama-2 vocabulary is not ours to ship; a 32000-entry model gets the default tokenizer,
    # whose ids are a subset of its range, so runners and parity text still work.
    tokenizer = DEFAULT_MODEL_DIR / "tokenizer.model"
    with staging(output) as tmp:
        save_checkpoint(
            model, tmp, "hf-safetensors", _DTYPES[dtype], tokenizer=tokenizer if tokenizer.is_file() else None
        )
        install_new(tmp, output)  # an empty folder is replaced; one that filled up meanwhile is not
    return output
