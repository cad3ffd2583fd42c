"""How sure the device model is of its own answer: features from its tokens and a calibrated combiner.

Each generated token carries its log-probability and the entropy of the distribution it was drawn from
(``Generation.logprob`` / ``Generation.entropy``, recorded when ``Sampling.token_stats`` is set; both from
the raw logits, before temperature or penalties). An answer's features are length-normalised summaries
of those (mean and minimum log-probability, mean and maximum entropy, the share of unsure tokens) plus its
length. A small logistic combiner, fitted on a dev split where both tiers answered, turns them into one
number in 0..1: the estimated probability that the device's answer is as good as the cloud's ("Cloud-device
collaborative adaptation": escalate by uncertainty, not at random). Without a fitted combiner the
confidence is the geometric mean token probability, ``exp(mean logprob)``, and says so (``calibrated``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "unsure_share", "log_tokens")
UNSURE_LOGPROB = math.log(0.5)  # a token the model gave less than even odds


def features(logprobs: Sequence[float], entropies: Sequence[float]) -> dict[str, float]:
    """The answer's features from its per-token log-probabilities and entropies (nats).

    An empty answer (the model stopped at once) has neutral features: nothing was unsure.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    ent = np.asarray(entropies, dtype=np.float64)
    if lp.size == 0:
        return {"mean_logprob": 0.0, "min_logprob": 0.0, "mean_entropy": 0.0, "max_entropy": 0.0,
                "unsure_share": 0.0, "log_tokens": 0.0}
    return {"mean_logprob": float(lp.mean()), "min_logprob": float(lp.min()),
            "mean_entropy": float(ent.mean()) if ent.size else 0.0,
            "max_entropy": float(ent.max()) if ent.size else 0.0,
            "unsure_share": float((lp < UNSURE_LOGPROB).mean()), "log_tokens": math.log1p(lp.size)}


class TokenStats:
    """Collects per-token statistics from a stream of ``Generation`` records (EOS records included: how
    sure the model was to stop counts too)."""

    def __init__(self) -> None:
        self.logprobs: list[float] = []
        self.entropies: list[float] = []

    def add(self, g) -> None:
        if g.logprob is not None:
            self.logprobs.append(g.logprob)
            self.entropies.append(g.entropy if g.entropy is not None else 0.0)

    def features(self) -> dict[str, float]:
        return features(self.logprobs, self.entropies)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


@dataclass
class Combiner:
    """Logistic regression over standardised :data:`FEATURES`; ``predict`` is P(device answer is good).

    Fitted with Newton's method (IRLS) and a small L2 penalty, in numpy: a handful of weights, nothing to
    install. ``meta`` says what it was fitted on (model sha256, cloud, suite, split, n, dev AUC).
    """

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    features: tuple[str, ...] = FEATURES
    meta: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return True

    def predict(self, feats: dict[str, float]) -> float:
        x = (np.array([feats[f] for f in self.features]) - np.array(self.mean)) / np.array(self.std)
        return float(_sigmoid(np.array(x @ np.array(self.weights) + self.bias)))

    @classmethod
    def fit(cls, feats: Sequence[dict[str, float]], labels: Sequence[int], *, l2: float | None = None,
            meta: dict | None = None) -> Combiner:
        """Fit on ``feats`` with binary ``labels`` (1: the device's answer was good enough).

        ``l2`` None picks the penalty from :data:`L2_GRID` by cross-validated log-loss on the same dev
        data (a few dozen answers overfit six weights easily; the test split is never looked at).
        """
        y = np.asarray(labels, dtype=np.float64)
        if len(feats) != len(y) or len(y) < 4:
            raise InvalidArgument(f"fitting the combiner needs at least 4 labelled answers, got {len(y)}; "
                                  f"use a larger dev split")
        if y.min() == y.max():
            raise InvalidArgument("every dev answer has the same label (all good or all bad): nothing to learn "
                                  "from; use a larger or more varied dev split")
        x = np.array([[f[k] for k in FEATURES] for f in feats], dtype=np.float64)  # (n, n_features)
        chosen = l2 if l2 is not None else _cv_l2(x, y)
        mu, sd, w = _fit_logistic(x, y, chosen)
        c = cls(mean=mu.tolist(), std=sd.tolist(), weights=w[:-1].tolist(), bias=float(w[-1]), meta=dict(meta or {}))
        c.meta.update(n_fit=len(y), n_good=int(y.sum()), l2=chosen)
        c.meta["dev_auc"] = roc_auc([c.predict(f) for f in feats], y.tolist())
        return c

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Combiner:
        try:
            c = cls(mean=list(d["mean"]), std=list(d["std"]), weights=list(d["weights"]), bias=float(d["bias"]),
                    features=tuple(d["features"]), meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a cascade combiner file ({e}); fit one with `ondevice cascade fit`") from e
        unknown = set(c.features) - set(FEATURES)
        if unknown or not (len(c.features) == len(c.mean) == len(c.std) == len(c.weights)):
            raise InvalidArgument(f"the combiner file names unknown or mismatched features {sorted(unknown)}; "
                                  f"refit it with `ondevice cascade fit`")
        return c

    def save(self, path: str | Path) -> Path:
        from ..models.store import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Combiner:
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InvalidArgument(f"no combiner file at {p}; fit one with `ondevice cascade fit`") from None
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{p} is not JSON ({e.msg}); refit it with `ondevice cascade fit`") from None


L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, weights with the bias last) of an L2-penalised logistic fit by Newton's method."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd < 1e-9] = 1.0
    z = np.hstack([(x - mu) / sd, np.ones((len(y), 1))])  # (n, n_features + 1), bias last
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # the bias is not penalised
    for _ in range(50):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mu, sd, w


