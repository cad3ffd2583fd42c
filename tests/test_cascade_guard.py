"""The cascade against a cloud that misbehaves in ways that cost the device tier (helper-133's audit): a reply far
larger than its token cap (without usage, so the device would count it), error text that echoes the key it got, a
slow cloud and a budget, a cloud that sends its answer a few bytes at a time, a redirect loop. The cloud is a small
HTTP server on loopback; the device tier is the real ``ondevice serve`` (in-process) or the library's CloudClient,
reached through the real code path."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import ondevice_home

pytest.importorskip("fastapi")
pytest.importorskip("openai")

KEY = "sk-TEST-SECRET-134-abcdef"
MSG = [{"role": "user", "content": "Say hi"}]
BIG_MB = 8  # a reply this large, no usage: the old server tokenized it on its event loop (seconds)


def _completion(text: str, usage: bool = True) -> dict:
    out = {"id": "x", "object": "chat.completion", "created": 1, "model": "fake",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    return out | ({"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}} if usage else {})


class Cloud:
    """Modes: ``ok``; ``big`` (BIG_MB of text, no usage; streamed too); ``bigclose`` (the same with usage, no
    Content-Length: read until the connection closes); ``gzip`` (the same gzip-encoded, ~20 KB on the wire, whatever
    Accept-Encoding asked); ``echo400`` (HTTP 400 whose message has
    the Authorization header it got, twice: the second one past the 80 characters a message is cut to);
    ``echo500`` (HTTP 500, a text page with the Authorization header in it); ``slow`` (answers after 3 s);
    ``trickle`` (a whole reply sent a byte each 0.25 s, 40 s in all); ``loop`` (307 to itself); ``401``.
    ``posts``: the chat requests it got."""

    def __init__(self):
        self.mode, self.posts, self.encodings = "ok", 0, []
        cloud = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                cloud.posts += 1
                m, auth = cloud.mode, self.headers.get("Authorization") or ""
                if m == "big" and body.get("stream"):
                    return self._sse(["hello world " * 1000] * (BIG_MB * 90))
                if m == "big":
                    return self._send(200, json.dumps(_completion("hello world " * ((BIG_MB << 20) // 12), False)))
                if m == "gzip":  # compressed although asked not to be: 8 MB of text in ~20 KB
                    cloud.encodings.append(self.headers.get("Accept-Encoding"))
                    return self._send(200, json.dumps(_completion("hello world " * ((BIG_MB << 20) // 12))),
                                      extra={"Content-Encoding": "gzip"}, gzip=True)
                if m == "bigclose":  # no Content-Length: read until the connection closes
                    return self._close_with(json.dumps(_completion("hello world " * ((BIG_MB << 20) // 12))))
                if m == "echo400":
                    said = f"Received {auth}, not valid at this gateway; received {auth}"  # the 2nd one is cut
                    return self._send(400, json.dumps({"error": {"message": said}}))
                if m == "echo500":
                    return self._send(500, f"<html>upstream refused {auth}</html>", "text/html")
                if m == "401":
                    return self._send(401, json.dumps({"error": {"message": "no"}}))
                if m == "loop":
                    return self._send(307, "", extra={"Location": self.path})
                if m == "slow":
                    time.sleep(3)
                if m == "trickle":
                    return self._trickle(json.dumps(_completion("CLOUD slow")).encode())
                if body.get("stream"):
                    return self._sse(["CLOUD ", "answer."])
                return self._send(200, json.dumps(_completion("CLOUD answer.")))

            def _send(self, code, text, ctype="application/json", extra=None, gzip=False):
                data = text.encode()
                if gzip:
                    import gzip as gz

                    data = gz.compress(data)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _close_with(self, text):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for i in range(0, len(text), 1 << 16):
                        self.wfile.write(text[i:i + (1 << 16)].encode())
                except OSError:  # the client stopped reading: as it should
                    pass
                self.close_connection = True

            def _sse(self, pieces):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                head = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "fake"}
                try:
                    for p in pieces:
                        d = head | {"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(d)}\n\n".encode())
                    d = head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                    self.wfile.write(f"data: {json.dumps(d)}\n\ndata: [DONE]\n\n".encode())
                except OSError:  # the client stopped reading: as it should
                    pass
                self.close_connection = True

            def _trickle(self, data: bytes):
                data = b" " * 160 + data
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.25 if i < 160 else 0)
                except OSError:
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def cloud():
    c = Cloud()
    yield c
    c.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with ondevice_home(tmp_path_factory.mktemp("cascade-guard-home")) as d:
        yield d


def _server(url: str, **settings):
    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(port=0, parallel=2, ctx=1024, threads=1, embeddings=False, cascade=url, **settings)
    return BackgroundServer(s)


@pytest.fixture(scope="module")
def device(cloud, home):
    mp = pytest.MonkeyPatch()
    mp.setenv("ONDEVICE_CLOUD_KEY", KEY)  # read when the server's cloud client is made
    try:
        with _server(cloud.url, cascade_timeout=30) as srv:
            yield srv
    finally:
        mp.undo()


def _ask(srv, stream=False, max_tokens=8) -> tuple[str, dict]:
    """One always_defer chat request: the reply's text and its cascade object."""
    body = {"model": "x", "messages": MSG, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "cascade": {"always_defer": True}}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        d = r.json()
        return d["choices"][0]["message"]["content"], d["cascade"]
    text, info = "", None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            ch = json.loads(line[6:])
            text += "".join(c["delta"].get("content") or "" for c in ch.get("choices", []))
            info = ch.get("cascade") or info
    return text, info


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_huge_cloud_reply_without_usage_is_a_too_large_fallback_and_the_server_stays_responsive(device, cloud,
                                                                                                  stream):
    cloud.mode = "big"
    waits, done = [], threading.Event()

    def probe():
        while not done.is_set():
            t = time.perf_counter()
            httpx.get(device.base_url + "/health", timeout=60)
            waits.append(time.perf_counter() - t)
            time.sleep(0.05)

    th = threading.Thread(target=probe)
    th.start()
    try:
        text, info = _ask(device, stream)
    finally:
        done.set()
        th.join()
        cloud.mode = "ok"
    assert info["tier"] == "device" and info["fallback"] == "too_large", info
    assert "hello world" not in text and text.strip()  # the device's answer, none of the cloud's
    assert "too large a reply" in info["error"]
    assert waits and max(waits) < 1.5, waits  # the event loop was never held (it took seconds to count 8 MB)
    assert _ask(device, stream)[1]["tier"] == "cloud"  # and the next deferral is answered


