"""Log-probabilities from raw logits (plain numpy, float64): shared by eval (PPL/KLD) and serve (logprobs)."""

from __future__ import annotations

import numpy as np

from ..errors import NonFiniteLogits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``(..., V)`` raw logits -> ``(..., V)`` float64 log-probabilities."""
    return log_softmax_lse(logits)[0]


def log_softmax_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log-probabilities, log-sum-exp (..., 1))`` of ``(..., V)`` raw logits, in float64; NaN or infinite
    logits raise :class:`NonFiniteLogits` (a PPL or logprob of nan is never a result)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)  # NaN or +inf anywhere in a row makes its max so
    if not np.isfinite(m).all():
        raise NonFiniteLogits()
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return x - lse, lse


def top_k(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token, logprob)`` of a ``(V,)`` row, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]


def token_stats(row: np.ndarray, token: int) -> tuple[float, float]:
    """``(logprob of token, entropy in nats)`` of a ``(V,)`` raw logits row, in float32 with one ``exp`` pass.

    The entropy is over the whole vocabulary: one dot product more than the log-probability, where a top-k
    entropy would need a partition of the row (about 3x the cost per token).
    """
    top = row.max()
    if not np.isfinite(top):
        raise NonFiniteLogits()
    x = row - top  # (V,) float32
    e = np.exp(x)
    z = float(e.sum())
    log_z = float(np.log(z))
    return float(x[token]) - log_z, log_z - float(np.dot(e, x)) / z
