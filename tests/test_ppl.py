"""Perplexity / KLD: our code against an independent computation, and the compact reference cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.eval import corpora
from ondevice.eval import ppl as P

CTX = 32
CHUNKS = 2


# --- the math on synthetic logits ------------------------------------------------------------------------


def _independent_log_softmax_row(row: np.ndarray) -> np.ndarray:
    """log p_i = x_i - max - log(sum_j exp(x_j - max)), with a Python fsum for the sum."""
    x = row.astype(np.float64)
    m = max(x.tolist())
    lse = m + math.log(math.fsum(math.exp(v - m) for v in x.tolist()))
    return x - lse


def test_log_softmax_matches_loop():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 500)) * 5).astype(np.float32)
    for r, row in enumerate(logits):
        np.testing.assert_allclose(P.log_softmax(logits)[r], _independent_log_softmax_row(row), rtol=0, atol=1e-12)


def test_compact_kld_exact_with_full_vocab_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(1)
    v = 400
    lp = P.log_softmax(rng.standard_normal((20, v)) * 3)
    lq = P.log_softmax(np.log(np.exp(lp)) + rng.standard_normal((20, v)) * 0.5)
    targets = rng.integers(0, v, 20)
    full = P.kld_full(lp, lq)
    assert (full > 0).all()
    exact, tail = P.kld_compact(P.RefRows.from_logp(lp, targets, v), lq)
    np.testing.assert_allclose(exact, full, rtol=1e-10)
    assert np.all(tail == 0)
    for k in (1, 8, 64):
        lo, tail = P.kld_compact(P.RefRows.from_logp(lp, targets, k), lq)
        assert np.all(lo <= full + 1e-12), k
        assert lo.mean() < full.mean(), k  # a bound, not the value: what `kld_exact: false` says
        assert np.all((tail > 0) & (tail < 1))
    self_lo, _ = P.kld_compact(P.RefRows.from_logp(lp, targets, 8), lp)
    assert np.all(self_lo == 0)


def test_compact_rows_keep_top_k_in_order_and_target():
    lp = P.log_softmax(np.array([[0.0, 3.0, 1.0, 2.0, -1.0]]))
    r = P.RefRows.from_logp(lp, np.array([4]), 3)
    assert r.ids.tolist() == [[1, 3, 2]]
    np.testing.assert_array_equal(r.logp[0], lp[0, [1, 3, 2]])
    assert r.target_logp[0] == lp[0, 4]


def test_ppl_stats_formula():
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    s = P.ppl_stats(nll)
    assert s["ppl"] == pytest.approx(math.exp(2.5))
    # llama-perplexity: sqrt((E[x^2] - E[x]^2) / (n - 1)) * ppl
    assert s["ppl_err"] == pytest.approx(math.sqrt(1.25 / 3) * math.exp(2.5))


def test_chunking_needs_two_chunks_of_text():
    with pytest.raises(InvalidArgument, match="at least 128"):
        P.make_chunks(list(range(100)), 64, None, 1)
    chunks = P.make_chunks(list(range(10, 300)), 64, None, 1)
    assert len(chunks) == 4 and all(len(c) == 64 and c[0] == 1 for c in chunks)
    assert chunks[1][1:] == list(range(10 + 65, 10 + 128))
    assert len(P.make_chunks(list(range(300)), 64, 2, None)) == 2


# --- corpora ----------------------------------------------------------------------------------------------


def test_pydoc_corpus_is_sorted_topics():
    from pydoc_data.topics import topics

    c = corpora.load_corpus("pydoc")
    assert c.text == "\n\n".join(topics[k] for k in sorted(topics))
    d = c.describe()
    assert d["chars"] == len(c.text) and len(d["sha256"]) == 64


def test_lee_found_without_importing_gensim(tmp_path, monkeypatch):
    pkg = tmp_path / "gensim"
    (pkg / "test" / "test_data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('gensim must not be imported')\n")
    (pkg / "test" / "test_data" / "lee_background.cor").write_text("hello lee\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    c = corpora.load_corpus("lee")
    assert c.name == "lee" and c.text == "hello lee\n"


def test_unknown_corpus_and_bad_file(tmp_path):
    with pytest.raises(InvalidArgument, match="not a corpus"):
        corpora.load_corpus("wikitext")
    bad = tmp_path / "x.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidArgument, match="UTF-8"):
        corpora.load_corpus(text_file=bad)


# --- on the real model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smol_path):
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    eng = LlamaEngine(smol_path, EngineConfig(n_ctx=CTX, n_threads=2))
    yield eng
    eng.close()


def test_ppl_equals_independent_computation(engine):
    corpus = corpora.pydoc()
    got = P.perplexity(engine, corpus, CTX, CHUNKS)
    # Independent path: tokenize, chunk as llama-perplexity does, all logits via prefill(logits_all=True).
    tokens = engine.tokenize(corpus.text, add_special=True, parse_special=False)
    nll = []
    first = CTX // 2
    for i in range(CHUNKS):
        chunk = tokens[i * CTX:(i + 1) * CTX]
        if engine.add_bos:
            chunk[0] = engine.bos_token
        engine.reset()
        engine.prefill(chunk, logits_all=True)
        logits = engine.all_logits()  # (CTX, n_vocab)
        engine.reset()
        for pos in range(first, CTX - 1):
            nll.append(-_independent_log_softmax_row(logits[pos])[chunk[pos + 1]])
    mean = math.fsum(nll) / len(nll)
    var = math.fsum(x * x for x in nll) / len(nll) - mean * mean
    assert got["n_scored"] == len(nll) == CHUNKS * (CTX - first - 1)
    assert got["ppl"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert got["ppl_err"] == pytest.approx(math.sqrt(var / (len(nll) - 1)) * math.exp(mean), rel=1e-4)
    assert got["corpus_tokens"] == len(tokens)


def test_kld_of_a_model_against_itself_is_zero_through_the_cache(smol_path, tmp_path, monkeypatch):
    from ondevice.eval.api import evaluate

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    kw = {"ref": smol_path, "ctx": 32, "chunks": CHUNKS, "store": tmp_path / "db.sqlite", "threads": 2}
    first = evaluate(smol_path, **kw)  # the exact KLD, from the reference's full rows (cached as float32 .npy)
    second = evaluate(smol_path, **kw)
    kld1 = next(r for r in first if r.test.startswith("kld:"))
    kld2 = next(r for r in second if r.test.startswith("kld:"))
    assert not kld1.ref_cached and kld2.ref_cached and kld2.ref_cache.endswith(".npy")
    for r in (kld1, kld2):
        assert r.kld_exact is True and r.topk is None
        assert r.kld_mean == 0.0 and r.kld_p99 == 0.0 and r.kld_max == 0.0
        assert r.top1_agree == 1.0
        assert r.dppl == 0.0
        assert r.ppl == r.ppl_ref
    ppl_rec = next(r for r in second if r.test.startswith("ppl:"))
    assert ppl_rec.ppl == kld2.ppl and ppl_rec.model_sha256 == kld2.ref_sha256
    from ondevice.store import Store

    with Store(tmp_path / "db.sqlite") as db:
        tests = sorted(r["test"] for r in db.records("eval"))
    assert tests == ["kld:pydoc", "kld:pydoc", "ppl:pydoc", "ppl:pydoc"]


def test_kld_refuses_a_different_tokenization(engine, tmp_path):
    corpus = corpora.from_file(_write(tmp_path / "t.txt", "The quick brown fox jumps over the lazy dog. " * 40))
    toks = P.corpus_tokens(engine, corpus)
    per = CTX - 1 - CTX // 2
    ref = P.RefRows(np.zeros((per, 4), np.int32), np.zeros((per, 4)), np.zeros(per), np.zeros(per))
    with pytest.raises(OndeviceError, match="tokenize the text differently"):
        P.kl_divergence(engine, ref, [t + 1 for t in toks], corpus, CTX, 1)


def _write(path, text):
    path.write_text(text)
    return path
