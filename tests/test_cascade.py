"""Device -> cloud cascade: confidence, policy, curve, rewrite metric (unit); and end to end with a REAL cloud
tier: a second ``ondevice serve`` process on loopback, reached over HTTP with the openai client, killed
mid-run for the leak test."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import ondevice_home

from ondevice.cascade.confidence import (
    FEATURES,
    TEXT_FEATURES,
    TOKEN_FEATURES,
    Combiner,
    GeometricMean,
    features,
    labels_for,
    request_text,
    roc_auc,
    split_of,
    text_features,
)
from ondevice.cascade.policy import Budget, Policy, RequestPolicy, decide, with_combiner
from ondevice.errors import InvalidArgument

# -- confidence ------------------------------------------------------------------------------------------


def test_token_stats_match_float64_reference():
    from ondevice.engine.logprobs import log_softmax, token_stats

    rng = np.random.default_rng(0)
    row = (rng.standard_normal(49152) * 4).astype(np.float32)
    lp_ref = log_softmax(row)
    p = np.exp(lp_ref)
    for tok in (0, int(row.argmax()), 1234):
        lp, ent = token_stats(row, tok)
        assert lp == pytest.approx(lp_ref[tok], abs=1e-4)
        assert ent == pytest.approx(float(-(p * lp_ref).sum()), rel=1e-4)


def test_features_are_length_normalised_summaries():
    f = features([-0.1, -2.0, -0.3], [0.5, 2.5, 1.0])
    assert f["mean_logprob"] == pytest.approx(-0.8)
    assert f["min_logprob"] == -2.0
    assert f["max_entropy"] == 2.5 and f["mean_entropy"] == pytest.approx(4.0 / 3)
    assert f["unsure_share"] == pytest.approx(1 / 3)  # only -2.0 is below log(0.5)
    assert f["log_tokens"] == pytest.approx(math.log(4))
    assert features([], [])["mean_logprob"] == 0.0
    assert GeometricMean().predict(f) == pytest.approx(math.exp(-0.8))


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(1)
    s, y = rng.random(40).round(1), rng.integers(0, 2, 40)  # rounding makes ties
    pairs = [(a, b) for a, ya in zip(s, y) for b, yb in zip(s, y) if ya == 1 and yb == 0]
    ref = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(s, y) == pytest.approx(ref)


def test_combiner_learns_a_separable_rule_and_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    feats, labels = [], []
    for _ in range(200):
        good = rng.random() < 0.5
        mlp = rng.normal(-0.3 if good else -1.5, 0.4)
        feats.append(features([mlp, mlp - 0.2], [rng.random(), rng.random()]))
        labels.append(int(good))
    c = Combiner.fit(feats, labels, features=TOKEN_FEATURES, meta={"suite": "synthetic"})
    assert c.meta["dev_auc"] > 0.9
    assert c.predict(features([-0.1], [0.1])) > 0.8
    assert c.predict(features([-3.0], [3.0])) < 0.2
    back = Combiner.load(c.save(tmp_path / "c.json"))
    assert back.predict(feats[0]) == pytest.approx(c.predict(feats[0]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="cascade fit"):
        Combiner.load(tmp_path / "bad.json")
    with pytest.raises(InvalidArgument, match="same label"):
        Combiner.fit(feats[:10], [1] * 10, features=TOKEN_FEATURES)


def test_a_deferral_share_picks_the_threshold_that_deferred_it_on_dev():
    # with a strong penalty every confidence sits near the dev base rate, so no fixed threshold like 0.5
    # defers a useful share; the share is what a user can pick
    rng = np.random.default_rng(3)
    feats = [features([m], [0.5]) for m in rng.normal(-1.0, 0.5, 101)]
    c = Combiner.fit(feats, [int(f["mean_logprob"] > -1.0) for f in feats], features=TOKEN_FEATURES, l2=1000.0)
    confs = [c.predict(f) for f in feats]
    for share in (0.05, 0.2, 0.4, 0.6, 0.95):
        t = c.threshold_for(share)
        assert abs(sum(x < t for x in confs) / len(confs) - share) <= 1 / len(confs)
    assert c.threshold_for(0.0) == 0.0 and c.threshold_for(1.0) == 1.0
    assert with_combiner(Policy(defer_share=0.4), c).threshold == c.threshold_for(0.4)
    assert with_combiner(Policy(threshold=0.3), c).threshold == 0.3
    with pytest.raises(InvalidArgument, match="fitted combiner"):
        with_combiner(Policy(defer_share=0.4), GeometricMean())
    old = Combiner.from_dict({**c.to_dict(), "meta": {}})  # a file fitted before the shares were stored
    with pytest.raises(InvalidArgument, match="refit it with `ondevice cascade fit`"):
        old.threshold_for(0.4)
    with pytest.raises(InvalidArgument, match="defer share must be in"):
        Policy(defer_share=1.5)


def test_split_is_fixed_per_id_and_labels():
    assert split_of("rewrite_formal-001") == split_of("rewrite_formal-001")
    shares = [split_of(f"x-{i}") == "dev" for i in range(2000)]
    assert 0.35 < sum(shares) / 2000 < 0.45
    assert labels_for([0.5, 0.2, 1.0], [0.5, 0.9, 0.0]) == [1, 0, 1]


# -- policy ------------------------------------------------------------------------------------------------


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_budget_caps_the_share_over_a_sliding_window():
    clock = Clock()
    b = Budget(0.25, 10.0, clock=clock)
    got = [b.admit(True) for _ in range(8)]  # every request wants the cloud
    assert sum(got) == 2 and got[0] is False and got[3] is True  # 1 in 4 once four have been seen
    b.refund()
    assert b.deferred_share == pytest.approx(1 / 8)
    clock.t = 11.0  # the window slid past all of them
    assert b.deferred_share == 0.0
    assert Budget(1.0, 10.0).admit(True) and not Budget(1.0, 10.0).admit(False)


def test_decide_respects_request_policy():
    p = Policy(threshold=0.5)
    assert decide(0.4, p, RequestPolicy(), Budget(1, 60)).defer
    assert not decide(0.6, p, RequestPolicy(), Budget(1, 60)).defer
    assert decide(0.6, p, RequestPolicy(threshold=0.7), Budget(1, 60)).reason == "unsure"
    d = decide(0.0, p, RequestPolicy(never_defer=True), Budget(1, 60))
    assert not d.defer and d.reason == "never_defer"
    assert decide(0.99, p, RequestPolicy(always_defer=True), Budget(1, 60)).reason == "always_defer"
    assert decide(0.0, p, RequestPolicy(), Budget(0.0, 60)).reason == "over_budget"
    with pytest.raises(InvalidArgument, match="contradict"):
        RequestPolicy(never_defer=True, always_defer=True)
    with pytest.raises(InvalidArgument, match="threshold"):
        Policy(threshold=1.5)


# -- the deferral curve ---------------------------------------------------------------------------------------


def _rows(n=30, seed=3):
    rng = np.random.default_rng(seed)
    return [{"device_score": float(rng.random()), "cloud_score": float(rng.random()), "device_s": 0.1,
             "cloud_s": 0.5, "cloud_tokens": 10} for _ in range(n)]


def test_deferral_curve_against_brute_force():
    from ondevice.eval.cascade_curve import at_share, deferral_curve

    rows = _rows()
    conf = [float(i % 7) for i in range(len(rows))]
    c = deferral_curve(rows, conf)
    dev = np.array([r["device_score"] for r in rows])
    cld = np.array([r["cloud_score"] for r in rows])
    assert c["confidence"]["quality"][0] == pytest.approx(dev.mean())
    assert c["confidence"]["quality"][-1] == pytest.approx(cld.mean())
    order = sorted(range(len(rows)), key=lambda i: conf[i])  # stable, as argsort(kind=stable)
    k = round(0.4 * len(rows))
    ref = np.mean([cld[i] if i in set(order[:k]) else dev[i] for i in range(len(rows))])
    assert at_share(c, 0.4)["quality"] == pytest.approx(ref)
    assert at_share(c, 0.4)["cloud_tokens"] == 10 * k
    assert at_share(c, 0.4)["latency_s"] == pytest.approx(0.1 + 0.5 * k / len(rows))
    # the oracle's curve bounds every ordering from above, and the random line is exact
    for i in range(len(c["shares"])):
        assert c["oracle"]["quality"][i] >= c["confidence"]["quality"][i] - 1e-12
    assert c["random"]["quality"][len(c["shares"]) // 2] == pytest.approx(
        dev.mean() + (round(0.5 * len(rows)) / len(rows)) * (cld.mean() - dev.mean()))
    assert c["auc"]["oracle"] >= c["auc"]["confidence"]
    perfect = deferral_curve(rows, list(-(cld - dev)))  # confidence = -(gain): ours becomes the oracle
    assert perfect["auc_gain"] == pytest.approx(1.0)


# -- the rewrite suite ----------------------------------------------------------------------------------------


def test_rewrite_suite_and_metric():
    from ondevice.eval.metrics import get_metric
    from ondevice.eval.suites import load_suite

    s = load_suite("rewrite")
    assert 60 <= len(s.items) <= 100
    assert set(s.tasks()) == {"rewrite_formal", "rewrite_friendly", "rewrite_polite", "rewrite_grammar",
                              "rewrite_shorter"}
    m = get_metric("rewrite_check")
    for it in s.items:  # every reference passes its own checks and scores 1
        if it.metric == "rewrite_check":
            assert m(json.loads(it.target)["reference"], it.target) == pytest.approx(1.0), it.id
    t = json.dumps({"reference": "Could you please send the slides?", "keep": ["slides"], "avoid": ["hey"],
                    "max_words": 6})
    assert m("Could you please send the slides?", t) == pytest.approx(1.0)
    low = m("hey send it", t)  # keeps nothing, uses "hey": only the length check passes
    assert low == pytest.approx(0.5 * get_metric("rouge_l")("hey send it", "Could you please send the slides?")
                                + 0.5 / 3)
    with pytest.raises(InvalidArgument, match="reference"):
        m("x", "not json")


def test_hard_samples_store_and_export(tmp_path):
    from ondevice.cascade.samples import export_hard_samples
    from ondevice.store import Store

    db = tmp_path / "s.sqlite"
    with Store(db) as st:
        st.add_hard_sample(source="test", device_model="m", device_sha256="abc123", cloud_model="c",
                           confidence=0.1, messages=[{"role": "user", "content": "hi"}], device_answer="yo",
                           cloud_answer="Hello!", extra={"reason": "unsure"})
        assert st.hard_samples(device_sha256="abc")[0]["extra"] == {"reason": "unsure"}
        st.add_hard_sample(source="test", device_model="m", device_sha256="abc123", cloud_model="c",
                           confidence=0.1, messages=[{"role": "user", "content": "Describe the sea."}],
                           device_answer="?", cloud_answer="The sea is a vast",
                           extra={"reason": "unsure", "finish_reason": "length"})  # kept by an older version
    out = tmp_path / "hard.jsonl"
    assert export_hard_samples(out, store=db) == 1  # the cut-off answer is no training row
    assert json.loads(out.read_text()) == {"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "Hello!"}]}


# -- end to end: a real cloud server on loopback ------------------------------------------------------------------

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the cloud server did not come up")


class CloudServer:
    """``ondevice serve`` of the default model in its own process (a real second server), alias cloud-smol."""

    def __init__(self, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, ONDEVICE_ACCESS_LOG="0", ONDEVICE_SUPERVISED="1")  # no supervisor: a kill hits it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ondevice.cli", "serve", "--port", str(self.port), "-np", "2", "-c", "1024",
             "-t", "1", "--alias", "cloud-smol", "--no-embeddings", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _wait_health(self.url, self.proc)

    def chat_requests(self) -> int:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ondevice_requests_total{route=\"/v1/chat/completions\""))

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cloud():
    c = CloudServer()
    yield c
    c.kill()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Hard samples of the in-process servers go to a store of their own."""
    with ondevice_home(tmp_path_factory.mktemp("cascade-home")) as d:
        yield d