def test_cloud_error_text_never_shows_the_key_to_clients_or_the_log(device, cloud, capfd):
    for mode in ("echo400", "echo500"):
        cloud.mode = mode
        try:
            _, info = _ask(device)
        finally:
            cloud.mode = "ok"
        assert info["fallback"] in ("http_400", "http_500") and "***" in info["error"], info
        assert KEY not in info["error"] and KEY[:12] not in info["error"], info["error"]
        assert len(info["error"]) <= 600
    _ask(device)  # the cloud answers again: the log says so
    err = capfd.readouterr().err
    assert "cascade: the cloud at" in err and "***" in err and KEY[:12] not in err


def test_error_text_hides_the_urls_password_and_its_basic_form(cloud):
    from ondevice.cascade.cloud import CloudClient, CloudError

    secret = "PASSWD-134-xyz"
    for mode in ("echo400", "echo500"):
        cloud.mode = mode
        c = CloudClient(cloud.url.replace("://", f"://alice:{secret}@"), model="fake", key_env="UNSET_KEY_134",
                        timeout=10)
        try:
            with pytest.raises(CloudError) as e:
                c.chat(MSG, max_tokens=4)
        finally:
            cloud.mode = "ok"
            c.close()
        basic = base64.b64encode(f"alice:{secret}".encode()).decode()
        assert secret not in str(e.value) and basic[:12] not in str(e.value) and "***" in str(e.value), e.value


def test_the_budget_charges_deferrals_the_cloud_got_even_when_it_was_too_slow(cloud, home):
    """budget 0.5: of 4 deferrals at most 2 reach the cloud, even when each times out (they were sent, and may be
    billed); the old refund let 3 through."""
    cloud.mode = "slow"
    try:
        with _server(cloud.url, cascade_timeout=1, cascade_budget=0.5, cascade_window=600) as srv:
            before = cloud.posts
            infos = [_ask(srv)[1] for _ in range(4)]
    finally:
        cloud.mode = "ok"
    assert cloud.posts - before == 2, infos
    assert [i["reason"] for i in infos].count("over_budget") == 2
    assert [i["fallback"] for i in infos if i["reason"] == "always_defer"] == ["timeout", "timeout"]


