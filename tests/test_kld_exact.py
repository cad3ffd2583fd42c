"""`ondevice eval --ref` gives the exact KLD by default: the full-vocabulary computation, llama-perplexity's figure.

The default once kept only the reference's top-256 log-probs and reported the coarse-grained KLD, a lower bound 16%
below llama-perplexity's for SmolLM2 (13% of the reference's mass lies outside its top 256), stored as ``kld_mean``
as if it were the KLD.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import home_with_f16

CTX = 64
CHUNKS = 4  # llama-perplexity prints its final KLD statistics from 4 chunks on
PEER = Path.home() / ".cache/ondevice-peers/llama.cpp-0.3.36/build/bin/llama-perplexity"


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    """The F16 variant of the shipped SmolLM2 (same tokenizer, different logits): the usual --ref."""
    with home_with_f16(tmp_path_factory.mktemp("home")) as path:
        yield path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20000], encoding="utf-8")
    return path


def _records(r) -> dict[str, dict]:
    assert r.returncode == 0, r.stderr
    return {d["test"].split(":")[0]: d for d in map(json.loads, r.stdout.splitlines())}


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - (m + math.log(math.fsum(np.exp(x - m).tolist())))


def _independent_klds(model: Path, ref: Path, text: Path) -> list[float]:
    """Per-token KLD(ref || model) over the whole vocabulary, llama-perplexity's chunks (second half of each)."""
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    rows = {}
    for name, path in (("p", ref), ("q", model)):
        eng = LlamaEngine(path, EngineConfig(n_ctx=CTX, n_threads=2))
        try:
            tokens = eng.tokenize(text.read_text(encoding="utf-8"), add_special=True, parse_special=False)
            out = []
            for i in range(CHUNKS):
                chunk = tokens[i * CTX:(i + 1) * CTX]
                if eng.add_bos:
                    chunk[0] = eng.bos_token
                eng.reset()
                eng.prefill(chunk, logits_all=True)
                out += [_log_softmax(x) for x in eng.all_logits()[CTX // 2:CTX - 1]]  # (n_vocab,) each
                eng.reset()
            rows[name] = out
        finally:
            eng.close()
    return [math.fsum((np.exp(lp) * (lp - lq)).tolist()) for lp, lq in zip(rows["p"], rows["q"])]


def test_default_kld_is_the_full_vocabulary_kld_and_topk_says_it_is_a_bound(cli, smol_path, f16, text):
    flags = ("eval", "-m", str(smol_path), "--ref", str(f16), "-f", str(text), "-c", str(CTX), "--chunks",
             str(CHUNKS), "-t", "2", "--no-store")
    kld = _records(cli(*flags, "--json"))["kld"]
    want = _independent_klds(smol_path, f16, text)
    assert kld["n_scored"] == len(want) == CHUNKS * (CTX - CTX // 2 - 1)
    assert kld["kld_mean"] == pytest.approx(math.fsum(want) / len(want), rel=1e-3)
    assert kld["kld_max"] == pytest.approx(max(want), rel=1e-3)
    assert kld["kld_exact"] is True and "topk" not in kld and "kld_upper_mean" not in kld
    # --topk K is still there for a small cache: its figure is a lower bound, and the record and screen say so
    low = _records(cli(*flags, "--topk", "16", "--json"))["kld"]
    assert low["kld_exact"] is False and low["topk"] == 16 and low["kld_mean"] < kld["kld_mean"]
    r = cli(*flags, "--topk", "16")
    assert r.returncode == 0, r.stderr
    assert f"KLD >= {low['kld_mean']:.6f}" in r.stdout and "a lower bound" in r.stdout, r.stdout
    assert "drop --topk for the exact KLD" in r.stdout and "upper bound" not in r.stdout


@pytest.mark.skipif(not PEER.is_file(), reason="llama-perplexity (the peer) is not built here")
def test_default_kld_is_llama_perplexitys(cli, tmp_path, smol_path, f16, text):
    kld = _records(cli("eval", "-m", str(smol_path), "--ref", str(f16), "-f", str(text), "-c", str(CTX), "--chunks",
                       str(CHUNKS), "-t", "2", "--no-store", "--json"))["kld"]
    base = tmp_path / "kl.base"
    common = ["-f", str(text), "-c", str(CTX), "--chunks", str(CHUNKS), "-b", str(CTX), "-t", "2",
              "--kl-divergence-base", str(base)]
    common += ["--no-repack"]  # llama.cpp's CPU repacking crashes on AMX machines; it changes no figure

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(PEER), *a], capture_output=True, text=True, timeout=600, check=False)

    assert run("-m", str(f16), *common).returncode == 0
    peer = run("-m", str(smol_path), *common, "--kl-divergence")
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)\s+±\s+([0-9.]+)", peer.stdout + peer.stderr)
    assert m, peer.stderr[-2000:]
    mean, err = float(m.group(1)), float(m.group(2))
    assert abs(kld["kld_mean"] - mean) <= err, (kld["kld_mean"], mean, err)  # within the peer's ±
    assert kld["kld_err"] == pytest.approx(err, rel=0.05)


def test_a_model_against_itself_is_zero_with_no_bound_printed(cli, tmp_path, smol_path):
    flags = ("eval", "-m", str(smol_path), "--ref", str(smol_path), "--ctx", "32", "--chunks", "2", "-t", "2")
    r = cli(*flags, "--db", str(tmp_path / "e.sqlite"))
    assert r.returncode == 0, r.stderr
    assert "KLD = 0.000000 ± 0.000000" in r.stdout, r.stdout
    assert "bound" not in r.stdout and ">=" not in r.stdout  # was "worst-case upper bound 2.0249" for a KLD of 0
    from ondevice.store import Store

    with Store(tmp_path / "e.sqlite") as db:
        (stored,) = [d for d in db.records("eval") if d["test"].startswith("kld:")]
    assert stored["kld_exact"] is True and stored["kld_mean"] == 0.0 and "kld_upper_mean" not in stored


def test_the_reference_rows_over_the_cache_limit_are_recomputed_not_stored(smol_path, f16, text, tmp_path,
                                                                          monkeypatch):
    """Cached rows and rows recomputed every run (over the cache's size limit) give the same exact figures."""
    from ondevice.eval import ppl as P
    from ondevice.eval.api import evaluate

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    kw = {"ref": str(f16), "text": str(text), "ctx": CTX, "chunks": CHUNKS, "threads": 2, "store": False}
    cached = [next(r for r in evaluate(smol_path, **kw) if r.test.startswith("kld:")) for _ in range(2)]
    assert [r.ref_cached for r in cached] == [False, True]
    cache = tmp_path / "home" / "data" / "eval-cache"
    (npy,) = cache.glob("*.npy")
    size = npy.stat().st_size
    assert size >= 4 * cached[0].n_scored * 49152  # float32 rows of the full vocabulary
    for f in cache.iterdir():
        f.unlink()
    monkeypatch.setattr(P, "FULL_CACHE_MAX_BYTES", 0)
    streamed = [next(r for r in evaluate(smol_path, **kw) if r.test.startswith("kld:")) for _ in range(2)]
    assert [r.ref_cached for r in streamed] == [False, False] and not list(cache.iterdir())
    assert cached[1].ref_cache_bytes == size - 128 and streamed[1].ref_cache_bytes == 0  # 128: the .npy header
    for r in (*cached[1:], *streamed):
        assert (r.kld_mean, r.kld_p99, r.top1_agree, r.ppl_ref) == (cached[0].kld_mean, cached[0].kld_p99,
                                                                    cached[0].top1_agree, cached[0].ppl_ref)
