"""Perplexity and KL divergence with llama-perplexity's conventions, on raw logits, in numpy float64.

Conventions (llama.cpp ``tools/perplexity/perplexity.cpp``, ``perplexity()`` and ``kl_divergence()``):

- the whole text is tokenized once with special tokens (BOS when the model adds one), then cut into
  ``len(tokens) // n_ctx`` chunks of exactly ``n_ctx`` tokens (at least 2 chunks' worth of text);
- the first token of each chunk is *replaced* by BOS when the model adds BOS, and the KV cache is
  cleared between chunks;
- only the second half of each chunk is scored: the logits at positions ``first = n_ctx // 2`` ..
  ``n_ctx - 2`` predict tokens ``first + 1`` .. ``n_ctx - 1`` (``n_ctx - first - 1`` tokens per chunk);
- PPL = exp(mean NLL), its uncertainty ``ppl * sqrt(var(NLL) / (count - 1))``; KLD, Δp and "same top p"
  with ``mean_and_uncertainty``; percentiles by linear interpolation on the sorted per-token values.

Logits come from ``llama_decode`` with output rows requested only for the scored positions (as
llama-perplexity does), read with ``engine.all_logits()``. llama-cpp-python's ``echo`` logprobs are not
used: they are wrong.

KLD(P_ref || Q) is exact by default: computed from both models' full distributions, chunk by chunk, as
llama-perplexity's ``--kl-divergence`` does from its base file. The reference's raw logits of a chunk come either
from the reference model itself, run on the same chunk just before the model under test (both are loaded; nothing
is written), or from the cache: the reference's float32 logits of every scored token, a memory-mapped ``.npy`` in
the data dir, written when it takes at most :data:`FULL_CACHE_MAX_BYTES` (``4 * n_vocab`` bytes per scored token:
SmolLM2 197 KB, Gemma 3 1 MB), so that repeated runs against one reference (``ondevice fit``) skip its pass.

With ``topk=K`` only a compact reference is kept (see :class:`RefRows`): per scored token, the top-K token ids
of the reference, their log-probs, the log-sum-exp of the raw logits and the log-prob of the actual next token.
From it KLD splits into the top-K part, which is exact, and the tail (the tokens outside the reference's top-K),
unknown token by token. We report ``P_tail * log(P_tail / Q_tail)`` for it: the KLD between the two
distributions coarse-grained to (top-K tokens, "everything else"). By the log-sum inequality this is a *lower
bound* on the true KLD (16% low for SmolLM2 with K = 256, whose reference leaves 13% of its mass outside), exact
only when the reference puts no mass outside its top-K (``K >= n_vocab``); records say so with ``kld_exact``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.logprobs import log_softmax, log_softmax_lse  # noqa: F401 — log_softmax re-exported
from ..errors import InvalidArgument, NonFiniteLogits, OndeviceError
from ..models.store import atomic_path
from .corpora import Corpus

CACHE_VERSION = 1
ROW_BLOCK = 32  # rows converted to float64 at a time: bounds memory for large vocabularies (Gemma: 262k)
FULL_CACHE_MAX_BYTES = 2 << 30  # the reference's full rows are cached up to 2 GiB; beyond, it is run every time


# --- the math (plain numpy, float64) -------------------------------------------------------------------


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity computes them (0 below 11 values)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    f = v.sum() / n
    df = (v * v).sum() / n - f * f
    return float(f), float(np.sqrt(df / (n - 1))) if df > 0 and n > 10 else 0.0


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama-perplexity's covariance of the *means* of ``a`` and ``b`` (0 below 10 values)."""
    n = a.size
    if n < 10:
        return 0.0
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def ppl_stats(nll: np.ndarray) -> dict:
    """PPL and its uncertainty from per-token negative log-likelihoods (llama-perplexity's final estimate)."""
    nll = np.asarray(nll, dtype=np.float64)
    count = nll.size
    mean = nll.sum() / count
    var = (nll * nll).sum() / count - mean * mean
    ppl = float(np.exp(mean))
    err = float(np.sqrt(var / (count - 1)) * ppl) if var > 0 and count > 1 else 0.0
    return {"ppl": ppl, "ppl_err": err, "nll_mean": float(mean), "n_scored": int(count)}


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation on sorted values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


