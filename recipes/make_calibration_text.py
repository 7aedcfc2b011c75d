"""Write `exporter/assets/calibration.txt`: the text GPTQ calibrates on, disjoint from the parity text.

Two sources, so a general-purpose model does not calibrate on one register only:
- King James Bible chapters (public domain, Debian's `bible-kjv`) that are *not* held out: the held-out
  chapters (every 40th, `exporter/assets/heldout.txt`) are the parity/perplexity text, so these never
  overlap them;
- English prose from CPython's own documentation topics (`pydoc_data.topics`, PSF license).

Run once (`apt-get install bible-kjv`); the file is committed, so exports never need either source.
"""

from __future__ import annotations

import pydoc_data.topics
import re
from pathlib import Path

from train_default_model import HELDOUT_EVERY, kjv_chapters

OUT = Path(__file__).resolve().parents[1] / "exporter" / "assets" / "calibration.txt"
BUDGET_CHARS = 40_000  # per source: ~2 x 9k tokens for a Llama-2 or SmolLM2 tokenizer


def bible_part() -> str:
    chapters = kjv_chapters()
    # Every 40th chapter offset by half a period: spread over the whole book, never a held-out one.
    picked = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2 - 1]
    out, size = [], 0
    for chapter in picked:
        if size >= BUDGET_CHARS:
            break
        out.append(chapter)
        size += len(chapter)
    return "\n".join(out)


def docs_part() -> str:
    out, size = [], 0
    for key in sorted(pydoc_data.topics.topics):
        # Prose paragraphs only: drop indented code and short headings.
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            text = " ".join(line.strip() for line in para.splitlines())
            if para.startswith("   ") or len(text) < 200 or size >= BUDGET_CHARS:
                continue
            out.append(text)
            size += len(text)
    return "\n".join(out)


def main() -> None:
    OUT.write_text(bible_part() + "\n" + docs_part() + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
