"""Ollama's /api/show and /api/tags of an adapter model (``BASE+NAME``, served with ``--adapter NAME=PATH``), through
the official ollama client: shown as Ollama shows a model created from another with an adapter, its Modelfile
``FROM`` the base file and ``ADAPTER`` the adapter's, its ``details.parent_model`` the base."""

from __future__ import annotations

import ollama
import pytest
from test_clients import _model_path
from test_serve_native import adapters  # noqa: F401 (the fixture: a rank-4 SmolLM2 adapter and its half)

from ondevice.serve import BackgroundServer, ServeSettings


@pytest.fixture(scope="module")
def server(adapters):  # noqa: F811 (the fixture imported above)
    a, _ = adapters
    with BackgroundServer(ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=512, threads=1,
                                        embeddings=False, adapter=[f"a={a}"])) as s:
        yield s


def test_show_of_an_adapter_model_names_its_base_and_adapter_as_ollama_does(server, adapters):  # noqa: F811
    client = ollama.Client(host=server.base_url, timeout=120)
    base = server.state.model_id
    listed = {m.model: m.details.parent_model for m in client.list().models}
    assert listed == {f"{base}:latest": "", f"{base}+a:latest": f"{base}:latest"}
    shown = client.show(f"{base}+a")
    lines = [x for x in shown.modelfile.splitlines() if not x.startswith("#")]
    assert lines == [f"FROM {_model_path()}", f"ADAPTER {adapters[0]}"]
    assert shown.details.parent_model == f"{base}:latest" and shown.details.family == "llama"
    assert client.show(f"{base}+a:latest").modelfile == shown.modelfile  # the tag may be given
    plain = client.show(base)
    assert "ADAPTER" not in plain.modelfile and plain.details.parent_model == ""
    assert plain.template == shown.template and plain.modelinfo == shown.modelinfo
