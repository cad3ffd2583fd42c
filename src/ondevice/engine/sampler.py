"""llama.cpp's native sampler chain, with the grammar checked outside it (constrained decoding at full speed)."""

from __future__ import annotations

import ctypes
import sys
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument, NonFiniteLogits
from . import native
from .records import Sampling

if TYPE_CHECKING:
    from .llama import LlamaEngine

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data, 12 bytes
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its PrefixIndex (built once)
NO_TOKEN = -1  # what LlamaEngine.sample returns when the grammar is complete: end the generation ("stop")


class Sampler:
    """llama.cpp's native sampler chain built from :class:`Sampling`."""

    ptr = grammar = None  # until __init__ sets them: one cut short (Ctrl-C) is collected without an error

    def __init__(self, engine: LlamaEngine, s: Sampling, prompt: Sequence[int] = ()):
        ll = self.ll = engine.ll
        self.ctx = engine.ctx
        self.adapters = getattr(engine, "adapters", None)  # engine/adapters.py: named when logits are NaN
        # stateless greedy needs no chain walk: LlamaEngine.sample takes an argmax instead
        self.argmax_ok = s.temp == 0 and not s.grammar and not s.penalized and not s.logit_bias and not s.infill
        self.banned = np.array(sorted(engine.eos_tokens), dtype=np.int64) if s.ignore_eos else None
        self.banned_set = frozenset(engine.eos_tokens) if s.ignore_eos else frozenset()
        self.ptr = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda smpl: ll.llama_sampler_chain_add(self.ptr, smpl)
        # the grammar sampler, kept OUT of the chain: see sample_checked (freed by close)
        self.grammar = None
        self.index: PrefixIndex | None = None
        self._cand: np.ndarray | None = None  # (n_vocab,) llama_token_data, made by _apply when first needed
        self.greedy = s.temp == 0
        self.post: int | None = None  # keep the top ``post`` probabilities after the chain (sample_post)
        self.post_out: tuple[float, tuple] = (0.0, ())  # the last sample_post's (logprob, top (id, logprob)s)
        # argmax, then the grammar check
        self.plain_greedy = s.temp == 0 and not s.penalized and not s.logit_bias and not s.infill
        if s.grammar:
            # the parser's error is ours to say (its syntax errors on stderr, left recursion in llama.cpp's log)
            with native.load_log(quiet=True) as logged, native.stderr_text() as err:
                g = ll.llama_sampler_init_grammar(engine.vocab, s.grammar.encode(), b"root")
            why = next((ln.split("error parsing grammar:", 1)[1].strip() for ln in err
                        if "error parsing grammar:" in ln), "")
            if not g:
                self.close()  # frees the chain once (and __del__ will not again)
                if not why and any("left recursion" in ln for ln in [*err, *logged]):
                    raise InvalidArgument("the grammar is left-recursive, which llama.cpp refuses: a rule reaches "
                                          "itself again before matching any text (`root ::= root \"a\"`; write "
                                          "`root ::= \"a\"+`); from a JSON schema, a $ref chain leads back to "
                                          "where it started (a -> b -> a) with nothing in between")
                raise InvalidArgument(f"the grammar does not parse (GBNF){': ' + why if why else ''}; check its "
                                      f"syntax")
            if err:  # it parsed: what came to stderr meanwhile was someone else's
                print("\n".join(err), file=sys.stderr, flush=True)
            self.grammar = g
            self._one = np.zeros(1, dtype=_TOKEN_DATA)
            # token references (``<[id]>``, ``<|tag|>``) match by id, not text: every token is checked then
            self.index = None if _names_tokens(s.grammar) else PrefixIndex.of(engine)
        biases = dict(s.logit_bias)
        for t, _ in s.logit_bias:
            if not 0 <= t < engine.n_vocab:
                self.close()
                raise InvalidArgument(f"logit_bias names token {t}, but the vocabulary has ids 0..{engine.n_vocab - 1}")
        if s.ignore_eos:  # end-of-generation tokens can never be sampled (fixed-length runs)
            biases.update((t, float("-inf")) for t in engine.eos_tokens)
        if biases:
            arr = (ll.llama_logit_bias * len(biases))(*[ll.llama_logit_bias(t, b) for t, b in sorted(biases.items())])
            add(ll.llama_sampler_init_logit_bias(engine.n_vocab, len(biases), arr))
        # in the order of llama.cpp's common sampler (llama-server's: the same seed samples the same)
        last_n = max(engine.n_ctx if s.repeat_last_n == -1 else s.repeat_last_n, s.dry_penalty_last_n)
        if s.repeats:  # over the last repeat_last_n tokens (llama.cpp's default 64)
            add(ll.llama_sampler_init_penalties(engine.n_vocab, engine.n_ctx if s.repeat_last_n == -1 else
                                                s.repeat_last_n, s.repeat_penalty, s.frequency_penalty,
                                                s.presence_penalty))
        if s.dry:
            breakers = [b.encode() for b in s.dry_sequence_breakers]
            add(ll.llama_sampler_init_dry(engine.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                                          s.dry_penalty_last_n, (ctypes.c_char_p * len(breakers))(*breakers),
                                          len(breakers)))
        if s.penalized:  # the prompt's tokens count, as llama-server's and llama-cli's
            for t in prompt[-last_n:]:
                ll.llama_sampler_accept(self.ptr, t)
        if s.temp == 0:
            if s.infill:
                add(ll.llama_sampler_init_infill(engine.vocab))
            add(ll.llama_sampler_init_greedy())
        elif s.mirostat:
            add(ll.llama_sampler_init_temp(s.temp))
            add(ll.llama_sampler_init_mirostat(engine.n_vocab, s.seed, s.mirostat_tau, s.mirostat_eta, 100)
                if s.mirostat == 1 else ll.llama_sampler_init_mirostat_v2(s.seed, s.mirostat_tau, s.mirostat_eta))
        else:
            if s.top_n_sigma > 0:
                add(ll.llama_sampler_init_top_n_sigma(s.top_n_sigma))
            if s.top_k > 0:
                add(ll.llama_sampler_init_top_k(s.top_k))
            if s.typical_p < 1:
                add(ll.llama_sampler_init_typical(s.typical_p, 1))
            add(ll.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0:
                add(ll.llama_sampler_init_min_p(s.min_p, 1))
            if s.xtc_probability > 0:
                add(ll.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, s.seed))
            add(ll.llama_sampler_init_temp_ext(s.temp, s.dynatemp_range, s.dynatemp_exponent))
            if s.infill:  # last before the draw, where llama-server's "infill" sampler goes
                add(ll.llama_sampler_init_infill(engine.vocab))
            add(ll.llama_sampler_init_dist(s.seed))

    def sample(self, row: np.ndarray, i: int | None = None) -> int:
        """The next token from logits ``row`` (accepted), or :data:`NO_TOKEN` when a grammar admits no further
        token. ``i``: the row's index in the engine's last decode, which llama.cpp then samples itself
        (``llama_sampler_sample``, which also accepts); None for a saved row. Non-finite logits raise
        :class:`NonFiniteLogits`."""
        if self.post is not None:  # post_sampling_probs: the chain over a copy, its candidates kept
            if not np.isfinite(row.max()):
                raise self.nonfinite()
            return self.sample_post(row)
        if self.argmax_ok:
            # plain greedy: an argmax over the logits row in place (~10 us) gives the token the native
            # chain would (it copies all n_vocab candidates first, ~90 us); the chain stays the reference
            tok = int(row.argmax())  # the first NaN, if there is one
            if not np.isfinite(row[tok]):
                raise self.nonfinite()
            if self.banned is None or tok not in self.banned_set:
                return tok
            masked = row.copy()  # an end-of-generation token won, but EOS is ignored: the best other one
            masked[self.banned] = -np.inf
            return int(masked.argmax())
        if not np.isfinite(row.max()):  # NaN or +inf: nothing to sample from (~10 us)
            raise self.nonfinite()
        if self.grammar is not None:
            return self.sample_checked(row)
        return self.sample_row(row) if i is None else self.ll.llama_sampler_sample(self.ptr, self.ctx, i)

    def nonfinite(self) -> NonFiniteLogits:
        """The error for a row of NaN or infinite logits, naming the LoRA adapters (with their scales) active on
        the context: the generator samples a row right after the decode that computed it, under that row's set."""
        ads = self.adapters
        return NonFiniteLogits(adapters=ads.describe(ads.active) if ads is not None else ())

    def sample_checked(self, row: np.ndarray) -> int:
        """Sample from logits ``row`` under the grammar, at nearly the speed of sampling without one.

        llama.cpp's own approach (common/sampling.cpp ``common_sampler_sample``): sample from the chain alone,
        then check that one token against the grammar (a one-candidate array); only when the grammar rejects
        it, apply the grammar to the vocabulary (slow: every token's text is matched against the grammar's
        stacks; :class:`PrefixIndex` leaves out tokens it would reject) and sample again. The token is then
        accepted by the grammar and the chain. The output is always valid; for greedy it is what grammar-first
        sampling gives (the argmax of the allowed tokens), for sampling it is llama.cpp's (llama-server's)
        distribution.

        llama.cpp aborts the process when its grammar accepts a token it rejects ("Unexpected empty grammar
        stack after accepting piece", or GGML_ABORT for an end-of-generation token while the grammar is
        incomplete). That happens once the grammar is complete and the end-of-generation tokens are banned
        (``ignore_eos``, ``logit_bias``): every candidate is then -inf and the chain still picks one. So the
        chain is applied here (as ``llama_sampler_sample`` does), the pick is checked against the grammar on
        its own, and a pick the grammar rejects ends the generation (:data:`NO_TOKEN`) instead.
        """
        ll = self.ll
        if self.plain_greedy:
            tok = int(row.argmax())
            if self.banned is not None and tok in self.banned:
                masked = row.copy()
                masked[self.banned] = -np.inf
                tok = int(masked.argmax())
        else:
            tok = self._apply(row, grammar=False)
        if tok < 0 or not self.allows(tok):  # rejected: the grammar over the whole vocabulary, then the chain
            tok = self._apply(row, grammar=True)
            if tok < 0 or not self.allows(tok):
                return NO_TOKEN
        ll.llama_sampler_accept(self.grammar, tok)
        ll.llama_sampler_accept(self.ptr, tok)
        return tok

    def sample_post(self, row: np.ndarray) -> int:
        """Sample as :meth:`sample_row` does (the grammar over the whole vocabulary first) and keep, in
        :attr:`post_out`, the chosen token's probability after the chain and the ``post`` most probable
        candidates left (llama-server's ``post_sampling_probs``; as logprobs). Greedy: the pick has 1."""
        tok, kept = self._apply(row, grammar=self.grammar is not None, keep=True)
        if tok < 0:
            return NO_TOKEN
        if self.greedy:  # temperature 0: the whole probability on the pick (llama-server's temp sampler gives it)
            self.post_out = (0.0, ((tok, 0.0),))
        else:
            kept = kept[np.argsort(-kept["p"], kind="stable")]
            kept = kept[kept["p"] > 0]
            p_tok = float(kept["p"][kept["id"] == tok][0]) if (kept["id"] == tok).any() else 0.0
            self.post_out = (float(np.log(p_tok)) if p_tok > 0 else -np.inf,
                             tuple((int(t), float(np.log(p))) for t, p in zip(kept["id"][:self.post],
                                                                               kept["p"][:self.post])))
        if self.grammar is not None:
            self.ll.llama_sampler_accept(self.grammar, tok)
        self.ll.llama_sampler_accept(self.ptr, tok)
        return tok

    def sample_row(self, row: np.ndarray) -> int:
        """Sample from a logits row held outside llama.cpp (a saved row) and accept the token, as
        ``llama_sampler_sample`` does for a row of the last decode; :data:`NO_TOKEN` when every token is banned."""
        tok = self._apply(row, grammar=False)
        if tok < 0:
            return NO_TOKEN
        self.ll.llama_sampler_accept(self.ptr, tok)
        return tok

    def _apply(self, row: np.ndarray, grammar: bool, keep: bool = False):
        """The chain's pick from ``row`` (after the grammar when ``grammar``), or -1 when it picks none; with
        ``keep``, also the candidates the chain left (a copy, with their probabilities when it computed them).

        With the grammar, only the tokens that :class:`PrefixIndex` leaves go to it and the chain: the others
        it would reject, and a rejected token is one the chain never picks, so the pick is distributed as
        with the whole vocabulary (llama.cpp's way), at a fraction of the cost (~0.3 ms, not ~5 ms, for 49k
        tokens where only a few can follow).

        A pick whose logit is -inf is none: every candidate was rejected by the grammar or banned (``ignore_eos``,
        ``logit_bias``), and the chain took one anyway; e.g. a complete grammar allows only end-of-generation
        tokens, which ``ignore_eos`` bans, so the generation must end rather than go on with a banned token.
        """
        ll = self.ll
        ids = self.index.candidates(self._passes) if grammar and self.index is not None else None
        if ids is not None:
            cand = np.zeros(len(ids), dtype=_TOKEN_DATA)  # (n_candidates,), in id order as the full array
            cand["id"] = ids
            cand["logit"] = row[ids]
        else:
            cand = self._cand
            if cand is None:
                cand = self._cand = np.zeros(len(row), dtype=_TOKEN_DATA)
                self._ids = np.arange(len(row), dtype=np.int32)
            cand["id"] = self._ids
            cand["logit"] = row
            cand["p"] = 0.0
        arr = ll.llama_token_data_array(cand.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)), len(cand), -1,
                                        False)
        if grammar:
            ll.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        ll.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            return -1
        # a sampler may move the array's start past the candidates it drops (XTC does): selected counts from there
        start = (ctypes.cast(arr.data, ctypes.c_void_p).value - cand.ctypes.data) // cand.itemsize
        pick = cand[start + arr.selected]
        tok = int(pick["id"]) if np.isfinite(pick["logit"]) else -1
        return (tok, cand[start:start + arr.size].copy()) if keep else tok

    def _passes(self, ids: np.ndarray) -> np.ndarray:
        """Which of tokens ``ids`` the grammar accepts next, (len(ids),) bool."""
        cand = np.zeros(len(ids), dtype=_TOKEN_DATA)
        cand["id"] = ids
        arr = self.ll.llama_token_data_array(cand.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)),
                                             len(cand), -1, False)
        self.ll.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return np.isfinite(cand["logit"])

    def allows(self, tok: int) -> bool:
        """Whether the grammar, in its current state, accepts ``tok`` (llama-server's single-token check)."""
        one = self._one
        one["id"], one["logit"], one["p"] = tok, 0.0, 0.0
        arr = self.ll.llama_token_data_array(one.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)), 1, -1,
                                             False)
        self.ll.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one["logit"][0]))

    def complete(self, end) -> bool:
        """Whether the grammar now takes no token but the ``end`` (end-of-generation) ones: its text is whole.
        Known only where a :class:`PrefixIndex` lists the candidates (else False: not known to be whole)."""
        if self.grammar is None or self.index is None:
            return False
        ids = self.index.candidates(self._passes)
        if ids is None:  # the index cannot narrow the vocabulary here: not known to be whole
            return False
        return bool(set(ids[self._passes(ids)].tolist()) <= set(end))

    def close(self) -> None:
        if self.ptr:
            self.ll.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            self.ll.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self) -> None:
        self.close()


