"""A relayed cloud stream, bounded and said: ``--cascade-timeout`` bounds the cloud's whole streamed answer (a cloud
that keeps its stream alive with empty deltas or comments held the client and the cloud's connection for ever); a
streamed reply that is a web page (a proxy's or captive portal's login, HTTP 200) says what came, with the key and
the URL's password redacted (it said only "the cloud's reply has no text"); and Ollama's /api/generate with
``raw: true`` refuses a ``cascade`` object asking for the cloud (it was silently answered on the device, with no
``cascade`` object). The cloud is a small HTTP server on loopback that drips its stream (test_cascade_cloud_replies'
FakeCloud, extended), the device tier the real ``ondevice serve`` reached with the official clients."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import ondevice_home
from test_cascade_cloud_replies import MSG, FakeCloud, cascade_device

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

DEADLINE_S = 3.0  # the device server's --cascade-timeout
DRIP_S = 0.3  # the dripping cloud sends something this often (each well within the deadline)
RELAYED = "Could you send"  # the text a dripping cloud sends before it drips nothing
PASSWORD = "pa55word-140"  # in the cloud URL


class DripCloud(FakeCloud):
    """FakeCloud whose streams can drip: ``drip_empty`` (an empty delta every :data:`DRIP_S`, for a minute),
    ``drip_comments`` (an SSE comment so), ``drip_after_text`` (:data:`RELAYED`, then empty deltas); ``portal``
    answers a captive portal's login page (HTTP 200, text/html) that echoes the Authorization header it got, and
    ``json_stream`` a whole JSON completion to a stream request (a server that does not stream). ``closed`` is set
    when the client drops a dripping stream."""

    def __init__(self):
        super().__init__()
        self.closed = threading.Event()
        fake, base = self, self.httpd.RequestHandlerClass

        class Handler(base):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if fake.mode == "portal":
                    auth = self.headers.get("Authorization", "")
                    return self._send(200, "text/html; charset=utf-8", f"<!DOCTYPE html><html><head><title>Guest "
                                      f"WiFi sign-in ({auth})</title></head><body>Log in to continue: {auth}</body>"
                                      f"</html>")
                if fake.mode == "json_stream":
                    return self._send(200, "application/json", json.dumps(fake.completion()))
                if not (body.get("stream") and fake.mode.startswith("drip")):
                    return super().do_POST()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    self._event({"role": "assistant", "content": ""})
                    if fake.mode == "drip_after_text":
                        self._event({"content": RELAYED})
                    for _ in range(int(60 / DRIP_S)):
                        time.sleep(DRIP_S)
                        if fake.mode == "drip_comments":
                            self.wfile.write(b": keep-alive\n\n")
                            self.wfile.flush()
                        else:
                            self._event({})
                except OSError:  # the client dropped the stream
                    fake.closed.set()
                self.close_connection = True

            def _event(self, delta: dict) -> None:
                chunk = fake._head("chat.completion.chunk") | {
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

        self.httpd.RequestHandlerClass = Handler


@pytest.fixture(scope="module")
def drip(tmp_path_factory):
    with ondevice_home(tmp_path_factory.mktemp("cascade-stream-limits-home")):
        f = DripCloud()
        yield f
        f.close()


@pytest.fixture(scope="module")
def device(drip):
    """The device server, deferring to the dripping cloud through a URL with a password in it."""
    with cascade_device(drip.url.replace("http://", f"http://user:{PASSWORD}@"), cascade_timeout=DEADLINE_S) as srv:
        yield srv


@pytest.fixture()
def cloud(drip, device):
    drip.closed.clear()
    yield drip
    drip.mode = "ok"


def _stream(srv, max_tokens: int = 8) -> tuple[dict, float]:
    """A deferred streamed chat request through the openai client: its text, finish_reason and cascade object, and
    how long it took."""
    c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
    out, t0 = {"text": "", "finish": None, "cascade": None}, time.perf_counter()
    for ch in c.chat.completions.create(model="x", messages=MSG, max_tokens=max_tokens, temperature=0, stream=True,
                                        extra_body={"cascade": {"always_defer": True}}):
        if ch.choices:
            out["text"] += ch.choices[0].delta.content or ""
            out["finish"] = ch.choices[0].finish_reason or out["finish"]
        out["cascade"] = (ch.model_extra or {}).get("cascade") or out["cascade"]
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("mode", ["drip_empty", "drip_comments"])
def test_a_cloud_stream_kept_alive_without_text_falls_back_to_the_device_at_the_deadline(device, cloud, mode):
    """Empty deltas each 0.3 s: each wait for the next chunk was bounded, never the whole, so the request hung."""
    cloud.mode = mode
    r, took = _stream(device)
    assert took < DEADLINE_S + 5, took  # the deadline, plus the device's answer (it decodes meanwhile)
    info = r["cascade"]
    assert info["tier"] == "device" and info["fallback"] == "timeout", info
    assert f"did not answer within {DEADLINE_S:g} s" in info["error"]
    assert r["text"] and r["finish"] in ("length", "stop")  # the device's answer, whole
    assert cloud.closed.wait(5)  # the cloud's connection was dropped, not held


def test_a_cloud_stream_that_stalls_after_its_text_ends_cut_at_the_deadline(device, cloud):
    """Text, then empty deltas: the client got the text and then waited for ever; now the stream ends at the
    deadline with finish_reason "error" (the answer did not end; "length" would say a token cap ended it) and a
    cascade object that says it was cut there."""
    cloud.mode = "drip_after_text"
    n0 = _cut(device)
    r, took = _stream(device)
    assert took < DEADLINE_S + 5, took
    assert r["text"] == RELAYED and r["finish"] == "error", r
    info = r["cascade"]
    assert info["tier"] == "cloud" and info["fallback"] == "timeout", info
    assert (f"did not end its streamed answer within {DEADLINE_S:g} s (the whole answer's deadline); it was cut "
            f"after {len(RELAYED)} characters") in info["error"]
    assert cloud.closed.wait(5)
    assert _cut(device) == n0 + 1  # counted as cut, not as a cloud answer


def _cut(srv) -> float:
    metrics = httpx.get(srv.base_url + "/metrics", timeout=30).text
    name = "ondevice_cascade_cloud_streams_cut "
    return float(next(x.split()[1] for x in metrics.splitlines() if x.startswith(name)))


def test_a_streamed_cloud_reply_that_is_a_web_page_says_what_came_with_secrets_redacted(device, cloud):
    """The page echoes the URL's credentials, sent as HTTP Basic (no key variable is set)."""
    from ondevice.cascade.guard import basic_auth

    cloud.mode = "portal"
    r, _ = _stream(device)
    info = r["cascade"]
    assert info["tier"] == "device" and info["fallback"] == "bad_reply" and r["text"], info
    said = info["error"]
    assert said.startswith("the cloud at http://***@127.0.0.1:") and "answered the stream with a web page " \
        "(text/html) titled 'Guest WiFi sign-in (Basic ***)', not an event stream: '<!DOCTYPE html>" in said, said
    assert ("check that the URL is the OpenAI-compatible API's base (e.g. http://host:port/v1) and that no proxy or "
            "login page (a captive portal) stands between this machine and the cloud") in said
    assert PASSWORD not in said and basic_auth("user", PASSWORD) not in said


