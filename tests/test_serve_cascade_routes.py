"""The cascade on the routes beside OpenAI's chat route: Ollama's /api/chat takes the request's ``cascade`` policy
(``never_defer`` keeps a private request on the device) and says which tier answered; a cloud stream that fails
after its first text ends the Messages, Responses and Ollama streams as a failure, as the chat route's ends with
finish_reason "error", not as a finished answer. The cloud is a fake OpenAI server on loopback
(tests/test_cascade_cloud_replies.py), the device the real ``ondevice serve``."""

# ruff: noqa: F811 (the fixtures of test_cascade_cloud_replies, imported, are the tests' parameters)
from __future__ import annotations

import json

import httpx
import pytest
from test_cascade_cloud_replies import CLOUD_PIECES, device, fake, home  # noqa: F401 (fixtures)

pytest.importorskip("fastapi")

PRIVATE = [{"role": "user", "content": "Rewrite formally, my card is 4111 1111 1111 1111: send me the slides"}]


@pytest.fixture()
def cloud(fake):
    yield fake
    fake.mode = "ok"


def _ollama_chat(srv, cascade: dict, stream: bool = False) -> list[dict]:
    body = {"model": srv.state.model_cards()[0].id, "messages": PRIVATE, "stream": stream, "cascade": cascade,
            "options": {"num_predict": 6, "temperature": 0}}
    r = httpx.post(srv.base_url + "/api/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_ollamas_chat_route_keeps_a_never_defer_request_on_the_device_and_says_who_answered(device, cloud):
    n = len(cloud.bodies)
    (kept,) = _ollama_chat(device, {"never_defer": True})
    assert len(cloud.bodies) == n  # the private request never reached the cloud (it did, and was kept, before)
    assert kept["cascade"]["tier"] == "device" and kept["done"]
    (sent,) = _ollama_chat(device, {"always_defer": True})
    assert sent["message"]["content"] == "".join(CLOUD_PIECES) and sent["cascade"]["tier"] == "cloud"
    assert cloud.bodies[-1]["messages"][-1]["content"] == PRIVATE[0]["content"]
    *_, last = _ollama_chat(device, {"always_defer": True}, stream=True)
    assert last["done"] and last["cascade"]["tier"] == "cloud"
    r = httpx.post(device.base_url + "/api/chat", json={"model": device.state.model_cards()[0].id, "stream": False,
                                                       "messages": PRIVATE, "cascade": {"threshold": 7}}, timeout=60)
    assert r.status_code == 400 and "threshold" in r.json()["error"]


def test_cascade_on_ollamas_routes_without_a_cloud_tier_is_a_400_that_says_how_to_get_one(smol_path):
    from ondevice.serve import BackgroundServer, ServeSettings

    with BackgroundServer(ServeSettings(model=str(smol_path), port=0, ctx=512, threads=1)) as srv:
        for route, extra in (("/api/chat", {"messages": PRIVATE}), ("/api/generate", {"prompt": "Hi"})):
            r = httpx.post(srv.base_url + route, json={"model": srv.state.model_cards()[0].id, "stream": False,
                                                       "cascade": {"always_defer": True}, **extra}, timeout=60)
            assert r.status_code == 400 and "--cascade" in r.json()["error"], r.text  # never_defer: served


def _events(srv, path: str, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed reply (Ollama's lines: ("", object))."""
    out = []
    with httpx.stream("POST", srv.base_url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                out.append((name, json.loads(line[6:])))
            elif line.startswith("{"):
                out.append(("", json.loads(line)))
    return out


def test_a_cloud_stream_cut_after_its_first_text_ends_every_api_as_a_failure_not_a_finished_answer(device, cloud):
    cloud.mode = "cut"  # two pieces of text, then the connection closes: no finish_reason, no [DONE]
    ask = {"cascade": {"always_defer": True}, "stream": True}
    ev = _events(device, "/v1/messages", {"model": "x", "max_tokens": 8, "messages": PRIVATE, **ask})
    names = [n for n, _ in ev]
    assert "content_block_delta" in names and names[-1] == "error" and "message_stop" not in names
    assert "cut off" in ev[-1][1]["error"]["message"] and ev[-1][1]["error"]["type"] == "api_error"
    ev = _events(device, "/v1/responses", {"model": "x", "max_output_tokens": 8, "input": PRIVATE[0]["content"],
                                           **ask})
    names = [n for n, _ in ev]
    assert "response.output_text.delta" in names and names[-1] == "response.failed"
    assert "response.completed" not in names and ev[-1][1]["response"]["status"] == "failed"
    ev = _events(device, "/api/chat", {"model": device.state.model_cards()[0].id, "messages": PRIVATE,
                                       "options": {"num_predict": 8}, **ask})
    assert ev[0][1]["message"]["content"] and "cut off" in ev[-1][1]["error"]
    assert not any(o.get("done") for _, o in ev)


def test_a_streamed_messages_reply_the_cloud_answers_names_the_clouds_model_from_its_start(device, cloud):
    ev = _events(device, "/v1/messages", {"model": "x", "max_tokens": 8, "messages": PRIVATE, "stream": True,
                                          "cascade": {"always_defer": True}})
    assert ev[0][0] == "message_start" and ev[0][1]["message"]["model"] == "fake"  # the fake cloud's name
    assert ev[-1][0] == "message_stop"


def test_a_streamed_request_the_cascade_does_not_apply_to_says_the_device_answered_as_a_whole_one_does(device, cloud):
    body = {"model": "x", "max_tokens": 4, "messages": PRIVATE, "response_format": {"type": "json_object"}}
    whole = httpx.post(device.base_url + "/v1/chat/completions", json=body, timeout=120)
    with httpx.stream("POST", device.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        headers = r.headers
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for h in ("x-ondevice-tier", "x-ondevice-cascade"):
        assert headers.get(h) == whole.headers.get(h) and headers.get(h)
    last = next(c for c in reversed(chunks) if c["choices"] and c["choices"][0]["finish_reason"])
    assert last["cascade"]["reason"] == whole.json()["cascade"]["reason"] == "not_applicable"


def test_a_cloud_answer_does_not_carry_the_devices_stop_string(device, cloud):
    r = httpx.post(device.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "x", "max_tokens": 24, "temperature": 0, "messages": PRIVATE, "stop": ["\n", "."],
        "cascade": {"always_defer": True}}).json()
    assert r["cascade"]["tier"] == "cloud" and r["choices"][0].get("stop_reason") is None
