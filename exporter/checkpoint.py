"""Checkpoint loading and saving: Hugging Face MobileLLM dirs, training-code dirs, bare state dicts.

Nothing here ever executes code from a checkpoint: safetensors, or `torch.load(weights_only=True)`.
Every problem with the input is a `UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .bundle import printable
from .config import SHARING_STRATEGIES, ModelConfig, preset
from .errors import UserError, first_line, loading
from .hub import is_hub_id, resolve_hub_id
from .model import MobileLLM, rope_tables

CheckpointFormat = Literal["hf-safetensors", "hf-bin", "training", "pt"]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SUPPORTED_MODEL_TYPES = ("mobilellm", "llama")


@dataclass
class Checkpoint:
    config: ModelConfig
    model: MobileLLM  # fp32, eval mode
    tokenizer_path: Path | None
    source: Path
    source_format: str
    source_dtype: str
    # How layer sharing was recovered from a flat checkpoint with byte-identical layers, as one
    # human sentence; None when the checkpoint was loaded as its config describes it.
    sharing_detected: str | None = None
    hub_id: str | None = None  # the Hugging Face id it was resolved from, if any

    @property
    def name(self) -> str:
        """What bundles and manifests call it: the hub repository's name, else the folder or file stem."""
        if self.hub_id:
            return self.hub_id.rsplit("/", 1)[1]
        return self.source.stem if self.source.is_file() else self.source.name


# ----------------------------------------------------------------------------- config.json
def config_from_hf(raw: dict[str, Any], where: Path) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; expected 'mobilellm' (Hugging Face) or 'llama' (training code)"
        )
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in raw]
    if missing:
        raise UserError(f"{where}: missing required key(s) {', '.join(missing)}")
    for key in (*required, "num_key_value_heads", "max_position_embeddings"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
            raise UserError(f"{where}: {key} must be an integer, got {raw[key]!r}")

    sharing_raw = raw.get("layer_sharing_strategy", raw.get("layer_sharing", False))
    if isinstance(sharing_raw, bool):
        sharing = "immediate" if sharing_raw else "none"
    elif isinstance(sharing_raw, str) and sharing_raw in SHARING_STRATEGIES:
        sharing = sharing_raw
    else:
        raise UserError(
            f"{where}: layer_sharing must be true/false or one of {', '.join(SHARING_STRATEGIES)}, got {sharing_raw!r}"
        )
    share_embedding = raw.get("share_embedding", raw.get("tie_word_embeddings", True))
    if not isinstance(share_embedding, bool):
        raise UserError(f"{where}: share_embedding must be true or false, got {share_embedding!r}")
    try:  # ModelConfig bounds every value before anything is allocated; name the file on failure
        return ModelConfig(
            dim=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"],
            n_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            ffn_dim=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            norm_eps=_number(raw, "rms_norm_eps", 1e-5, where),
            rope_theta=_number(raw, "rope_theta", 10000.0, where),
            max_context=raw.get("max_position_embeddings", 2048),
            share_embedding=share_embedding,
            sharing=sharing,  # type: ignore[arg-type]
            # bos: null or 0 reads as 1, eos: null as 2, as this tool has always read them
            bos_id=_token_id(raw.get("bos_token_id") or None, 1, "bos_token_id", where),
            eos_id=_token_id(raw.get("eos_token_id"), 2, "eos_token_id", where),
        )
    except UserError as exc:  # name the file and the key as config.json spells it
        field, _, rest = str(exc).removeprefix("config: ").partition(" ")
        raise UserError(f"{where}: {_HF_KEYS.get(field, field)} {rest}") from None


_HF_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "max_context": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "bos_id": "bos_token_id",
    "eos_id": "eos_token_id",
}


def _number(raw: dict[str, Any], key: str, default: float, where: Path) -> float:
    value = raw.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{where}: {key} must be a number, got {printable(repr(value), 60)}")
    return float(value)


