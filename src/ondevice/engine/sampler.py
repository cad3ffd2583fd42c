"""llama.cpp's native sampler chain, with the grammar checked outside it (constrained decoding at full speed)."""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument
from . import native
from .records import Sampling

if TYPE_CHECKING:
    from .llama import LlamaEngine

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data, 12 bytes
NO_TOKEN = -1  # what LlamaEngine.sample returns when the grammar is complete: end the generation ("stop")


class Sampler:
    """llama.cpp's native sampler chain built from :class:`Sampling`."""

    def __init__(self, engine: LlamaEngine, s: Sampling):
        ll = self.ll = engine.ll
        # stateless greedy needs no chain walk: LlamaEngine.sample takes an argmax instead
        self.argmax_ok = s.temp == 0 and not s.grammar and not s.penalized and not s.logit_bias
        self.banned = np.array(sorted(engine.eos_tokens), dtype=np.int64) if s.ignore_eos else None
        self.ptr = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda smpl: ll.llama_sampler_chain_add(self.ptr, smpl)
        # the grammar sampler, kept OUT of the chain: see sample_checked (freed by close)
        self.grammar = None
        self._cand: np.ndarray | None = None  # (n_vocab,) llama_token_data, made by _apply when first needed
        self.plain_greedy = s.temp == 0 and not s.penalized and not s.logit_bias  # argmax, then the grammar check
        if s.grammar:
            with native.load_log(quiet=True), native.stderr_text() as err:  # the parser's error is ours to say
                g = ll.llama_sampler_init_grammar(engine.vocab, s.grammar.encode(), b"root")
            why = next((ln.split("error parsing grammar:", 1)[1].strip() for ln in err
                        if "error parsing grammar:" in ln), "")
            if not g:
                self.close()  # frees the chain once (and __del__ will not again)
                raise InvalidArgument(f"the grammar does not parse (GBNF){': ' + why if why else ''}; check its "
                                      f"syntax")
            if err:  # it parsed: what came to stderr meanwhile was someone else's
                print("\n".join(err), file=sys.stderr, flush=True)
            self.grammar = g
            self._one = np.zeros(1, dtype=_TOKEN_DATA)
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
        if s.penalized:  # over the last 64 generated tokens, as llama.cpp's default
            add(ll.llama_sampler_init_penalties(engine.n_vocab, 64, s.repeat_penalty, s.frequency_penalty,
                                                s.presence_penalty))
        if s.temp == 0:
            add(ll.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(ll.llama_sampler_init_top_k(s.top_k))
            add(ll.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0:
                add(ll.llama_sampler_init_min_p(s.min_p, 1))
            add(ll.llama_sampler_init_temp(s.temp))
            add(ll.llama_sampler_init_dist(s.seed))

    def sample_checked(self, row: np.ndarray) -> int:
        """Sample from logits ``row`` under the grammar, at nearly the speed of sampling without one.

        llama.cpp's own approach (common/sampling.cpp ``common_sampler_sample``): sample from the chain alone,
        then check that one token against the grammar (a one-candidate array); only when the grammar rejects
        it, apply the grammar to the whole vocabulary (slow: every token's text is matched against the
        grammar's stacks) and sample again. The token is then accepted by the grammar and the chain. The
        output is always valid; for greedy it is what grammar-first sampling gives (the argmax of the allowed
        tokens), for sampling it is llama.cpp's (llama-server's) distribution.

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

    def sample_row(self, row: np.ndarray) -> int:
        """Sample from a logits row held outside llama.cpp (a saved row) and accept the token, as
        ``llama_sampler_sample`` does for a row of the last decode; :data:`NO_TOKEN` when every token is banned."""
        tok = self._apply(row, grammar=False)
        if tok < 0:
            return NO_TOKEN
        self.ll.llama_sampler_accept(self.ptr, tok)
        return tok

    def _apply(self, row: np.ndarray, grammar: bool) -> int:
        """The chain's pick from ``row`` (after the grammar when ``grammar``), or -1 when it picks none.

        A pick whose logit is -inf is none: every candidate was rejected by the grammar or banned (``ignore_eos``,
        ``logit_bias``), and the chain took one anyway; e.g. a complete grammar allows only end-of-generation
        tokens, which ``ignore_eos`` bans, so the generation must end rather than go on with a banned token.
        """
        ll, cand = self.ll, self._cand
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
        pick = cand[arr.selected]
        return int(pick["id"]) if np.isfinite(pick["logit"]) else -1

    def allows(self, tok: int) -> bool:
        """Whether the grammar, in its current state, accepts ``tok`` (llama-server's single-token check)."""
        one = self._one
        one["id"], one["logit"], one["p"] = tok, 0.0, 0.0
        arr = self.ll.llama_token_data_array(one.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)), 1, -1,
                                             False)
        self.ll.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one["logit"][0]))

    def close(self) -> None:
        if self.ptr:
            self.ll.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            self.ll.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self) -> None:
        self.close()