@dataclass
class RefRows:
    """The compact reference: per scored token, ``(n,)`` or ``(n, k)`` arrays."""

    ids: np.ndarray  # (n, k) int32: the reference's top-k token ids, most likely first
    logp: np.ndarray  # (n, k) float64: their log-probs
    lse: np.ndarray  # (n,) float64: log-sum-exp of the raw logits (raw logit = logp + lse)
    target_logp: np.ndarray  # (n,) float64: log-prob of the actual next token

    @staticmethod
    def from_logp(logp: np.ndarray, targets: np.ndarray, k: int, lse: np.ndarray | None = None) -> RefRows:
        n, v = logp.shape
        k = min(k, v)
        part = np.argpartition(-logp, k - 1, axis=1)[:, :k] if k < v else np.tile(np.arange(v), (n, 1))
        top = np.take_along_axis(logp, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        ids = np.take_along_axis(part, order, axis=1).astype(np.int32)
        return RefRows(ids, np.take_along_axis(top, order, axis=1), np.zeros(n) if lse is None else lse,
                       logp[np.arange(n), targets])

    @staticmethod
    def concat(parts: Sequence[RefRows]) -> RefRows:
        return RefRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "logp", "lse",
                                                                                   "target_logp")))

    def slice(self, a: int, b: int) -> RefRows:
        return RefRows(self.ids[a:b], self.logp[a:b], self.lse[a:b], self.target_logp[a:b])