def _token_id(value: Any, default: int, key: str, where: Path) -> int:
    """A token id (the first of a list, as Hugging Face allows for eos); null means the default."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: {key} must be an integer token id, got {printable(repr(value), 60)}")
    return value


def config_to_hf(cfg: ModelConfig, model_type: str = "mobilellm", dtype: str = "float16") -> dict[str, Any]:
    arch = "MobileLLMForCausalLM" if model_type == "mobilellm" else "LlamaForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_context,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "share_embedding": cfg.share_embedding,
        "tie_word_embeddings": False if model_type == "mobilellm" else cfg.share_embedding,
        "layer_sharing": cfg.sharing != "none",
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "torch_dtype": dtype,
    }
    if cfg.sharing not in ("none", "immediate"):
        out["layer_sharing_strategy"] = cfg.sharing  # our extension for ablation checkpoints
    return out


_MAX_JSON_BYTES = 64 << 20  # a config.json or a shard index; far above any real one


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, too large for a config or index file")
        raw = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix or re-download the file") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: invalid JSON ({type(exc).__name__}); fix or re-download the file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


# ----------------------------------------------------------------------------- tensors
def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{path}: corrupt or truncated safetensors file ({first_line(exc)}); re-download or re-save it"
        ) from None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise UserError(
            f"{path}: refused to load: the file contains pickled objects beyond plain tensors ({first}); "
            "convert it to safetensors with code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise UserError(
            f"{path}: corrupt or truncated checkpoint ({first_line(exc)}); re-download or re-save it"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return obj


def _load_tensor_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: weight file is missing")
    with loading(path, "checkpoint weights", "re-download or re-save it"):
        return _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)


def _load_sharded(index_path: Path) -> dict[str, Tensor]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: no 'weight_map' object in the index")
    shards = set(weight_map.values())
    for shard in shards:  # shard names from elsewhere: plain file names beside the index, nothing else
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise UserError(
                f"{index_path}: weight_map names shard {printable(repr(shard), 80)}; shards are files beside the index"
            )
    tensors: dict[str, Tensor] = {}
    for shard in sorted(shards):
        tensors.update(_load_tensor_file(index_path.parent / shard))
    absent = sorted(k for k in weight_map if k not in tensors)
    if absent:
        raise UserError(f"{index_path}: index lists tensors its shards do not contain: {_names(absent)}")
    return tensors


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _normalize_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in tensors.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key.removeprefix("model.")] = value
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys (without the `model.` prefix) and shapes for a config."""
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (cfg.dim, cfg.dim),
                p + "self_attn.k_proj.weight": (cfg.kv_dim, cfg.dim),
                p + "self_attn.v_proj.weight": (cfg.kv_dim, cfg.dim),
                p + "self_attn.o_proj.weight": (cfg.dim, cfg.dim),
                p + "mlp.gate_proj.weight": (cfg.ffn_dim, cfg.dim),
                p + "mlp.up_proj.weight": (cfg.ffn_dim, cfg.dim),
                p + "mlp.down_proj.weight": (cfg.dim, cfg.ffn_dim),
                p + "input_layernorm.weight": (cfg.dim,),
                p + "post_attention_layernorm.weight": (cfg.dim,),
            }
        )
    if not cfg.share_embedding:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    """Verify the tensors match the config exactly; return them without ignorable extras."""
    want = expected_shapes(cfg)
    if cfg.share_embedding:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # ignored by design
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # derived buffer
    missing = sorted(k for k in want if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in want)
    if missing:
        raise UserError(
            f"{where}: missing tensor(s) {_names(['model.' + k for k in missing])}; the checkpoint is incomplete or the config describes another model"
        )
    if unexpected:
        raise UserError(
            f"{where}: unexpected tensor(s) {_names(unexpected)}; the config (num_hidden_layers?) does not describe these weights"
        )
    bad = [
        f"model.{k} is {tuple(tensors[k].shape)}, config implies {want[k]}"
        for k in want
        if tuple(tensors[k].shape) != want[k]
    ]
    if bad:
        hint = _shape_hint(cfg, tensors)
        raise UserError(
            f"{where}: tensor shape contradicts config.json: {bad[0]}"
            + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
            + hint
        )
    non_float = [k for k, v in tensors.items() if not v.is_floating_point()]
    if non_float:
        raise UserError(f"{where}: tensor(s) {_names(non_float)} are not floating point")
    return tensors


def _shape_hint(cfg: ModelConfig, tensors: dict[str, Tensor]) -> str:
    k = tensors.get("layers.0.self_attn.k_proj.weight")
    if k is not None and k.ndim == 2 and k.shape[0] != cfg.kv_dim and k.shape[0] % cfg.head_dim == 0:
        return f"; the weights imply num_key_value_heads={k.shape[0] // cfg.head_dim}, config says {cfg.n_kv_heads}"
    return ""


# ----------------------------------------------------------------------------- shared-block detection
# Tried in this order; the first pattern whose every pair of layers is byte-identical wins (for a
# stack where all layers are identical, every pattern fits and gives the same numbers).
_FOLDABLE: tuple[str, ...] = ("immediate", "repeat_all", "reverse")
_SAMPLE = 64  # elements per tensor in the cheap fingerprint


