"""Files shipped inside the package: the embedded default model and the held-out text."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "default_model"
HELDOUT_TEXT = ASSETS_DIR / "heldout.txt"


def heldout_text() -> str:
    return HELDOUT_TEXT.read_text()


CALIBRATION_TEXT = ASSETS_DIR / "calibration.txt"


def calibration_text() -> str:
    """GPTQ's calibration text: disjoint from the held-out parity text (recipes/make_calibration_text.py)."""
    return CALIBRATION_TEXT.read_text()
