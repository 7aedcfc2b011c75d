"""Parity of an exported artifact against the fp32 reference and the fake-quant twin.

At export the bundle gets `golden.npz`: the parity inputs and what the reference and the twin
answered, so `validate` can re-check the artifact on any machine without the checkpoint.
Differences from the twin are lowering error; differences from the reference are quantization
(plus lowering) error.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mobilellm.exporter.errors import UserError
from mobilellm.exporter.model import KVState, MobileLLM
from mobilellm.exporter.targets.base import TargetRuntime

from .metrics import compare_logits, perplexity
from .sequences import run_runtime

GOLDEN_FILE = "golden.npz"
DECODE_STEPS = 8
PREFILL_TOKENS = 16
GENERATE_TOKENS = 16
PPL_TOKENS = 192
AGAINST = ("reference", "twin")


class ReferenceRuntime:
    """The reference model (dynamic KV state) behind the TargetRuntime interface."""

    def __init__(self, model: MobileLLM) -> None:
        self.model, self.state = model, KVState()

    def reset(self) -> None:
        self.state = KVState()

    @torch.no_grad()
    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        if start != self.state.length:
            raise ValueError("reference runtime must be fed positions in order")
        return self.model(torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None], self.state)[0].float().numpy()


def greedy(runtime: TargetRuntime, prompt: np.ndarray, count: int) -> np.ndarray:
    runtime.reset()
    logits = runtime.forward(prompt, 0)
    out = []
    for i in range(count):
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        if i + 1 < count:
            logits = runtime.forward(np.asarray([nxt], dtype=np.int64), len(prompt) + i)
    return np.asarray(out, dtype=np.int64)


@dataclass
class Golden:
    tokens: np.ndarray  # prefill tokens followed by one token per decode step
    prefill: int
    ppl_tokens: np.ndarray
    logits: dict[str, np.ndarray]  # against -> [len(tokens), vocab]
    ppl: dict[str, float]
    greedy: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"tokens": self.tokens, "prefill": np.int64(self.prefill), "ppl_tokens": self.ppl_tokens}
        for who in AGAINST:
            arrays[f"{who}_logits"] = self.logits[who]
            arrays[f"{who}_ppl"] = np.float64(self.ppl[who])
            arrays[f"{who}_greedy"] = self.greedy[who]
        # np.savez stamps each member with the current time; a fixed stamp keeps bundles reproducible.
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(arrays[key]), allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> "Golden":
        if not path.is_file():
            raise UserError(f"{path.parent}: no {path.name} in the bundle; re-export it or pass --checkpoint")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    tokens=z["tokens"], prefill=int(z["prefill"]), ppl_tokens=z["ppl_tokens"],
                    logits={w: z[f"{w}_logits"] for w in AGAINST}, ppl={w: float(z[f"{w}_ppl"]) for w in AGAINST},
                    greedy={w: z[f"{w}_greedy"] for w in AGAINST},
                )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: corrupt golden data ({exc}); re-export the bundle or pass --checkpoint") from None


def golden_inputs(all_tokens: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Split held-out tokens into (prefill+decode tokens, prefill length, perplexity window)."""
    seq = all_tokens[: PREFILL_TOKENS + DECODE_STEPS]
    ppl_len = min(PPL_TOKENS, max_seq_len - 1, len(all_tokens))
    return seq, PREFILL_TOKENS, all_tokens[:ppl_len]


def compute_golden(runtimes: dict[str, TargetRuntime], all_tokens: np.ndarray, max_seq_len: int) -> Golden:
    tokens, prefill, ppl_tokens = golden_inputs(all_tokens, max_seq_len)
    logits, ppl, gen = {}, {}, {}
    for who in AGAINST:
        rt = runtimes[who]
        logits[who] = run_runtime(rt, tokens, prefill)
        rt.reset()
        ppl[who] = perplexity(rt.forward(ppl_tokens[:-1], 0), ppl_tokens[1:])
        gen[who] = greedy(rt, tokens[:prefill], GENERATE_TOKENS)
    return Golden(tokens, prefill, ppl_tokens, logits, ppl, gen)


# ------------------------------------------------------------------------------ thresholds
# (metric, op, value): op ">=" means the measured value must be at least the threshold.
DEFAULT_THRESHOLDS: dict[int, dict[str, float]] = {
    16: {"reference.top1_agreement": 1.0, "reference.min_cosine": 0.999, "reference.ppl_delta": 0.01,
         "twin.top1_agreement": 1.0, "twin.min_cosine": 0.999, "twin.ppl_delta": 0.01, "twin.generation_match": 1.0},
    8: {"reference.top1_agreement": 0.95, "reference.min_cosine": 0.99, "reference.ppl_delta": 0.05,
        "twin.top1_agreement": 0.99, "twin.min_cosine": 0.995, "twin.ppl_delta": 0.02, "twin.generation_match": 0.5},
    4: {"reference.top1_agreement": 0.75, "reference.min_cosine": 0.95, "reference.ppl_delta": 0.30,
        "twin.top1_agreement": 0.99, "twin.min_cosine": 0.99, "twin.ppl_delta": 0.03, "twin.generation_match": 0.5},
}
# Metrics where smaller is better; every other metric must be at least its threshold.
_AT_MOST = {"ppl_delta", "max_kl_divergence", "kl_divergence", "max_abs", "mean_abs"}
KNOWN_METRICS = {"top1_agreement", "top5_overlap", "min_cosine", "cosine", "kl_divergence", "max_kl_divergence",
                 "max_abs", "mean_abs", "ppl_delta", "generation_match"}