def kld_full(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Exact per-token KLD(P || Q) from full ``(n, V)`` log-probs (the reference path)."""
    return (np.exp(logp) * (logp - logq)).sum(axis=1)


def kld_compact(ref: RefRows, logq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (coarse-grained KLD: a lower bound, reference tail mass) from the compact rows; see module doc."""
    n, v = logq.shape
    p_top = np.exp(ref.logp)  # (n, k)
    q_logtop = np.take_along_axis(logq, ref.ids, axis=1)  # (n, k)
    head = (p_top * (ref.logp - q_logtop)).sum(axis=1)
    if ref.ids.shape[1] >= v:
        return head, np.zeros(n)
    p_tail = np.clip(1.0 - p_top.sum(axis=1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_logtop).sum(axis=1), 0.0, 1.0)
    tiny = 1e-12  # below this the tail is rounding noise of 1 - sum(top-k)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > tiny, p_tail * (np.log(p_tail) - np.log(np.maximum(q_tail, 1e-300))), 0.0)
    return head + tail, p_tail


# --- running a model over a corpus ---------------------------------------------------------------------


def make_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: ``n_ctx`` tokens each, the first replaced by ``bos`` when given."""
    if n_ctx < 8:
        raise InvalidArgument(f"--ctx {n_ctx} is too small for perplexity; use at least 8 (512 is usual)")
    if len(tokens) < 2 * n_ctx:
        raise InvalidArgument(f"the text has {len(tokens)} tokens but perplexity with --ctx {n_ctx} needs at "
                              f"least {2 * n_ctx}; use a longer text or a smaller --ctx")
    n_max = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks < 1:
        raise InvalidArgument(f"--chunks {n_chunks} must be >= 1")
    n = n_max if n_chunks is None else min(n_chunks, n_max)
    chunks = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


def corpus_tokens(engine, corpus: Corpus) -> list[int]:
    """The whole text tokenized as llama-perplexity does (special tokens added, none parsed)."""
    return engine.tokenize(corpus.text, add_special=True, parse_special=False)


def chunk_logits(engine, chunk: Sequence[int], first: int) -> np.ndarray:
    """Raw logits ``(n_ctx - 1 - first, V)`` float32 of the scored positions of one chunk (KV cleared)."""
    n_ctx = len(chunk)
    if engine.n_ctx < n_ctx:
        raise InvalidArgument(f"the model was loaded with a context of {engine.n_ctx}, smaller than "
                              f"--ctx {n_ctx}; load it with n_ctx >= {n_ctx}")
    engine.reset()
    rows = []
    try:
        for start in range(0, n_ctx, engine.n_batch):
            items = [(t, p, 0, first <= p <= n_ctx - 2)
                     for p, t in enumerate(chunk[start:start + engine.n_batch], start)]
            engine.decode_batch(items)
            if any(w for *_, w in items):
                rows.append(engine.all_logits())
    finally:
        engine.reset()  # decode_batch does not track positions: leave the engine empty and consistent
    return np.concatenate(rows) if len(rows) > 1 else rows[0]


@dataclass
class ChunkScores:
    nll: np.ndarray  # (n,) float64
    argmax: np.ndarray  # (n,) int: the model's top-1 token
    kld: np.ndarray | None = None  # (n,) coarse-grained KLD vs the reference
    tail_mass: np.ndarray | None = None
    ref: RefRows | None = None  # this model's compact rows when asked for (building a reference)


def score_chunk(logits: np.ndarray, targets: np.ndarray, *, ref: RefRows | None = None,
                keep_k: int | None = None) -> ChunkScores:
    """NLL, top-1 and (against ``ref``) KLD of one chunk's ``(n, V)`` logits, in row blocks of float64."""
    out: dict[str, list] = {k: [] for k in ("nll", "argmax", "kld", "tail_mass", "ref")}
    n = logits.shape[0]
    for a in range(0, n, ROW_BLOCK):
        b = min(a + ROW_BLOCK, n)
        lp, lse = log_softmax_lse(logits[a:b])  # (rows, V), (rows, 1)
        t = targets[a:b]
        out["nll"].append(-lp[np.arange(b - a), t])
        out["argmax"].append(lp.argmax(axis=1))
        if ref is not None:
            kl, tm = kld_compact(ref.slice(a, b), lp)
            out["kld"].append(kl)
            out["tail_mass"].append(tm)
        if keep_k:
            out["ref"].append(RefRows.from_logp(lp, t, keep_k, lse[:, 0]))
    cat = lambda k: np.concatenate(out[k]) if out[k] else None
    return ChunkScores(nll=cat("nll"), argmax=cat("argmax"), kld=cat("kld"), tail_mass=cat("tail_mass"),
                       ref=RefRows.concat(out["ref"]) if out["ref"] else None)


def iter_scores(engine, chunks: list[list[int]], *, ref: RefRows | None = None,
                keep_k: int | None = None) -> Iterator[ChunkScores]:
    """One :class:`ChunkScores` per chunk (the reference rows are sliced chunk by chunk)."""
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    per = n_ctx - 1 - first
    for i, chunk in enumerate(chunks):
        logits = chunk_logits(engine, chunk, first)
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)
        r = ref.slice(i * per, (i + 1) * per) if ref is not None else None
        yield score_chunk(logits, targets, ref=r, keep_k=keep_k)


# --- the compact reference cache -----------------------------------------------------------------------


def cache_path(cache_dir: Path, ref_sha256: str, corpus: Corpus, n_ctx: int, k: int) -> Path:
    key = hashlib.sha256(f"v{CACHE_VERSION}|{ref_sha256}|{corpus.sha256}|{n_ctx}|{k}".encode()).hexdigest()
    return cache_dir / f"ref-{ref_sha256[:12]}-{corpus.sha256[:12]}-c{n_ctx}-k{k}-{key[:8]}.npz"


