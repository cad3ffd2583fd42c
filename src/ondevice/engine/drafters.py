"""Where speculative drafts come from: prompt lookup (Saxena 2023) and a smaller draft model.

The generator (engine/generator.py) decides how many tokens to draft and verifies them; these only propose.
Both are deterministic (an n-gram continuation, a draft model's argmax), which is what makes the generator's
"sample from the target, accept if equal" the exact rejection rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Engine

NGRAMS = (3, 2)  # prompt lookup: the longest suffix n-gram with an earlier occurrence gives the draft


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    i = int(np.argmax(diff))
    return i if diff[i] else n


class PromptLookup:
    """One request's text (prompt + generated tokens) indexed by n-gram, for prompt-lookup drafts."""

    def __init__(self, tokens: Sequence[int]):
        self.hist = list(tokens)
        self.ngrams: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest occurrence
        self.n_indexed = 0

    def append(self, tok: int) -> None:
        self.hist.append(tok)

    def draft(self, k: int) -> list[int]:
        """What followed the latest earlier occurrence of the text's last n tokens (at most ``k`` of them)."""
        h = self.hist
        for end in range(self.n_indexed, len(h) - 1):  # index the n-grams whose continuation is now known
            for n in NGRAMS:
                if end + 1 >= n:
                    self.ngrams[tuple(h[end + 1 - n:end + 1])] = end + 1
        self.n_indexed = max(self.n_indexed, len(h) - 1)
        for n in NGRAMS:
            p = self.ngrams.get(tuple(h[-n:])) if len(h) >= n else None
            if p is not None:
                d = h[p:p + k]
                return d if min(d) >= 0 else []
        return []


class ModelDrafter:
    """Drafts from a smaller model with the same vocabulary: greedy (argmax) continuations, its KV per slot
    kept in step with the target's tokens."""

    def __init__(self, engine: Engine, seqs: Sequence[int]):
        self.eng = engine
        self.cached: dict[int, list[int]] = {seq: [] for seq in seqs}

    def draft(self, seq: int, tokens: list[int], k: int) -> list[int]:
        eng, cached = self.eng, self.cached[seq]
        del cached[eng.n_past(seq):]  # the draft engine was reset or truncated meanwhile
        n = min(common_prefix(cached, tokens), len(tokens) - 1)  # the last token is decoded for its logits
        eng.truncate(n, seq)
        del cached[n:]
        if len(tokens) + k > eng.n_ctx // max(1, eng.config.n_seq_max):
            return []
        todo = tokens[n:]
        for start in range(0, len(todo), eng.n_batch):
            chunk = todo[start:start + eng.n_batch]
            last = start + len(chunk) == len(todo)
            eng.decode_batch([(t, n + start + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        cached.extend(todo)
        out: list[int] = []
        while True:
            tok = int(eng.logits(-1).argmax())
            if tok in eng.eos_tokens:
                break
            out.append(tok)
            if len(out) >= k:
                break
            eng.decode_batch([(tok, len(cached), seq, True)])
            cached.append(tok)
        return out
