"""Parity metrics between two sets of logits (artifact vs reference or twin)."""

from __future__ import annotations

import math

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
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
    lp_e, lp_a = log_softmax(e), log_softmax(a)
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


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [N, k] (best first) and their log-softmax values [N, k] float32."""
    k = min(k, logits.shape[-1])
    ids = np.argsort(-logits.astype(np.float64), axis=-1, kind="stable")[:, :k]
    lp = np.take_along_axis(log_softmax(logits), ids, axis=-1)
    return ids.astype(np.int32), lp.astype(np.float32)


def compare_top_k(
    actual: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, decisive_margin: float
) -> dict[str, float]:
    """`actual` full logits [N, V] against an expected distribution kept as its top-k (ids, log-probs).

    KL(expected || actual) is measured over the k ids plus one bucket holding the rest of the mass:
    a lower bound of the full KL (merging outcomes never increases KL) that is tight when the k ids
    hold almost all the mass. `top1_decisive` counts only positions whose expected top-1 leads its
    runner-up by more than `decisive_margin` nats, where a flip is a real difference."""
    lp_a = log_softmax(actual)
    n = len(ids)
    top1 = lp_a.argmax(-1) == ids[:, 0]
    decisive = (logprobs[:, 0] - logprobs[:, 1]) > decisive_margin if ids.shape[1] > 1 else np.ones(n, bool)
    k5 = min(5, ids.shape[1])
    top5_a = np.argsort(-lp_a, -1)[:, :k5]
    overlap = np.mean([len(set(x) & set(y)) / k5 for x, y in zip(top5_a, ids[:, :k5])])
    p_e = np.exp(logprobs.astype(np.float64))
    rest_e = np.clip(1.0 - p_e.sum(-1), 0.0, 1.0)
    lp_a_k = np.take_along_axis(lp_a, ids.astype(np.int64), axis=-1)
    rest_a = np.clip(1.0 - np.exp(lp_a_k).sum(-1), 1e-300, 1.0)
    kl = (p_e * (logprobs - lp_a_k)).sum(-1) + np.where(
        rest_e > 0, rest_e * (np.log(np.maximum(rest_e, 1e-300)) - np.log(rest_a)), 0.0
    )
    kl = np.maximum(kl, 0.0)
    return {
        "top1_agreement": float(top1.mean()),
        "top1_decisive": float(top1[decisive].mean()) if decisive.any() else 1.0,
        "decisive_positions": int(decisive.sum()),
        "top5_overlap": float(overlap),
        "kl_divergence": float(kl.mean()),
        "max_kl_divergence": float(kl.max()),
    }


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean NLL) of `targets` [N] under `logits` [N, vocab]."""
    lp = log_softmax(logits)
    return float(math.exp(-lp[np.arange(len(targets)), targets].mean()))


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, as Apple's ml-stable-diffusion reports conversions."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    peak = float(np.abs(expected).max())
    return float("inf") if mse == 0 else 20 * math.log10(peak / math.sqrt(mse))
