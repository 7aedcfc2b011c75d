"""The interface every target implements, and the facts about a bundle all targets share.

A target module defines `TARGET`, a `Target` (`FunctionTarget` over its functions; see `exporter/targets/onnx.py`):

    quant_scheme(opts)        how this target rounds weights/activations; the fake-quant twin follows it exactly
    export(model, quantized, ckpt, opts, bundle_dir)
                              lower the fp32 export model storing exactly `quantized`'s codes/scales, write the
                              artifact file(s) into `bundle_dir` (a temp dir the pipeline renames into place)
    open_runtime(bundle_dir, manifest)
                              load the written artifact with the target's real runtime (or its Linux evaluator)
    speed_unmeasurable_reason()
                              why `make bench` cannot time this runtime here (e.g. Core ML off Apple OSes)

`RunnerMetadata` is what a generation runner needs besides the weights; one object feeds the manifest,
ExecuTorch's constant methods, Core ML's metadata and onnxruntime-genai's config.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..errors import UserError
from ..export_model import ExportModel, ExportSettings
from ..quantize import QuantizedModel, QuantMethod, QuantScheme


@dataclass(frozen=True)
class TargetOptions:
    bits: int = 4
    group_size: int = 32
    embedding_bits: int | None = None  # None: the target's default (8, or 16 with --bits 16)
    output_bits: int | None = None  # a separately stored output projection; None: the target's default
    # Mixed precision: (selector, bits) pairs, e.g. (("w2", 8),) (see mixed_precision.py); None: the target's default.
    layer_bits: tuple[tuple[str, int], ...] | None = None
    # Block selectors picked from a sensitivity ranking (`--sensitivity`), on top of `layer_bits` or the default.
    sensitive_layer_bits: tuple[tuple[str, int], ...] = ()
    max_seq_len: int = 512
    fuse: bool = True
    method: QuantMethod = field(default_factory=QuantMethod)  # how codes are chosen within the format

    def resolved_layer_bits(self, default: dict[int, tuple[tuple[str, int], ...]]) -> tuple[tuple[str, int], ...]:
        """(selector, bits) of the block linears: the options' (else the target's default for these bits), then
        the sensitivity picks. Kept even at `bits`: "w2=8" with "w2@5=4" keeps block 5's at 4."""
        chosen = dict(self.layer_bits if self.layer_bits is not None else default.get(self.bits, ()))
        chosen.update(self.sensitive_layer_bits)
        return tuple(chosen.items())

    def export_settings(self) -> ExportSettings:
        return ExportSettings(max_seq_len=self.max_seq_len, fuse=self.fuse)

    def resolved_embedding_bits(self) -> int:
        if self.embedding_bits is not None:
            return self.embedding_bits
        return 16 if self.bits == 16 else 8


@dataclass(frozen=True)
class RunnerMetadata:
    bos_id: int
    eos_ids: tuple[int, ...]
    vocab_size: int
    max_seq_len: int  # KV-cache length: prompt + generated tokens must fit
    n_applied: int  # KV-cache pairs: one per block application (sharing unrolled)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int

    @classmethod
    def of(cls, cfg: ModelConfig, max_seq_len: int) -> "RunnerMetadata":
        return cls(
            bos_id=cfg.bos_id,
            eos_ids=(cfg.eos_id,),
            vocab_size=cfg.vocab_size,
            max_seq_len=max_seq_len,
            n_applied=cfg.n_applied,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            dim=cfg.dim,
        )

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest's top-level runner fields (apps read these)."""
        return {
            "max_context": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
        }


@dataclass
class ExportedArtifact:
    target: str
    files: list[str]  # paths relative to the bundle dir, the main artifact first
    io: dict[str, Any] = field(default_factory=dict)  # input/output names, shapes, dtypes
    info: dict[str, Any] = field(default_factory=dict)  # quantization details, measured sizes, notes


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False  # wrap the prompt in the tokenizer's chat template


@dataclass
class GenerationResult:
    client: str  # the runtime's own generation stack that ran
    text: str
    token_ids: list[int] | None  # None where the client streams text only
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


TextSink = Callable[[str], None]


def apply_chat_template(bundle_dir: Path, prompt: str) -> str:
    """The prompt as one user turn of the bundle tokenizer's chat template (tokenizer_config.json)."""
    path = Path(bundle_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if not template:
        raise UserError(f"{bundle_dir}: the tokenizer has no chat template; drop --chat")
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # what transformers renders templates with

    rendered = ImmutableSandboxedEnvironment().from_string(template)
    return rendered.render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        bos_token="",  # the runner adds BOS itself
        eos_token=config.get("eos_token", ""),
    )


