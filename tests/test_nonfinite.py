"""A model whose logits come out NaN (weights damaged in the file: structurally a valid GGUF, so the loader
takes it) gives one clear error, never a reply made of meaningless tokens or a server's 500 from a NaN that
JSON cannot carry. Real engine, a real server on loopback, the official ``openai`` client."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
from conftest import serve_process

import ondevice
from ondevice.errors import NonFiniteLogits


@pytest.fixture(scope="module")
def nan_model(smol_path, tmp_path_factory):
    from gguf import GGUFReader

    path = tmp_path_factory.mktemp("nan") / "nan.gguf"
    shutil.copy(smol_path, path)
    reader = GGUFReader(path, "r+")
    next(t for t in reader.tensors if t.name == "output_norm.weight").data[...] = np.nan  # every logit NaN
    reader.data.flush()
    del reader
    return path


@pytest.mark.parametrize("kw", [{"temp": 0.0}, {"temp": 0.8, "seed": 3}, {"temp": 0.0, "token_stats": True}])
def test_nan_logits_end_the_generation_with_a_clear_error(nan_model, kw):
    with ondevice.load(str(nan_model)) as m, pytest.raises(NonFiniteLogits, match="NaN or infinite logits.*"
                                                                                "download or convert the model again"):
        m.generate("Hi", max_tokens=4, **kw)


def test_the_server_answers_nan_logits_with_a_model_error_and_keeps_serving(nan_model, tmp_path):
    openai = pytest.importorskip("openai")
    with serve_process(tmp_path, "-m", str(nan_model), "-np", "1") as (proc, url, log):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        for kw in ({}, {"logprobs": True, "top_logprobs": 2}, {"temperature": 0.8, "stream": True}):
            with pytest.raises(openai.APIError) as e:  # a stream: an error event after its 200 (no [DONE])
                r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, **kw)
                if kw.get("stream"):
                    list(r)
            assert getattr(e.value, "status_code", 500) == 500 and e.value.body["code"] == "model_error", e.value.body
            assert "NaN or infinite logits" in e.value.body["message"]
        with pytest.raises(openai.InternalServerError, match="NaN or infinite logits"):
            client.completions.create(model="x", prompt="Hi there", max_tokens=1, echo=True, logprobs=1)
        assert httpx.get(url + "/models", timeout=60).status_code == 200 and proc.poll() is None
        assert "Traceback" not in log.read_text()
