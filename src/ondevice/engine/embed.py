"""Pooled embeddings of several inputs in one ``llama_decode``, packed as llama-server packs them.

Each input is a sequence of its own (ids ``seq0 .. seq0 + n - 1``), every token is an output (pooling reads
them all) and ``llama_get_embeddings_seq`` gives each sequence's pooled vector. Inputs do not see each
other: llama.cpp's attention mask admits only KV cells of a token's own sequence, for causal models too
(tests/test_embeddings_batch.py compares packed vectors with one input per decode).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ContextOverflow, InvalidArgument, OndeviceError
from .base import EngineConfig

LLAMA_MAX_SEQ = 256  # llama.cpp's limit on sequence ids (llama-cparams.h)
MAX_SEQS = LLAMA_MAX_SEQ  # inputs per decode at most; 1 gives one decode per input (the reference path)
PACK_TOKENS = 512  # tokens per decode at least (a pack's attention spans all its cells: cost grows as its square)


def embedding_config(longest: int, pooling: str | None = "mean", **kw) -> EngineConfig:
    """An embeddings context for inputs of up to ``longest`` tokens that packs many inputs per decode.

    One ubatch of ``max(longest, PACK_TOKENS)`` tokens (llama.cpp pools per ubatch), a unified KV of as many
    cells, and a sequence id per input (``n_seq_max``). ``kw``: other :class:`EngineConfig` fields. Flash
    attention off unless ``kw`` turns it on: with it (llama-server's default) a text's vector moves by up to
    1e-3 in cosine with the other inputs of its pack (its f16 accumulation), so the same text embedded alone and
    in a batch would differ (LangChain's embed_query vs embed_documents); without it they agree to 1e-5 in cosine
    (5e-5 with last-token pooling on AVX2 builds of llama.cpp), at 10% more time (benchmarks/embed_bench.py, 50
    inputs: 0.91x llama-server's inputs/s without, 1.01x with).
    """
    n = max(longest, PACK_TOKENS)
    kw.setdefault("flash_attn", False)
    return EngineConfig(n_ctx=n, n_batch=n, n_ubatch=n, n_seq_max=min(LLAMA_MAX_SEQ, n), kv_unified=True,
                        embeddings=True, pooling=pooling, **kw)


def capacity(eng) -> tuple[int, int]:
    """(tokens, inputs) one decode of ``eng`` embeds at most.

    llama.cpp pools per ubatch, so a decode must be one ubatch; in a unified KV all of its tokens sit in the
    cache at once. A split KV (``kv_unified=False``) cuts ubatches into equal shares of every sequence, which
    would split an input across ubatches: there, one input per decode.
    """
    ll, ctx = eng.ll, eng.ctx
    n_tokens = min(eng.n_batch, ll.llama_n_ubatch(ctx), eng.n_ctx)
    n_seqs = min(MAX_SEQS, ll.llama_n_seq_max(ctx)) if eng.config.kv_unified else 1
    return n_tokens, max(1, n_seqs)


def packs(lengths: Sequence[int], n_tokens: int, n_seqs: int) -> list[range]:
    """Consecutive runs of inputs (in order) of at most ``n_tokens`` tokens and ``n_seqs`` inputs each; an input
    longer than ``n_tokens`` is a run of its own (which :func:`embed_batch` refuses)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (used + n > n_tokens or i - start >= n_seqs):
            out.append(range(start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def embed_batch(eng, token_lists: Sequence[Sequence[int]], seq0: int = 0) -> np.ndarray:
    """Pooled embeddings ``(len(token_lists), n_embd)`` from one ``llama_decode`` (inputs that fit
    :func:`capacity`; :func:`packs` makes such runs). ``eng`` needs ``embeddings=True`` and a pooling type."""
    if not eng.config.embeddings:
        raise InvalidArgument("this engine was created without embeddings; use EngineConfig(embeddings=True)")
    eng._open()
    n_tokens, n_seqs = capacity(eng)
    for toks in token_lists:
        if not 0 < len(toks) <= n_tokens:
            raise ContextOverflow(len(toks), n_tokens, "input")
    total = sum(len(t) for t in token_lists)
    if len(token_lists) > n_seqs or total > n_tokens:
        raise ValueError(f"{len(token_lists)} inputs of {total} tokens exceed one decode ({n_seqs} inputs, "
                         f"{n_tokens} tokens); split them with packs()")
    ll, mem = eng.ll, eng.mem
    seqs = range(seq0, seq0 + len(token_lists))
    for s in seqs:
        ll.llama_memory_seq_rm(mem, s, 0, -1)
    try:
        eng.decode_batch([(t, pos, s, True) for s, toks in zip(seqs, token_lists) for pos, t in enumerate(toks)])
        n_embd = ll.llama_model_n_embd(eng.model)
        out = np.empty((len(token_lists), n_embd), np.float32)  # (n_inputs, n_embd)
        for row, s in enumerate(seqs):
            ptr = ll.llama_get_embeddings_seq(eng.ctx, s)
            if not ptr:
                raise OndeviceError("llama.cpp returned no pooled embedding; set a pooling type (e.g. 'mean')")
            out[row] = np.ctypeslib.as_array(ptr, shape=(n_embd,))
        return out
    finally:
        for s in seqs:
            ll.llama_memory_seq_rm(mem, s, 0, -1)
            eng._n_past[s] = 0


def embed_many(eng, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """Pooled embeddings ``(len(token_lists), n_embd)``, as few decodes as :func:`capacity` allows, in order."""
    runs = packs([len(t) for t in token_lists], *capacity(eng))
    parts = [embed_batch(eng, [token_lists[i] for i in r]) for r in runs]
    return np.concatenate(parts) if parts else np.empty((0, eng.ll.llama_model_n_embd(eng.model)), np.float32)
