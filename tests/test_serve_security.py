"""`ondevice serve` against what a web page, a slow or oversized client, or a local user can send: a live server
on loopback, raw sockets and httpx (serve/http.py's Gate and log, serve/server.py's head limits, slot links)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import httpx
import pytest
from test_serve import _model_path

from ondevice.serve import BackgroundServer, ServeSettings
from ondevice.serve.http import Gate, host_allowed, origin_allowed


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    slots = tmp_path_factory.mktemp("slots")
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=1, embeddings=False,
                             slot_save_path=str(slots), header_timeout=1.5)
    with BackgroundServer(settings) as s:
        s.slots = slots
        yield s


def _port(s) -> int:
    return int(s.base_url.rsplit(":", 1)[1])


def _chat():
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def test_a_page_on_another_site_is_refused_before_any_work(srv):
    """A browser's no-cors POST (text/plain, no preflight) from another origin: a 403, the model never runs; a
    page on this machine and clients without Origin (openai, curl) go on as before."""
    import json

    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain;charset=UTF-8"}
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=json.dumps(_chat()), headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "--cors https://evil.example" in r.json()["error"]["message"]
    r = httpx.post(srv.base_url + "/slots/0?action=save", json={"filename": "csrf.bin"}, headers=evil)
    assert r.status_code == 403 and not (srv.slots / "csrf.bin").exists()
    for path in ("/props", "/health", "/api/tags", "/nowhere"):  # every route, the public ones too
        assert httpx.get(srv.base_url + path, headers=evil).status_code == 403, path
    r = httpx.options(srv.base_url + "/v1/chat/completions", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403
    port = _port(srv)
    for own in (f"127.0.0.1:{port}", f"localhost:{port}"):  # the server's own pages (its /docs): same origin
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=_chat(), headers={"Origin": f"http://{own}",
                                                                                      "Host": own})
        assert r.status_code == 200, own
    rebound = {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"}  # same origin, rebound name
    assert httpx.post(srv.base_url + "/v1/chat/completions", json=_chat(), headers=rebound).status_code == 403
    ok = httpx.post(srv.base_url + "/v1/chat/completions", json=_chat(), headers={"Origin": "http://localhost:5173"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert httpx.post(srv.base_url + "/v1/chat/completions", json=_chat()).status_code == 200  # no Origin


def test_dns_rebinding_host_is_refused_on_loopback(srv):
    port = _port(srv)
    r = httpx.get(srv.base_url + "/props", headers={"Host": f"rebind.evil.example:{port}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert "--allowed-hosts rebind.evil.example" in r.json()["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", f"app.localhost:{port}",
                 f"LOCALHOST.:{port}", f"10.1.2.3:{port}"):
        assert httpx.get(srv.base_url + "/health", headers={"Host": host}).status_code == 200, host


def test_refusals_are_counted_in_metrics(srv):
    """A 403 from the gate counts in requests_total as the app's own 401s and 413s do (monitoring adds up)."""
    def refused() -> int:
        text = httpx.get(srv.base_url + "/metrics").text
        key = 'ondevice_requests_total{route="/v1/models",code="403"}'
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
        return int(line.split()[-1]) if line else 0

    before = refused()
    for _ in range(3):
        assert httpx.get(srv.base_url + "/v1/models", headers={"Host": "rebind.evil.example"}).status_code == 403
    assert refused() == before + 3


