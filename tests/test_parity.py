"""The parity machinery itself: metrics, checks, reports (JSON schema, Markdown, JUnit)."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import jsonschema
import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from mobilellm.exporter.errors import UserError
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.quantize import QuantScheme, WeightQuant, fake_quantized_twin, quantize_model
from mobilellm.validation.metrics import compare_logits, compare_top_k, perplexity, top_k
from mobilellm.validation.parity import Golden, ReferenceRuntime, compute_golden, resolve_thresholds, run_parity
from mobilellm.validation.reports import SCHEMA_PATH, report_dict, write_reports
from mobilellm.validation.sequences import TorchRuntime


def test_metrics_on_known_values() -> None:
    e = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    m = compare_logits(e, e)
    assert (
        m["max_abs"] == 0
        and m["top1_agreement"] == 1
        and abs(m["cosine"] - 1) < 1e-12
        and abs(m["kl_divergence"]) < 1e-12
    )
    a = np.array([[0.0, 1.0, 2.5], [0.0, 3.0, 0.0]])
    m = compare_logits(a, e)
    assert m["max_abs"] == 3.0 and m["top1_agreement"] == 0.5
    assert perplexity(np.zeros((4, 10)), np.array([1, 2, 3, 4])) == pytest.approx(10.0)


def test_top_k_kl_is_a_tight_lower_bound_and_decisive_top1_ignores_near_ties() -> None:
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(50, 300)) * 3
    actual = expected + rng.normal(size=expected.shape) * 0.3
    ids, lp = top_k(expected, 64)
    full_kl = compare_logits(actual, expected)["kl_divergence"]
    m = compare_top_k(actual, ids, lp, decisive_margin=0.5)
    assert 0 < m["kl_divergence"] <= full_kl + 1e-12 and m["kl_divergence"] > 0.8 * full_kl
    assert compare_top_k(expected, ids, lp, 0.5)["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    # A near-tie (top-2 apart by 0.1 nats) flipped by the artifact counts in top1_agreement only.
    tie = np.array([[5.0, 4.9, 0.0, 0.0]])
    flipped = np.array([[4.9, 5.0, 0.0, 0.0]])
    ids, lp = top_k(tie, 4)
    m = compare_top_k(flipped, ids, lp, decisive_margin=0.5)
    assert m["top1_agreement"] == 0.0 and m["decisive_positions"] == 0 and m["top1_decisive"] == 1.0


@pytest.fixture(scope="module")
def setup():
    ref = random_model(tiny_config(sharing="immediate"))
    model = ExportModel.from_reference(ref, ExportSettings(max_seq_len=64))
    twin = fake_quantized_twin(
        model, quantize_model(model, QuantScheme(WeightQuant(4, 32), WeightQuant(8), WeightQuant(8)))
    )
    tokens = np.random.default_rng(0).integers(3, 160, 80)
    golden = compute_golden({"reference": ReferenceRuntime(ref), "twin": TorchRuntime(twin)}, tokens, 64)
    return ref, model, twin, golden


def test_golden_round_trip(tmp_path: Path, setup) -> None:
    golden = setup[3]
    golden.save(tmp_path / "g.npz")
    loaded = Golden.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(loaded.logits["twin"], golden.logits["twin"])
    assert loaded.ppl == golden.ppl and loaded.prefill == golden.prefill
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt golden data"):
        Golden.load(tmp_path / "bad.npz")


def test_fp32_export_model_passes_16_bit_thresholds_against_reference(setup) -> None:
    _, model, _, golden = setup
    result = run_parity(
        TorchRuntime(model),
        golden,
        {"reference.top1_agreement": 1.0, "reference.min_cosine": 0.99999, "reference.max_abs": 1e-4},
    )
    assert result.passed, result.failures()
    assert result.generation["match_vs_reference"] == result.generation["tokens"]


def test_twin_against_itself_is_exact(setup) -> None:
    _, _, twin, golden = setup
    result = run_parity(TorchRuntime(twin), golden, resolve_thresholds(4))
    assert result.overall["twin"]["max_abs"] == 0.0
    assert result.perplexity["delta_vs_twin"] == 0.0


def test_perturbed_block_fails_and_names_metric_and_step(setup, tmp_path: Path) -> None:
    _, model, _, golden = setup
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.blocks[1].w2.weight.mul_(3.0)  # one block scaled
    result = run_parity(TorchRuntime(bad), golden, resolve_thresholds(4))
    assert not result.passed
    failed = [c for c in result.checks if not c.passed]
    assert any(c.name in ("twin.top1_decisive", "twin.kl_divergence") for c in failed)
    msg = result.failures()[0]
    assert "threshold" in msg and "at step" in msg

    report = report_dict(
        result, {"bundle": "b", "target": "onnx", "bits": 4, "embedding_bits": 8}, resolve_thresholds(4)
    )
    paths = write_reports(report, tmp_path)
    jsonschema.validate(json.loads(paths[0].read_text()), json.loads(SCHEMA_PATH.read_text()))
    md = paths[1].read_text()
    assert "**FAIL**" in md and "| reference |" in md
    suite = ET.parse(paths[2]).getroot().find("testsuite")
    assert int(suite.get("failures")) == len(failed)
    assert any(tc.find("failure") is not None for tc in suite.findall("testcase"))


def test_unknown_threshold_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown threshold 'twin.speed'"):
        resolve_thresholds(4, {"twin.speed": 1.0})
    assert resolve_thresholds(8, {"twin.top1_agreement": 0.5})["twin.top1_agreement"] == 0.5
