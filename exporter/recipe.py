"""Recipes: declarative TOML files holding every export choice for one released model x target x bits.

    mobilellm-export --recipe recipes/MobileLLM-125M/executorch-4bit.toml --checkpoint ~/MobileLLM-125M

Flags given on the command line override the recipe; unknown keys or values are refused, naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilellm.validation.parity import resolve_thresholds

from .checkpoint import resolve_config
from .config import ModelConfig, preset
from .errors import UserError
from .mixed_precision import ROLES, check_layer_bits, sensitive_layer_bits
from .quantize import QuantMethod
from .targets import TARGET_NAMES, TargetOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ExportOptions:
    """One export job: which checkpoint, which targets, where to; `quant` is what every target builds."""

    checkpoint: Path | None = None
    config: str | None = None
    tokenizer: Path | None = None
    targets: list[str] = field(default_factory=lambda: ["executorch"])
    quant: TargetOptions = field(default_factory=TargetOptions)
    parity: bool = True
    output: Path = Path("dist")
    thresholds: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    recipe: Recipe | None = None  #: the checkpoint must be the recipe's model
    jobs: int | None = None  #: processes exporting targets at once (None: pipeline.export_jobs decides)


_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "model": {"name": str, "preset": str, "config": str, "hub_id": str},
    "export": {
        "target": str,
        "bits": int,
        "group_size": int,
        "embedding_bits": int,
        "output_bits": int,
        "max_seq_len": int,
        "fuse": bool,
        "quant_method": str,
        "zero_points": bool,
        "layer_bits": dict,
        "sensitivity": str,
        "sensitive_layers": int,
    },
    "parity": {"thresholds": dict},
}
_CHOICES = {
    "target": ("executorch", "coreml", "onnx", "all"),
    "bits": (4, 8, 16),
    "embedding_bits": (4, 8, 16),
    "output_bits": (4, 8, 16),
    "quant_method": ("gptq", "mse", "rtn"),
}


@dataclass
class Recipe:
    path: Path
    name: str
    preset: str
    hub_id: str | None
    export: dict[str, Any]
    thresholds: dict[str, float] = field(default_factory=dict)
    #: `[model] config`: a config.json (relative to the recipe) for a model that is no preset
    config_file: Path | None = None

    def config(self) -> ModelConfig:
        return resolve_config(self.config_file) if self.config_file else preset(self.preset)

    def check_matches(self, cfg: ModelConfig) -> None:
        """Refuse a checkpoint whose architecture is not the recipe's model."""
        want = self.config()
        fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "sharing")
        diffs = [
            f"{f} {getattr(cfg, f)} (recipe: {getattr(want, f)})" for f in fields if getattr(cfg, f) != getattr(want, f)
        ]
        if diffs:
            raise UserError(
                f"{self.path}: the checkpoint is not {self.name}: {', '.join(diffs)}; pick the recipe for your model"
            )


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
                raise UserError(
                    f"{path}: {section}.{key} = {value!r} is not one of {', '.join(map(str, _CHOICES[key]))}"
                )
    model = raw.get("model", {})
    if ("preset" in model) == ("config" in model):
        raise UserError(f'{path}: [model] needs exactly one of preset (e.g. "125M") and config (a config.json)')
    config_file = (path.parent / model["config"]) if "config" in model else None
    if config_file is not None and "name" not in model:
        raise UserError(f"{path}: model.name is required with model.config")
    resolve_config(config_file) if config_file else preset(model["preset"])  # unknown preset, bad file -> clear error
    for selector, value in raw.get("export", {}).get("layer_bits", {}).items():
        try:
            check_layer_bits(selector, value)
        except ValueError:
            raise UserError(
                f"{path}: export.layer_bits: {selector!r} is not ROLE, ROLE@q4km or ROLE@BLOCK (ROLE one of "
                f"{', '.join(ROLES)}) or its value {value!r} is not 4, 8 or 16"
            ) from None
    thresholds = raw.get("parity", {}).get("thresholds", {})
    bits = raw.get("export", {}).get("bits", 4)
    try:
        resolve_thresholds(bits, thresholds)
    except UserError as exc:
        raise UserError(f"{path}: parity.thresholds: {exc}") from None
    return Recipe(
        path,
        model.get("name", model.get("preset")),
        model.get("preset", ""),
        model.get("hub_id"),
        dict(raw.get("export", {})),
        {k: float(v) for k, v in thresholds.items()},
        config_file,
    )


def export_options_from_recipe(
    plan: Recipe | None,
    *,
    checkpoint: Path | None = None,
    config: str | None = None,
    tokenizer: Path | None = None,
    target: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    embedding_bits: int | None = None,
    output_bits: int | None = None,
    max_seq_len: int | None = None,
    fuse: bool | None = None,
    quant_method: str | None = None,
    zero_points: bool | None = None,
    layer_bits: dict[str, int] | None = None,
    sensitivity: Path | None = None,
    sensitive_layers: int | None = None,
    parity: bool = True,
    output: Path = Path("dist"),
    thresholds: dict[str, float] | None = None,
    name: str | None = None,
) -> ExportOptions:
    """The export a recipe describes (none: the defaults), with every flag given (not None) overriding it.

    The one mapping of recipe keys to ExportOptions, used by `mobilellm-export --recipe` and the repo's
    benchmarks. `target` may be "all"; `zero_points` and `layer_bits` (role -> bits, e.g. {"w2": 8}) override the recipe's;
    `thresholds` are laid over the recipe's; `name` defaults to the recipe's model name. `sensitivity` (a
    sensitivity.json; a recipe's path is relative to the recipe) gives its `sensitive_layers` top layers more bits."""
    base = plan.export if plan else {}

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else base.get(key, default)

    target_name = str(pick(target, "target", "all"))
    emb = pick(embedding_bits, "embedding_bits", None)
    out_bits = pick(output_bits, "output_bits", None)
    roles = pick(layer_bits, "layer_bits", None)
    export_bits, fused = int(pick(bits, "bits", 4)), bool(pick(fuse, "fuse", True))
    ranking = sensitivity or (plan.path.parent / base["sensitivity"] if plan and "sensitivity" in base else None)
    top = int(pick(sensitive_layers, "sensitive_layers", 8))
    if ranking is None and sensitive_layers is not None:
        raise UserError("--sensitive-layers needs --sensitivity FILE (a sensitivity.json from inspect --sensitivity)")
    quant = TargetOptions(
        bits=export_bits,
        group_size=int(pick(group_size, "group_size", 32)),
        embedding_bits=int(emb) if emb is not None else None,
        output_bits=int(out_bits) if out_bits is not None else None,
        layer_bits=None if roles is None else tuple(sorted((role, int(b)) for role, b in roles.items())),
        max_seq_len=int(pick(max_seq_len, "max_seq_len", 512)),
        sensitive_layer_bits=sensitive_layer_bits(ranking, top, export_bits, fused) if ranking else (),
        fuse=fused,
        method=QuantMethod.named(
            str(pick(quant_method, "quant_method", "gptq")), pick(zero_points, "zero_points", None)
        ),
    )
    return ExportOptions(
        checkpoint=checkpoint,
        config=config,
        tokenizer=tokenizer,
        targets=list(TARGET_NAMES) if target_name == "all" else [target_name],
        quant=quant,
        parity=parity,
        output=output,
        thresholds={**(plan.thresholds if plan else {}), **(thresholds or {})},
        name=name or (plan.name if plan else None),
        recipe=plan,
    )