def _layer_suffixes(cfg: ModelConfig) -> list[str]:
    return [k.removeprefix("layers.0.") for k in expected_shapes(cfg.replace(n_layers=1)) if k.startswith("layers.0.")]


def _bits(t: Tensor) -> Tensor:
    """`t` reinterpreted (no copy) as integers of the same width, so equality is bitwise."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    try:
        return t.view(ints[t.element_size()])
    except (KeyError, RuntimeError):
        return t


def _fingerprint(t: Tensor) -> tuple[object, ...]:
    """dtype, shape and a strided sample of the bits: equal for identical tensors, cheap to build."""
    flat = _bits(t).reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    return (t.dtype, tuple(t.shape), tuple(flat[::step][:_SAMPLE].tolist()))


def _identical(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # the same memory (a file that aliases the tensors)
    return torch.equal(_bits(a), _bits(b))


def fold_shared_blocks(
    cfg: ModelConfig, tensors: dict[str, Tensor]
) -> tuple[ModelConfig, dict[str, Tensor], str] | None:
    """Recover layer sharing from a flat (unrolled) stack whose layers repeat byte for byte.

    For a `sharing="none"` config with an even number 2N of layers, finds the first strategy S in
    immediate / repeat_all / reverse such that, with schedule s of N blocks under S, every tensor of
    layer i is bitwise identical to that of the layer where block s[i] is first applied. Returns the
    folded config (N stored blocks, sharing S), the tensors with each stored block once (the same
    tensor objects, nothing is copied) and a one-sentence description; None when no pattern fits
    exactly. The folded model computes exactly what the flat one does, since its schedule applies
    the very same weights in the very same order, each application with its own KV cache.

    Cost: one small fingerprint per tensor, then a full comparison only of candidate pairs, which
    each layer joins at most once per pattern; O(params), no copies.
    """
    total = cfg.n_layers
    if cfg.sharing != "none" or total < 2 or total % 2:
        return None
    suffixes = _layer_suffixes(cfg)
    layers = [[tensors[f"layers.{i}.{s}"] for s in suffixes] for i in range(total)]
    prints = [tuple(_fingerprint(t) for t in layer) for layer in layers]
    half = total // 2
    for strategy in _FOLDABLE:
        folded = cfg.replace(n_layers=half, sharing=strategy)
        schedule = folded.schedule()
        first: dict[int, int] = {}
        for slot, block in enumerate(schedule):
            first.setdefault(block, slot)
        pairs = [(first[block], slot) for slot, block in enumerate(schedule) if first[block] != slot]
        if any(prints[a] != prints[b] for a, b in pairs):
            continue
        if not all(_identical(x, y) for a, b in pairs for x, y in zip(layers[a], layers[b])):
            continue
        out = {k: v for k, v in tensors.items() if not k.startswith("layers.")}
        for block in range(half):
            src = first[block]
            out.update({f"layers.{block}.{s}": t for s, t in zip(suffixes, layers[src])})
        return folded, out, _describe_fold(strategy, total)
    return None


def _describe_fold(strategy: str, total: int) -> str:
    half, last = total // 2, total - 1
    what = {
        "immediate": f"{half} blocks each applied twice in a row (layer 2k == layer 2k+1, byte-identical)",
        "repeat_all": f"{half} blocks applied twice in order (layer i == layer i+{half}, byte-identical)",
        "reverse": f"{half} blocks applied in order then in reverse (layer i == layer {last}-i, byte-identical)",
    }[strategy]
    return f"layers 0-{last} hold {what}: loaded as {strategy} sharing, weights stored once"


# ----------------------------------------------------------------------------- public API
def find_tokenizer(directory: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def resolve_config(spec: str | Path) -> ModelConfig:
    """A preset name (e.g. `125M-LS`) or a path to a config.json."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        return config_from_hf(_read_json(path), path)
    return preset(str(spec))