def resolve_thresholds(bits: int, overrides: dict[str, float] | None = None) -> dict[str, float]:
    out = dict(DEFAULT_THRESHOLDS[bits])
    for key, value in (overrides or {}).items():
        who, _, metric = key.partition(".")
        if who not in AGAINST or metric not in KNOWN_METRICS:
            raise UserError(
                f"unknown threshold {key!r}; use <reference|twin>.<metric> with metric one of {', '.join(sorted(KNOWN_METRICS))}"
            )
        out[key] = float(value)
    return out


@dataclass
class Check:
    name: str
    passed: bool
    value: float
    threshold: float
    op: str
    step: str

    def describe(self) -> str:
        return f"{self.name} = {self.value:.6g} (threshold {self.op} {self.threshold:g}) at step {self.step}"


@dataclass
class ParityResult:
    steps: dict[str, list[dict[str, Any]]]  # against -> per-step metric rows
    overall: dict[str, dict[str, float]]  # against -> metrics over every position
    perplexity: dict[str, float]
    generation: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    integrity_problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and not self.integrity_problems

    def failures(self) -> list[str]:
        out = [f"integrity: {name} differs from the sha256 recorded in manifest.json" for name in self.integrity_problems]
        return out + [c.describe() for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["failures"] = self.failures()
        return d


def _step_slices(golden: Golden) -> list[tuple[str, slice]]:
    steps = [("prefill", slice(0, golden.prefill))]
    steps += [(f"decode_{i + 1}", slice(golden.prefill + i, golden.prefill + i + 1)) for i in range(len(golden.tokens) - golden.prefill)]
    return steps


def _match_length(a: np.ndarray, b: np.ndarray) -> int:
    n = 0
    for x, y in zip(a.tolist(), b.tolist()):
        if x != y:
            break
        n += 1
    return n


def run_parity(runtime: TargetRuntime, golden: Golden, thresholds: dict[str, float],
               progress: Callable[[str], None] | None = None) -> ParityResult:
    say = progress or (lambda _msg: None)
    say("prefill + decode")
    logits = run_runtime(runtime, golden.tokens, golden.prefill)
    say("perplexity")
    runtime.reset()
    artifact_ppl = perplexity(runtime.forward(golden.ppl_tokens[:-1], 0), golden.ppl_tokens[1:])
    say("greedy generation")
    generated = greedy(runtime, golden.tokens[: golden.prefill], len(golden.greedy["reference"]))

    steps: dict[str, list[dict[str, Any]]] = {}
    overall: dict[str, dict[str, float]] = {}
    for who in AGAINST:
        expected = golden.logits[who]
        steps[who] = [{"step": name, "positions": s.stop - s.start, **compare_logits(logits[s], expected[s])} for name, s in _step_slices(golden)]
        overall[who] = compare_logits(logits, expected)
    ppl = {"tokens": int(len(golden.ppl_tokens)), "artifact": artifact_ppl, **{who: golden.ppl[who] for who in AGAINST}}
    for who in AGAINST:
        ppl[f"delta_vs_{who}"] = (artifact_ppl - golden.ppl[who]) / golden.ppl[who]
    gen = {"tokens": int(len(generated)), "artifact": generated.tolist()}
    for who in AGAINST:
        gen[f"match_vs_{who}"] = _match_length(generated, golden.greedy[who])

    result = ParityResult(steps, overall, ppl, gen)
    for key, threshold in sorted(thresholds.items()):
        who, _, metric = key.partition(".")
        op = "<=" if metric in _AT_MOST else ">="

        def ok(value: float) -> bool:
            return value <= threshold + 1e-12 if op == "<=" else value >= threshold - 1e-12

        if metric == "ppl_delta":
            value, step = abs(ppl[f"delta_vs_{who}"]), "perplexity"
        elif metric == "generation_match":
            value, step = gen[f"match_vs_{who}"] / max(1, gen["tokens"]), "generation"
        elif metric in ("min_cosine", "max_kl_divergence", "max_abs"):
            # Per-step checks: the report names the worst step.
            rows = steps[who]
            worst = min(rows, key=lambda r: r[metric]) if op == ">=" else max(rows, key=lambda r: r[metric])
            value, step = worst[metric], worst["step"]
        else:
            value = overall[who][metric]
            failing = [r["step"] for r in steps[who] if not ok(r[metric])]
            step = "all" if ok(value) or not failing else f"all (first at {failing[0]})"
        result.checks.append(Check(key, ok(value), float(value), threshold, op, step))
    return result
