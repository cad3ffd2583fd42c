"""``--body-timeout``: a request body that stops coming is answered with a 408 and its connection closed (as
nginx's client_body_timeout: the time between two reads, not the whole body), and a body sent slowly but
steadily is served. A real server on loopback, spoken to through raw sockets."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from test_serve import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def srv():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=512, threads=1, embeddings=False,
                             body_timeout=TIMEOUT)
    with BackgroundServer(settings) as s:
        yield s


def _connect(srv) -> socket.socket:
    host, port = srv.base_url.split("//")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _head(body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))


def _read_all(c: socket.socket) -> bytes:
    out = b""
    while chunk := c.recv(65536):
        out += chunk
    return out


BODY = json.dumps({"prompt": "Name a colour.", "max_tokens": 4, "temperature": 0}).encode()


def test_a_body_that_stops_coming_gets_a_408_and_is_closed(srv):
    c = _connect(srv)
    t0 = time.monotonic()
    c.sendall(_head(BODY) + BODY[:10])
    reply = _read_all(c)  # until the server closes the connection
    waited = time.monotonic() - t0
    c.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    err = json.loads(body)["error"]
    assert err["code"] == "body_timeout" and "--body-timeout" in err["message"]
    assert TIMEOUT <= waited < TIMEOUT + 3
    # counted (and logged) as the 408 it was, not as the 400 of a body cut short
    assert _count(srv, "408") == 1 and _count(srv, "400") == 0
    # nothing held: the one slot is idle and serves the next request
    assert not httpx.get(srv.base_url + "/slots").json()[0]["is_processing"]
    r = httpx.post(srv.base_url + "/v1/completions", content=BODY, headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == 200


def test_a_body_sent_slowly_but_steadily_is_served(srv):
    """Pauses shorter than the timeout, the whole body taking well over it: not cut."""
    c = _connect(srv)
    c.sendall(_head(BODY))
    t0 = time.monotonic()
    for i in range(0, len(BODY), 6):
        time.sleep(TIMEOUT * 0.4)
        c.sendall(BODY[i:i + 6])
    assert time.monotonic() - t0 > 2 * TIMEOUT
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(65536)
    c.close()
    assert head.startswith(b"HTTP/1.1 200"), head


def _count(srv, code: str) -> int:
    """The /metrics count of /v1/completions requests answered ``code``."""
    key = f'ondevice_requests_total{{route="/v1/completions",code="{code}"}} '
    lines = httpx.get(srv.base_url + "/metrics").text.splitlines()
    return sum(int(float(ln[len(key):])) for ln in lines if ln.startswith(key))


def test_a_client_that_leaves_mid_body_counts_as_gone(srv):
    """nginx's 499, as a client that leaves during its answer: not the 400 of parsing what came of the body."""
    before = _count(srv, "499")
    c = _connect(srv)
    c.sendall(_head(BODY) + BODY[:10])
    time.sleep(TIMEOUT / 4)
    c.close()
    deadline = time.monotonic() + 10
    while _count(srv, "499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(srv, "499") == before + 1 and _count(srv, "400") == 0
