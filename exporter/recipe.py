"""Recipes: declarative TOML files holding every export choice for one released model x target x bits.

    mobilellm-export --recipe recipes/MobileLLM-125M/executorch-4bit.toml --checkpoint ~/MobileLLM-125M

Flags given on the command line override the recipe; unknown keys or values are refused, naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig, preset
from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "model": {"name": str, "preset": str, "hub_id": str},
    "export": {"target": str, "bits": int, "group_size": int, "embedding_bits": int, "max_seq_len": int, "fuse": bool,
               "quant_method": str, "symmetric": bool},
    "parity": {"thresholds": dict},
}
_CHOICES = {"target": ("executorch", "coreml", "onnx", "all"), "bits": (4, 8, 16), "embedding_bits": (4, 8, 16),
            "quant_method": ("gptq", "mse", "rtn")}


@dataclass
class Recipe:
    path: Path
    name: str
    preset: str
    hub_id: str | None
    export: dict[str, Any]
    thresholds: dict[str, float] = field(default_factory=dict)

    def config(self) -> ModelConfig:
        return preset(self.preset)

    def check_matches(self, cfg: ModelConfig) -> None:
        """Refuse a checkpoint whose architecture is not the recipe's model."""
        want = self.config()
        fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "sharing")
        diffs = [f"{f} {getattr(cfg, f)} (recipe: {getattr(want, f)})" for f in fields if getattr(cfg, f) != getattr(want, f)]
        if diffs:
            raise UserError(f"{self.path}: the checkpoint is not {self.name}: {', '.join(diffs)}; pick the recipe for your model")


def load_recipe(path: Path) -> Recipe:
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass one recipe file, e.g. {path}/executorch-4bit.toml")
    if not path.is_file():
        raise UserError(f"{path}: recipe not found (see recipes/README.md for the list)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None
    for section, body in raw.items():
        if section not in _SECTIONS:
            raise UserError(f"{path}: unknown section [{section}]; allowed: {', '.join(_SECTIONS)}")
        if not isinstance(body, dict):
            raise UserError(f"{path}: {section} must be a table")
        for key, value in body.items():
            allowed = _SECTIONS[section]
            if key not in allowed:
                raise UserError(f"{path}: unknown key {section}.{key}; allowed: {', '.join(allowed)}")
            if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
                raise UserError(f"{path}: {section}.{key} must be {allowed[key].__name__}, got {value!r}")  # type: ignore[union-attr]
            if key in _CHOICES and value not in _CHOICES[key]:
                raise UserError(f"{path}: {section}.{key} = {value!r} is not one of {', '.join(map(str, _CHOICES[key]))}")
    model = raw.get("model", {})
    if "preset" not in model:
        raise UserError(f"{path}: missing model.preset")
    preset(model["preset"])  # unknown preset -> clear error
    thresholds = raw.get("parity", {}).get("thresholds", {})
    from mobilellm.validation.parity import resolve_thresholds

    bits = raw.get("export", {}).get("bits", 4)
    try:
        resolve_thresholds(bits, thresholds)
    except UserError as exc:
        raise UserError(f"{path}: parity.thresholds: {exc}") from None
    return Recipe(path, model.get("name", model["preset"]), model["preset"], model.get("hub_id"), dict(raw.get("export", {})),
                  {k: float(v) for k, v in thresholds.items()})
