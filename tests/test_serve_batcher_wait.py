"""Requests that wait on the batcher thread for work other than generation (embeddings, slot files): a client
that leaves while its request is queued there costs no compute, and a stopping server answers them at once with
its 503 ``shutting_down`` (not the 500 and traceback of a handler cancelled at the end of the graceful
shutdown). The batcher thread is held by a call of the test's own, so "queued" is certain, not a race."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ondevice.serve import BackgroundServer, ServeSettings


@pytest.fixture
def srv(smol_path):
    settings = ServeSettings(model=str(smol_path), port=0, parallel=1, ctx=256, threads=1, embeddings_ctx=128)
    with BackgroundServer(settings) as s:
        yield s


def _hold(srv) -> threading.Event:
    """Hold the batcher thread (a call that waits); set the event to let it go."""
    started, release = threading.Event(), threading.Event()
    srv.state.batcher.call(lambda: started.set() or release.wait(60))
    assert started.wait(30)  # running, out of the queue
    return release


def _count(srv, code: int) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text
    key = f'ondevice_requests_total{{route="/v1/embeddings",code="{code}"}} '
    return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(key)), 0.0)


def _until(what, ok, limit=20.0):
    end = time.monotonic() + limit
    while not ok():
        assert time.monotonic() < end, f"{what} did not happen in {limit} s"
        time.sleep(0.05)


def test_an_embedding_whose_client_left_while_queued_is_never_computed(srv, monkeypatch):
    from ondevice.serve import state

    ran, embed_batch = [], state.embed_batch
    monkeypatch.setattr(state, "embed_batch", lambda *a, **k: ran.append(1) or embed_batch(*a, **k))  # counted
    release = _hold(srv)
    try:
        with pytest.raises(httpx.TimeoutException):  # the client leaves while its request waits
            httpx.post(srv.base_url + "/v1/embeddings", json={"input": ["a cat", "a dog"]}, timeout=0.5)
        _until("the 499 while the batcher is still held", lambda: _count(srv, 499) == 1)
    finally:
        release.set()
    r = httpx.post(srv.base_url + "/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert ran == [1]  # only the last request's pack: the one whose client left was dropped, not computed


def test_a_stopping_server_answers_a_queued_embedding_503_at_once(srv):
    release = _hold(srv)
    got = {}
    t = threading.Thread(target=lambda: got.update(r=httpx.post(srv.base_url + "/v1/embeddings",
                                                                json={"input": "hello"}, timeout=60)))
    try:
        t.start()
        _until("the request queued behind the held call", lambda: len(srv.state.batcher.calls) == 1)
        srv.app.state.end_requests()  # what the server calls as it begins to stop (SIGTERM, Ctrl-C)
        t.join(timeout=20)
        assert not t.is_alive(), "the queued request was not answered while the batcher was held"
    finally:
        release.set()
    r = got["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
