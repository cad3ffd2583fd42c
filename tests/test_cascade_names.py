"""Who a cascade reply names, and cascade settings that cannot be honoured.

- A reply the cloud wrote names the cloud's model at the top level (as OpenAI-compatible routers with a fallback,
  OpenRouter and LiteLLM, name the model that answered); the device's name stays in the ``cascade`` object.
- A chat request's ``cascade`` object sent to a server with no cloud tier is refused, not served on the device.
- The library's ``Cascade`` warns, as ``serve --cascade`` does, about a threshold that defers nearly everything.

The cloud is a small OpenAI-compatible HTTP server on loopback (test_cascade_cloud_replies.FakeCloud); the device
tier is the real ``ondevice serve`` on the embedded model, reached with the official openai client.
"""

from __future__ import annotations

import json
import warnings

import httpx
import numpy as np
import pytest
from conftest import ondevice_home
from test_cascade_cloud_replies import MSG, FakeCloud, cascade_device

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

ASKED = "cloud-big"  # --cascade-model
NAMED = "cloud-big-2026-01-15"  # the name the cloud's replies give (as OpenAI's dated snapshots)


class NamingCloud(FakeCloud):
    """FakeCloud whose replies name ``reply_model`` ("" : a reply that names none)."""

    def __init__(self):
        super().__init__()
        self.reply_model = NAMED

    def _head(self, kind: str) -> dict:
        return super()._head(kind) | {"model": self.reply_model}


@pytest.fixture(scope="module")
def fake():
    f = NamingCloud()
    yield f
    f.close()


@pytest.fixture()
def cloud(fake):
    yield fake
    fake.mode, fake.reply_model = "ok", NAMED


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with ondevice_home(tmp_path_factory.mktemp("cascade-s33-home")) as d:
        yield d


@pytest.fixture(scope="module")
def device(fake, home):
    with cascade_device(fake.url, cascade_model=ASKED) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(home):
    """A server started without --cascade URL."""
    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(port=0, parallel=1, ctx=1024, threads=1, embeddings=False)
    with BackgroundServer(s) as srv:
        yield srv


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def _models(srv, stream: bool, cascade: dict) -> tuple[list[str], dict]:
    """The top-level ``model`` of the reply (of every chunk, streaming) and its cascade object."""
    kw = {"model": "x", "messages": MSG, "max_tokens": 6, "temperature": 0, "extra_body": {"cascade": cascade}}
    if not stream:
        r = _client(srv).chat.completions.create(**kw)
        return [r.model], r.model_extra["cascade"]
    models, info = [], None
    for ch in _client(srv).chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        models.append(ch.model)
        info = (ch.model_extra or {}).get("cascade") or info
    return models, info


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_reply_the_cloud_wrote_names_the_clouds_model(device, cloud, stream):
    """`model` named the device's model although `cascade.tier` was "cloud"."""
    models, info = _models(device, stream, {"always_defer": True})
    assert info["tier"] == "cloud", info
    assert set(models) == {NAMED}, models  # every chunk, the role chunk and the usage chunk included
    assert info["device_model"] == device.state.model_id and info["cloud_model"] == NAMED


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cloud_reply_that_names_no_model_is_named_by_the_model_asked_for(device, cloud, stream):
    cloud.reply_model = ""
    models, info = _models(device, stream, {"always_defer": True})
    assert info["tier"] == "cloud" and set(models) == {ASKED}, (models, info)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_reply_the_device_wrote_names_the_device_model(device, cloud, stream):
    """Kept on the device, or deferred and answered by it when the cloud failed: the device's name."""
    models, info = _models(device, stream, {"never_defer": True})
    assert info["tier"] == "device" and set(models) == {device.state.model_id}, (models, info)
    cloud.mode = "html"
    models, info = _models(device, stream, {"always_defer": True})
    assert info["tier"] == "device" and info["fallback"] == "bad_reply", info
    assert set(models) == {device.state.model_id} and info["device_model"] == device.state.model_id, models


