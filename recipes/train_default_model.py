"""Train the embedded default model: a small deep-and-thin MobileLLM with immediate layer sharing.

Corpus: the King James Bible (public domain) from Debian's `bible-kjv` package
(`apt-get install bible-kjv`). Every 40th chapter is held out; the held-out text ships in the repo
(`exporter/assets/heldout.txt`) so perplexity can be measured on any machine.

    python recipes/train_default_model.py [--minutes 25] [--out exporter/assets/default_model]

Writes a Hugging Face MobileLLM dir (config.json, model.safetensors fp16, tokenizer.model).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from mobilellm.exporter.checkpoint import load_checkpoint, save_checkpoint
from mobilellm.exporter.config import ModelConfig
from mobilellm.exporter.model import MobileLLM

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "exporter" / "assets"

# Deep and thin like the real family: 8 stored blocks run twice each (16 applied), GQA 3:1,
# head_dim 64, every width a multiple of 32 so int4 group-32 quantization covers every layer.
DEFAULT_CONFIG = ModelConfig(
    dim=192,
    n_layers=8,
    n_heads=3,
    n_kv_heads=1,
    ffn_dim=512,
    vocab_size=2048,
    max_context=512,
    share_embedding=True,
    sharing="immediate",
)
HELDOUT_EVERY = 40


def kjv_chapters() -> list[str]:
    """One paragraph of plain text per chapter, verse numbers removed."""
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` command is missing: apt-get install bible-kjv")
    raw = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters, current = [], []
    for line in raw.splitlines():
        if re.fullmatch(r"[1-3A-Z][A-Za-z ]* \d+", line.strip()):  # chapter heading, e.g. "Genesis 1"
            if current:
                chapters.append(" ".join(current))
            current = []
        elif line.strip():
            current.append(re.sub(r"^\s*\d+\s+", "", line).strip())
    if current:
        chapters.append(" ".join(current))
    return [re.sub(r"\s+", " ", c) for c in chapters]


def train_tokenizer(text: str, vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text)
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tok"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,  # the Llama-2 ids the runners expect
            num_threads=2,
            minloglevel=2,
            split_digits=True,
        )
        shutil.copy(Path(tmp) / "tok.model", out)
    return spm.SentencePieceProcessor(model_file=str(out))


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids += [sp.bos_id(), *sp.encode(doc), sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: MobileLLM, ids: torch.Tensor, window: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1])
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_ids[1:]].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--out", type=Path, default=ASSETS / "default_model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from the weights and tokenizer already in --out")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    chapters = kjv_chapters()
    train_docs = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout_docs = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    (ASSETS / "heldout.txt").write_text("\n".join(heldout_docs) + "\n")
    print(f"{len(chapters)} chapters: {len(train_docs)} train, {len(heldout_docs)} held out")

    args.out.mkdir(parents=True, exist_ok=True)
    tok_path = args.out / "tokenizer.model"
    if args.resume:
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    else:
        sp = train_tokenizer("\n".join(train_docs), DEFAULT_CONFIG.vocab_size, tok_path)
    train_ids, eval_ids = encode_docs(sp, train_docs), encode_docs(sp, heldout_docs)
    print(f"tokens: {len(train_ids)} train, {len(eval_ids)} held out")

    model = MobileLLM(DEFAULT_CONFIG)
    if args.resume:
        model = load_checkpoint(args.out).model.requires_grad_(True).train()
    for name, p in model.named_parameters():
        if p.ndim == 2 and not args.resume:
            # Scaled init for residual outputs keeps a 16-application stack stable.
            std = (
                0.02 / math.sqrt(2 * DEFAULT_CONFIG.n_applied)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            torch.nn.init.normal_(p, std=std)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    start, step, tokens_seen = time.time(), 0, 0
    warmup = 10 if args.resume else 100
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,))
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        if step % 50 == 0:
            print(
                f"step {step} loss {loss.item():.3f} lr {lr:.2e} {tokens_seen / (time.time() - start):.0f} tok/s",
                flush=True,
            )

    model.eval()
    ppl = perplexity(model, eval_ids, args.seq_len)
    uni = unigram_perplexity(train_ids, eval_ids, DEFAULT_CONFIG.vocab_size)
    save_checkpoint(model, args.out, "hf-safetensors", torch.float16)
    print(f"trained {step} steps on {tokens_seen} tokens in {time.time() - start:.0f}s")
    shipped = perplexity(load_checkpoint(args.out).model, eval_ids, args.seq_len)
    print(
        f"held-out perplexity {ppl:.2f} (fp32 weights), {shipped:.2f} (shipped fp16 weights) vs unigram baseline {uni:.2f}"
    )


if __name__ == "__main__":
    main()
