"""MobileLLM architecture: one dataclass, named presets, and the layer-sharing schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

SharingStrategy = Literal["none", "immediate", "repeat_all", "reverse"]
SHARING_STRATEGIES: tuple[str, ...] = ("none", "immediate", "repeat_all", "reverse")


# Upper bounds of every size a config may hold (checked in ModelConfig, before any allocation).
LIMITS: dict[str, int] = {
    "dim": 1 << 15,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "ffn_dim": 1 << 17,
    "vocab_size": 1 << 20,
    "max_context": 1 << 17,  # RoPE tables of at most 2 x 131072 x head_dim floats
}


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int  # stored blocks; the applied depth is `len(schedule())`
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_context: int = 2048
    share_embedding: bool = True
    sharing: SharingStrategy = "none"
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.sharing not in SHARING_STRATEGIES:
            raise UserError(
                f"unknown layer-sharing strategy {self.sharing!r}; use one of {', '.join(SHARING_STRATEGIES)}"
            )
        # Checked before anything is allocated: a config from elsewhere must not ask for a 256 GB RoPE
        # table (max_context 1e9) or a billion-layer loop. The bounds are far above any MobileLLM.
        for name, top in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"config: {name} must be an integer, got {value!r}")
            if value <= 0:
                raise UserError(f"config: {name} must be positive, got {value}")
            if value > top:
                raise UserError(f"config: {name} is {value}, more than this tool supports ({top})")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, float) or not (0 < value < float("inf")):
                raise UserError(f"config: {name} must be a positive finite number, got {value!r}")
        if self.norm_eps >= 1:
            raise UserError(f"config: norm_eps must be below 1, got {self.norm_eps}")
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise UserError(f"config: {name} must be a token id in 0..{self.vocab_size - 1}, got {value!r}")
        if not isinstance(self.share_embedding, bool):
            raise UserError(f"config: share_embedding must be true or false, got {self.share_embedding!r}")
        if self.dim % self.n_heads:
            raise UserError(f"config: hidden size {self.dim} is not divisible by {self.n_heads} attention heads")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"config: {self.n_heads} attention heads are not a multiple of {self.n_kv_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise UserError(
                f"config: head size {self.head_dim} (hidden size / heads) must be even for rotary embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def schedule(self) -> list[int]:
        """Stored-block index for every block application, in execution order."""
        stored = list(range(self.n_layers))
        if self.sharing == "none":
            return stored
        if self.sharing == "immediate":  # 0,0,1,1,...: the released -LS models
            return [i for i in stored for _ in range(2)]
        if self.sharing == "repeat_all":  # 0..N-1,0..N-1
            return stored + stored
        return stored + stored[::-1]  # reverse: 0..N-1,N-1..0

    @property
    def n_applied(self) -> int:
        return len(self.schedule())

    def replace(self, **changes: object) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Parameter accounting -------------------------------------------------------------------
    def block_params(self) -> int:
        attn = self.dim * self.dim * 2 + self.dim * self.kv_dim * 2
        return attn + 3 * self.dim * self.ffn_dim + 2 * self.dim

    def unique_params(self) -> int:
        emb = self.vocab_size * self.dim * (1 if self.share_embedding else 2)
        return emb + self.n_layers * self.block_params() + self.dim

    def applied_params(self) -> int:
        """Parameters as an unrolled model with no aliasing would hold them."""
        emb = self.vocab_size * self.dim * 2
        return emb + self.n_applied * self.block_params() + self.dim


def _preset(dim: int, layers: int, heads: int, kv: int, ffn: int) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn)


_BASE = {
    "125M": _preset(576, 30, 9, 3, 1536),
    "350M": _preset(960, 32, 15, 5, 2560),
    "600M": _preset(1152, 40, 18, 6, 3072),
    "1B": _preset(1280, 54, 20, 5, 3584),
    "1.5B": _preset(1600, 54, 25, 5, 4352),
}

PRESETS: dict[str, ModelConfig] = dict(_BASE)
PRESETS.update({f"{name}-LS": cfg.replace(sharing="immediate") for name, cfg in _BASE.items()})


def preset(name: str) -> ModelConfig:
    key = {k.lower(): k for k in PRESETS}.get(name.lower().removeprefix("mobilellm-"))
    if key is None:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
