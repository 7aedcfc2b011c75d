"""The reference model against an independent implementation (transformers' Llama)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_model, tiny_config
from mobilellm.exporter.config import PRESETS, preset
from mobilellm.exporter.model import KVState


def hf_llama_unrolled(model) -> LlamaForCausalLM:
    """An untied-by-construction Llama with one layer per *application*, weights copied in."""
    cfg = model.config
    schedule = cfg.schedule()
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=len(schedule),
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_context,
        tie_word_embeddings=cfg.share_embedding,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["embed_tokens.weight"], "model.norm.weight": ours["norm.weight"]}
    for slot, block in enumerate(schedule):
        for key, value in ours.items():
            if key.startswith(f"layers.{block}."):
                state["model.layers." + str(slot) + key[len(f"layers.{block}") :]] = value
    state["lm_head.weight"] = model.output_weight()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("share_embedding", [True, False])
def test_reference_equals_transformers_llama(sharing: str, share_embedding: bool, tokens: torch.Tensor) -> None:
    model = random_model(tiny_config(sharing=sharing, share_embedding=share_embedding))
    hf = hf_llama_unrolled(model)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens, use_cache=False).logits
    assert ours.shape == (1, tokens.shape[1], model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_incremental_decoding_equals_full_forward(sharing: str, tokens: torch.Tensor) -> None:
    model = random_model(tiny_config(sharing=sharing))
    full = model(tokens)
    state = KVState()
    pieces = [model(tokens[:, :5], state)]  # prefill, then one token at a time
    for i in range(5, tokens.shape[1]):
        pieces.append(model(tokens[:, i : i + 1], state))
    assert len(state.entries) == model.config.n_applied  # one cache per block application
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_every_application_has_its_own_cache() -> None:
    """Immediate sharing runs block i twice; the second run must not see the first run's K/V."""
    model = random_model(tiny_config(sharing="immediate"))
    state = KVState()
    model(torch.tensor([[3, 4, 5]]), state)
    k_first, k_second = state.entries[0][0], state.entries[1][0]
    assert k_first.data_ptr() != k_second.data_ptr()
    assert not torch.allclose(k_first, k_second)


def test_schedules() -> None:
    cfg = tiny_config()
    assert cfg.replace(sharing="none").schedule() == [0, 1, 2]
    assert cfg.replace(sharing="immediate").schedule() == [0, 0, 1, 1, 2, 2]
    assert cfg.replace(sharing="repeat_all").schedule() == [0, 1, 2, 0, 1, 2]
    assert cfg.replace(sharing="reverse").schedule() == [0, 1, 2, 2, 1, 0]


def test_presets_match_the_paper() -> None:
    table = {
        "125M": (576, 30, 9, 3, 1536),
        "350M": (960, 32, 15, 5, 2560),
        "600M": (1152, 40, 18, 6, 3072),
        "1B": (1280, 54, 20, 5, 3584),
        "1.5B": (1600, 54, 25, 5, 4352),
    }
    for name, (dim, layers, heads, kv, ffn) in table.items():
        cfg = preset(name)
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (dim, layers, heads, kv, ffn)
        assert cfg.head_dim == 64 and cfg.vocab_size == 32000 and cfg.share_embedding
        assert preset(name + "-LS").n_applied == 2 * layers
    # ~125M parameters with the embedding counted once
    assert 124e6 < PRESETS["125M"].unique_params() < 126e6


def test_greedy_generation_matches_full_recompute() -> None:
    model = random_model(tiny_config(sharing="immediate"))
    prompt = [1, 7, 9, 11]
    out = model.generate(prompt, 6)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]
