"""Log-probabilities from raw logits (plain numpy, float64): shared by eval (PPL/KLD) and serve (logprobs)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``(..., V)`` raw logits -> ``(..., V)`` float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def top_k(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token, logprob)`` of a ``(V,)`` row, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
