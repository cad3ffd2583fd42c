"""How sure the device model is of its own answer: features of its tokens and text, and a calibrated combiner.

Each generated token carries its log-probability and the entropy of the distribution it was drawn from
(``Generation.logprob`` / ``Generation.entropy``, recorded when ``Sampling.token_stats`` is set; both from
the raw logits, before temperature or penalties). An answer's token features are length-normalised summaries
of those (mean and minimum log-probability, mean and maximum entropy, the share of unsure tokens) plus its
length. On rewrite and summary requests those barely tell a bad answer from a good one (the model is fluent
and sure while it chats instead of rewriting), so the answer's text is also compared with the request
(:func:`text_features`): how much of it is copied from the message and how much of the message it keeps, its
length against the message's, repeated bigrams, words echoed from the instruction, an answer cut by
``max_tokens``, and a "rewrite" that returned the message unchanged. A small logistic combiner (over the
text features by default, :data:`FIT_FEATURES`, which rank bad answers better), fitted on a dev split where
both tiers answered, turns them into one number in 0..1: the estimated probability that the
device's answer is as good as the cloud's ("Cloud-device collaborative adaptation": escalate by uncertainty,
not at random). Each dev answer is weighted by how much the choice matters there (``|cloud - device|``
score), so the fit ranks the answers where deferring gains most first. Without a fitted combiner the
confidence is the geometric mean token probability, ``exp(mean logprob)``, and says so (``calibrated``).
Everything here is what the device has at decision time: the request, its own tokens and its own text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

TOKEN_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "unsure_share", "log_tokens")
TEXT_FEATURES = ("copied_bigrams", "kept_bigrams", "length_ratio", "distinct_bigrams", "instruction_echo",
                 "truncated", "unchanged")
FEATURES = TOKEN_FEATURES + TEXT_FEATURES
# What a combiner is fitted on by default. Measured by benchmarks/cascade_bench.py (SmolLM2-135M -> Qwen2.5-
# 0.5B, rewrite + summary items): on top of the text features the token features only add noise that a few
# dozen dev answers cannot average out (60 random 54/108 re-splits: 84% of cloud-only at 40% deferred with
# the text features, 82% with both, 80% with the tokens alone). They are still computed and reported with
# every answer, and ``Combiner.fit(features=FEATURES)`` uses them.
FIT_FEATURES = TEXT_FEATURES
UNSURE_LOGPROB = math.log(0.5)  # a token the model gave less than even odds
MIN_FIT = 4  # labelled dev answers a combiner is fitted on, at least
FEW_PER_LABEL = 10  # `cascade fit` warns below this many dev answers of either label (good / worse than the cloud)
_WORD = re.compile(r"\w+(?:'\w+)?")
_LABEL = re.compile(r"^[^\W\d][\w ]{0,30}:\s*")  # "Message: ..." / "Notifications:\n..." before the text itself


def token_features(logprobs: Sequence[float], entropies: Sequence[float]) -> dict[str, float]:
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


def request_text(request) -> str:
    """The text a request asks about: a prompt string, or the last user message of a chat (text parts)."""
    if isinstance(request, str):
        return request
    for m in reversed(list(request or [])):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return "\n".join(p.get("text", "") for p in c or [] if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _bigrams(words: list[str]) -> list[tuple[str, str]]:
    w = ["<s>", *words]  # a start mark: a one-word text still has one bigram
    return list(itertools.pairwise(w))


def _share_in(xs: Sequence, pool: set) -> float:
    return sum(x in pool for x in xs) / len(xs) if xs else 0.0


def text_features(request: str, output: str, finish_reason: str | None = None) -> dict[str, float]:
    """The answer's text against the request: does it look like the rewrite or summary that was asked for?

    The request is split into the instruction and the text to work on: its last paragraph (after a blank
    line; a leading ``Label:`` dropped) when it has more than one, else the whole request. Shapes are word
    lists; the cost is linear in the lengths (microseconds for a message).
    """
    paras = [p for p in request.strip().split("\n\n") if p.strip()]
    source = _LABEL.sub("", paras[-1].strip()) if len(paras) > 1 else request
    instruction = "\n\n".join(paras[:-1]) if len(paras) > 1 else ""
    ow, sw = _words(output), _words(source)
    ob, sb = _bigrams(ow), _bigrams(sw)
    src_vocab = set(sw)
    new_words = [w for w in ow if w not in src_vocab]
    return {"copied_bigrams": _share_in(ob, set(sb)) if ow else 0.0,
            "kept_bigrams": _share_in(sb, set(ob)) if sw else 0.0,
            "length_ratio": math.log((len(ow) + 1) / (len(sw) + 1)),
            "distinct_bigrams": len(set(ob)) / len(ob) if ow else 1.0,
            "instruction_echo": _share_in(new_words, set(_words(instruction))) if ow else 0.0,
            "truncated": float(finish_reason == "length"),
            "unchanged": float(bool(ow) and ow == sw)}


def features(logprobs: Sequence[float], entropies: Sequence[float], request: str = "", output: str = "",
             finish_reason: str | None = None) -> dict[str, float]:
    """All of :data:`FEATURES`: the token features and the text features of one answer (or its prefix)."""
    return token_features(logprobs, entropies) | text_features(request, output, finish_reason)


class TokenStats:
    """Collects an answer's tokens from a stream of ``Generation`` records (EOS records included: how sure
    the model was to stop counts too): their statistics, text and finish reason. ``request`` is the prompt
    or chat messages the answer is for (its text features compare the two)."""

    def __init__(self, request=None) -> None:
        self.request = request_text(request)
        self.logprobs: list[float] = []
        self.entropies: list[float] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None

    def add(self, g) -> None:
        if g.logprob is not None:
            self.logprobs.append(g.logprob)
            self.entropies.append(g.entropy if g.entropy is not None else 0.0)
        self.pieces.append(g.text)
        self.finish_reason = g.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def features(self) -> dict[str, float]:
        return features(self.logprobs, self.entropies, self.request, self.text, self.finish_reason)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


@dataclass
class Combiner:
    """Logistic regression over standardised features (``features``, a subset of :data:`FEATURES`, stored
    with it); ``predict`` is P(device answer is good).

    Fitted with Newton's method (IRLS) and an L2 penalty, in numpy: a dozen weights, nothing to install.
    ``meta`` says what it was fitted on (model sha256, cloud, suite, split, n, dev AUC). A file fitted before
    the text features existed names only token features and still predicts from those.
    """

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    features: tuple[str, ...] = FEATURES
    meta: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        """False for a file fitted for another device model (:func:`find_combiner`): its scale is that model's."""
        return not self.meta.get(SERVING_ANOTHER)

    def predict(self, feats: dict[str, float]) -> float:
        x = (np.array([feats[f] for f in self.features]) - np.array(self.mean)) / np.array(self.std)
        return float(_sigmoid(np.array(x @ np.array(self.weights) + self.bias)))

    @classmethod
    def fit(cls, feats: Sequence[dict[str, float]], labels: Sequence[int], *, weights: Sequence[float] | None = None,
            features: Sequence[str] = FIT_FEATURES, l2: float | None = None, meta: dict | None = None) -> Combiner:
        """Fit on ``feats`` with binary ``labels`` (1: the device's answer was good enough).

        ``weights`` (one per answer, default 1) say how much each answer counts: with ``|cloud - device|``
        the fit cares about the answers where the choice changes the score. ``l2`` None picks the penalty
        from :data:`L2_GRID` by cross-validated (weighted) log-loss on the same dev data (a few dozen answers
        overfit a dozen weights easily; the test split is never looked at).
        """
        y = np.asarray(labels, dtype=np.float64)
        sw = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        unknown = set(features) - set(FEATURES)
        if unknown or not features:
            raise InvalidArgument(f"unknown combiner features {sorted(unknown)}; pick from {', '.join(FEATURES)}")
        if len(sw) != len(y) or (sw < 0).any() or not sw.sum() > 0:
            raise InvalidArgument("combiner weights must be one non-negative number per answer, not all 0")
        sw = sw / sw.mean()  # mean weight 1: the penalty grid means the same weighted or not
        if len(feats) != len(y) or len(y) < MIN_FIT:
            raise InvalidArgument(f"fitting the combiner needs at least {MIN_FIT} labelled answers, got {len(y)}; "
                                  f"use a larger dev split")
        if y.min() == y.max():
            raise InvalidArgument("every dev answer has the same label (all good or all bad): nothing to learn "
                                  "from; use a larger or more varied dev split")
        x = np.array([[f[k] for k in features] for f in feats], dtype=np.float64)  # (n, n_features)
        chosen = l2 if l2 is not None else _cv_l2(x, y, sw)
        mu, sd, w = _fit_logistic(x, y, chosen, sw)
        c = cls(mean=mu.tolist(), std=sd.tolist(), weights=w[:-1].tolist(), bias=float(w[-1]),
                features=tuple(features), meta=dict(meta or {}))
        c.meta.update(n_fit=len(y), n_good=int(y.sum()), l2=chosen, weighted=weights is not None)
        confs = [c.predict(f) for f in feats]
        c.meta["dev_auc"] = roc_auc(confs, y.tolist())
        c.meta["share_thresholds"] = share_thresholds(confs)
        return c

    def threshold_for(self, share: float) -> float:
        """The threshold that defers ``share`` of requests like the dev answers: the least confident ones.

        A probability threshold means what it says only as far as the dev split was like the traffic; with
        a strong penalty every confidence sits near the dev base rate, so a share is what users can pick."""
        pts = self.meta.get("share_thresholds")
        if not pts:
            raise InvalidArgument("this combiner was fitted before it stored the threshold of each deferral "
                                  "share; refit it with `ondevice cascade fit`, or give a threshold instead")
        if share <= 0 or share >= 1:
            return float(share >= 1)
        return float(np.interp(share, [0.0] + [a for a, _ in pts] + [1.0], [0.0] + [b for _, b in pts] + [1.0]))

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


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, sw: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, weights with the bias last) of an L2-penalised logistic fit by Newton's method, each
    row's loss weighted by ``sw`` (default 1)."""
    sw = np.ones(len(y)) if sw is None else sw
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd < 1e-9] = 1.0
    z = np.hstack([(x - mu) / sd, np.ones((len(y), 1))])  # (n, n_features + 1), bias last
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # the bias is not penalised
    for _ in range(50):
        p = _sigmoid(z @ w)
        grad = z.T @ (sw * (p - y)) + reg * w
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mu, sd, w