def test_host_and_origin_rules():
    assert host_allowed("0.0.0.0", None) is None and host_allowed("192.168.1.5", None) is None  # not checked
    assert host_allowed("127.0.0.1", "*") is None
    ok = host_allowed("127.0.0.1", "api.example.com,.corp.example")
    assert ok(b"api.example.com:443") and ok(b"x.corp.example") and ok(b"corp.example") and ok(b"localhost")
    assert not ok(b"evil.example") and not ok(b"api.example.com.evil.example") and not ok(b"xcorp.example")
    lan = host_allowed("0.0.0.0", "box.lan")  # given: checked on any bind
    assert lan(b"box.lan:8080") and lan(b"192.168.1.5:8080") and not lan(b"evil.example")
    assert host_allowed("localhost", None)(b"localhost:1") and host_allowed("::1", None)(b"[::1]:8080")
    local = origin_allowed("local")
    assert local("http://localhost:3000") and local("app://obsidian.md") and not local("http://localhost.evil.com")
    assert not local("null") and not origin_allowed("none")("http://localhost")
    assert origin_allowed("*")("https://any.example")
    # the server's own pages (its /docs) send Origin on a same-origin POST: let in whatever --cors says, unless
    # the name could be a rebound one (a name on a server whose Host is not checked)
    own = {"type": "http", "headers": [(b"origin", b"http://192.168.1.5:8080"), (b"host", b"192.168.1.5:8080")]}
    for cors, bound in (("none", "127.0.0.1"), ("local", "0.0.0.0"), ("https://app.example", "0.0.0.0")):
        assert Gate(None, cors=cors, bound=bound, allowed_hosts=None).refusal(own) is None, (cors, bound)
    named = {"type": "http", "headers": [(b"origin", b"http://box.lan:8080"), (b"host", b"box.lan:8080")]}
    assert Gate(None, cors="local", bound="0.0.0.0", allowed_hosts=None).refusal(named)[0] == "origin_not_allowed"
    assert Gate(None, cors="local", bound="0.0.0.0", allowed_hosts="box.lan").refusal(named) is None
    listed = origin_allowed("https://app.example.com, http://localhost:3000")
    assert listed("https://app.example.com") and not listed("https://evil.example")


def test_allowed_hosts_setting():
    from ondevice.errors import InvalidArgument
    from ondevice.serve.settings import settings_from_args

    assert settings_from_args(None, allowed_hosts="api.example.com,.corp.example").allowed_hosts
    assert settings_from_args(None, allowed_hosts="*").allowed_hosts == "*"
    with pytest.raises(InvalidArgument, match="--allowed-hosts.*'https://x.example' is not a host name"):
        settings_from_args(None, allowed_hosts="https://x.example")


def _health_ms(srv) -> float:
    t0 = time.perf_counter()
    assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
    return (time.perf_counter() - t0) * 1e3


def test_an_endless_header_line_gets_a_431_and_the_server_stays_fast(srv):
    s = socket.create_connection(("127.0.0.1", _port(srv)), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    t0, sent, closed = time.monotonic(), 0, False
    try:
        while sent < 1 << 20:
            s.sendall(b"a" * 16384)
            sent += 16384
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    try:
        reply = s.recv(4096)
    except ConnectionResetError:
        reply = b""
    s.close()
    assert closed or reply.startswith(b"HTTP/1.1 431") or reply == b"", reply[:80]
    assert time.monotonic() - t0 < 5
    assert _health_ms(srv) < 1000
    big = "a" * 8000  # an ordinary large header (a long cookie or token) still passes
    assert httpx.get(srv.base_url + "/health", headers={"X-Token": big}).status_code == 200


def _one_read(srv, raw: bytes) -> bytes:
    """``raw`` sent in one write; the reply's first line."""
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=30) as s:
        s.sendall(raw)
        return s.makefile("rb").readline()


