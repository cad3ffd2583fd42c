"""Speculative drafts: where they come from (prompt lookup, Saxena 2023; a smaller draft model) and how many pay.

The generator (engine/generator.py) verifies drafts; these propose them. Both proposers are deterministic (an
n-gram continuation, a draft model's argmax), which is what makes the generator's "sample from the target,
accept if equal" the exact rejection rule. How many tokens to draft is weighed here (:class:`Acceptance`,
:class:`StepCosts`): verifying k more tokens costs ``cost(base + k) - cost(base)`` (measured on this machine,
under its current load) and yields, in expectation, 1 + a + a^2 + ... + a^k tokens for the one of a plain step
(``a``: the request's measured per-token acceptance). The k with the best tokens per second is drafted, and
none when no k beats plain decoding: drafts that keep missing turn themselves off.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from .base import Engine

NGRAMS = (3, 2)  # prompt lookup: the longest suffix n-gram with an earlier occurrence gives the draft
ACCEPT_PRIOR = 0.6  # per-token acceptance a new request's drafts start from (then measured per request)
# drafting off: the acceptance estimate creeps back up this much per step (the text may start to repeat);
# a probe that misses entirely halves the creep, an accepted token resets it
PROBE_CREEP = 0.02


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


class StepCosts:
    """What a ``llama_decode`` of n items (n <= 64) costs here, now: the median of the last ``WINDOW`` steps of
    each size (one step the host stalled does not make a plain step look dear and drafting cheap, as it did
    in a running mean), interpolated between the sizes seen, and (unmeasured) a prior that lets drafting be
    tried (decode is memory-bound: a few more rows cost little) until measurements say."""

    MAX_ITEMS = 64
    WINDOW = 9

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self._last: dict[int, collections.deque] = {}

    def observe(self, n: int, seconds: float) -> None:
        if n <= self.MAX_ITEMS:
            last = self._last.setdefault(n, collections.deque(maxlen=self.WINDOW))
            last.append(seconds)
            self.seen[n] = statistics.median(last)

    def trusted(self, base: int, top: int) -> int:
        """The largest step (at most ``top`` items) worth weighing from a step of ``base`` items: none larger
        until ``base`` itself was measured (drafts are weighed against a plain step's cost), then twice the
        largest size measured between the two. Estimates between a one-token step and a prompt chunk run low
        where small steps cost nearly per token (on 2 Zen 5 cores, 2 items cost 1.6-2.5 single ones), so the
        draft grows by doubling, each size measured before the next: a wrong guess costs one step, not 7."""
        if base not in self.seen:
            return base
        return min(top, 2 * max(m for m in self.seen if base <= m <= top))

    def __call__(self, n: int) -> float:
        c = self.seen
        if n in c:
            return c[n]
        lo = max((m for m in c if m < n), default=None)
        hi = min((m for m in c if m > n), default=None)
        if lo is not None and hi is not None:
            return c[lo] + (c[hi] - c[lo]) * (n - lo) / (hi - lo)
        if lo is not None:
            one = c.get(1, c[lo] / (1 + 0.1 * (lo - 1)))
            return max(c[lo], one * (1 + 0.1 * (n - 1)))
        return (c[hi] if hi is not None else 1.0) * (1 + 0.1 * (n - 1)) / (1 + 0.1 * ((hi or 1) - 1))


class Acceptance:
    """One request's running estimate of the chance that its next draft token is accepted, and the draft
    length it makes worth verifying."""

    def __init__(self) -> None:
        self.rate = ACCEPT_PRIOR
        self.creep = PROBE_CREEP  # how fast the estimate recovers while drafting is off (backs off on misses)

    def length(self, base: int, k_max: int, cost: Callable[[int], float]) -> int:
        """How many tokens to draft into a step that already holds ``base`` items: the k (at most ``k_max``)
        with the best expected tokens per second, 0 when none beats plain decoding."""
        a = self.rate
        best, k, gain = 1.02 / cost(base), 0, 1.0
        for j in range(1, k_max + 1):
            if a ** j < 0.01:  # later tokens add under 1% each: no longer draft can pay (and this runs every step)
                break
            gain += a ** j
            rate = gain / cost(base + j)
            if rate > best:
                best, k = rate, j
        if k == 0:
            self.rate = min(ACCEPT_PRIOR, a + self.creep)  # look again now and then: the text may start to repeat
        return k

    def update(self, n_draft: int, n_acc: int) -> None:
        """A verification: ``n_acc`` accepted, then (unless all were) one rejected."""
        seen = 1.0 if n_acc == n_draft else n_acc / (n_acc + 1)
        self.rate += 0.3 * (seen - self.rate)
        self.creep = PROBE_CREEP if n_acc else self.creep / 2  # consecutive misses: probe ever more rarely
