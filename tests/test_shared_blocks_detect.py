"""A flat checkpoint whose layers repeat byte for byte (an -LS model saved unrolled) loads in the
shared form: each stored block once, one KV cache per application, the very same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from mobilellm.exporter.checkpoint import config_to_hf, fold_shared_blocks, load_checkpoint, save_checkpoint
from mobilellm.exporter.model import KVState, MobileLLM

STRATEGIES = ("immediate", "repeat_all", "reverse")


def unrolled(shared: MobileLLM) -> MobileLLM:
    """The flat model a converter writes for `shared`: one layer per application, weights copied."""
    cfg = shared.config
    schedule = cfg.schedule()
    flat = MobileLLM(cfg.replace(n_layers=len(schedule), sharing="none")).eval().requires_grad_(False)
    ours = shared.state_dict()
    state = {k: v.clone() for k, v in ours.items() if not k.startswith(("layers.", "rope_"))}
    for slot, block in enumerate(schedule):
        prefix = f"layers.{block}."
        state.update({f"layers.{slot}.{k[len(prefix) :]}": v.clone() for k, v in ours.items() if k.startswith(prefix)})
    flat.load_state_dict(state, strict=True)
    return flat


def flat_checkpoint(
    tmp_path: Path, strategy: str, n_blocks: int = 4, seed: int = 0, **save: object
) -> tuple[MobileLLM, Path]:
    shared = random_model(tiny_config(n_layers=n_blocks, sharing=strategy), seed=seed)
    return shared, save_checkpoint(unrolled(shared), tmp_path / f"flat-{strategy}", **save)


def stack(blocks: list[MobileLLM]) -> MobileLLM:
    """A flat model whose layer i is a copy of the single layer of `blocks[i]` (embeddings of the first)."""
    model = MobileLLM(tiny_config(n_layers=len(blocks))).eval().requires_grad_(False)
    state = {k: v.clone() for k, v in blocks[0].state_dict().items() if not k.startswith(("layers.", "rope_"))}
    for slot, src in enumerate(blocks):
        state.update(
            {
                k.replace("layers.0.", f"layers.{slot}.", 1): v.clone()
                for k, v in src.state_dict().items()
                if k.startswith("layers.0.")
            }
        )
    model.load_state_dict(state, strict=True)
    return model


def edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def tokens() -> torch.Tensor:
    return torch.randint(0, tiny_config().vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------- folded
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "fmt,dtype", [("hf-safetensors", torch.float16), ("hf-bin", torch.bfloat16), ("training", torch.float32)]
)
def test_unrolled_stack_is_folded(tmp_path: Path, strategy: str, fmt: str, dtype: torch.dtype) -> None:
    shared, path = flat_checkpoint(tmp_path, strategy, fmt=fmt, dtype=dtype)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 8
    assert json.loads((path / "config.json").read_text())["layer_sharing"] is False

    folded = load_checkpoint(path)
    flat = load_checkpoint(path, detect_shared_blocks=False)

    assert folded.config == shared.config  # 4 stored blocks, the strategy it was unrolled from
    assert folded.config.n_layers == 4 and folded.config.sharing == strategy and folded.config.n_applied == 8
    assert len(folded.model.layers) == 4  # each stored block's weights once
    assert flat.config.n_layers == 8 and flat.config.sharing == "none" and flat.sharing_detected is None
    assert folded.sharing_detected is not None
    assert (
        folded.sharing_detected.startswith("layers 0-7 hold 4 blocks")
        and f"loaded as {strategy} sharing" in folded.sharing_detected
    )
    for name, value in shared.state_dict().items():  # the stored blocks are the original blocks
        if not name.startswith("rope_"):
            assert torch.equal(folded.model.state_dict()[name], value.to(dtype).float()), name

    x = tokens()
    with torch.no_grad():
        assert torch.equal(folded.model(x), flat.model(x))  # exactly, not approximately
        # incremental decoding too: one cache per application, as many as the flat model's layers
        s_folded, s_flat = KVState(), KVState()
        a = [folded.model(x[:, :5], s_folded)] + [folded.model(x[:, i : i + 1], s_folded) for i in range(5, 12)]
        b = [flat.model(x[:, :5], s_flat)] + [flat.model(x[:, i : i + 1], s_flat) for i in range(5, 12)]
    assert len(s_folded.entries) == len(s_flat.entries) == 8
    assert torch.equal(torch.cat(a, 1), torch.cat(b, 1))


def test_sixty_layers_of_immediate_pairs(tmp_path: Path) -> None:
    cfg = tiny_config(dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=32)
    shared = random_model(cfg.replace(n_layers=30, sharing="immediate"))
    path = save_checkpoint(unrolled(shared), tmp_path / "ls60", dtype=torch.float32)
    ckpt = load_checkpoint(path)
    assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.config.n_applied) == (30, "immediate", 60)
    assert ckpt.sharing_detected == (
        "layers 0-59 hold 30 blocks each applied twice in a row "
        "(layer 2k == layer 2k+1, byte-identical): loaded as immediate sharing, weights stored once"
    )
    x = torch.randint(0, 32, (1, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ckpt.model(x), load_checkpoint(path, detect_shared_blocks=False).model(x))


def test_bare_state_dict_with_aliased_layers(tmp_path: Path) -> None:
    """A .pt whose repeated layers are the same tensors (torch.save keeps the aliasing)."""
    shared = random_model(tiny_config(n_layers=2, sharing="repeat_all"))
    state = {"model.embed_tokens.weight": shared.embed_tokens.weight, "model.norm.weight": shared.norm.weight}
    for slot, block in enumerate(shared.config.schedule()):
        state.update(
            {
                f"model.layers.{slot}.{k.split('.', 2)[2]}": v
                for k, v in shared.state_dict().items()
                if k.startswith(f"layers.{block}.")
            }
        )
    torch.save(state, tmp_path / "m.pt")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(shared.config.replace(n_layers=4, sharing="none"))))
    ckpt = load_checkpoint(tmp_path / "m.pt", tmp_path / "config.json")
    assert ckpt.config == shared.config  # 0,1,0,1 = repeat_all (checked before reverse 0,1,1,0)


def test_all_layers_identical_fold_as_immediate(tmp_path: Path) -> None:
    """Every pattern fits; the first tried (immediate, the released -LS layout) is taken."""
    one = random_model(tiny_config(n_layers=1))
    path = save_checkpoint(stack([one] * 4), tmp_path / "same", dtype=torch.float32)
    ckpt = load_checkpoint(path)
    assert (ckpt.config.n_layers, ckpt.config.sharing) == (2, "immediate")
    x = tokens()
    assert torch.equal(ckpt.model(x), load_checkpoint(path, detect_shared_blocks=False).model(x))


def test_fold_keeps_tensor_objects() -> None:
    """No copy of the model: the folded dict holds the loaded tensors themselves."""
    shared = random_model(tiny_config(n_layers=3, sharing="reverse"))
    tensors = {k: v for k, v in unrolled(shared).state_dict().items() if not k.startswith("rope_")}
    cfg, out, _ = fold_shared_blocks(tiny_config(n_layers=6), tensors)
    assert cfg == shared.config
    assert len(out) == len(tensors) - 3 * 9
    for key, value in out.items():
        assert value is tensors[key]  # reverse: block j is stored as layer j


# ------------------------------------------------------------------------------------- left alone
@pytest.mark.parametrize("where", ["first", "last", "one_element"])
def test_partial_match_is_not_folded(tmp_path: Path, where: str) -> None:
    _, path = flat_checkpoint(tmp_path, "immediate", dtype=torch.float32)

    def edit(t: dict[str, torch.Tensor]) -> None:
        if where == "first":  # pair (0, 1) differs in one whole tensor
            t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"] + 1.0
        elif where == "last":  # only the last pair's norm differs
            t["model.layers.7.post_attention_layernorm.weight"] = (
                t["model.layers.7.post_attention_layernorm.weight"] * 1.5
            )
        else:  # one element of one tensor, one ulp: not in the sampled fingerprint, caught by the full compare
            w = t["model.layers.5.mlp.down_proj.weight"].clone()
            w.view(-1)[-2] = torch.nextafter(w.view(-1)[-2], torch.tensor(1.0))
            t["model.layers.5.mlp.down_proj.weight"] = w

    edit_tensors(path, edit)
    ckpt = load_checkpoint(path)
    assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.sharing_detected) == (8, "none", None)


def test_mixed_patterns_are_not_folded(tmp_path: Path) -> None:
    """First half pairs like immediate, second half like reverse: no single pattern, no fold."""
    a, b, c = (random_model(tiny_config(n_layers=1), seed=s) for s in (1, 2, 3))
    ckpt = load_checkpoint(save_checkpoint(stack([a, a, b, c, c, b]), tmp_path / "mixed", dtype=torch.float32))
    assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.sharing_detected) == (6, "none", None)


def test_signed_zero_is_not_byte_identical(tmp_path: Path) -> None:
    """0.0 and -0.0 compare equal as numbers, but the layers are not byte-identical: no fold."""
    _, path = flat_checkpoint(tmp_path, "immediate", dtype=torch.float32)

    def edit(t: dict[str, torch.Tensor]) -> None:
        for i in range(8):
            w = t[f"model.layers.{i}.self_attn.q_proj.weight"].clone()
            w.view(-1)[-1] = -0.0 if i == 3 else 0.0
            t[f"model.layers.{i}.self_attn.q_proj.weight"] = w

    edit_tensors(path, edit)
    assert load_checkpoint(path).config.n_layers == 8


def test_detection_disabled(tmp_path: Path) -> None:
    _, path = flat_checkpoint(tmp_path, "immediate")
    ckpt = load_checkpoint(path, detect_shared_blocks=False)
    assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.sharing_detected) == (8, "none", None)
    assert len(ckpt.model.layers) == 8


def test_odd_number_of_layers_is_not_folded(tmp_path: Path) -> None:
    """3 identical layers, and 0==1, 2==3 with a fifth: no pattern of 2N applications fits an odd stack."""
    a, b, c = (random_model(tiny_config(n_layers=1), seed=s) for s in (1, 2, 3))
    for name, blocks in {"three-same": [a, a, a], "pairs-plus-one": [a, a, b, b, c]}.items():
        ckpt = load_checkpoint(save_checkpoint(stack(blocks), tmp_path / name))
        assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.sharing_detected) == (len(blocks), "none", None)


def test_already_shared_config_is_left_alone(tmp_path: Path) -> None:
    """layer_sharing true: the config is trusted even if its stored blocks happen to repeat."""
    shared = random_model(tiny_config(n_layers=2, sharing="immediate"))
    with torch.no_grad():
        for p0, p1 in zip(shared.layers[0].parameters(), shared.layers[1].parameters()):
            p1.copy_(p0)
    path = save_checkpoint(shared, tmp_path / "ls")
    assert json.loads((path / "config.json").read_text())["layer_sharing"] is True
    ckpt = load_checkpoint(path)
    assert ckpt.config == shared.config and ckpt.sharing_detected is None
    assert (ckpt.config.n_layers, ckpt.config.n_applied) == (2, 4)


def test_random_flat_model_is_not_folded(tmp_path: Path) -> None:
    path = save_checkpoint(random_model(tiny_config(n_layers=4)), tmp_path / "plain")
    ckpt = load_checkpoint(path)
    assert (ckpt.config.n_layers, ckpt.config.sharing, ckpt.sharing_detected) == (4, "none", None)


# ------------------------------------------------------------------------------------- inspect
def test_inspect_reports_detection(tmp_path: Path) -> None:
    from mobilellm.exporter.inspect import describe

    _, path = flat_checkpoint(tmp_path, "reverse")
    text = describe(path, ops=False)
    assert "4 stored blocks, 8 applied" in text
    assert "layer sharing   reverse (block order 0,1,2,3,3,2,1,0)" in text
    assert (
        "detected: layers 0-7 hold 4 blocks applied in order then in reverse (layer i == layer 7-i, byte-identical): "
        "loaded as reverse sharing" in text
    )
    plain = describe(path, ops=False, detect_shared_blocks=False)
    assert "8 stored blocks, 8 applied" in plain and "detected:" not in plain