def _device(cloud_url: str, **kw):
    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(port=0, parallel=2, ctx=1024, threads=1, embeddings=False,
                      cascade=cloud_url, **kw)
    return BackgroundServer(s)


@pytest.fixture(scope="module")
def device(cloud, home):
    with _device(cloud.url, cascade_keep_hard=True, cascade_timeout=300) as srv:
        yield srv


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Rewrite politely: send me the report now"}]


def _ask(srv, cascade=None, stream=False, max_tokens=24):
    """(headers, body text, cascade info) of one chat request through the openai client."""
    c = _client(srv)
    extra = {"cascade": cascade} if cascade is not None else None
    if not stream:
        raw = c.chat.completions.with_raw_response.create(model="x", messages=MSG, max_tokens=max_tokens,
                                                          temperature=0, extra_body=extra)
        body = raw.parse()
        return raw.headers, body.choices[0].message.content, body.model_extra["cascade"]
    with c.chat.completions.with_streaming_response.create(model="x", messages=MSG, max_tokens=max_tokens,
                                                           temperature=0, stream=True, extra_body=extra) as raw:
        text, info = [], None
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if (chunk.model_extra or {}).get("cascade"):
                info = chunk.model_extra["cascade"]
        return raw.headers, "".join(text), info


@pytest.mark.parametrize("stream", [False, True])
def test_defers_to_the_real_cloud_and_says_so(device, cloud, stream):
    before = cloud.chat_requests()
    h, text, info = _ask(device, {"threshold": 1.0}, stream=stream)
    assert h["x-ondevice-tier"] == "cloud" and info["tier"] == "cloud" and info["reason"] == "unsure"
    assert info["cloud_model"] == "cloud-smol" and info["cloud_ms"] > 0 and info["device_ms"] > 0
    assert 0 <= info["confidence"] <= 1 and float(h["x-ondevice-confidence"]) == pytest.approx(info["confidence"],
                                                                                                abs=1e-4)
    assert ("cloud_first_token=" if stream else "cloud=") in h["x-ondevice-latency-ms"] and text
    assert cloud.chat_requests() == before + 1
    direct = openai.OpenAI(base_url=cloud.url + "/v1", api_key="none").chat.completions.create(
        model="x", messages=MSG, max_tokens=24, temperature=0).choices[0].message.content
    assert text == direct  # the client got the cloud's answer (greedy: the same text again)


