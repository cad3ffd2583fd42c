"""Pooled embeddings of many inputs per ``llama_decode`` (engine/embed.py) and through ``/v1/embeddings``.

The reference is computed independently: one input per decode on a context with no pooling, each token's
hidden state read back and averaged with numpy (what mean pooling is). Packed vectors must match it for
inputs of different lengths on causal models (a leak between packed sequences would move them far more).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import openai
import pytest
from test_serve_tools import QWEN, needs_qwen

from ondevice.engine.base import EngineConfig
from ondevice.engine.llama import LlamaEngine
from ondevice.serve import BackgroundServer, ServeSettings

TEXTS = ["hi", "The cat sat on the mat.", "Quarterly tax filings are due in April; late filers pay a penalty. " * 6,
         "A cat is sitting on a rug.", "ok", "Photosynthesis turns light, water and carbon dioxide into sugar."]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


class MeanOfTokens:
    """Mean pooling by hand: one input per decode, no pooling in llama.cpp, the token states averaged here."""

    def __init__(self, path):
        self.eng = LlamaEngine(path, EngineConfig(n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                                                  embeddings=True, pooling="none", flash_attn=False))

    def __call__(self, tokens: list[int]) -> np.ndarray:
        eng = self.eng
        eng.reset()
        eng.decode_batch([(t, i, 0, True) for i, t in enumerate(tokens)])
        n_embd = eng.ll.llama_model_n_embd(eng.model)
        rows = [np.ctypeslib.as_array(eng.ll.llama_get_embeddings_ith(eng.ctx, i), shape=(n_embd,))
                for i in range(len(tokens))]  # (n_tokens, n_embd)
        return np.mean(rows, axis=0)


class Decodes:
    """Counts the real ``llama_decode`` calls an engine makes (the method still runs)."""

    def __init__(self, eng):
        self.n, real = 0, eng.decode_batch

        def counted(items):
            self.n += 1
            return real(items)

        eng.decode_batch = counted


@pytest.fixture(scope="module")
def smol():
    from ondevice.models import resolve

    return resolve(None).path


@pytest.fixture(scope="module")
def reference(smol):
    ref = MeanOfTokens(smol)
    yield ref
    ref.eng.close()


@pytest.mark.parametrize("model", [pytest.param(None, id="smollm2"), pytest.param(QWEN, id="qwen", marks=needs_qwen)])
def test_packed_vectors_equal_one_input_per_decode(model, smol, reference):
    """SmolLM2 and Qwen2.5 (causal, mean pooled): all inputs in one decode, each vector as if alone."""
    from ondevice.engine.embed import embed_many, embedding_config
    from ondevice.models import resolve

    path = smol if model is None else resolve(model).path
    ref = reference if model is None else MeanOfTokens(path)
    eng = LlamaEngine(path, embedding_config(128, n_threads=2))
    try:
        toks = [eng.tokenize(t) for t in TEXTS]
        assert min(map(len, toks)) <= 2 and max(map(len, toks)) > 60  # lengths differ a lot
        want = np.stack([ref(t) for t in toks])
        decodes = Decodes(eng)
        got = embed_many(eng, toks)
        assert decodes.n == 1 and got.shape == want.shape
        assert _cos(got, want).min() > 0.9999, _cos(got, want)
        # scale; on AVX2 builds of llama.cpp Qwen2.5's norms were 1.1e-3 apart
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=2e-3)
        # the same input, alone and among others at any place in the pack: the same vector
        alone = eng.embed(toks[1])
        again = embed_many(eng, [toks[2], toks[1], toks[0], toks[1]])
        assert _cos(again[[1, 3]], alone).min() > 0.9999
    finally:
        eng.close()
        if ref is not reference:
            ref.eng.close()


def test_many_inputs_take_as_few_decodes_as_fit_and_keep_their_order(smol, reference):
    from ondevice.engine.embed import capacity, embed_many, embedding_config, packs

    eng = LlamaEngine(smol, embedding_config(64, n_threads=2))
    try:
        texts = [f"item {i}: " + "word " * (i % 13) for i in range(300)]  # more inputs than sequence ids
        toks = [eng.tokenize(t) for t in texts]
        n_tokens, n_seqs = capacity(eng)
        runs = packs([len(t) for t in toks], n_tokens, n_seqs)
        assert [i for r in runs for i in r] == list(range(300))
        assert all(sum(len(toks[i]) for i in r) <= n_tokens and len(r) <= n_seqs for r in runs)
        for r, nxt in pairwise(runs):  # each run full: the next input would not have fit
            assert sum(len(toks[i]) for i in r) + len(toks[nxt[0]]) > n_tokens or len(r) == n_seqs
        decodes = Decodes(eng)
        got = embed_many(eng, toks)
        assert decodes.n == len(runs) < 10
        sample = [0, 7, 150, 299]
        assert _cos(got[sample], np.stack([reference(toks[i]) for i in sample])).min() > 0.9999
    finally:
        eng.close()


def test_packs_split_in_order_at_either_limit():
    from ondevice.engine.embed import packs

    assert packs([3, 3, 3], 6, 8) == [range(2), range(2, 3)]
    assert packs([1] * 5, 100, 2) == [range(2), range(2, 4), range(4, 5)]
    assert packs([2, 9, 2], 6, 8) == [range(1), range(1, 2), range(2, 3)]  # too long: alone (then refused)
    assert packs([], 6, 8) == []


def test_an_input_longer_than_a_decode_is_refused_by_name(smol):
    from ondevice.engine.embed import embed_many, embedding_config
    from ondevice.errors import ContextOverflow

    eng = LlamaEngine(smol, embedding_config(16, n_threads=2))  # 512 tokens per decode
    try:
        with pytest.raises(ContextOverflow, match="input.*600.*512"):
            embed_many(eng, [[1] * 5, [1] * 600])
    finally:
        eng.close()


# -- through the server, with the official openai client -------------------------------------------------------
@pytest.fixture(scope="module")
def srv(smol):
    settings = ServeSettings(model=str(smol), port=0, parallel=2, ctx=256, threads=2, embeddings_ctx=128)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_packs_a_requests_inputs_and_answers_as_one_per_decode(srv, client, reference):
    texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(50)]
    decodes = Decodes(srv.state.embedder)
    r = client.embeddings.create(model="m", input=texts)
    assert decodes.n <= 3  # 50 inputs of ~1,400 tokens in all: packs of 512 tokens (one decode per input before)
    assert [d.index for d in r.data] == list(range(50))
    toks = [reference.eng.tokenize(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, toks))
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cos(got, np.stack([reference(t) for t in toks])).min() > 0.9999


def test_server_limits_and_messages_are_unchanged(srv, client):
    from ondevice.serve.app import MAX_EMBEDDING_INPUTS

    decodes = Decodes(srv.state.embedder)
    long = "word " * 150  # over --embeddings-ctx 128
    with pytest.raises(openai.BadRequestError, match="embeddings accept at most 128.*--embeddings-ctx") as e:
        client.embeddings.create(model="m", input=["fine", long, "fine"])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="the input is empty"):
        client.embeddings.create(model="m", input=["fine", ""])
    with pytest.raises(openai.BadRequestError, match=f"embeds at most {MAX_EMBEDDING_INPUTS} per request"):
        client.embeddings.create(model="m", input=["x"] * (MAX_EMBEDDING_INPUTS + 1))
    with pytest.raises(openai.BadRequestError, match="dimensions 10000 exceeds the model's 576"):
        client.embeddings.create(model="m", input=["fine"] * 50, dimensions=10000)
    assert decodes.n == 0  # every input and setting is checked before any is computed
    r = client.embeddings.create(model="m", input=["x"] * MAX_EMBEDDING_INPUTS)  # the limit itself is served
    assert len(r.data) == MAX_EMBEDDING_INPUTS and decodes.n < MAX_EMBEDDING_INPUTS // 50
