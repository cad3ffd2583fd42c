"""The cascade against a cloud that misbehaves: a small fake OpenAI server (a real HTTP server on loopback, as a
third-party endpoint is) answers HTTP 200 with garbage, no choices or no content, or answers well with or
without usage. The device tier is the real ``ondevice serve``, reached with the official openai client."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import ondevice_home

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

MSG = [{"role": "user", "content": "Rewrite politely: send me the report now"}]
CLOUD_PIECES = ["Could you", " send me", " the report", ", please?"]
WHITESPACE = ["\n", "  ", "\n\n "]
CLOUD_USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


class FakeCloud:
    """An OpenAI-compatible endpoint whose next replies are set by ``mode``; ``bodies`` are the requests it got.

    Modes: ``ok`` (the answer in :data:`CLOUD_PIECES`, usage when streaming is asked for it), ``slow`` (the same
    after 6 s), ``gated`` (the same once ``gate`` is set), ``ok_no_usage``, ``strict`` (a 400 for a request with
    ``stream_options``, as servers that refuse unknown fields answer, else ``ok_no_usage``),
    ``html`` (200 with a web page), ``html_500`` (HTTP 500 with a web page, as a proxy in front of a dead cloud
    answers), ``mixed`` (the rewrite suite's reference answer to a rewrite_check item, a wrong one to any other),
    ``no_choices`` (200, ``choices: []``), ``null_content`` (200,
    ``content: null``), ``whitespace`` (200, an answer of only spaces and newlines), ``cut`` (a stream that ends
    after two pieces of text, with no finish_reason and no [DONE]). ``finish_reason`` is the one the cloud gives.
    """

    def __init__(self):
        self.mode, self.finish_reason, self.bodies = "ok", "stop", []
        self.gate = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, "application/json", json.dumps({"object": "list", "data": [{"id": "fake"}]}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if fake.mode == "slow":  # answers well, after the client has given up
                    time.sleep(6)
                if fake.mode == "gated":  # answers well, when the test lets it
                    fake.gate.wait(120)
                if fake.mode == "strict" and "stream_options" in body:
                    return self._send(400, "application/json", json.dumps({"error": {
                        "message": "Unrecognized request argument supplied: stream_options",
                        "type": "invalid_request_error"}}))
                if fake.mode in ("html", "html_500"):
                    return self._send(500 if fake.mode == "html_500" else 200, "text/html",
                                      "<html><body>Service temporarily unavailable</body></html>")
                if fake.mode == "mixed":
                    answer = fake.reference(body["messages"][-1]["content"])
                    return self._send(200, "application/json", json.dumps(fake.completion(answer)))
                if body.get("stream") and fake.mode == "cut":  # some text, then the connection closes
                    events = [json.dumps(e) for e in fake.chunks(body)[:3]]
                    return self._send(200, "text/event-stream", "".join(f"data: {e}\n\n" for e in events))
                if body.get("stream"):
                    events = [json.dumps(e) for e in fake.chunks(body)] + ["[DONE]"]
                    return self._send(200, "text/event-stream", "".join(f"data: {e}\n\n" for e in events))
                return self._send(200, "application/json", json.dumps(fake.completion()))

            def _send(self, status: int, ctype: str, text: str):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _head(self, kind: str) -> dict:
        return {"id": "chatcmpl-fake", "object": kind, "created": int(time.time()), "model": "fake"}

    @staticmethod
    def reference(request: str) -> str:
        """``mixed``: the reference of the rewrite suite's rewrite_check item asked (it scores 1), else a wrong
        answer (an exact_match item scores 0)."""
        from ondevice.eval.suites import load_suite

        for it in load_suite("rewrite").items:
            if it.metric == "rewrite_check" and it.messages()[-1]["content"] == request:
                return json.loads(it.target)["reference"]
        return "zzz"

    def completion(self, answer: str | None = None) -> dict:
        content = answer or {"null_content": None, "whitespace": "".join(WHITESPACE)}.get(self.mode,
                                                                                          "".join(CLOUD_PIECES))
        choices = [] if self.mode == "no_choices" else [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": self.finish_reason}]
        usage = {} if self.mode in ("ok_no_usage", "strict") else {"usage": CLOUD_USAGE}
        return self._head("chat.completion") | {"choices": choices, **usage}

    def chunks(self, body: dict) -> list[dict]:
        def chunk(delta, finish=None):
            choices = [] if self.mode == "no_choices" else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return self._head("chat.completion.chunk") | {"choices": choices}

        pieces = {"null_content": [None], "whitespace": WHITESPACE}.get(self.mode, CLOUD_PIECES)
        out = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
        out.append(chunk({}, self.finish_reason))
        if self.mode == "ok" and (body.get("stream_options") or {}).get("include_usage"):
            out.append(self._head("chat.completion.chunk") | {"choices": [], "usage": CLOUD_USAGE})
        return out

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake():
    f = FakeCloud()
    yield f
    f.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Hard samples go to a store of this module's own."""
    with ondevice_home(tmp_path_factory.mktemp("cascade-replies-home")) as d:
        yield d


@contextlib.contextmanager
def cascade_device(cloud_url: str, **settings):
    """``ondevice serve`` (2 slots, 1 thread) on the embedded model with ``--cascade cloud_url`` (and
    ``--cascade-timeout 30`` unless ``settings`` say otherwise)."""
    from ondevice.serve import BackgroundServer, ServeSettings

    s = ServeSettings(port=0, parallel=2, ctx=1024, threads=1, embeddings=False, cascade=cloud_url,
                      **{"cascade_timeout": 30, **settings})
    with BackgroundServer(s) as srv:
        yield srv


@pytest.fixture(scope="module")
def device(fake, home):
    with cascade_device(fake.url, cascade_keep_hard=True) as srv:
        yield srv


@pytest.fixture()
def cloud(fake, device):
    """The fake cloud, answering well again after the test (and the server asking it for usage again)."""
    yield fake
    fake.mode, fake.finish_reason = "ok", "stop"
    device.state.cascade.cloud.stream_usage = True


def _hard_samples() -> list[dict]:
    from ondevice.store import Store

    time.sleep(0.3)  # the server keeps a sample after its reply
    with Store() as st:
        return st.hard_samples()


def _ask(srv, stream: bool, max_tokens: int = 6) -> dict:
    """One deferred chat request through the openai client, as the client sees it: text, finish_reason, usage
    (None when the reply has none), cascade object, and the chunks' choices lists (streaming)."""
    c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = {"model": "x", "messages": MSG, "max_tokens": max_tokens, "temperature": 0,
          "extra_body": {"cascade": {"always_defer": True}}}
    if not stream:
        r = c.chat.completions.create(**kw)
        return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                "usage": r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
                "cascade": r.model_extra["cascade"]}
    out = {"text": "", "finish": None, "usage": None, "cascade": None, "choices": []}
    for ch in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        out["choices"].append(len(ch.choices))
        if ch.choices:
            out["text"] += ch.choices[0].delta.content or ""
            out["finish"] = ch.choices[0].finish_reason or out["finish"]
        if ch.usage is not None:
            out["usage"] = ch.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
        out["cascade"] = (ch.model_extra or {}).get("cascade") or out["cascade"]
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", ["html", "no_choices", "null_content", "whitespace"])
def test_an_unusable_or_empty_cloud_reply_falls_back_to_the_device_and_is_not_kept(device, cloud, mode, stream):
    n0 = len(_hard_samples())
    cloud.mode = mode
    r = _ask(device, stream)
    info = r["cascade"]
    assert info["tier"] == "device" and info["fallback"] == "bad_reply", (mode, info)
    assert r["text"] and r["finish"] in ("length", "stop")  # the device's answer, with its own finish reason
    assert r["usage"]["completion_tokens"] == info["device_usage"]["completion_tokens"] > 0
    assert len(_hard_samples()) == n0  # nothing to learn from