@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_api_defers_as_chat_does(device, cloud, stream):
    c = _client(device)
    kw = {"model": "x", "input": MSG, "max_output_tokens": 24, "temperature": 0,
          "extra_body": {"cascade": {"always_defer": True, "keep": False}}}
    if stream:
        with c.responses.with_streaming_response.create(stream=True, **kw) as raw:
            last = list(raw.parse())[-1]
        h, r = raw.headers, last.response
    else:
        raw = c.responses.with_raw_response.create(**kw)
        h, r = raw.headers, raw.parse()
    assert h["x-ondevice-tier"] == "cloud" and r.model_extra["cascade"]["tier"] == "cloud"
    direct = openai.OpenAI(base_url=cloud.url + "/v1", api_key="none").chat.completions.create(
        model="x", messages=MSG, max_tokens=24, temperature=0).choices[0].message.content
    assert r.output_text == direct


@pytest.mark.parametrize("stream", [False, True])
def test_never_defer_and_confident_answers_stay_on_the_device(device, cloud, stream):
    before = cloud.chat_requests()
    h, text, info = _ask(device, {"threshold": 1.0, "never_defer": True}, stream=stream)
    assert h["x-ondevice-tier"] == "device" and info["reason"] == "never_defer" and text
    h, text, info = _ask(device, {"threshold": 0.0}, stream=stream)
    assert info["tier"] == "device" and info["reason"] == "confident" and info["cloud_ms"] is None
    assert cloud.chat_requests() == before  # nothing reached the cloud


