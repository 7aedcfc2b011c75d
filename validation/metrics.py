"""Parity metrics between two sets of logits (artifact vs reference or twin)."""

from __future__ import annotations

import math

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """actual/expected: [positions, vocab]. All metrics averaged over positions unless named max."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if a.shape != e.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {e.shape}")
    diff = np.abs(a - e)
    cos = (a * e).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1) + 1e-30)
    top1 = (a.argmax(-1) == e.argmax(-1)).mean()
    k = min(5, a.shape[-1])
    top_a, top_e = np.argsort(-a, -1)[:, :k], np.argsort(-e, -1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_e)])
    lp_e, lp_a = _log_softmax(e), _log_softmax(a)
    kl = (np.exp(lp_e) * (lp_e - lp_a)).sum(-1)  # KL(expected || actual)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float(top1),
        "top5_overlap": float(overlap),
        "kl_divergence": float(kl.mean()),
        "max_kl_divergence": float(kl.max()),
    }


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean NLL) of `targets` [N] under `logits` [N, vocab]."""
    lp = _log_softmax(logits)
    return float(math.exp(-lp[np.arange(len(targets)), targets].mean()))


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, as Apple's ml-stable-diffusion reports conversions."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    peak = float(np.abs(expected).max())
    return float("inf") if mse == 0 else 20 * math.log10(peak / math.sqrt(mse))