def _cv_l2(x: np.ndarray, y: np.ndarray, folds: int = 5) -> float:
    """The penalty of :data:`L2_GRID` with the lowest held-out log-loss over ``folds`` interleaved folds."""
    k = max(2, min(folds, len(y)))
    best, best_loss = L2_GRID[-1], float("inf")
    for l2 in L2_GRID:
        loss = 0.0
        for f in range(k):
            test = np.arange(len(y)) % k == f
            if y[~test].min() == y[~test].max():  # a training fold with one label: predict its base rate
                p = np.full(test.sum(), np.clip(y[~test].mean(), 0.01, 0.99))
            else:
                mu, sd, w = _fit_logistic(x[~test], y[~test], l2)
                p = _sigmoid(np.hstack([(x[test] - mu) / sd, np.ones((test.sum(), 1))]) @ w)
            p = np.clip(p, 1e-6, 1 - 1e-6)
            loss -= float((y[test] * np.log(p) + (1 - y[test]) * np.log(1 - p)).sum())
        if loss < best_loss - 1e-12:
            best, best_loss = l2, loss
    return best


class GeometricMean:
    """The uncalibrated fallback: ``exp(mean token logprob)``, the geometric mean token probability."""

    calibrated = False

    @property
    def meta(self) -> dict:
        return {}

    def predict(self, feats: dict[str, float]) -> float:
        return math.exp(feats["mean_logprob"])

    def to_dict(self) -> dict:
        return {"kind": "geometric_mean"}


def combiner_path(model_sha256: str) -> Path:
    """Where the combiner fitted for a device model (by its file's sha256) is stored."""
    from ..models.store import data_dir

    return data_dir() / "cascade" / f"combiner-{model_sha256[:16]}.json"


def find_combiner(model_sha256: str | None, path: str | Path | None = None) -> Combiner | GeometricMean:
    """An explicit combiner file, else the one fitted for this model in the data dir (``ondevice cascade
    fit``), else one shipped with ondevice for this model file, else the uncalibrated fallback."""
    if path:
        return Combiner.load(path)
    if model_sha256:
        from importlib import resources

        for p in (combiner_path(model_sha256),
                  resources.files("ondevice") / "data" / "cascade" / f"combiner-{model_sha256[:16]}.json"):
            if p.is_file():
                return Combiner.from_dict(json.loads(p.read_text(encoding="utf-8")))
    return GeometricMean()


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (ties count half): how well ``scores`` rank good answers above bad ones."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def split_of(item_id: str, dev_share: float = 0.4) -> str:
    """``dev`` or ``test``, fixed per item id (a hash), so the combiner is never scored on what it saw."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big") / 2**32
    return "dev" if h < dev_share else "test"


def labels_for(device_scores: Iterable[float], cloud_scores: Iterable[float], margin: float = 0.0) -> list[int]:
    """1 where the device's answer scored at least the cloud's (minus ``margin``): deferring would not help."""
    return [int(d >= c - margin) for d, c in zip(device_scores, cloud_scores)]