def save_ref(path: Path, ref: RefRows, tokens: Sequence[int], n_chunks: int) -> None:
    """Write the compact reference atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=ref.ids, logp=ref.logp, lse=ref.lse, target_logp=ref.target_logp,
                        tokens=np.asarray(tokens, dtype=np.int32), n_chunks=np.int64(n_chunks),
                        version=np.int64(CACHE_VERSION))
    with atomic_path(path, suffix=".npz") as tmp:
        tmp.write_bytes(buf.getvalue())


def load_ref(path: Path, n_chunks: int, per_chunk: int) -> tuple[RefRows, np.ndarray] | None:
    """The first ``n_chunks`` chunks of a cached reference; None when absent, stale or too short."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if int(z["version"]) != CACHE_VERSION or int(z["n_chunks"]) < n_chunks:
                return None
            n = n_chunks * per_chunk
            ref = RefRows(z["ids"][:n], z["logp"][:n], z["lse"][:n], z["target_logp"][:n])
            return ref, z["tokens"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a corrupt cache file is recomputed, not trusted


# --- the full reference cache (exact KLD) ---------------------------------------------------------------


def full_cache_path(cache_dir: Path, ref_sha256: str, corpus: Corpus, n_ctx: int) -> Path:
    """The ``.npy`` of the reference's float32 logits; its ``.json`` sidecar says what they cover."""
    key = hashlib.sha256(f"v{CACHE_VERSION}|{ref_sha256}|{corpus.sha256}|{n_ctx}|full".encode()).hexdigest()
    return cache_dir / f"ref-{ref_sha256[:12]}-{corpus.sha256[:12]}-c{n_ctx}-full-{key[:8]}.npy"


def _tokens_sha256(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def load_full_ref(path: Path, n_chunks: int, per_chunk: int, tokens: Sequence[int],
                  n_vocab: int) -> np.ndarray | None:
    """The cached ``(n_chunks * per_chunk, n_vocab)`` float32 logits (memory-mapped); None when absent, stale,
    too short or made for another tokenization."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if (meta["version"] != CACHE_VERSION or meta["tokens_sha256"] != _tokens_sha256(tokens)
                or meta["n_chunks"] < n_chunks or meta["n_vocab"] != n_vocab):
            return None
        rows = np.load(path, mmap_mode="r")
        if rows.dtype != np.float32 or rows.shape != (meta["n_chunks"] * per_chunk, n_vocab):
            return None
        return rows[:n_chunks * per_chunk]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache is recomputed, not trusted


def _free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def kl_divergence_exact(engine, corpus: Corpus, n_ctx: int, n_chunks: int | None, *, ref_engine=None,
                        cached: np.ndarray | None = None, cache_file: Path | None = None,
                        ref_name: str = "reference") -> dict:
    """PPL of ``engine``'s model and its exact KLD from the reference's full distributions (module doc).

    The reference's rows come from ``cached`` (as :func:`load_full_ref` returns them) or from ``ref_engine``, run
    chunk by chunk; its rows are then written to ``cache_file`` when given and within
    :data:`FULL_CACHE_MAX_BYTES`. Adds ``kld_exact: True`` and ``ref_cache_bytes``: the cached rows' size (0: none
    cached, the reference ran).
    """
    t0 = time.perf_counter()
    if (ref_engine is None) == (cached is None):
        raise OndeviceError("internal: kl_divergence_exact takes a reference engine or its cached rows")
    tokens = corpus_tokens(engine, corpus)
    if ref_engine is not None and (ref_engine.n_vocab != engine.n_vocab
                                   or corpus_tokens(ref_engine, corpus) != tokens):
        raise InvalidArgument("the model and the reference tokenize the text differently; KLD needs two "
                              "variants of the same model (same tokenizer)")
    chunks = make_chunks(tokens, n_ctx, n_chunks, engine.bos_token if engine.add_bos else None)
    first = n_ctx // 2
    per = n_ctx - 1 - first
    shape = (len(chunks) * per, engine.n_vocab)
    size = 4 * shape[0] * shape[1]
    if cached is not None and cached.shape != shape:
        raise OndeviceError(f"internal: cached reference rows {cached.shape}, expected {shape}")
    write = (ref_engine is not None and cache_file is not None and size <= FULL_CACHE_MAX_BYTES
             and _free_bytes(cache_file.parent) > 2 * size)  # a cache never fills the disk
    out: dict[str, list] = {k: [] for k in ("nll", "nll_ref", "kld", "same")}
    # written with plain writes, not a memory map: a full disk is an OSError then, not a SIGBUS
    with (atomic_path(cache_file, suffix=".npy") if write else contextlib.nullcontext()) as tmp, \
            (open(tmp, "wb") if write else contextlib.nullcontext()) as rows:
        if rows is not None:
            np.lib.format.write_array_header_1_0(rows, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                        "fortran_order": False, "shape": shape})
        for i, chunk in enumerate(chunks):
            # (per, V) float32: the reference's from the memory map or its model, then the model's
            p = cached[i * per:(i + 1) * per] if cached is not None else chunk_logits(ref_engine, chunk, first)
            q = chunk_logits(engine, chunk, first)
            targets = np.asarray(chunk[first + 1:], dtype=np.int64)
            for a in range(0, per, ROW_BLOCK):
                b = min(a + ROW_BLOCK, per)
                try:
                    lp, _ = log_softmax_lse(np.asarray(p[a:b]))  # (rows, V) float64
                except NonFiniteLogits:
                    raise NonFiniteLogits(f"logits as the reference ({ref_name})") from None
                lq, _ = log_softmax_lse(q[a:b])
                r = np.arange(b - a)
                out["nll"].append(-lq[r, targets[a:b]])
                out["nll_ref"].append(-lp[r, targets[a:b]])
                out["kld"].append(kld_full(lp, lq))
                out["same"].append(lq.argmax(axis=1) == lp.argmax(axis=1))
            if rows is not None:  # checked finite above
                rows.write(np.ascontiguousarray(p, dtype=np.float32).tobytes())
    if write:  # the sidecar last: the rows count only once they are complete
        meta = {"version": CACHE_VERSION, "tokens_sha256": _tokens_sha256(tokens), "n_chunks": len(chunks),
                "n_vocab": shape[1], "n_ctx": n_ctx}
        with atomic_path(cache_file.with_suffix(".json"), suffix=".json") as side:
            side.write_text(json.dumps(meta), encoding="utf-8")
    nll, nll_ref, kld, same = (np.concatenate(out[k]) for k in ("nll", "nll_ref", "kld", "same"))
    return {**ppl_stats(nll), **kld_stats(nll, nll_ref, kld, same), **_text_fields(corpus, tokens, n_ctx, len(chunks)),
            "kld_exact": True, "ref_cache_bytes": size if write or cached is not None else 0,
            "time_s": time.perf_counter() - t0}


# --- the two measurements ------------------------------------------------------------------------------


def perplexity(engine, corpus: Corpus, n_ctx: int = 512, n_chunks: int | None = None) -> dict:
    """PPL of ``engine``'s model on ``corpus`` (llama-perplexity conventions; see module doc)."""
    t0 = time.perf_counter()
    tokens = corpus_tokens(engine, corpus)
    chunks = make_chunks(tokens, n_ctx, n_chunks, engine.bos_token if engine.add_bos else None)
    scores = list(iter_scores(engine, chunks))
    nll = np.concatenate([s.nll for s in scores])
    return {**ppl_stats(nll), **_text_fields(corpus, tokens, n_ctx, len(chunks)),
            "time_s": time.perf_counter() - t0}


def reference_rows(ref_engine, corpus: Corpus, n_ctx: int, n_chunks: int | None, k: int,
                   cache_file: Path | None) -> tuple[RefRows, list[int], int, bool]:
    """The compact reference rows (from the cache when it holds enough chunks): (rows, tokens, chunks, hit)."""
    tokens = corpus_tokens(ref_engine, corpus)
    chunks = make_chunks(tokens, n_ctx, n_chunks, ref_engine.bos_token if ref_engine.add_bos else None)
    per = n_ctx - 1 - n_ctx // 2
    if cache_file is not None:
        hit = load_ref(cache_file, len(chunks), per)
        if hit is not None and np.array_equal(hit[1], np.asarray(tokens, dtype=np.int32)):
            return hit[0], tokens, len(chunks), True
    ref = RefRows.concat([s.ref for s in iter_scores(ref_engine, chunks, keep_k=k)])
    if cache_file is not None:
        save_ref(cache_file, ref, tokens, len(chunks))
    return ref, tokens, len(chunks), False


def kl_divergence(engine, ref: RefRows, ref_tokens: Sequence[int], corpus: Corpus, n_ctx: int,
                  n_chunks: int) -> dict:
    """PPL of ``engine``'s model and its divergence from the compact reference ``ref``."""
    t0 = time.perf_counter()
    if engine.n_vocab <= int(ref.ids.max(initial=0)):
        raise InvalidArgument("the model and the reference have different vocabularies; KLD needs two "
                              "variants of the same model (same tokenizer)")
    tokens = corpus_tokens(engine, corpus)
    if list(tokens) != list(ref_tokens):
        raise InvalidArgument("the model and the reference tokenize the text differently; KLD needs two "
                              "variants of the same model (same tokenizer)")
    chunks = make_chunks(tokens, n_ctx, n_chunks, engine.bos_token if engine.add_bos else None)
    scores = list(iter_scores(engine, chunks, ref=ref))
    nll = np.concatenate([s.nll for s in scores])
    top = np.concatenate([s.argmax for s in scores])
    kld = np.concatenate([s.kld for s in scores])
    if nll.size != ref.target_logp.size:
        raise OndeviceError(f"internal: {nll.size} scored tokens but {ref.target_logp.size} reference rows")
    k = int(ref.ids.shape[1])
    return {**ppl_stats(nll), **kld_stats(nll, -ref.target_logp, kld, top == ref.ids[:, 0],
                                          np.concatenate([s.tail_mass for s in scores])),
            **_text_fields(corpus, tokens, n_ctx, len(chunks)), "topk": k, "kld_exact": k >= engine.n_vocab,
            "time_s": time.perf_counter() - t0}


def kld_stats(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, same_top: np.ndarray,
              tail_mass: np.ndarray | None = None) -> dict:
    """llama-perplexity's KLD summary: ΔPPL, KLD mean ± err, median, p99, max, same-top, Δp RMS."""
    lp, lp_err = mean_and_uncertainty(nll)
    lb, lb_err = mean_and_uncertainty(nll_base)
    ppl, ppl_base = float(np.exp(lp)), float(np.exp(lb))
    cov = covariance(nll, nll_base)
    ppl_err, base_err = ppl * lp_err, ppl_base * lb_err
    k_mean, k_err = mean_and_uncertainty(kld)
    s = np.sort(kld)
    top1 = float(same_top.mean())
    n = same_top.size
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    mse, mse_err = mean_and_uncertainty(p_diff * p_diff)
    rms = float(np.sqrt(mse))
    out = {
        "ppl_ref": ppl_base, "ppl_ref_err": base_err,
        "dppl": ppl - ppl_base, "dppl_err": float(np.sqrt(max(ppl_err ** 2 + base_err ** 2 - 2 * ppl * ppl_base * cov,
                                                              0.0))),
        "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_err": float(np.sqrt(max(lp_err ** 2 + lb_err ** 2 - 2 * cov, 0.0))),
        "kld_mean": k_mean, "kld_err": k_err, "kld_median": percentile(s, 0.5), "kld_p99": percentile(s, 0.99),
        "kld_max": float(s[-1]),
        "top1_agree": top1, "top1_err": float(np.sqrt(top1 * (1 - top1) / (n - 1))) if n > 1 else 0.0,
        "dp_rms": rms, "dp_rms_err": 0.5 / rms * mse_err if rms > 0 else 0.0,
    }
    if tail_mass is not None:
        out["ref_tail_mass_mean"] = float(tail_mass.mean())
    return out


def _text_fields(corpus: Corpus, tokens: Sequence[int], n_ctx: int, n_chunks: int) -> dict:
    return {"corpus": corpus.describe(), "corpus_tokens": len(tokens), "n_ctx": n_ctx, "n_chunks": n_chunks}