def load_checkpoint(
    path: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    detect_shared_blocks: bool = True,
) -> Checkpoint:
    """Load and validate a checkpoint into the fp32 reference model.

    With `detect_shared_blocks` (the default), a flat checkpoint whose layers repeat byte for byte
    in a layer-sharing pattern (an -LS model saved unrolled) is loaded in the shared form; see
    `fold_shared_blocks()` and `Checkpoint.sharing_detected`. Pass False to load it as written.
    """
    hub_id = str(path) if is_hub_id(path) else None
    src = resolve_hub_id(hub_id) if hub_id else Path(path).expanduser()
    if not src.exists():
        raise UserError(
            f"{src}: checkpoint not found; pass a Hugging Face MobileLLM dir, a checkpoint-<step>/ dir or a .pt/.pth file"
        )
    if src.is_dir():
        cfg_path = src / "config.json"
        if config is not None:
            cfg = resolve_config(config)
        elif cfg_path.is_file():
            cfg = config_from_hf(_read_json(cfg_path), cfg_path)
        else:
            raise UserError(f"{src}: no config.json in the checkpoint dir; add it or pass --config")
        raw_type = _read_json(cfg_path).get("model_type") if cfg_path.is_file() else None
        weight_file = next((src / n for n in _WEIGHT_FILES if (src / n).is_file()), None)
        if weight_file is None:
            raise UserError(f"{src}: no weights found; expected one of {', '.join(_WEIGHT_FILES)}")
        tensors = (
            _load_sharded(weight_file) if weight_file.name.endswith(".index.json") else _load_tensor_file(weight_file)
        )
        fmt = (
            "training" if raw_type == "llama" else ("hf-safetensors" if "safetensors" in weight_file.name else "hf-bin")
        )
        tok_dir, where = src, weight_file
    else:
        if config is None:
            raise UserError(f"{src}: a bare state dict needs --config (a preset such as 125M-LS, or a config.json)")
        cfg = resolve_config(config)
        tensors = _load_tensor_file(src)
        fmt, tok_dir, where = "pt", src.parent, src
    tensors = check_tensors(cfg, _normalize_keys(tensors), where)
    source_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    detected = None
    if detect_shared_blocks:
        fold = fold_shared_blocks(cfg, tensors)
        if fold is not None:
            cfg, tensors, detected = fold
    model = _build(cfg, tensors)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(tok_dir)
    if tok is not None and not tok.is_file():
        raise UserError(f"{tok}: tokenizer file not found")
    return Checkpoint(cfg, model, tok, src, fmt, source_dtype, detected, hub_id)


def _build(cfg: ModelConfig, tensors: dict[str, Tensor]) -> MobileLLM:
    """The fp32 model holding `tensors` (already checked against `cfg`): built on the meta device and
    loaded with assign, so no second set of weights is allocated (fp32 tensors are used as they are;
    others are converted one at a time, their source dropped as it goes)."""

    with torch.device("meta"):
        model = MobileLLM(cfg)
    state = {}
    for key in list(tensors):
        state[key] = tensors.pop(key).float().contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_context, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin  # the non-persistent buffers, computed (not loaded)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:3]}")
    return model.eval().requires_grad_(False)


def save_checkpoint(
    model: MobileLLM,
    out: str | Path,
    fmt: CheckpointFormat = "hf-safetensors",
    dtype: torch.dtype = torch.float16,
    tokenizer: Path | None = None,
    include_lm_head: bool = False,
    shards: int = 1,
) -> Path:
    """Write `model` in one of the formats users hold. Returns the checkpoint path to load."""
    from safetensors.torch import save_file

    cfg = model.config
    state = {
        "model." + k: v.detach().to(dtype).contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("rope_")
    }
    if include_lm_head and "model.lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # as 600M+ files carry
    if "model.lm_head.weight" in state:
        state["lm_head.weight"] = state.pop("model.lm_head.weight")
    out = Path(out)
    if fmt == "pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        if tokenizer:
            shutil.copy(tokenizer, out.parent / tokenizer.name)
        return out
    out.mkdir(parents=True, exist_ok=True)
    model_type = "llama" if fmt == "training" else "mobilellm"
    (out / "config.json").write_text(
        json.dumps(config_to_hf(cfg, model_type, str(dtype).removeprefix("torch.")), indent=2) + "\n"
    )
    suffix = ".bin" if fmt == "hf-bin" else ".safetensors"
    stem = "pytorch_model" if fmt == "hf-bin" else "model"

    def write(tensors: dict[str, Tensor], name: str) -> None:
        if suffix == ".bin":
            torch.save(tensors, out / name)
        else:
            save_file(tensors, str(out / name), metadata={"format": "pt"})

    if shards <= 1:
        write(state, stem + suffix)
    else:
        keys = list(state)
        per = -(-len(keys) // shards)
        weight_map = {}
        for i in range(shards):
            name = f"{stem}-{i + 1:05d}-of-{shards:05d}{suffix}"
            part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
            write(part, name)
            weight_map.update({k: name for k in part})
        (out / f"{stem}{suffix}.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer:
        shutil.copy(tokenizer, out / tokenizer.name)
    return out