def test_the_server_scores_its_answer_by_the_text_features_of_a_fitted_combiner(cloud, home, tmp_path):
    # a combiner over the text features only: the server computes them from the request and its own answer
    # exactly as confidence.text_features does (one place), and predicts from them
    rng = np.random.default_rng(5)
    feats = [dict.fromkeys(FEATURES, 0.0) | {"copied_bigrams": x, "length_ratio": -x} for x in rng.random(40)]
    comb = Combiner.fit(feats, [int(f["copied_bigrams"] > 0.5) for f in feats], features=TEXT_FEATURES)
    path = comb.save(tmp_path / "text.json")
    with _device(cloud.url, cascade_combiner=str(path), cascade_threshold=0.0, cascade_timeout=300) as srv:
        _, text, info = _ask(srv)
    assert info["calibrated"] and info["tier"] == "device" and text
    expect = text_features(request_text(MSG), text)
    for k in TEXT_FEATURES:
        if k != "truncated":  # the finish reason is not in the reply's cascade object
            assert info["features"][k] == pytest.approx(expect[k], abs=1e-6), k
    assert info["confidence"] == pytest.approx(comb.predict(info["features"]), abs=1e-4)


def test_bad_request_policy_is_a_400(device):
    with pytest.raises(openai.BadRequestError, match="cascade"):
        _ask(device, {"threshold": 2})
    with pytest.raises(openai.BadRequestError, match="cascade"):
        _ask(device, {"never_defr": True})


