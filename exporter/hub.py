"""Hugging Face hub ids (`facebook/MobileLLM-125M`) as checkpoints: the local cache first (works offline),
a download when the network allows, one line naming the id and the cache otherwise."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError, first_line

# owner/name as the hub spells them; a path that exists locally always wins over this reading.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# What an export reads from a checkpoint repository (never its other files: no code, no other formats).
CHECKPOINT_FILES = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "LICENSE*",
]


def is_hub_id(spec: str | Path) -> bool:
    text = str(spec)
    return not Path(text).expanduser().exists() and HUB_ID.fullmatch(text) is not None


def hub_cache() -> str:
    """The hub cache folder as huggingface_hub resolves it, read now (its constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of `repo_id`: from the cache, else downloaded (unless HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or an incomplete cache entry): try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(
            f"{repo_id}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
            f"download it where the network allows (huggingface-cli download {repo_id}) or pass a local path"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, cache_dir=cache))
    except Exception as exc:  # noqa: BLE001 - no network, unknown or gated repository: all bad input here
        raise UserError(
            f"{repo_id}: not in the Hugging Face cache ({cache}) and could not be downloaded "
            f"({first_line(exc)}); check the id and the network (gated models need `huggingface-cli login`), "
            "or pass a local path"
        ) from None
