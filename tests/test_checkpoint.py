"""Checkpoint formats round-trip; every kind of bad input gets its own clear message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import random_model, run_cli, tiny_config
from mobilellm.exporter.checkpoint import load_checkpoint, save_checkpoint
from mobilellm.exporter.errors import UserError


@pytest.mark.parametrize(
    "fmt,dtype,shards",
    [
        ("hf-safetensors", torch.float16, 1),
        ("hf-safetensors", torch.bfloat16, 3),
        ("hf-bin", torch.float16, 1),
        ("hf-bin", torch.bfloat16, 2),
        ("training", torch.float32, 1),
        ("pt", torch.float32, 1),
    ],
)
def test_round_trip(tmp_path: Path, fmt: str, dtype: torch.dtype, shards: int, sharing: str) -> None:
    model = random_model(tiny_config(sharing=sharing))
    tok = tmp_path / "src" / "tokenizer.model"
    tok.parent.mkdir()
    tok.write_bytes(b"not really a tokenizer")
    path = save_checkpoint(
        model, tmp_path / ("ckpt.pt" if fmt == "pt" else "ckpt"), fmt, dtype, tokenizer=tok, shards=shards
    )
    config_json = None
    if fmt == "pt":
        config_json = tmp_path / "config.json"
        from mobilellm.exporter.checkpoint import config_to_hf

        config_json.write_text(json.dumps(config_to_hf(model.config)))
    loaded = load_checkpoint(path, config_json)
    assert loaded.config == model.config
    assert loaded.tokenizer_path is not None and loaded.tokenizer_path.name == "tokenizer.model"
    expected_type = {"training": "llama"}.get(fmt, "mobilellm")
    if fmt != "pt":
        assert json.loads((path / "config.json").read_text())["model_type"] == expected_type
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        torch.testing.assert_close(a.to(dtype).float(), b, atol=0, rtol=0, msg=name)


def test_ignored_lm_head_is_accepted(tmp_path: Path) -> None:
    """600M+ files carry an lm_head.weight that share_embedding tells us to ignore."""
    model = random_model(tiny_config())
    path = save_checkpoint(model, tmp_path / "ckpt", include_lm_head=True)
    from safetensors.torch import load_file

    assert "lm_head.weight" in load_file(path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.model.lm_head is None


def test_bare_state_dict_with_preset(tmp_path: Path) -> None:
    from mobilellm.exporter.config import preset

    cfg = preset("125M").replace(n_layers=1)  # keep it small, but a preset-shaped config
    model = random_model(cfg)
    path = save_checkpoint(model, tmp_path / "m.pt", "pt", torch.float16)
    with pytest.raises(UserError, match="needs --config"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="unexpected tensor|missing tensor"):
        load_checkpoint(path, "125M")  # 30 layers expected, 1 present


# ------------------------------------------------------------------ bad input, one message each
@pytest.fixture
def good_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(random_model(tiny_config()), tmp_path / "good")


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, cfg: dict) -> None:
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(good_ckpt: Path) -> None:
    (good_ckpt / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint(good_ckpt)


def test_missing_weights(good_ckpt: Path) -> None:
    (good_ckpt / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights found"):
        load_checkpoint(good_ckpt)


def test_invalid_json(good_ckpt: Path) -> None:
    (good_ckpt / "config.json").write_text('{"model_type": "mobilellm",')
    with pytest.raises(UserError, match="invalid JSON"):
        load_checkpoint(good_ckpt)


def test_unknown_model_type(good_ckpt: Path) -> None:
    cfg = _config(good_ckpt)
    cfg["model_type"] = "gpt2"
    _write_config(good_ckpt, cfg)
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        load_checkpoint(good_ckpt)


def test_config_contradicts_kv_heads(good_ckpt: Path) -> None:
    cfg = _config(good_ckpt)
    cfg["num_key_value_heads"] = 1
    _write_config(good_ckpt, cfg)
    with pytest.raises(
        UserError, match=r"k_proj.weight is \(32, 64\), config implies \(16, 64\).*num_key_value_heads=2"
    ):
        load_checkpoint(good_ckpt)


def _rewrite_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_named(good_ckpt: Path) -> None:
    _rewrite_tensors(good_ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(good_ckpt)


def test_unexpected_tensor_named(good_ckpt: Path) -> None:
    _rewrite_tensors(good_ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(UserError, match=r"unexpected tensor\(s\) layers.0.self_attn.q_proj.bias"):
        load_checkpoint(good_ckpt)


def test_misshaped_tensor_named(good_ckpt: Path) -> None:
    _rewrite_tensors(good_ckpt, lambda t: t.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(64, 95)}))
    with pytest.raises(
        UserError, match=r"model.layers.2.mlp.down_proj.weight is \(64, 95\), config implies \(64, 96\)"
    ):
        load_checkpoint(good_ckpt)


def test_truncated_safetensors(good_ckpt: Path) -> None:
    f = good_ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated safetensors"):
        load_checkpoint(good_ckpt)


def test_truncated_bin(tmp_path: Path) -> None:
    path = save_checkpoint(random_model(tiny_config()), tmp_path / "bin", "hf-bin")
    f = path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated checkpoint"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(random_model(tiny_config()), tmp_path / "evil", "hf-bin")
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["payload"] = _Exploit()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists(), "the checkpoint's code ran"


def test_cli_reports_bad_input_in_one_line(good_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(good_ckpt)
    cfg["model_type"] = "bert"
    _write_config(good_ckpt, cfg)
    code, out, err = run_cli(["inspect", str(good_ckpt)], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert "model_type 'bert' is not supported" in err


def test_cli_inspect(good_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["inspect", str(good_ckpt)], capsys)
    assert code == 0, err
    assert "3 stored blocks, 3 applied" in out
    assert "4-bit" in out and "8-bit" in out and "16-bit" in out
    # fused: one QKV and one gate/up linear per stored block; unfused: three and two
    assert "fused         " in out and f"{3 * 4 + 1} linear" in out  # 3 blocks x (qkv, o, w13, w2) + output
    assert f"{3 * 7 + 1} linear" in out