def test_a_good_cloud_answer_is_kept_as_a_hard_sample(device, cloud):
    n0 = len(_hard_samples())
    for stream in (False, True):
        assert _ask(device, stream)["cascade"]["tier"] == "cloud"
    kept = _hard_samples()[n0:]
    assert [s["cloud_answer"] for s in kept] == ["".join(CLOUD_PIECES)] * 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_the_relayed_reply_has_the_clouds_finish_reason_and_usage(device, cloud, stream, finish):
    cloud.finish_reason = finish
    r = _ask(device, stream)
    info = r["cascade"]
    assert info["tier"] == "cloud" and info["fallback"] is None and r["text"] == "".join(CLOUD_PIECES)
    assert r["finish"] == finish
    assert r["usage"] == CLOUD_USAGE  # the completion the client received
    assert info["usage_source"] == "cloud"
    assert info["cloud_usage"] == {k: CLOUD_USAGE[k] for k in ("prompt_tokens", "completion_tokens")}
    dev = info["device_usage"]  # the device's own figures are kept in the cascade object
    assert dev["prompt_tokens"] > 0 and dev["completion_tokens"] > 0
    if stream:
        assert cloud.bodies[-1]["stream_options"] == {"include_usage": True}
        assert r["choices"][-1] == 0  # the usage chunk comes last, with no choices (as OpenAI sends it)


