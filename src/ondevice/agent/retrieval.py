"""Tool retrieval: offer a small model only the few tools a request needs (LLMind 2.0's API retrieval).

Each tool is indexed by its text (name split into words, description, parameter names and descriptions)
two ways: BM25 over words, and the model's own pooled embeddings (a second llama.cpp context with
``embeddings=True``, mean pooling, as ``/v1/embeddings`` serves them), or a hybrid of both (each signal
scaled to 0..1 over the catalog, mixed with weight ``alpha`` on the embedding). A decoder LM's mean-pooled
states are a weak sentence embedding: on the function-calling suite SmolLM2-135M's gave a top-5 recall far
below BM25's and pulled the hybrid below BM25 alone (``benchmarks/agent_bench.py`` measures all three), so
BM25 is what ``ondevice agent --retrieve`` uses unless told otherwise.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tools import Tool

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of to for in on at and or is are be by with from this that it as my me i you your "
                  "please can could would will what which do does".split())


def words(text: str) -> list[str]:
    """Lower-case words, identifiers split on ``_``/``-``/camelCase, stop words and a plural ``s`` dropped."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()
    out = []
    for w in _WORD.findall(text):
        if w in _STOP:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


def tool_text(t: Tool) -> str:
    """What a tool is indexed by."""
    props = t.parameters.get("properties", {})
    params = "; ".join(f"{k}: {v.get('description', '')} {' '.join(map(str, v.get('enum', [])))}".strip()
                       for k, v in props.items())  # enum values are words a request uses ("vibrate")
    return f"{t.name.replace('_', ' ')}: {t.description} ({params})"


class BM25:
    """Okapi BM25 over short documents (k1=1.2, b=0.75)."""

    def __init__(self, docs: Sequence[list[str]], k1: float = 1.2, b: float = 0.75):
        self.docs = [Counter(d) for d in docs]
        self.lens = [len(d) for d in docs]
        self.avg = (sum(self.lens) / len(self.lens)) if self.lens else 1.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(len(self.docs))
        for i, (d, n) in enumerate(zip(self.docs, self.lens)):
            s = 0.0
            for w in query:
                f = d.get(w)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg))
            out[i] = s
        return out


class Embedder:
    """Pooled, L2-normalised embeddings from a GGUF model (its own small context, mean pooling)."""

    def __init__(self, model_path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None,
                 pooling: str = "mean"):
        from ..engine.embed import embedding_config
        from ..engine.llama import LlamaEngine

        self.engine = LlamaEngine(model_path, embedding_config(n_ctx, pooling=pooling, n_threads=n_threads,
                                                               warmup=False))
        self.n_ctx = n_ctx  # tokens of a text that count (the rest is cut)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), n_embd)`` unit vectors (many texts per decode: engine/embed.py)."""
        from ..engine.embed import embed_many

        toks = [self.engine.tokenize(t, add_special=True, parse_special=False)[: self.n_ctx] for t in texts]
        v = embed_many(self.engine, toks)
        return v / np.where((n := np.linalg.norm(v, axis=1, keepdims=True)) > 0, n, 1.0)

    def close(self) -> None:
        self.engine.close()


def _unit(x: np.ndarray) -> np.ndarray:
    """Scores scaled to 0..1 over the catalog (all equal: zeros)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class ToolIndex:
    """Top-k tools for a request: ``mode`` is ``hybrid`` (default), ``lexical`` or ``embedding``."""

    def __init__(self, tools: Sequence[Tool], embedder: Embedder | None = None, *, alpha: float = 0.3,
                 mode: str | None = None):
        self.tools = list(tools)
        self.embedder = embedder
        self.alpha = alpha
        self.mode = mode or ("hybrid" if embedder is not None else "lexical")
        if self.mode not in ("hybrid", "lexical", "embedding"):
            raise ValueError(f"retrieval mode {self.mode!r}: use hybrid, lexical or embedding")
        if self.mode != "lexical" and embedder is None:
            raise ValueError(f"retrieval mode {self.mode!r} needs an embedder")
        texts = [tool_text(t) for t in self.tools]
        self.bm25 = BM25([words(t) for t in texts])
        self.vectors = embedder(texts) if embedder is not None else None  # (n_tools, n_embd)

    def scores(self, query: str, mode: str | None = None) -> np.ndarray:
        mode = mode or self.mode
        lex = _unit(self.bm25.scores(words(query)))
        if mode == "lexical":
            return lex
        emb = _unit(self.vectors @ self.embedder([query])[0])
        return emb if mode == "embedding" else self.alpha * emb + (1 - self.alpha) * lex

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Tool]:
        s = self.scores(query, mode)
        order = np.argsort(-s, kind="stable")[:k]
        return [self.tools[i] for i in order]