def _cv_l2(x: np.ndarray, y: np.ndarray, sw: np.ndarray, folds: int = 5) -> float:
    """The penalty of :data:`L2_GRID` with the lowest held-out (``sw``-weighted) log-loss over ``folds``
    interleaved folds."""
    k = max(2, min(folds, len(y)))
    best, best_loss = L2_GRID[-1], float("inf")
    for l2 in L2_GRID:
        loss = 0.0
        for f in range(k):
            test = np.arange(len(y)) % k == f
            if y[~test].min() == y[~test].max():  # a training fold with one label: predict its base rate
                p = np.full(test.sum(), np.clip(y[~test].mean(), 0.01, 0.99))
            else:
                mu, sd, w = _fit_logistic(x[~test], y[~test], l2, sw[~test])
                p = _sigmoid(np.hstack([(x[test] - mu) / sd, np.ones((test.sum(), 1))]) @ w)
            p = np.clip(p, 1e-6, 1 - 1e-6)
            loss -= float((sw[test] * (y[test] * np.log(p) + (1 - y[test]) * np.log(1 - p))).sum())
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

    def threshold_for(self, share: float) -> float:
        raise InvalidArgument("a deferral share needs a fitted combiner (`ondevice cascade fit` on a dev split: "
                              "the share is taken from its answers' confidences); or give a threshold instead")