def test_a_cloud_that_refuses_stream_options_still_answers_streamed_requests(device, cloud):
    cloud.mode = "strict"
    n0 = len(cloud.bodies)
    for _ in range(2):
        r = _ask(device, True)
        assert r["cascade"]["tier"] == "cloud" and r["cascade"]["fallback"] is None, r["cascade"]
        assert r["text"] == "".join(CLOUD_PIECES) and r["cascade"]["usage_source"] == "device_tokenizer"
    sent = [("stream_options" in b) for b in cloud.bodies[n0:]]
    assert sent == [True, False, False]  # refused once, asked again without it, then never sent again


def test_a_whole_cloud_answer_carries_no_device_timings(device, cloud):
    c = openai.OpenAI(base_url=device.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = {"model": "x", "messages": MSG, "max_tokens": 6, "temperature": 0}
    on_device = c.chat.completions.create(**kw, extra_body={"cascade": {"never_defer": True}})
    deferred = c.chat.completions.create(**kw, extra_body={"cascade": {"always_defer": True}})
    assert on_device.model_extra["timings"]["predicted_n"] > 0  # llama-server's field, of the device's decode
    assert deferred.model_extra["cascade"]["tier"] == "cloud" and deferred.model_extra.get("timings") is None


def test_a_cloud_that_reports_no_usage_is_counted_on_the_device_the_same_way_in_both_modes(device, cloud):
    import urllib.request

    cloud.mode = "ok_no_usage"
    whole, streamed = _ask(device, False), _ask(device, True)
    req = urllib.request.Request(device.base_url + "/tokenize", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"content": "".join(CLOUD_PIECES), "parse_special": False}).encode())
    with urllib.request.urlopen(req, timeout=30) as t:
        counted = json.loads(t.read())["count"]  # the cloud's text by the device's tokenizer
    for r in (whole, streamed):
        info = r["cascade"]
        assert info["tier"] == "cloud" and info["usage_source"] == "device_tokenizer"  # says it was counted here
        assert info["cloud_usage"] is None  # the cloud said nothing: unknown (it read 0/0, a cost of nothing)
        prompt = info["device_usage"]["prompt_tokens"]  # the same messages, as the device counted them
        assert r["usage"] == {"prompt_tokens": prompt, "completion_tokens": counted, "total_tokens": prompt + counted}
    assert whole["usage"] == streamed["usage"]


def test_export_skips_stored_samples_with_an_empty_cloud_answer(tmp_path):
    """A store written before empty answers were refused may hold some: they are never exported or trained on."""
    from ondevice.cascade.samples import export_hard_samples
    from ondevice.store import Store

    db = tmp_path / "s.sqlite"
    with Store(db) as st:
        for answer in ("Hello!", "", "  \n"):
            st.add_hard_sample(source="test", device_model="m", device_sha256="abc", cloud_model="c", confidence=0.1,
                               messages=[{"role": "user", "content": "hi"}], device_answer="yo",
                               cloud_answer=answer, extra={})
    out = tmp_path / "hard.jsonl"
    assert export_hard_samples(out, store=db) == 1
    assert [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()] == ["Hello!"]