def test_a_refused_connection_is_not_charged_to_the_budget(home):
    """A request the cloud never got costs nothing: the budget lets the next one try."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with _server(f"http://127.0.0.1:{port}/v1", cascade_model="m", cascade_budget=0.5,
                 cascade_window=600) as srv:
        infos = [_ask(srv)[1] for _ in range(3)]
    assert [i["fallback"] for i in infos] == [None, "unreachable", "unreachable"], infos


@pytest.mark.parametrize("offline", [False, True], ids=["library", "eval"])
def test_the_sync_door_gives_up_after_the_timeout_for_the_whole_answer(cloud, offline):
    """A cloud that sends its answer a byte at a time (each read well within the timeout) is given up on after
    ``timeout`` seconds in all, as the server does: the library, and eval / cascade fit's retrying client."""
    from ondevice.cascade.cloud import CloudClient, CloudError
    from ondevice.eval.cascade_curve import offline_cloud

    c = offline_cloud(cloud.url, "fake", None, 1.5) if offline else CloudClient(cloud.url, model="fake", timeout=1.5)
    cloud.mode = "trickle"
    t = time.perf_counter()
    try:
        with pytest.raises(CloudError) as e:
            c.chat(MSG, max_tokens=4)
    finally:
        cloud.mode = "ok"
    took = time.perf_counter() - t
    assert e.value.kind == "timeout" and took < 4, (e.value, took)  # the trickle lasts 40 s
    assert c.chat(MSG, max_tokens=4).text == "CLOUD answer."  # the client still works
    c.close()


def test_a_redirect_loop_and_refused_url_credentials_are_said_as_such(cloud, monkeypatch):
    from ondevice.cascade.cloud import CloudClient, CloudError

    monkeypatch.delenv("ONDEVICE_CLOUD_KEY", raising=False)
    c = CloudClient(cloud.url.replace("://", "://alice:pw-134-secret@"), model="fake", timeout=10)
    try:
        for mode, kind, said in (("loop", "redirect_loop", "redirect loop"), ("401", "http_401", "user:pass@")):
            cloud.mode = mode
            with pytest.raises(CloudError) as e:
                c.chat(MSG, max_tokens=4)
            assert e.value.kind == kind and said in str(e.value), e.value
    finally:
        cloud.mode = "ok"
        c.close()


def test_a_streamed_messages_reply_says_who_answered_as_the_others_do(device, cloud):
    """A streamed /v1/messages reply carried no ``cascade`` object (only the X-Ondevice-* headers)."""
    for cascade, tier in (({"always_defer": True}, "cloud"), ({"never_defer": True}, "device")):
        r = httpx.post(device.base_url + "/v1/messages", timeout=120, json={
            "model": "x", "max_tokens": 4, "stream": True, "messages": MSG, "cascade": cascade})
        deltas = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
        deltas = [d for d in deltas if d["type"] == "message_delta"]
        assert len(deltas) == 1 and deltas[0]["cascade"]["tier"] == tier == r.headers["x-ondevice-tier"], r.text


def test_eval_stops_at_the_first_refused_key_instead_of_answering_every_item(cli, cloud):
    """A 401 repeats on every item: eval --cascade (and cascade fit, the same client) decoded the device's answer to
    each and failed only at the end."""
    cloud.mode = "401"
    try:
        before = cloud.posts
        r = cli("eval", "--cascade", cloud.url, "--cloud-model", "fake", "--suite", "rewrite", "--split", "test",
                "--limit", "3", "--max-tokens", "4", "--threads", "1", "--no-store", timeout=300)
    finally:
        cloud.mode = "ok"
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert cloud.posts - before == 1 and not [x for x in r.stderr.splitlines() if x.startswith("  [")], r.stderr
    assert "HTTP 401: it refused the key" in r.stderr and "none more is asked" in r.stderr, r.stderr


def _refused(cloud, mode: str):
    """The CloudError a chat of 8 tokens gets from the fake cloud in ``mode``."""
    from ondevice.cascade.cloud import CloudClient, CloudError

    c = CloudClient(cloud.url, model="fake", timeout=30)
    cloud.mode = mode
    try:
        with pytest.raises(CloudError) as e:
            c.chat(MSG, max_tokens=8)
    finally:
        cloud.mode = "ok"
        c.close()
    return e


def test_a_reply_with_no_content_length_is_read_only_up_to_its_cap(cloud):
    """The cap holds where the reply does not say its size up front: reading stops past it (1 MiB here)."""
    e = _refused(cloud, "bigclose")
    assert e.value.kind == "too_large" and "its reply passed" in str(e.value), e.value


def test_a_compressed_reply_cannot_expand_past_the_cap(cloud):
    """The cap counts bytes on the wire: the cloud is asked for an uncompressed reply, and one compressed anyway is
    held to a cap 100 times smaller (8 MB of text arrives as ~20 KB of gzip)."""
    e = _refused(cloud, "gzip")
    # refused on its ~20 KB on the wire, before 8 MB were decoded (the text cap would say "characters of text")
    assert e.value.kind == "too_large" and " bytes, over the 10485 bytes" in str(e.value), e.value
    assert cloud.encodings[-1] == "identity", cloud.encodings