class PrefixIndex:
    """The vocabulary grouped by the first two characters of each token's text, so that a grammar is checked
    on the tokens that may pass it rather than on all of them (a 49k-token check costs llama.cpp ~5 ms).

    llama.cpp accepts a token when its characters, one by one, follow the grammar, so a token whose text
    starts with ``ab`` can pass only if the token whose whole text is ``ab`` (a probe) does; likewise for
    ``a``. :meth:`candidates` checks the one-character probes, then the two-character ones under the first
    characters that passed (a few hundred tokens in all), and leaves the tokens whose prefixes passed.
    Tokens it cannot rule out this way are always left: end-of-generation tokens, and text that does not start
    with ASCII characters that have a probe.
    """

    NONE1, NONE2 = 128, 128 * 128  # key of "no probe": always passes

    def __init__(self, engine: LlamaEngine):
        n = engine.n_vocab
        pieces = [engine.token_bytes(t, special=True) for t in range(n)]  # the text llama.cpp's grammar reads
        eog = set(engine.eos_tokens)
        ascii_ = lambda b: 0 < b < 128
        p1: dict[int, int] = {}
        p2: dict[int, int] = {}
        for t, p in enumerate(pieces):
            if t in eog or not all(map(ascii_, p)):
                continue
            if len(p) == 1:
                p1.setdefault(p[0], t)
            elif len(p) == 2:
                p2.setdefault(p[0] * 128 + p[1], t)
        k1 = np.full(n, self.NONE1, dtype=np.int32)  # (n_vocab,) first-character key
        k2 = np.full(n, self.NONE2, dtype=np.int32)  # (n_vocab,) first-two-characters key
        for t, p in enumerate(pieces):
            if t in eog or not p or p[0] not in p1:
                continue
            k1[t] = p[0]
            if len(p) >= 2 and ascii_(p[1]) and p[0] * 128 + p[1] in p2:
                k2[t] = p[0] * 128 + p[1]
        self.k1, self.k2 = k1, k2
        # tokens per key whose count candidates() adds up: by first character those without a two-character
        # key (NONE1: always left), and by two-character key
        self.n1 = np.bincount(k1[k2 == self.NONE2], minlength=self.NONE1 + 1)
        self.n2 = np.bincount(k2, minlength=self.NONE2 + 1)
        self.n2[self.NONE2] = 0
        self.keys1 = np.array(sorted(p1), dtype=np.int32)
        self.probes1 = np.array([p1[k] for k in self.keys1], dtype=np.int32)
        self.keys2 = np.array(sorted(p2), dtype=np.int32)
        self.probes2 = np.array([p2[k] for k in self.keys2], dtype=np.int32)

    @classmethod
    def of(cls, engine: LlamaEngine) -> PrefixIndex:
        index = _INDEXES.get(engine)
        if index is None:
            index = _INDEXES[engine] = cls(engine)
        return index

    def candidates(self, passes) -> np.ndarray | None:
        """Ids of the tokens that may pass the grammar, ascending; ``passes(ids)`` is its check of ``ids``.
        None when that is most of the vocabulary (inside a JSON string): check them all, it is cheaper."""
        ok1 = np.zeros(self.NONE1 + 1, dtype=bool)
        ok1[self.NONE1] = True
        ok1[self.keys1[passes(self.probes1)]] = True
        under = ok1[self.keys2 // 128]  # the two-character probes whose first character passed
        ok2 = np.zeros(self.NONE2 + 1, dtype=bool)
        ok2[self.NONE2] = True
        ok2[self.keys2[under][passes(self.probes2[under])]] = True
        if self.n1[ok1].sum() + self.n2[ok2].sum() > len(self.k1) // 2:
            return None
        return np.flatnonzero(ok1[self.k1] & ok2[self.k2]).astype(np.int32)


def _names_tokens(gbnf: str) -> bool:
    """Whether GBNF text refers to tokens (``<[id]>``, ``<|tag|>``, ``!<...>``): a ``<`` or ``!`` outside
    strings, character classes and comments."""
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[":
            close = "\"" if c == "\"" else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < n and gbnf[i] != "\n":
                i += 1
        elif c in "<!":
            return True
        i += 1
    return False