def share_thresholds(confs: Sequence[float]) -> list[list[float]]:
    """``[share, threshold]`` for shares 0.05..0.95: below ``threshold`` lie ``share`` of ``confs`` (the
    midpoint between the two answers either side of that rank)."""
    c, n = sorted(confs), len(confs)
    out = []
    for i in range(1, 20):
        k = round(i * n / 20)
        t = c[0] if k == 0 else math.nextafter(c[-1], math.inf) if k == n else (c[k - 1] + c[k]) / 2
        out.append([i / 20, t])
    return out


def combiner_path(model_sha256: str) -> Path:
    """Where the combiner fitted for a device model (by its file's sha256) is stored."""
    from ..models.store import data_dir

    return data_dir() / "cascade" / f"combiner-{model_sha256[:16]}.json"


def find_combiner(model_sha256: str | None, path: str | Path | None = None) -> Combiner | GeometricMean:
    """An explicit combiner file, else the one fitted for this model in the data dir (``ondevice cascade
    fit``), else one shipped with ondevice for this model file, else the uncalibrated fallback."""
    if path:
        return _for_model(Combiner.load(path), model_sha256)
    if model_sha256:
        from importlib import resources

        for p in (combiner_path(model_sha256),
                  resources.files("ondevice") / "data" / "cascade" / f"combiner-{model_sha256[:16]}.json"):
            if p.is_file():
                return Combiner.from_dict(json.loads(p.read_text(encoding="utf-8")))
    return GeometricMean()


SERVING_ANOTHER = "serving_another_model"  # meta: the sha256 of the device model a foreign combiner is used with


def _for_model(comb: Combiner, model_sha256: str | None) -> Combiner:
    """``comb``, marked (:data:`SERVING_ANOTHER`) when its file records another device model than ``model_sha256``
    (a combiner fitted before ``adapt merge`` made a new model, or copied from another machine)."""
    fitted = comb.meta.get("model_sha256")
    if model_sha256 and fitted and fitted != model_sha256:
        comb.meta[SERVING_ANOTHER] = model_sha256
    return comb


def combiner_warning(comb, model_name: str) -> str | None:
    """Why a combiner's confidences do not fit the device model ``model_name``, or None."""
    meta = getattr(comb, "meta", {})
    if not meta.get(SERVING_ANOTHER):
        return None
    return (f"the combiner was fitted for {meta.get('model', 'another model')} ({meta['model_sha256'][:12]}), not for "
            f"{model_name} ({meta[SERVING_ANOTHER][:12]}): its confidences and defer-share thresholds are that "
            f"model's; refit it with `ondevice cascade fit -m {model_name}`")


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


WEIGHT_FLOOR = 0.05  # ties (both tiers equally good or bad) still count a little


def weights_for(device_scores: Iterable[float], cloud_scores: Iterable[float]) -> list[float]:
    """How much each answer's choice matters: ``|cloud - device|`` (+ a small floor)."""
    return [abs(c - d) + WEIGHT_FLOOR for d, c in zip(device_scores, cloud_scores)]