def test_a_whole_json_reply_to_a_stream_request_says_what_came(device, cloud):
    cloud.mode = "json_stream"
    r, _ = _stream(device)
    info = r["cascade"]
    assert info["fallback"] == "bad_reply" and r["text"], info
    assert "answered the stream with a application/json body, not an event stream: '{\"id\": \"chatcmpl-fake\"" \
        in info["error"] and "that the server streams chat answers (text/event-stream)" in info["error"], info


# -- Ollama's /api/generate with raw: true: the device alone answers a raw prompt ------------------------------

RAW_REFUSED = ("cascade: a raw: true prompt skips the chat template, so the device alone answers it (the cloud tier "
               "answers chat messages); send the prompt without raw (the chat template renders it, and it may be "
               "deferred, as on /api/chat), or leave cascade unset")


def _raw(srv, cascade: dict | None, stream: bool) -> httpx.Response:
    body = {"model": srv.state.model_cards()[0].id, "prompt": "The capital of France is", "raw": True,
            "stream": stream, "options": {"num_predict": 3, "temperature": 0}}
    return httpx.post(srv.base_url + "/api/generate", json=body | ({"cascade": cascade} if cascade else {}),
                      timeout=120)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_ollamas_raw_generate_refuses_a_cascade_object_asking_for_the_cloud_and_marks_what_it_answers(
        device, cloud, stream):
    """It was answered on the device, with no cascade object and no X-Ondevice-* headers, as if the policy held."""
    n0 = len(cloud.bodies)
    for asked in ({"always_defer": True}, {"threshold": 0.9}, {"keep": True}):
        r = _raw(device, asked, stream)
        assert r.status_code == 400 and RAW_REFUSED in r.json()["error"], r.text
    for kept in ({"never_defer": True}, {"keep": False}, None):  # only keeps it here: served, and marked
        r = _raw(device, kept, stream)
        last = json.loads(r.text.strip().splitlines()[-1])
        assert r.status_code == 200 and last["done"], r.text
        assert last["cascade"] == {"tier": "device", "reason": "not_applicable", "confidence": None,
                                   "device_model": device.state.model_cards()[0].id}, last
        assert r.headers["x-ondevice-tier"] == "device" and r.headers["x-ondevice-cascade"] == "not_applicable"
    assert len(cloud.bodies) == n0  # nothing reached the cloud


def test_ollamas_raw_generate_without_a_cloud_tier_names_raw_not_the_cascade_flag(smol_path):
    """A server with no --cascade said to start it with --cascade URL, which would not have served it either."""
    from ondevice.serve import BackgroundServer, ServeSettings

    with BackgroundServer(ServeSettings(model=str(smol_path), port=0, ctx=512, threads=1)) as srv:
        r = _raw(srv, {"always_defer": True}, False)
        assert r.status_code == 400 and RAW_REFUSED in r.json()["error"] and "--cascade" not in r.text, r.text
        r = _raw(srv, {"never_defer": True}, False)
        assert r.status_code == 200 and "cascade" not in r.json() and r.json()["response"], r.text
        r = httpx.post(srv.base_url + "/api/generate", json={"model": srv.state.model_cards()[0].id, "prompt": "Hi",
                       "stream": False, "cascade": {"always_defer": True}}, timeout=60)  # templated: as before
        assert r.status_code == 400 and "--cascade URL" in r.json()["error"], r.text