def test_hard_samples_kept_unless_the_request_says_no(device, home, cli):
    from ondevice.store import Store

    with Store() as st:
        n0 = len(st.hard_samples())
    _ask(device, {"always_defer": True}, max_tokens=96)  # the cloud's whole answer (56 tokens): kept
    _ask(device, {"always_defer": True, "keep": False}, max_tokens=96)
    _ask(device, {"always_defer": True}, max_tokens=4)  # cut off by max_tokens: it would teach stopping mid-sentence
    time.sleep(0.5)  # written after the reply (a background task)
    with Store() as st:
        kept = st.hard_samples()
    assert len(kept) == n0 + 1 and kept[-1]["messages"] == MSG and kept[-1]["cloud_model"] == "cloud-smol"
    assert kept[-1]["extra"]["finish_reason"] == "stop"
    r = cli("cascade", "export", env={"ONDEVICE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[-1]["messages"][:-1] == MSG and rows[-1]["messages"][-1]["role"] == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_cloud_down_slow_or_erroring_still_answers_from_the_device(cloud, home, stream):
    cases = [(f"http://127.0.0.1:{_free_port()}", {}, "unreachable"),  # nothing listens there
             (cloud.url, {"cascade_timeout": 0.001}, "timeout")]  # the real cloud, slower than the timeout
    for url, kw, kind in cases:
        with _device(url, **kw) as srv:
            h, text, info = _ask(srv, {"always_defer": True}, stream=stream)
            assert h["x-ondevice-tier"] == "device" and info["tier"] == "device" and text
            assert info["fallback"] == kind and f"fallback={kind}" in h["x-ondevice-cascade"]
            # the wait on the cloud is the reply's cloud latency (non-streamed it was null and left out of the header).
            # The server runs on uvloop, whose timers count whole milliseconds of a clock read at the loop's turn: a
            # deadline can fire up to ~2 ms of real time early (CI once saw 0.94 ms for the 1 ms timeout)
            assert info["cloud_ms"] > 0 and "cloud=" in h["x-ondevice-latency-ms"]
            assert info["cloud_ms"] >= 1e3 * kw.get("cascade_timeout", 0) - 2.0, info


def test_cloud_http_errors_fall_back():
    locked = CloudServer("--api-key", "sekret")  # a real server that refuses our (missing) key
    try:
        with _device(locked.url) as srv:
            h, text, info = _ask(srv, {"always_defer": True})
            assert info["fallback"] == "http_401" and h["x-ondevice-tier"] == "device" and text
            assert info["error"].endswith("answered HTTP 401: it refused the key, read from the environment variable "
                                          "ONDEVICE_CLOUD_KEY, which is not set"), info
        os.environ["TEST_CLOUD_KEY"] = "sekret"  # the key from the env var it names: now the cloud answers
        with _device(locked.url, cascade_key_env="TEST_CLOUD_KEY", cascade_timeout=300) as srv:
            assert _ask(srv, {"always_defer": True})[2]["tier"] == "cloud"
    finally:
        os.environ.pop("TEST_CLOUD_KEY", None)
        locked.kill()


def _cloud_conns(port: int) -> list:
    import psutil

    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port
            and c.status == psutil.CONN_ESTABLISHED]


def test_killing_the_cloud_mid_run_loses_no_request_and_leaks_nothing(home):
    victim = CloudServer()
    with _device(victim.url, cascade_timeout=300) as srv:
        results, errors = [], []

        def worker(stream):
            try:
                results.append(_ask(srv, {"always_defer": True}, stream=stream, max_tokens=32)[2])
            except Exception as e:  # noqa: BLE001 — collected: the test fails on any
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and victim.health()["slots_processing"] == 0:
            time.sleep(0.02)
        victim.kill()  # SIGKILL while the cloud is generating for one of them
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert len(results) == 4
        assert any(r["fallback"] for r in results)  # the kill hit some of them
        for r in results:
            assert r["tier"] == "device" and r["fallback"] in ("unreachable", "bad_reply", "timeout") \
                or r["tier"] == "cloud"
        with urllib.request.urlopen(srv.base_url + "/health") as resp:
            health = json.loads(resp.read())
        assert health["slots_processing"] == 0 and health["queue_depth"] == 0  # no slot leaked
        assert _cloud_conns(victim.port) == []  # no connection to the dead cloud kept open
        _, text, info = _ask(srv, {"always_defer": True})  # the server still serves
        assert info["fallback"] == "unreachable" and text


def test_library_cascade(smol, cloud):
    import ondevice

    with ondevice.Cascade(smol, cloud.url, policy=Policy(threshold=1.0)) as c:
        r = c.generate("Rewrite politely: send me the report now", max_tokens=16, temp=0)
        assert r.tier == "cloud" and r.cloud_model == "cloud-smol" and r.text and r.device_text, str(r.info())
        assert r.info()["cloud_usage"]["completion_tokens"] > 0
        kept = c.generate("Hi", max_tokens=8, temp=0, cascade={"never_defer": True})
        assert kept.tier == "device" and kept.reason == "never_defer"
        # always_defer asks the cloud once the first token is scored: the device does not decode its whole answer
        early = c.generate("Rewrite politely: send me the report now", max_tokens=16, temp=0,
                           cascade={"always_defer": True})
        assert early.tier == "cloud" and early.reason == "always_defer" and early.text == r.text, early.info()
        assert r.device_text.startswith(early.device_text) and len(early.device_text) < len(r.device_text)
    comb = Combiner.fit([features([m], [0.5]) for m in (-0.2, -0.5, -1.0, -2.0, -3.0)], [1, 1, 0, 0, 0],
                        features=TOKEN_FEATURES)
    with ondevice.Cascade(smol, cloud.url, policy=Policy(defer_share=0.4), combiner=comb) as c:
        assert c.generate("Hi", max_tokens=8, temp=0).threshold == comb.threshold_for(0.4)
    down = f"http://127.0.0.1:{_free_port()}"
    with ondevice.Cascade(smol, down, policy=Policy(threshold=1.0)) as c:
        r = c.generate("Hi", max_tokens=8, temp=0)
        assert r.tier == "device" and r.fallback == "unreachable" and r.text == r.device_text
        assert r.error == (f"cannot reach the cloud at {down}/v1: nothing accepts connections there; start its "
                           "server, or fix the host or port in the URL") and r.info()["error"] == r.error
        assert r.cloud_s is not None and r.info()["cloud_ms"] == round(r.cloud_s * 1e3, 3)  # the failed wait
        fallback = c.generate("Hi", max_tokens=8, temp=0, cascade={"always_defer": True})  # the device's whole answer
        assert fallback.tier == "device" and fallback.fallback == "unreachable" and fallback.text == r.text


def test_eval_curve_stored_and_reported(cloud, cli, tmp_path):
    r = cli("eval", "--cascade", cloud.url, "--suite", "rewrite", "--limit", "3", "--max-tokens", "8",
            "--threads", "1", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "AUC: confidence" in r.stdout and "at 40% deferred" in r.stdout
    rep = cli("report", "--cascade", "--html", str(tmp_path / "c.html"))
    assert rep.returncode == 0, rep.stderr
    assert "cascade:rewrite" in rep.stdout
    page = (tmp_path / "c.html").read_text()
    assert "<svg" in page and "oracle" in page


def test_a_stopping_server_answers_a_request_waiting_on_the_cloud_from_the_device(home):
    """A deferred request waits on a cloud that never answers; the server stops: the request gets the device's
    answer, marked, at once, instead of outliving the shutdown's grace period (and its traceback)."""
    import socket
    import threading

    mute = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    conns: list = []
    threading.Thread(target=lambda: conns.append(mute.accept()[0]), daemon=True).start()
    got: dict = {}
    srv = _device(f"http://127.0.0.1:{mute.getsockname()[1]}", cascade_timeout=300)
    with srv:
        t = threading.Thread(target=lambda: got.update(zip(("h", "text", "info"), _ask(srv, {"always_defer": True}))))
        t.start()
        deadline = time.monotonic() + 120
        while not conns and time.monotonic() < deadline:  # the device answered and the cascade asks the cloud
            time.sleep(0.05)
        assert conns, "the request never reached the cloud"
        t0 = time.monotonic()
        srv.server.should_exit = True  # what a stop signal does
        t.join(timeout=30)
    assert time.monotonic() - t0 < 4  # not the grace period, nor the 300 s cloud timeout
    assert got["info"]["fallback"] == "shutdown" and got["info"]["tier"] == "device" and got["text"]
    mute.close()