def test_a_client_that_leaves_while_the_cloud_answers_ends_the_cloud_request(device, cloud):
    import re
    import urllib.request

    def cancelled() -> int:
        with urllib.request.urlopen(device.base_url + "/metrics", timeout=30) as m:
            return int(re.search(r"^ondevice_requests_cancelled_total (\d+)", m.read().decode(), re.MULTILINE).group(1))

    n0 = cancelled()
    cloud.mode = "slow"
    c = openai.OpenAI(base_url=device.base_url + "/v1", api_key="none", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="x", messages=MSG, max_tokens=6, extra_body={"cascade": {"always_defer": True}})
    t_gone = time.perf_counter()
    while cancelled() == n0 and time.perf_counter() - t_gone < 3:  # the cloud would answer 6 s after the request
        time.sleep(0.1)
    assert cancelled() == n0 + 1  # noticed and ended, not waited out


def test_a_streaming_client_that_leaves_while_the_cloud_is_silent_ends_the_cloud_request(device, cloud):
    """It was noticed only once the cloud's first token came, or at --cascade-timeout (logged as a cloud failure)."""
    import httpx

    def cancelled() -> int:
        m = httpx.get(device.base_url + "/metrics", timeout=30).text
        return int(next(x.split()[1] for x in m.splitlines() if x.startswith("ondevice_requests_cancelled_total ")))

    n0 = cancelled()
    cloud.mode = "slow"
    body = {"model": "x", "messages": MSG, "max_tokens": 6, "stream": True, "cascade": {"always_defer": True}}
    with pytest.raises(httpx.ReadTimeout), httpx.stream("POST", device.base_url + "/v1/chat/completions", json=body,
                                                        timeout=1.5) as r:
        r.read()
    t_gone = time.perf_counter()
    while cancelled() == n0 and time.perf_counter() - t_gone < 3:  # the cloud would answer 6 s after the request
        time.sleep(0.1)
    assert cancelled() == n0 + 1


def test_a_cloud_stream_cut_off_before_its_end_is_an_error_not_a_whole_answer(device, cloud):
    """Text, then the connection closed with no finish_reason: it was relayed as a complete answer ("stop")."""
    cloud.mode = "cut"
    r = _ask(device, True)
    assert r["text"] == "".join(CLOUD_PIECES[:2]) and r["finish"] == "error", r
    assert r["cascade"]["fallback"] == "bad_reply" and "no finish_reason" in r["cascade"]["error"]


def test_completions_refuse_a_cascade_object_and_name_the_chat_routes(device, cloud):
    """/v1/completions answered on the device with no cascade object and no X-Ondevice-* headers, as if the request's
    "cascade" were honoured; the cloud tier answers chat messages, so the route refuses one asking for the cloud and
    says where it works. One that only keeps the request here (never_defer) is served, as on raw /api/generate."""
    c = openai.OpenAI(base_url=device.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    n0 = len(cloud.bodies)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="x", prompt="Rewrite politely: send me the report now", max_tokens=4,
                                 stream=stream, extra_body={"cascade": {"always_defer": True}})
        assert ("invalid request: cascade: a completion continues its prompt as it is, so the device alone answers "
                "it (the cloud tier answers chat messages); send it as a user message to a chat route "
                "(/v1/chat/completions, /v1/responses, /v1/messages, /api/chat), where it may be deferred, or leave "
                "cascade unset") in str(e.value)
    r = httpx.post(device.base_url + "/completion", json={"prompt": "Hi", "n_predict": 2, "cascade": {}}, timeout=60)
    assert r.status_code == 400 and "cascade: a completion continues its prompt as it is" in r.text
    private = {"cascade": {"never_defer": True}}
    assert c.completions.create(model="x", prompt="Hi", max_tokens=2, extra_body=private).choices[0].text is not None
    r = httpx.post(device.base_url + "/completion", json={"prompt": "Hi", "n_predict": 2, **private}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
    assert len(cloud.bodies) == n0  # nothing reached the cloud
    assert c.completions.create(model="x", prompt="Hi", max_tokens=2).choices[0].text is not None  # without: served


# -- `ondevice eval --cascade` and `ondevice cascade fit` against the same cloud (the CLI in a subprocess) -------

HTML_500 = "HTTP 500: '<html><body>Service temporarily unavailable</body></html>'"


@pytest.fixture()
def cloud_as(fake):
    """The fake cloud in a mode for one test (no device server needed); it answers well again after."""
    def mode(m: str) -> FakeCloud:
        fake.mode = m
        return fake

    yield mode
    fake.mode = "ok"


def _item_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("  [")]


