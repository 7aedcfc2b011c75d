"""Mixed precision: which block linears are stored with more bits than the rest.

A selector names block linears by role (wqkv, wo, w13, w2; unfused: wq, wk, wv, w1, w3):

    w2          every block's
    w2@q4km     the blocks llama.cpp's Q4_K_M recipe gives more bits (`more_bits_blocks`)
    w2@7        block 7's

When several selectors match one weight the most specific wins (block > q4km > every block), so a
ranking's picks can sit on top of a target's default. `sensitive_layer_bits` turns the ranking that
`inspect --sensitivity` wrote (sensitivity.json) into block selectors: the layers whose rounding alone
moved perplexity most.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

FUSED_ROLES = ("wqkv", "wo", "w13", "w2")
UNFUSED_ROLES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
ROLES = tuple(dict.fromkeys(FUSED_ROLES + UNFUSED_ROLES))
# A reference (Hugging Face) linear's role in the export model: (unfused, fused).
ROLE_OF_LINEAR = {
    "self_attn.q_proj": ("wq", "wqkv"),
    "self_attn.k_proj": ("wk", "wqkv"),
    "self_attn.v_proj": ("wv", "wqkv"),
    "self_attn.o_proj": ("wo", "wo"),
    "mlp.gate_proj": ("w1", "w13"),
    "mlp.up_proj": ("w3", "w13"),
    "mlp.down_proj": ("w2", "w2"),
}


def more_bits_blocks(n_layers: int) -> set[int]:
    """The blocks llama.cpp's Q4_K_M recipe quantizes with more bits (`use_more_bits` in its
    quantizer): the first and last eighth, and every third block between."""
    return {i for i in range(n_layers) if i < n_layers / 8 or i >= 7 * n_layers / 8 or (i - n_layers // 8) % 3 == 2}


def check_layer_bits(selector: str, bits: object) -> None:
    """Raise ValueError unless `selector` is ROLE, ROLE@q4km or ROLE@BLOCK and `bits` is 4, 8 or 16."""
    role, at, which = selector.partition("@")
    if role not in ROLES or (at and which != "q4km" and not which.isdigit()):
        raise ValueError(selector)
    if isinstance(bits, bool) or bits not in (4, 8, 16):
        raise ValueError(bits)


def selector_rank(selector: str, role: str, block: int, n_layers: int) -> int | None:
    """How specifically `selector` names block `block`'s `role` linear (0 most), None if it does not."""
    sel_role, _, which = selector.partition("@")
    if sel_role != role:
        return None
    if not which:
        return 2
    if which == "q4km":
        return 1 if block in more_bits_blocks(n_layers) else None
    return 0 if int(which) == block else None


def selected_blocks(selectors: tuple[tuple[str, int], ...]) -> set[int]:
    """The block indices named by ROLE@BLOCK selectors."""
    return {int(w) for s, _ in selectors if (w := s.partition("@")[2]).isdigit()}


def sensitive_layer_bits(path: Path, layers: int, export_bits: int, fuse: bool) -> tuple[tuple[str, int], ...]:
    """Block selectors for the `layers` most sensitive linears of a sensitivity.json, at twice `export_bits`.

    Only the rows that round a layer in all its applications count (a shared block's weight is stored
    once). With fused projections q/k/v share one weight (wqkv) and gate/up another (w13): such a weight
    gets more bits if any of its parts is picked, and counts once."""
    fix = f"write it with `mobilellm-export inspect CHECKPOINT --sensitivity --bits {export_bits}`"
    if layers < 1:
        raise UserError(f"--sensitive-layers {layers}: pick at least 1 layer")
    if export_bits not in (4, 8):
        raise UserError(f"--sensitivity: a {export_bits}-bit export has no more bits to give; use --bits 4 or 8")
    try:
        data = json.loads(path.read_text())
        rows, measured_bits = data["rows"], data["bits"]
        ranked = [(r["layer"], r["application"]) for r in rows]
    except FileNotFoundError:
        raise UserError(f"{path}: sensitivity file not found; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a sensitivity.json; {fix}") from None
    if measured_bits != export_bits:
        raise UserError(f"{path}: ranks {measured_bits}-bit rounding but this export is {export_bits}-bit; {fix}")
    picked: dict[str, int] = {}
    for layer, application in ranked:
        parts = str(layer).split(".", 2)  # layers.{b}.self_attn.q_proj
        if application is not None or len(parts) != 3 or parts[0] != "layers" or parts[2] not in ROLE_OF_LINEAR:
            continue  # one application alone, or the untied lm_head (--output-bits sets it)
        role = ROLE_OF_LINEAR[parts[2]][1 if fuse else 0]
        picked.setdefault(f"{role}@{int(parts[1])}", 2 * export_bits)
        if len(picked) == layers:
            break
    return tuple(sorted(picked.items()))
