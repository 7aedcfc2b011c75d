"""Tokenizers: loading for parity text (SentencePiece `tokenizer.model` or HF `tokenizer.json`), and the
`tokenizer.json` every bundle carries (Hugging Face tokenizers format, what the runtimes' clients read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UserError, loading


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class _SentencePiece:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))


class _HFTokenizerJson:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)


def load_tokenizer(path: Path | None) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when there is none. One that cannot be read (truncated,
    corrupt) is a UserError naming the file: parity on pseudo-text would hide it and pass."""

    if path is None:
        return None
    with loading(path, "tokenizer", "re-download it or pass --tokenizer PATH"):
        return _SentencePiece(path) if path.suffix == ".model" else _HFTokenizerJson(path)


def parity_tokens(tokenizer: Tokenizer | None, text: str, count: int, vocab_size: int, bos_id: int) -> np.ndarray:
    """`count` token ids of held-out text (BOS first); deterministic pseudo-text without a tokenizer."""
    ids: list[int] = []
    if tokenizer is not None:
        ids = [bos_id] + [i for i in tokenizer.encode(text) if 0 <= i < vocab_size]
    if len(ids) < count:
        rng = np.random.default_rng(1234)
        ids += rng.integers(3, vocab_size, count - len(ids)).tolist()
    return np.asarray(ids[:count], dtype=np.int64)


TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def write_tokenizer_json(
    bundle_dir: Path, tokenizer: Path, max_context: int, bos_id: int = 1, eos_id: int = 2
) -> tuple[list[str], str]:
    """tokenizer.json + tokenizer_config.json in `bundle_dir`, encoding as the exporter does: BOS, then
    the text. Converted from a SentencePiece model, or taken from the checkpoint's tokenizer.json with a
    BOS template added where it has none. A tokenizer that cannot be written is a UserError (a bundle
    without tokenizer.json is incomplete)."""
    if tokenizer.suffix == ".json":
        with loading(tokenizer, "tokenizer", "pass a readable tokenizer.json or tokenizer.model with --tokenizer"):
            from tokenizers import Tokenizer

            source = Tokenizer.from_file(str(tokenizer))
        bos = source.id_to_token(bos_id)
        if bos is None:
            raise UserError(f"{tokenizer}: the model's BOS id {bos_id} is not in this tokenizer's vocabulary")
        note = f"copied {tokenizer.name}"
        if source.encode("a").ids[:1] != [bos_id]:
            _prepend_bos(source, bos, bos_id)
            note += " (BOS template added: the model reads BOS first)"
        source.save(str(bundle_dir / TOKENIZER_JSON))
        config = tokenizer.parent / TOKENIZER_CONFIG
        existing = json.loads(config.read_text()) if config.is_file() else None
        pieces = {"bos": bos, "eos": source.id_to_token(eos_id) or "</s>"}
        _tokenizer_config(bundle_dir, max_context, pieces, existing)
        return [TOKENIZER_JSON, TOKENIZER_CONFIG], note
    try:
        converted, pieces = spm_to_tokenizers(tokenizer)
    except Exception as exc:  # noqa: BLE001 - any failure means no tokenizer.json: say which file and why
        raise UserError(
            f"{tokenizer}: cannot convert to tokenizer.json ({type(exc).__name__}: {str(exc)[:200]}); "
            "pass a readable tokenizer.model or a tokenizer.json with --tokenizer"
        ) from None
    converted.save(str(bundle_dir / TOKENIZER_JSON))
    _tokenizer_config(bundle_dir, max_context, pieces)
    return [
        TOKENIZER_JSON,
        TOKENIZER_CONFIG,
    ], f"{TOKENIZER_JSON} converted from {tokenizer.name} (transformers SpmConverter, BOS template)"


def spm_to_tokenizers(path: Path) -> tuple[Any, dict[int, str]]:
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor.encode` with BOS prepended.

    Uses transformers' `SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's own
    normalizer spec; unk/bos/eos are registered as special tokens so decoding can skip them."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab: Any = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:  # unigram
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    spec = proto.trainer_spec
    ids = {"unk": spec.unk_id, "bos": spec.bos_id, "eos": spec.eos_id}
    pieces = {i: proto.pieces[i].piece for i in ids.values() if 0 <= i < len(proto.pieces)}
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in sorted(pieces)])
    if spec.bos_id in pieces:
        bos = pieces[spec.bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    named = {name: pieces[i] for name, i in ids.items() if i in pieces}
    return tok, named


def _prepend_bos(tok: Any, bos: str, bos_id: int) -> None:
    from tokenizers import processors

    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    tok.post_processor = template if tok.post_processor is None else processors.Sequence([tok.post_processor, template])


def _tokenizer_config(
    bundle_dir: Path, max_context: int, pieces: dict[str, str] | None, existing: dict[str, Any] | None = None
) -> None:
    """tokenizer_config.json: the checkpoint's (when it has one) with BOS declared as added, which is what
    onnxruntime-genai's and swift-transformers' tokenizers read."""
    pieces = pieces or {}
    if existing is not None:
        conf = {**existing, "bos_token": pieces.get("bos", existing.get("bos_token")), "add_bos_token": True}
        (bundle_dir / TOKENIZER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
        return
    conf = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": pieces.get("bos", "<s>"),
        "eos_token": pieces.get("eos", "</s>"),
        "unk_token": pieces.get("unk", "<unk>"),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_context,
    }
    (bundle_dir / TOKENIZER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