def test_request_heads_over_64_kib_that_come_in_one_read_get_a_431_too(srv):
    """The 64 KiB limit was counted only for heads that spanned reads: one header of 70,000 bytes, or 80 headers
    of 1,000, sent in one write got a 200, and a 66,000-byte request line a bare 400 "Invalid HTTP request"."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    assert _one_read(srv, head + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    many = b"".join(b"X-H%d: " % i + b"a" * 1000 + b"\r\n" for i in range(80))
    assert _one_read(srv, head + many + b"\r\n").startswith(b"HTTP/1.1 431")
    assert _one_read(srv, b"GET /health?" + b"a" * 66_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     ).startswith(b"HTTP/1.1 431")
    assert _one_read(srv, head + b"X-Ok: " + b"a" * 60_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    # a body is not the head: 300 KB of JSON in the same write as its headers is read as ever
    body = json.dumps({"content": "a " * 150_000}).encode()
    post = (b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert _one_read(srv, post).startswith(b"HTTP/1.1 200")
    # two requests in one write (pipelined): both answered
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=30) as s:
        s.sendall(head + b"\r\n" + head + b"Connection: close\r\n\r\n")
        replies = s.makefile("rb").read()
    assert replies.count(b"HTTP/1.1 200") == 2, replies


def test_a_half_sent_request_is_disconnected_after_the_header_timeout(srv):
    """Slowloris: a request's headers sent a byte at a time, or a part and then nothing, or nothing at all."""
    port = _port(srv)
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # connects and sends nothing
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    drip = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    drip_closed = None
    for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        try:
            drip.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            drip_closed = time.monotonic() - t0
            break
        time.sleep(0.2)
    assert drip_closed is not None and drip_closed < 4, drip_closed  # header_timeout is 1.5 s here
    assert idle.recv(4096) == b""  # asked nothing (a browser's preconnect): closed without a reply
    idle.close()
    assert stalled.recv(4096).startswith(b"HTTP/1.1 408")
    assert stalled.recv(4096) == b""  # then closed
    stalled.close()
    drip.close()
    # a kept-alive connection's next request has the same limit; a whole request is answered as ever
    ka = socket.create_connection(("127.0.0.1", port), timeout=10)
    ka.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert ka.recv(4096).startswith(b"HTTP/1.1 200")
    ka.sendall(b"GET /health HTTP/1.1\r\n")
    assert ka.recv(4096).startswith(b"HTTP/1.1 408")
    ka.close()


def test_log_lines_escape_control_characters(srv):
    forged = "/x%0d%0a2026-12-06%2016:40:00%20192.168.1.50%20POST%20/v1/chat/completions%20200"
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ondevice.access")
    logger.addHandler(handler)
    try:
        httpx.get(srv.base_url + forged)
        deadline = time.monotonic() + 5  # the line is written once the reply is sent
        while not any("/x" in m for m in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
    lines = [m for m in lines if "/x" in m]
    assert lines and all("\r" not in m and "\n" not in m for m in lines), lines
    assert "/x\\r\\n2026-12-06" in lines[0]


def test_slot_files_never_follow_a_link(srv, tmp_path):
    """A link placed in --slot-save-path: save and restore refuse it (400 naming it); the target is untouched
    and no folder is made through a dangling one."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (srv.slots / "innocent.bin").symlink_to(victim)
    (srv.slots / "dangling.bin").symlink_to(tmp_path / "newdir" / "made.bin")
    assert httpx.post(srv.base_url + "/v1/chat/completions", json=_chat(), timeout=60).status_code == 200
    for name in ("innocent.bin", "dangling.bin"):
        for action in ("save", "restore"):
            r = httpx.post(srv.base_url + f"/slots/0?action={action}", json={"filename": name}, timeout=60)
            assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"], (name, action, r.text)
    assert victim.read_text() == "keep me" and not (tmp_path / "newdir").exists()
    r = httpx.post(srv.base_url + "/slots/0?action=save", json={"filename": "plain.bin"}, timeout=60)
    assert r.status_code == 200 and not os.path.islink(srv.slots / "plain.bin")
    assert httpx.post(srv.base_url + "/slots/0?action=restore", json={"filename": "plain.bin"},
                      timeout=60).status_code == 200
    fifo = srv.slots / "fifo.bin"
    os.mkfifo(fifo)
    # a FIFO would block the batcher's thread: refused, both ways, as a name the client must change
    for action in ("restore", "save"):
        r = httpx.post(srv.base_url + f"/slots/0?action={action}", json={"filename": "fifo.bin"}, timeout=20)
        assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"], (action, r.text)
    assert fifo.is_fifo()


def test_a_non_ascii_api_key_matches(tmp_path):
    key = "clé-秘密"
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=1, embeddings=False,
                             api_key=key)
    with BackgroundServer(settings) as s:
        url = s.base_url + "/v1/models"
        assert httpx.get(url, headers={"Authorization": b"Bearer " + key.encode()}).status_code == 200
        assert httpx.get(url, headers={"x-api-key": key.encode()}).status_code == 200
        assert httpx.get(url, headers={"Authorization": b"Bearer " + key.encode("latin-1", "replace")}
                         ).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer cle"}).status_code == 401