def sample_tokens(
    runtime: "TargetRuntime",
    prompt_ids: list[int],
    request: GenerationRequest,
    eos_ids: tuple[int, ...],
    max_positions: int,
    on_token: Callable[[int], None] = lambda token: None,
) -> list[int]:
    """The project's own generation loop over any TargetRuntime: greedy at temperature 0, else
    temperature + top-p sampling from a seeded generator. Stops at EOS, `max_new_tokens` or the context."""
    rng = np.random.default_rng(request.seed)
    runtime.reset()
    logits = runtime.forward_last(np.asarray(prompt_ids, dtype=np.int64), 0)[-1]
    out: list[int] = []
    position = len(prompt_ids)
    while len(out) < request.max_new_tokens and position < max_positions:
        token = _pick(logits, request, rng)
        out.append(token)
        on_token(token)
        if token in eos_ids:
            break
        logits = runtime.forward_last(np.asarray([token], dtype=np.int64), position)[-1]
        position += 1
    return out


def _pick(logits: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
    if request.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / request.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), request.top_p) + 1)]
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


class TargetRuntime(ABC):
    """A loaded artifact, run position by position over its own KV cache."""

    @abstractmethod
    def reset(self) -> None:
        """Forget all cached state (start a new sequence)."""

    @abstractmethod
    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Run `tokens` (int64 [S]) at positions start..start+S-1; return float32 logits [S, vocab]."""

    def forward_last(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Logits [1, vocab] of the last position only: what a generation loop reads."""
        return self.forward(tokens, start)[-1:]

    def details(self) -> dict[str, Any]:
        """Runtime settings worth reporting next to a measurement."""
        return {}


class Target(ABC):
    NAME: ClassVar[str]

    @abstractmethod
    def quant_scheme(self, opts: TargetOptions) -> QuantScheme: ...

    @abstractmethod
    def export(
        self,
        model: ExportModel,
        quantized: QuantizedModel,
        ckpt: Checkpoint | None,
        opts: TargetOptions,
        bundle_dir: Path,
    ) -> ExportedArtifact: ...

    @abstractmethod
    def open_runtime(self, bundle_dir: Path, manifest: dict[str, Any]) -> TargetRuntime: ...

    def speed_unmeasurable_reason(self) -> str | None:
        return None

    def generate(
        self, bundle_dir: Path, manifest: dict[str, Any], request: GenerationRequest, on_text: TextSink
    ) -> GenerationResult:
        """Run the bundle with the runtime's own generation client (the one apps use), streaming text."""
        raise UserError(f"the {self.NAME} target has no generation client")


class FunctionTarget(Target):
    """A target given as its module's functions: each target module ends with
    `TARGET = FunctionTarget(NAME, quant_scheme, export, open_runtime, ...)`, so the functions (with their
    extra keyword options, used by tests and benches) stay the implementation and nothing is written twice."""

    def __init__(
        self,
        name: str,
        quant_scheme: Callable[[TargetOptions], QuantScheme],
        export: Callable[..., ExportedArtifact],
        open_runtime: Callable[[Path, dict[str, Any]], TargetRuntime],
        generate: Callable[[Path, dict[str, Any], GenerationRequest, TextSink], GenerationResult] | None = None,
        speed_unmeasurable_reason: Callable[[], str | None] | None = None,
    ) -> None:
        self.NAME = name  # type: ignore[misc]
        self._quant_scheme, self._export, self._open_runtime = quant_scheme, export, open_runtime
        self._generate, self._unmeasurable = generate, speed_unmeasurable_reason

    def quant_scheme(self, opts: TargetOptions) -> QuantScheme:
        return self._quant_scheme(opts)

    def export(
        self,
        model: ExportModel,
        quantized: QuantizedModel,
        ckpt: Checkpoint | None,
        opts: TargetOptions,
        bundle_dir: Path,
    ) -> ExportedArtifact:
        return self._export(model, quantized, ckpt, opts, bundle_dir)

    def open_runtime(self, bundle_dir: Path, manifest: dict[str, Any]) -> TargetRuntime:
        return self._open_runtime(bundle_dir, manifest)

    def speed_unmeasurable_reason(self) -> str | None:
        return None if self._unmeasurable is None else self._unmeasurable()

    def generate(
        self, bundle_dir: Path, manifest: dict[str, Any], request: GenerationRequest, on_text: TextSink
    ) -> GenerationResult:
        if self._generate is None:
            return super().generate(bundle_dir, manifest, request, on_text)
        return self._generate(bundle_dir, manifest, request, on_text)