def test_cascade_fit_against_a_cloud_that_answers_no_item_says_so_and_why(cli, cloud_as):
    """Each item said only "cloud error", then the fit failed with "combiner weights must be one non-negative number
    per answer, not all 0": now each line has the cause and the run ends as `eval --cascade` does (one check)."""
    url = cloud_as("html_500").url
    r = cli("cascade", "fit", "--cascade", url, "--limit", "4", "--max-tokens", "4", "--threads", "1", timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = _item_lines(r.stderr)
    assert len(lines) == 4 and all(line.endswith(f", cloud error ({HTML_500})") for line in lines), r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"ondevice cascade: error: the cloud answered none of the 4 items "
                                                 f"({HTML_500}); check the --cascade URL and the cloud server")


def test_eval_against_a_hung_cloud_gives_up_after_cascade_timeout_and_says_so(cli, cloud_as):
    """A cloud that does not answer held each item for a minute or more, with no flag to shorten it."""
    url = cloud_as("slow").url  # answers after 6 s
    r = cli("eval", "--cascade", url, "--suite", "rewrite", "--split", "test", "--limit", "2", "--max-tokens", "4",
            "--threads", "1", "--no-store", "--cascade-timeout", "0.5", timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = _item_lines(r.stderr)
    assert len(lines) == 2 and all(line.endswith(", cloud error (no answer within 0.5 s)") for line in lines), r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "ondevice eval: error: the cloud answered none of the 2 items (no answer within 0.5 s); check the --cascade "
        "URL and the cloud server; or raise --cascade-timeout")
    r = cli("cascade", "fit", "--cascade", url, "--cascade-timeout", "0", timeout=60)
    assert r.returncode == 2 and "--cascade-timeout: give a number of seconds > 0, not '0'" in r.stderr, r.stderr


def test_eval_no_store_writes_no_per_item_log(cli, cloud_as, tmp_path):
    """`--no-store` skips the per-sample log of a suite; the deferral curve's run still wrote (and printed) one."""
    url = cloud_as("ok").url
    args = ("eval", "--cascade", url, "--suite", "rewrite", "--split", "test", "--limit", "2", "--max-tokens", "4",
            "--threads", "1")
    r = cli(*args, "--no-store", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "AUC: confidence" in r.stdout and "per-item log" not in r.stdout, r.stdout
    assert not list((tmp_path / "home").rglob("eval-logs/*")), list((tmp_path / "home").rglob("eval-logs/*"))
    r = cli(*args, timeout=300)  # stored: the log goes with the record, and is named
    assert r.returncode == 0, r.stderr
    log = Path(r.stdout.split("per-item log: ")[1].strip())
    assert len(log.read_text(encoding="utf-8").splitlines()) == 2


def test_cascade_fit_to_a_file_names_it_in_the_serve_advice(cli, cloud_as, tmp_path):
    """The advice after `-o FILE` left out --cascade-combiner FILE: serving as advised used the model's default
    combiner (or none), not the one just fitted."""
    url = cloud_as("mixed").url  # the cloud is right on the rewrite_check items, wrong on the exact_match one
    out = tmp_path / "my combiner.json"
    r = cli("cascade", "fit", "--cascade", url, "--limit", "5", "--max-tokens", "16", "--threads", "1", "-o", str(out),
            timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert f"serve with --cascade-defer-share 0.4 --cascade-combiner '{out}' to defer the least confident 40%" \
        in r.stdout, r.stdout
