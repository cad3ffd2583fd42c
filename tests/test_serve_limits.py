"""Hard limits of `ondevice serve`: each gets its designed status (never a 500) and the server keeps serving."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastapi  # noqa: E402, F401 — [server] extra, installed by `make test`
import httpx  # noqa: E402
import openai  # noqa: E402

from test_serve import _log_softmax, _model_path

from ondevice.engine.base import EngineConfig
from ondevice.engine.llama import LlamaEngine
from ondevice.errors import InvalidArgument
from ondevice.serve import BackgroundServer, ServeSettings
from ondevice.serve.settings import settings_from_args

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=2, max_prompt_tokens=64,
                             max_queue=1, max_body_bytes=4096, api_key=KEY, embeddings=False,
                             kv_type="f32")
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(srv, path: str, **kw) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(srv.base_url + path, headers=headers, timeout=60, **kw)


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _still_serving(client) -> None:
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0)
    assert r.choices[0].message.content is not None


def _wait_health(srv, key: str, value: int, within: float = 30.0) -> dict:
    """Poll /health until ``key == value`` (a bound on waiting, not a speed assertion)."""
    end = time.monotonic() + within
    while True:
        h = httpx.get(srv.base_url + "/health").json()
        if h[key] == value or time.monotonic() > end:
            return h
        time.sleep(0.05)


class _LongStream:
    """A streaming request that holds a slot until closed (the response object is kept alive)."""

    def __init__(self, srv):
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        self.cm = httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        self.resp = self.cm.__enter__()
        assert self.resp.status_code == 200
        self.lines = self.resp.iter_lines()
        got = 0
        for line in self.lines:  # wait until tokens flow: the slot is taken
            got += line.startswith("data: ")
            if got >= 3:
                break

    def close(self) -> None:
        self.cm.__exit__(None, None, None)


def test_api_key(srv, client):
    assert httpx.get(srv.base_url + "/v1/models").status_code == 401
    r = httpx.get(srv.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(srv.base_url + "/health").status_code == 200  # health needs no key
    assert client.models.list().data


def test_oversize_prompt_is_400_naming_limit(srv, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 200}], max_tokens=4)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and "at most 64" in err["message"] and err["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=list(range(100, 180)), max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="m", input="word " * 200)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    _still_serving(client)


def test_malformed_json_and_wrong_types_are_400(srv, client):
    r = _post(srv, "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"})
    assert r.status_code == 400 and _error(r)["param"] == "max_tokens"
    r = _post(srv, "/v1/chat/completions", json={"messages": "hello"})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = _post(srv, "/v1/chat/completions", json=[1, 2, 3])
    assert r.status_code == 400
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "contents": "x"}]})  # misspelt: was ""
    assert r.status_code == 400 and _error(r)["param"] == "messages.0", r.text  # as llama-server refuses it
    assert "the user message has no 'content'" in _error(r)["message"] and "'contents'" in _error(r)["message"]
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": None}], "max_tokens": 1})
    assert r.status_code == 200, r.text  # null content: an empty message, as llama-server takes it
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "temperature": -1})
    assert r.status_code == 400 and _error(r)["param"] == "temperature"
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                 "tool_choice": "required"})
    assert r.status_code == 400 and "tools" in _error(r)["message"]
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                 "response_format": {"type": "json_schema", "json_schema": {
                                                     "name": "x", "schema": {"$ref": "#/$defs/nowhere"}}}})
    assert r.status_code == 400 and "response_format.json_schema.schema" in _error(r)["message"]
    r = _post(srv, "/tokenize", json={"content": 5})
    assert r.status_code == 400
    r = _post(srv, "/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400
    r = httpx.get(srv.base_url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    _still_serving(client)


def test_body_too_large_is_413(srv, client):
    r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 10_000}]})
    assert r.status_code == 413 and _error(r)["code"] == "body_too_large"
    _still_serving(client)


def test_disconnect_mid_stream_frees_the_slot(srv, client):
    cancelled = _metric(srv, "ondevice_requests_cancelled_total")
    stream = _LongStream(srv)
    assert httpx.get(srv.base_url + "/health").json()["slots_processing"] == 1
    stream.close()  # the client goes away mid-stream
    assert _wait_health(srv, "slots_processing", 0)["slots_processing"] == 0
    assert _metric(srv, "ondevice_requests_cancelled_total") == cancelled + 1
    _still_serving(client)


def test_a_client_gone_before_its_whole_answer_frees_the_slot(srv, client):
    """A request answered in one piece (no stream writes to fail) notices its client left while tokens flow."""
    import json
    import socket
    from urllib.parse import urlparse

    made = _metric(srv, "ondevice_generation_tokens_total")
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 180,
                       "ignore_eos": True}).encode()
    u = urlparse(srv.base_url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert _wait_health(srv, "slots_processing", 1)["slots_processing"] == 1
    sock.close()  # gone while its 180 tokens are being made
    assert _wait_health(srv, "slots_processing", 0)["slots_processing"] == 0
    assert _metric(srv, "ondevice_generation_tokens_total") - made < 150  # stopped, not run to its end
    _still_serving(client)


def test_full_queue_is_429_with_retry_after(srv, client):
    stream = _LongStream(srv)  # holds the only slot
    queued: dict = {}
    t = threading.Thread(target=lambda: queued.setdefault("r", client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)))
    t.start()
    try:
        assert _wait_health(srv, "queue_depth", 1)["queue_depth"] == 1
        r = _post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 429 and _error(r)["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        stream.close()  # frees the slot: the queued request runs
        t.join(timeout=60)
    assert queued["r"].choices[0].message.content is not None
    _still_serving(client)


def _metric(srv, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", headers=AUTH).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_echo_logprobs_exact_with_f32_kv(srv, client):
    """With an f32 KV cache the prompt logprobs equal an independent computation bit for bit (in float64)."""
    _still_serving(client)  # other cache contents first: the result must not depend on them
    prompt = "Water boils at one hundred degrees Celsius at sea level, and"
    eng = LlamaEngine(_model_path(), EngineConfig(n_ctx=256, n_threads=2, type_k="f32", type_v="f32"))
    try:
        toks = eng.tokenize(prompt, add_special=True, parse_special=True)
        eng.prefill(toks, logits_all=True)
        ref = _log_softmax(eng.all_logits())
    finally:
        eng.close()
    lp = client.completions.create(model="m", prompt=prompt, max_tokens=1, echo=True, logprobs=3,
                                   temperature=0).choices[0].logprobs
    n = len(toks)
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:n], [ref[i - 1, toks[i]] for i in range(1, n)], rtol=0, atol=1e-9)
    assert lp.token_logprobs[n] == pytest.approx(ref[n - 1].max(), abs=1e-9)  # greedy continuation


# -- settings ---------------------------------------------------------------------------------------------
def test_settings_flags_env_and_validation(monkeypatch):
    monkeypatch.setenv("ONDEVICE_PARALLEL", "3")
    monkeypatch.setenv("ONDEVICE_API_KEY", "k")
    s = settings_from_args(argparse.Namespace(verb="serve"))
    assert s.parallel == 3 and s.api_key == "k" and s.host == "127.0.0.1"
    assert settings_from_args(argparse.Namespace(parallel="5")).parallel == 5  # the flag wins
    with pytest.raises(InvalidArgument, match="--parallel"):
        settings_from_args(argparse.Namespace(parallel="0"))
    with pytest.raises(InvalidArgument, match="max_prompt_tokens"):
        settings_from_args(argparse.Namespace(ctx="128", max_prompt_tokens="500"))


def test_cli_help_shows_defaults_and_env():
    out = subprocess.run([sys.executable, "-m", "ondevice.cli", "serve", "--help"], capture_output=True, text=True, check=False,
                         env={**os.environ, "COLUMNS": "200"}, timeout=60)
    assert out.returncode == 0
    assert "default: 127.0.0.1; env ONDEVICE_HOST" in out.stdout and "ONDEVICE_PARALLEL" in out.stdout
    assert "--api-key" in out.stdout and "default: 8080" in out.stdout


def test_request_timeout_is_504_and_frees_the_slot():
    """--timeout bounds a request (queue wait included): 504 without streaming, an error event with it."""
    # one thread: two on a 2-core machine beside other work stall each other past the short request's 0.5 s
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=1024, threads=1, timeout=0.5,
                             embeddings=False)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
            "ignore_eos": True}
    with BackgroundServer(settings) as s:
        r = httpx.post(s.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 504 and _error(r)["code"] == "timeout"
        assert r.headers["x-should-retry"] == "false"  # the openai client retried a 504 twice: 3x the wait
        import openai

        sent = []
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", timeout=60,  # its default: 2 retries
                               http_client=httpx.Client(event_hooks={"request": [sent.append]}))
        with pytest.raises(openai.InternalServerError, match="timeout"):
            client.chat.completions.create(model="x", messages=body["messages"], max_tokens=1000,
                                           extra_body={"ignore_eos": True})
        assert len(sent) == 1
        with httpx.stream("POST", s.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as resp:
            assert resp.status_code == 200  # headers went out before the time ran out
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert "timeout" in events[-1] and "[DONE]" not in events
        # Anthropic's Messages route: its 504 type, whole or as the stream's error event
        msgs = {"model": "x", "max_tokens": 1000, "messages": body["messages"], "ignore_eos": True}
        r = httpx.post(s.base_url + "/v1/messages", json=msgs, timeout=60)
        assert r.status_code == 504 and r.json()["type"] == "error" and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", s.base_url + "/v1/messages", json={**msgs, "stream": True}, timeout=60) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert lines[-2] == "event: error" and '"type":"timeout_error"' in lines[-1].replace(" ", ""), lines[-2:]
        assert _wait_health(s, "slots_processing", 0)["slots_processing"] == 0
        short = httpx.post(s.base_url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert short.status_code == 200


def test_a_bad_host_or_a_taken_port_names_the_flag_to_change():
    from ondevice.errors import OndeviceError
    from ondevice.serve.server import _bind

    with pytest.raises(OndeviceError, match="--host must be an address of this machine"):
        _bind("999.1.1.1", 0)
    taken = _bind("127.0.0.1", 0)  # listening: a second bind fails even with SO_REUSEADDR
    try:
        with pytest.raises(OndeviceError, match="pick another --port"):
            _bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
