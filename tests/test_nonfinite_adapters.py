"""NaN logits met while generating name the LoRA adapters in use, with their scales, as the restore check does
(errors.NonFiniteLogits through engine/sampler.py ``Sampler.nonfinite``): "likely causes: the LoRA adapter
nanv at scale 0.5 (...), or the model's weights (...)", not "download or convert the model again" alone. In a
batch, the request under the adapter fails naming it, under the set its own decode ran with. Real SmolLM2 and
a real LoRA GGUF whose B matrix is NaN (every logit computed through it is NaN).

Only the first generated token's logits can be made NaN this way: a NaN tied to one token needs a LoRA on
``token_embd``, which llama.cpp cannot apply to SmolLM2, whose output reuses the embedding (it aborted the process:
now refused at load, the last test), so no test reaches a later token; every token goes through the same
``Sampler.sample``."""

from __future__ import annotations

import numpy as np
import pytest

import ondevice
from ondevice.adapt import adapter_file
from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Generation, Request, Sampling
from ondevice.errors import NonFiniteLogits
from ondevice.models.store import cached_sha256

NAMED = "likely causes: the LoRA adapter nanv at scale 0.5 (a NaN or inf in its weights"


@pytest.fixture(scope="module")
def nan_adapter(smol_path, tmp_path_factory):
    """A LoRA for SmolLM2's last attention V whose B is NaN: whatever it is applied to computes NaN logits."""
    a = np.full((4, 576), 0.01, np.float32)
    b = np.full((192, 4), np.nan, np.float32)
    return adapter_file.write(tmp_path_factory.mktemp("nan-lora") / "nan.gguf", "llama", 8.0,
                              {"blk.29.attn_v.weight": (a, b)},
                              {"base_sha256": cached_sha256(smol_path), "base_name": "smollm2-135m-instruct"})


@pytest.mark.parametrize("kw", [{"temp": 0.0}, {"temp": 0.8, "seed": 3}, {"temp": 0.0, "token_stats": True}])
def test_generation_names_the_adapter_in_use_and_its_scale(smol_path, nan_adapter, kw):
    with ondevice.load(str(smol_path), n_ctx=256, n_threads=1, adapters=(f"nanv={nan_adapter}:0.5",)) as m:
        with pytest.raises(NonFiniteLogits) as e:
            m.generate("Hi", max_tokens=4, **kw)
    msg = str(e.value)
    assert NAMED in msg and msg.index("adapter nanv") < msg.index("the model's weights"), msg


def test_in_a_batch_the_request_under_the_adapter_names_it(smol_path, nan_adapter):
    """A clean request is decoding when one under the adapter (at a scale of its own) arrives: the step that
    samples the second fails naming its adapter and scale; the clean one had produced tokens until then."""
    eng = LlamaEngine(str(smol_path), EngineConfig(n_ctx=512, n_seq_max=2, n_threads=1,
                                                   adapters=(f"nanv={nan_adapter}",)))
    try:
        gen = BatchGenerator(eng)
        toks = eng.tokenize("The capital of France is")
        clean = Request(tokens=toks, sampling=Sampling(temp=0, max_tokens=16), adapters=())
        gen.insert(clean)
        got = [ev for _ in range(3) for r, ev in gen.step() if r is clean and isinstance(ev, Generation)]
        assert len(got) == 3 and all(g.text is not None for g in got)  # no adapter: finite logits
        gen.insert(Request(tokens=toks, sampling=Sampling(temp=0, max_tokens=4), logprobs=1, post_probs=True,
                           adapters=(eng.adapters.scaled("nanv", 0.5),)))  # post_sampling_probs: the 3rd check
        with pytest.raises(NonFiniteLogits) as e:
            for _ in range(4):
                gen.step()
        assert NAMED in str(e.value), str(e.value)
    finally:
        eng.close()


def test_the_cli_names_the_adapter(cli, nan_adapter):
    r = cli("run", "--adapter", f"nanv={nan_adapter}:0.5", "-n", "2", "-t", "1", "hi")
    assert r.returncode != 0 and NAMED in " ".join(r.stderr.split()) and "Traceback" not in r.stderr, r.stderr


def test_a_lora_on_the_tied_embedding_is_refused_not_an_abort(cli, smol_path, tmp_path):
    """llama.cpp applies a ``token_embd`` LoRA to the output matmul of a model whose output is its embedding, where
    the shapes do not fit: GGML_ASSERT, the process aborted at the first decode (engine/adapters.py refuses it)."""
    a = np.zeros((49152, 4), np.float32)  # ggml's token_embd LoRA: A is (n_vocab, r), B (n_embd, r)
    emb = adapter_file.write(tmp_path / "emb.gguf", "llama", 4.0, {"token_embd.weight": (a, a[:576] + 0.01)},
                             {"base_sha256": cached_sha256(smol_path), "base_name": "smollm2-135m-instruct"})
    r = cli("run", "--adapter", str(emb), "-n", "2", "-t", "1", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "GGML_ASSERT" not in r.stderr, r.stderr[-2000:]
    assert f"--adapter {emb}: it adapts token_embd.weight" in r.stderr and "(tied embeddings)" in r.stderr, r.stderr