def test_the_responses_and_messages_routes_name_who_answered(device, cloud):
    """The Responses and Messages shapes of a cloud-written answer name the cloud's model too (a Messages stream
    names its model once, in message_start, before the cascade has decided: the device's)."""
    body = {"model": "x", "max_tokens": 16, "temperature": 0, "cascade": {"always_defer": True}}
    for cascade, want in (({"always_defer": True}, NAMED), ({"never_defer": True}, device.state.model_id)):
        r = httpx.post(device.base_url + "/v1/responses", json={**body, "cascade": cascade, "input": "Hi"},
                       timeout=120).json()
        assert r["model"] == want and r["cascade"]["device_model"] == device.state.model_id, r
        m = httpx.post(device.base_url + "/v1/messages", json={**body, "cascade": cascade,
                                                               "messages": [{"role": "user", "content": "Hi"}]},
                       timeout=120).json()
        assert m["model"] == want, m
        with httpx.stream("POST", device.base_url + "/v1/responses", timeout=120,
                          json={**body, "cascade": cascade, "input": "Hi", "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        done = [e for e in events if e["type"] == "response.completed"]
        assert done and done[0]["response"]["model"] == want, events[-1]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_ollamas_routes_name_who_answered(device, cloud, stream):
    """Ollama's /api/chat and /api/generate named the client's model although the cloud answered; the device's
    answers keep the name the client gave (``name:latest``)."""
    name = f"{device.state.model_id}:latest"
    for route, extra in (("/api/chat", {"messages": MSG}), ("/api/generate", {"prompt": MSG[0]["content"]})):
        for cascade, want in (({"always_defer": True}, NAMED), ({"never_defer": True}, name)):
            r = httpx.post(device.base_url + route, timeout=120, json={
                "model": name, "stream": stream, "cascade": cascade, "options": {"temperature": 0, "num_predict": 6},
                **extra})
            lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            assert lines[-1]["done"] and lines[-1]["cascade"]["tier"] == ("cloud" if want == NAMED else "device")
            assert {x["model"] for x in lines} == {want}, (route, lines)


NO_CLOUD = ("invalid request: cascade: this server has no cloud tier: start it with `ondevice serve --cascade "
            "URL`, or leave `cascade` out (only {\"never_defer\": true} and {\"keep\": false}, which keep a request "
            "on the device, are served)")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cascade_object_without_a_cloud_tier_is_refused(plain, stream):
    """A server without --cascade URL answered on the device, ignoring a policy that asked to defer."""
    c = _client(plain)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="x", messages=MSG, max_tokens=2, stream=stream,
                                  extra_body={"cascade": {"threshold": 0.99}})
    assert e.value.status_code == 400
    assert e.value.body == {"message": NO_CLOUD, "type": "invalid_request_error", "param": "cascade",
                            "code": "invalid_value"}, e.value.body


def test_the_other_chat_routes_refuse_it_too_and_null_or_none_is_served(plain):
    base = plain.base_url + "/v1"
    r = httpx.post(base + "/responses", json={"input": "Hi", "max_output_tokens": 2, "cascade": {}}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["message"] == NO_CLOUD, r.text
    assert r.json()["error"]["param"] == "cascade"
    r = httpx.post(base + "/messages", json={"model": "x", "max_tokens": 2, "messages": MSG,
                                             "cascade": {"always_defer": True}}, timeout=120)
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": NO_CLOUD}}, r.text
    c = _client(plain)
    r = c.chat.completions.create(model="x", messages=MSG, max_tokens=2, extra_body={"cascade": None})
    assert r.choices[0].message.content is not None and (r.model_extra or {}).get("cascade") is None
    r = httpx.post(base + "/responses", json={"input": "Hi", "max_output_tokens": 2, "cascade": None}, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(base + "/messages", json={"model": "x", "max_tokens": 2, "messages": MSG}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("cascade", [{"never_defer": True}, {"keep": False}])
def test_a_policy_that_only_keeps_a_request_on_the_device_is_served_without_a_cloud_tier(plain, cascade):
    """A client marking private requests never_defer broke (HTTP 400) as soon as the cascade was turned off; what
    asks for the cloud is still refused."""
    base, model = plain.base_url, plain.state.model_id
    for route, body in (("/v1/chat/completions", {"messages": MSG, "max_tokens": 2}),
                        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "stream": True}),
                        ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
                        ("/v1/messages", {"messages": MSG, "max_tokens": 2}),
                        ("/api/chat", {"messages": MSG, "stream": False, "options": {"num_predict": 2}})):
        r = httpx.post(base + route, json={"model": model, "cascade": cascade} | body, timeout=120)
        assert r.status_code == 200 and '"tier"' not in r.text, (route, r.text)  # the device's, no cascade object
        r = httpx.post(base + route, json={"model": model, "cascade": cascade | {"always_defer": False,
                                                                                "threshold": 0.5}} | body)
        assert r.status_code == 400 and "no cloud tier" in r.text, (route, r.text)
    r = httpx.post(base + "/api/chat", json={"model": model, "messages": MSG, "stream": False,
                                             "cascade": {"neverDefer": True}}, timeout=120)
    assert r.status_code == 400 and "neverDefer" in r.text, r.text


def _low_combiner():
    """A fitted combiner whose dev confidences all lie below 0.5 (few good answers), as test_cascade_walk's."""
    from ondevice.cascade.confidence import FEATURES, Combiner

    rng = np.random.default_rng(0)
    feats = [dict.fromkeys(FEATURES, 0.0) | {"copied_bigrams": x} for x in rng.random(40)]
    comb = Combiner.fit(feats, [int(f["copied_bigrams"] > 0.95) for f in feats], l2=1000.0)
    assert comb.meta["share_thresholds"][-1][1] < 0.5
    return comb


def test_the_library_cascade_warns_of_a_threshold_that_defers_nearly_everything(smol):
    """`serve --cascade` said so at start-up; `ondevice.Cascade` with the same policy and combiner said nothing."""
    import ondevice
    from ondevice.cascade import Policy

    comb = _low_combiner()
    top = comb.meta["share_thresholds"][-1][1]
    down = "http://127.0.0.1:9/v1"  # never asked: the warning comes at construction
    with pytest.warns(UserWarning) as caught, ondevice.Cascade(smol, down, policy=Policy(threshold=0.5),
                                                               combiner=comb):
        pass
    said = [str(w.message) for w in caught]
    want = (f"policy threshold 0.5 is above 95% of the fitted combiner's dev confidences (they lie below {top:.4g}), "
            f"so nearly every request will go to the cloud; give Policy(defer_share=0.4) to defer the least "
            f"confident 40%, or a policy threshold below {top:.4g}")
    assert said == [want], said
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a share, a threshold below the dev confidences or 1: nothing to say
        for policy in (Policy(defer_share=0.4), Policy(threshold=top / 2), Policy(threshold=1.0)):
            ondevice.Cascade(smol, down, policy=policy, combiner=comb).close()


def test_the_server_and_the_library_share_one_check():
    """One check, two spellings: the server's flags (its start-up line, test_cascade_walk) and the library's."""
    from ondevice.cascade import GeometricMean, Policy
    from ondevice.cascade.policy import threshold_warning

    comb = _low_combiner()
    flags = threshold_warning(Policy(threshold=0.5), comb)
    lib = threshold_warning(Policy(threshold=0.5), comb, "policy threshold", "Policy(defer_share=0.4)")
    assert flags.startswith("--cascade-threshold 0.5 is above 95%") and "--cascade-defer-share 0.4" in flags
    assert lib.replace("policy threshold", "--cascade-threshold").replace(
        "Policy(defer_share=0.4)", "--cascade-defer-share 0.4") == flags
    assert threshold_warning(Policy(threshold=0.99), GeometricMean()) is None  # uncalibrated: no dev split
