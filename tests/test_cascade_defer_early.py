"""A non-streamed request its policy defers whatever the device answers (``always_defer``) does not wait for the
device's whole answer before the cloud is asked: the cloud gets it while the device still decodes, and the cloud's
answer ends the device's job (its slot is free). The device tier is the real ``ondevice serve``; the cloud a fake
OpenAI server on loopback that answers when the test lets it (test_cascade_cloud_replies.FakeCloud)."""

# ruff: noqa: F811 (the fixtures of test_cascade_cloud_replies, imported, are the tests' parameters)
from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_cascade_cloud_replies import CLOUD_PIECES, MSG, device, fake, home  # noqa: F401 (fixtures)

pytest.importorskip("fastapi")

LONG = 900  # device tokens asked for (ignore_eos: it would decode all of them)


@pytest.fixture()
def cloud(fake):
    fake.gate.clear()
    yield fake
    fake.gate.set()  # a request still held is answered
    fake.mode = "ok"


def _busy(srv) -> int:
    return httpx.get(srv.base_url + "/health").json()["slots_processing"]


def _until(cond, within: float = 60.0) -> bool:
    """Poll ``cond`` until true (a bound on waiting, not a speed assertion)."""
    end = time.monotonic() + within
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def test_the_cloud_is_asked_while_the_device_decodes_and_its_answer_ends_the_devices_job(device, cloud):
    cloud.mode = "gated"
    n = len(cloud.bodies)
    body = {"model": "x", "messages": MSG, "max_tokens": LONG, "ignore_eos": True, "temperature": 0,
            "cascade": {"always_defer": True}}
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=httpx.post(device.base_url + "/v1/chat/completions", json=body,
                                                                timeout=180)))
    t.start()
    try:
        assert _until(lambda: len(cloud.bodies) > n), "the request never reached the cloud"
        busy = _busy(device)  # the device's job, still decoding while the cloud is asked
    finally:
        cloud.gate.set()
        t.join(180)
    assert busy == 1  # before: the device's whole answer (900 tokens) came first, its slot free by then
    r = out["r"].json()
    info = r["cascade"]
    assert r["choices"][0]["message"]["content"] == "".join(CLOUD_PIECES) and info["tier"] == "cloud", r
    assert info["reason"] == "always_defer" and info["confidence"] is not None
    assert 0 < info["device_usage"]["completion_tokens"] < LONG
    assert _until(lambda: _busy(device) == 0)  # the cloud's answer ended the device's job


def test_when_the_cloud_fails_the_device_answer_is_whole_and_marked(device, cloud):
    cloud.mode = "html_500"
    kw = {"model": "x", "messages": MSG, "max_tokens": 24, "temperature": 0}
    kept = httpx.post(device.base_url + "/v1/chat/completions", json={**kw, "cascade": {"never_defer": True}},
                      timeout=120).json()
    r = httpx.post(device.base_url + "/v1/chat/completions", json={**kw, "cascade": {"always_defer": True}},
                   timeout=120).json()
    assert r["cascade"]["tier"] == "device" and r["cascade"]["fallback"] == "http_500", r
    assert r["choices"][0]["message"]["content"] == kept["choices"][0]["message"]["content"]
    assert r["choices"][0]["finish_reason"] == kept["choices"][0]["finish_reason"]
    assert r["usage"]["completion_tokens"] == kept["usage"]["completion_tokens"]
