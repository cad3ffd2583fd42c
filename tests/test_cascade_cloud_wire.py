"""What reaches the cloud, and what a user is told about it (the s39 audit of the device -> cloud cascade).

- The cloud and the hard-sample export get the messages in OpenAI's shape, as the client sent them (a tool call's
  arguments as JSON text, content parts unjoined), and the request's fields under their OpenAI names
  (``max_completion_tokens``, ``user``; the library's seed and penalties).
- A base URL with a path of its own (Gemini's, a gateway's) is used as given; a query is sent as a query.
- Credentials in the cloud URL are never shown; a model listing with several models, or one that fails, says so
  and names the argument that chooses the model; an error body sent with HTTP 200 is the gateway's message.
- A combiner fitted for another device model is warned about; offline batch work retries rate-limited items and
  says which were left out; ``cascade fit`` takes serve's spellings and warns about a small dev set.
- A relayed stream cut after its first token is not counted as a cloud answer.

The cloud is a small OpenAI-compatible HTTP server on loopback (test_cascade_cloud_replies.FakeCloud, extended);
the device tier is the real embedded model: the library's ``Cascade``, ``ondevice serve`` reached with the
official openai client, or the CLI.
"""

from __future__ import annotations

import io
import json
import socket
import time
import warnings

import httpx
import pytest
from conftest import ondevice_home
from test_cascade_cloud_replies import CLOUD_PIECES, MSG, FakeCloud, cascade_device

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from ondevice.cascade import Policy
from ondevice.cascade.cloud import base_url

GEMINI = "https://generativelanguage.googleapis.com/v1beta/openai"  # Google's OpenAI-compatible base URL
LISTED = ["text-embedding-3-small", "whisper-1", "gpt-4o-mini", "o1-pro"]
ERROR_BODY = {"error": {"message": "Provider returned error: upstream overloaded", "code": 502}}
# an agent's history: a tool call and its result, and a user turn in two text parts (no tools in this turn)
AGENT = [{"role": "user", "content": [{"type": "text", "text": "Rewrite: "}, {"type": "text", "text": "hey slides"}]},
         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny 20C"}]


class WireCloud(FakeCloud):
    """FakeCloud that also records each request's path (query included), lists ``listing`` (None: GET /models is a
    404, as at an Azure-style deployment), answers ``err200`` with an error body and HTTP 200, ``rate_limited``
    with a 429 and ``Retry-After: retry_after``, ``flaky``: every other POST so, and ``refuse``: a 503 for
    requests whose last message is one of these."""

    def __init__(self):
        super().__init__()
        self.paths, self.listing, self.flaky, self.refuse, self.posts = [], ["fake"], False, set(), 0
        self.retry_after = "0.1"
        fake, base = self, self.httpd.RequestHandlerClass

        class Handler(base):
            def do_GET(self):
                fake.paths.append(self.path)
                if fake.listing is None:
                    return self._send(404, "application/json", json.dumps({"error": {"message": "nope"}}))
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in fake.listing]
                return self._send(200, "application/json", json.dumps({"object": "list", "data": data}))

            def do_POST(self):
                fake.paths.append(self.path)
                fake.posts += 1
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                if fake.mode == "err200":  # streamed: an error event (OpenRouter's mid-stream failure)
                    fake.bodies.append(body)
                    if body.get("stream"):
                        return self._send(200, "text/event-stream", f"data: {json.dumps(ERROR_BODY)}\n\n")
                    return self._send(200, "application/json", json.dumps(ERROR_BODY))
                if body["messages"][-1]["content"] in fake.refuse:
                    return self._send(503, "application/json", json.dumps({"error": {"message": "down"}}))
                if fake.mode == "rate_limited" or (fake.flaky and fake.posts % 2):
                    fake.bodies.append(body)
                    self.send_response(429)
                    self.send_header("Retry-After", fake.retry_after)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.rfile = io.BytesIO(raw)  # FakeCloud answers it
                return super().do_POST()

        self.httpd.RequestHandlerClass = Handler
        self.root = self.url.removesuffix("/v1")

    def reset(self):
        self.mode, self.finish_reason, self.listing, self.flaky, self.refuse = "ok", "stop", ["fake"], False, set()
        self.retry_after = "0.1"
        self.paths.clear()
        self.bodies.clear()


def secret_url(fake: WireCloud) -> str:
    """The fake's URL with a password and a key in it (a gateway behind basic auth, a signed URL)."""
    return fake.url.replace("http://", "http://user:pa55word@") + "?api_key=sk-SECRET-1"


SECRETS = ("pa55word", "sk-SECRET-1")


@pytest.fixture(scope="module")
def fake():
    f = WireCloud()
    yield f
    f.close()


@pytest.fixture()
def cloud(fake):
    yield fake
    fake.reset()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with ondevice_home(tmp_path_factory.mktemp("cascade-wire-home")) as d:
        yield d


@pytest.fixture(scope="module")
def device(fake, home):
    """``ondevice serve --cascade URL`` with credentials in the URL, keeping hard samples."""
    with cascade_device(secret_url(fake), cascade_keep_hard=True) as srv:
        yield srv


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def _cascade_of(reply, stream: bool) -> dict:
    if not stream:
        return reply.model_extra["cascade"]
    return [c.model_extra["cascade"] for c in reply if (c.model_extra or {}).get("cascade")][-1]


DEFER = {"cascade": {"always_defer": True}}


# -- the server ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_cloud_and_the_export_get_the_clients_messages_in_openais_shape(device, cloud, stream, tmp_path):
    """The cloud got the device's rendered form: a tool call's arguments as an object (OpenAI answers HTTP 400: every
    deferred agent conversation fell back) and text parts joined with a newline the client never sent; the export
    wrote the same objects (not valid fine-tuning JSONL)."""
    from ondevice.cascade import export_hard_samples

    r = _client(device).chat.completions.create(model="x", messages=AGENT, max_tokens=4, temperature=0, stream=stream,
                                                extra_body={"cascade": {"always_defer": True, "keep": True}})
    assert _cascade_of(r, stream)["tier"] == "cloud"
    assert cloud.bodies[-1]["messages"] == AGENT
    time.sleep(0.3)  # the server keeps the sample after its reply
    assert export_hard_samples(tmp_path / "hard.jsonl") > 0
    last = json.loads((tmp_path / "hard.jsonl").read_text().splitlines()[-1])
    assert last["messages"] == [*AGENT, {"role": "assistant", "content": "".join(CLOUD_PIECES)}]


def test_an_export_of_samples_kept_with_parsed_arguments_writes_them_as_json_text():
    from ondevice.cascade.samples import training_rows

    kept = {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "f", "arguments": {"city": "Paris"}}}]}],
        "cloud_answer": "Sunny.", "extra": {}}
    call = training_rows([kept])[0]["messages"][0]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"city": "Paris"}'


def test_the_cloud_gets_the_token_cap_under_the_clients_name_and_the_fields_only_it_uses(device, cloud):
    """max_completion_tokens went out as max_tokens (OpenAI's reasoning models refuse that: HTTP 400 on every
    deferral), and ``user`` was dropped."""
    _client(device).chat.completions.create(model="x", messages=MSG, max_completion_tokens=5, user="u1", seed=3,
                                            temperature=0, extra_body=DEFER)
    body = cloud.bodies[-1]
    assert body["max_completion_tokens"] == 5 and "max_tokens" not in body, body
    assert body["user"] == "u1" and body["seed"] == 3
    _client(device).chat.completions.create(model="x", messages=MSG, max_tokens=5, extra_body=DEFER)
    assert cloud.bodies[-1]["max_tokens"] == 5 and "max_completion_tokens" not in cloud.bodies[-1]


def test_credentials_in_the_cloud_url_are_never_shown(device, cloud, capsys):
    """``user:pass@`` and ``?api_key=`` in --cascade were echoed in every fallback's cascade.error (sent to the
    client), on stderr and in the start-up line. The query still reaches the cloud, as a query."""
    cloud.mode = "html_500"
    r = _client(device).chat.completions.create(model="x", messages=MSG, max_tokens=4, extra_body=DEFER)
    info = r.model_extra["cascade"]
    shown = f"http://***@127.0.0.1:{cloud.httpd.server_address[1]}/v1?api_key=***"
    assert info["fallback"] == "http_500" and info["error"].startswith(f"the cloud at {shown} answered HTTP 500")
    said = info["error"] + device.state.cascade.describe() + capsys.readouterr().err
    assert f"cascade: the cloud at {shown} answered HTTP 500" in said and not any(s in said for s in SECRETS), said
    assert device.state.cascade.describe().startswith(f"cascade -> {shown} (threshold 0.5, ")
    assert device.state.cascade.describe().endswith("; model fake)")  # as the listing named it
    assert cloud.paths[-1] == "/v1/chat/completions?api_key=sk-SECRET-1"


def _metrics(srv) -> dict[str, float]:
    lines = httpx.get(srv.base_url + "/metrics").text.splitlines()
    return {k: float(v) for k, _, v in (line.partition(" ") for line in lines) if k.startswith("ondevice_cascade")}


def test_a_relayed_stream_cut_after_its_first_token_is_not_counted_as_a_cloud_answer(device, cloud, capsys):
    """/metrics counted it as a cloud answer, and the log said the client got the device's answer; the client
    got a cut-off cloud answer (finish_reason "error")."""
    before = _metrics(device)
    cloud.mode = "cut"
    chunks = list(_client(device).chat.completions.create(model="x", messages=MSG, max_tokens=6, stream=True,
                                                          extra_body=DEFER))
    assert chunks[-1].choices[0].finish_reason == "error"
    after = _metrics(device)
    assert after["ondevice_cascade_cloud_answers"] == before["ondevice_cascade_cloud_answers"]
    assert after["ondevice_cascade_cloud_streams_cut"] == before.get("ondevice_cascade_cloud_streams_cut", 0) + 1
    err = capsys.readouterr().err
    assert "ended its stream before the answer's end (no finish_reason); the client got a cut-off cloud answer " \
           "(finish_reason \"error\")" in err, err


def test_after_a_429_with_retry_after_deferrals_fall_back_at_once_until_then(device, cloud):
    """Every deferral still went to a cloud that had said "come back in 30 s", and the error did not say when."""
    cloud.mode, cloud.retry_after = "rate_limited", "30"
    try:
        infos = [_cascade_of(_client(device).chat.completions.create(
            model="x", messages=MSG, max_tokens=4, stream=stream, extra_body=DEFER), stream)
            for stream in (False, True, False)]
    finally:
        device.state.cascade.cloud._cool = None  # the next tests' cloud answers
    assert [i["fallback"] for i in infos] == ["http_429", "cooldown", "cooldown"] and len(cloud.bodies) == 1
    assert "answered HTTP 429 (Retry-After 30 s)" in infos[0]["error"]
    assert "answered HTTP 429 (Retry-After 30 s)" in infos[1]["error"] and "not asked again for " in infos[1]["error"]


def test_an_error_event_in_the_clouds_stream_is_the_gateways_message(device, cloud):
    """A stream whose event is an ``{"error": ...}`` fell back as "unusable reply (APIError)"."""
    cloud.mode = "err200"
    r = _client(device).chat.completions.create(model="x", messages=MSG, max_tokens=4, stream=True, extra_body=DEFER)
    info = _cascade_of(r, True)
    assert info["fallback"] == "cloud_error" and info["error"].endswith(
        "sent an error: 'Provider returned error: upstream overloaded'"), info


@pytest.mark.parametrize("policy", [{"never_defer": True}, {"threshold": 0}])
def test_a_stream_whose_tier_is_known_up_front_is_not_held_for_the_prefix(device, cloud, policy):
    """A never_defer stream sent its first text only after --cascade-prefix-tokens (16) device tokens, in one
    chunk: the private request was decided before any token, so each token now goes out as it comes."""
    r = _client(device).chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Tell me a long story about a dragon."}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"cascade": policy})
    chunks = list(r)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    tokens = chunks[-1].usage.completion_tokens
    assert tokens > 1 and len(texts) == tokens, (len(texts), tokens)
    assert cloud.bodies == []


# -- the library --------------------------------------------------------------------------------------------
def _generate(smol, url: str, **kw):
    from ondevice import Cascade

    with Cascade(smol, url, policy=Policy(threshold=1.0), **kw) as c:
        return c.generate("Hi", max_tokens=4, temp=0)


@pytest.mark.parametrize("url, base", [
    ("http://h:1", "http://h:1/v1"), ("http://h:1/", "http://h:1/v1"), ("http://h:1/v1/", "http://h:1/v1"),
    ("http://h:1/v1/chat/completions", "http://h:1/v1"),
    (GEMINI + "/", GEMINI),
    ("https://gateway.ai.cloudflare.com/v1/acc/gw/openai", "https://gateway.ai.cloudflare.com/v1/acc/gw/openai"),
    ("https://models.github.ai/inference", "https://models.github.ai/inference"),
    ("https://x.azure.com/openai/deployments/d?api-version=1", "https://x.azure.com/openai/deployments/d"),
])
def test_v1_is_added_to_a_bare_origin_only(url, base):
    assert base_url(url) == base


def test_a_cloud_url_with_a_path_of_its_own_and_a_query_is_asked_there(smol, cloud):
    """Every path not ending in /v1 got /v1 added (Gemini, Cloudflare's gateway, GitHub Models: all 404s), and a
    query was glued into the path."""
    r = _generate(smol, cloud.root + "/gw/openai/?api-version=2024-02-01", cloud_model="m")
    assert r.tier == "cloud" and cloud.paths == ["/gw/openai/chat/completions?api-version=2024-02-01"]


def test_the_library_sends_the_seed_and_penalties_as_the_server_does(smol, cloud):
    from ondevice import Cascade

    with Cascade(smol, cloud.url, policy=Policy(threshold=1.0)) as c:
        c.generate("Hi", max_tokens=4, temp=0.2, seed=42, presence_penalty=0.5, frequency_penalty=0.25)
    body = cloud.bodies[-1]
    assert (body["seed"], body["presence_penalty"], body["frequency_penalty"]) == (42, 0.5, 0.25), body


def test_a_cloud_listing_several_models_wants_one_chosen(smol, cloud):
    """The first listed model was used (here an embedding model: every deferral failed)."""
    cloud.listing = LISTED
    r = _generate(smol, cloud.url)
    assert r.tier == "device" and r.fallback == "no_model" and cloud.bodies == []
    assert r.error == (f"the cloud at {cloud.url} lists 4 models (text-embedding-3-small, whisper-1, gpt-4o-mini, "
                       f"o1-pro); choose one with Cascade(cloud_model=...)")
    cloud.listing = ["only-one"]
    assert _generate(smol, cloud.url).tier == "cloud" and cloud.bodies[-1]["model"] == "only-one"


def test_a_failed_model_listing_says_so_and_how_to_skip_it(smol, cloud):
    """A 404 from GET /models read as if the chat call had failed."""
    cloud.listing = None
    r = _generate(smol, cloud.url)
    assert r.fallback == "http_404" and r.error == (
        f"listing the models of the cloud at {cloud.url} (GET /models) failed: HTTP 404: 'nope'; name the model "
        f"with Cascade(cloud_model=...) to skip the listing")
    assert _generate(smol, cloud.url, cloud_model="m").tier == "cloud"


def test_an_error_body_sent_with_http_200_is_the_gateways_message(smol, cloud):
    cloud.mode = "err200"
    r = _generate(smol, cloud.url)
    assert r.tier == "device" and r.fallback == "cloud_error" and r.error == (
        f"the cloud at {cloud.url} answered an error in an HTTP 200 body: 'Provider returned error: upstream "
        f"overloaded' (code 502)")


def test_library_errors_never_show_url_credentials(smol):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _generate(smol, f"http://user:pa55word@127.0.0.1:{port}/v1?api_key=sk-SECRET-1", cloud_model="m")
    assert r.fallback == "unreachable"
    assert r.error == (f"cannot reach the cloud at http://***@127.0.0.1:{port}/v1?api_key=***"
                       f": nothing accepts connections there; start its server, or fix the host or port in the URL")


def test_a_cloud_host_that_does_not_resolve_is_said_with_the_fix(smol):
    """(Nothing listening at the address: the test above.)"""
    r = _generate(smol, "http://cloud.invalid/v1", cloud_model="m")  # .invalid never resolves (RFC 2606)
    assert r.fallback == "unreachable" and r.error == ("cannot reach the cloud at http://cloud.invalid/v1: its host "
                                                       "name does not resolve; fix the host in the URL")


def test_a_combiner_fitted_for_another_model_is_warned_about_and_not_called_calibrated(smol, cloud, tmp_path):
    from ondevice import Cascade
    from ondevice.cascade import Combiner, features
    from ondevice.cascade.confidence import TOKEN_FEATURES

    comb = Combiner.fit([features([m], [0.5]) for m in (-0.2, -0.5, -1.0, -2.0, -3.0)], [1, 1, 0, 0, 0],
                        features=TOKEN_FEATURES, meta={"model": "gemma3-270m", "model_sha256": "ab" * 32})
    path = comb.save(tmp_path / "combiner.json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Cascade(smol, cloud.url, combiner=str(path)) as c:
            r = c.generate("Hi", max_tokens=4, temp=0, cascade={"never_defer": True})
    said = [str(x.message) for x in w if "fitted for" in str(x.message)]
    assert len(said) == 1 and said[0].startswith(f"the combiner was fitted for gemma3-270m (abababababab), not for "
                                                 f"{smol.name} ("), said
    assert r.calibrated is False


# -- offline batch work ---------------------------------------------------------------------------------------
def test_eval_retries_rate_limited_items_and_says_which_it_left_out(smol_path, cloud, home, capsys):
    """Every item the cloud rate-limited was dropped (no retries offline) and only a smaller n showed it."""
    from ondevice.eval.cascade_curve import cascade_eval, load_items, print_record

    items = load_items("rewrite", "test", None, 4)
    cloud.flaky, cloud.refuse = True, {items[0].messages()[-1]["content"]}  # every other request 429, one item 503
    r = cascade_eval(str(smol_path), cloud.url, "rewrite", split="test", limit=4, max_tokens=4, threads=1,
                     store=False)
    assert r["curve"]["n"] == 3
    assert r["left_out"] == "1 of 4 items had no cloud answer (http_503 x1): left out of the curve"
    print_record(r)
    assert "  1 of 4 items had no cloud answer (http_503 x1): left out of the curve\n" in capsys.readouterr().out


def test_cascade_fit_takes_serves_flag_names_and_warns_about_a_small_dev_set(cli, smol_path, cloud, tmp_path):
    """``--cascade-model`` (serve's name) was refused with "did you mean --cascade-timeout?"; 8 dev answers made a
    combiner and a recommended share without a word about how rough that is."""
    cloud.mode, cloud.listing = "mixed", LISTED
    fit = ("cascade", "fit", "-m", str(smol_path), "--cascade", cloud.url, "--limit", "8", "--max-tokens", "4",
           "--threads", "1", "-o", str(tmp_path / "combiner.json"))
    r = cli(*fit)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        f"ondevice cascade: error: the cloud at {cloud.url} lists 4 models (text-embedding-3-small, whisper-1, "
        f"gpt-4o-mini, o1-pro); choose one with --cloud-model"), r.stderr
    r = cli(*fit, "--cascade-model", "gpt-4o-mini", "--cascade-key-env", "ONDEVICE_TEST_UNSET_KEY")
    assert r.returncode == 0, r.stderr
    assert {b["model"] for b in cloud.bodies} == {"gpt-4o-mini"}
    assert "ondevice cascade: warning: 8 dev answers (" in r.stderr, r.stderr
    assert "give rough thresholds: fewer than 10 of either kind; raise --limit (8 now) or add a suite (e.g. " \
        "--suite rewrite,assistant-en" in r.stderr  # more items: the fixes that give them


def test_the_small_dev_set_warning_names_a_fix_that_adds_items():
    """With no --limit given, "raise --limit" was advised though every dev item was used, and --tasks can only
    narrow: the fix named now is the one that gives more items."""
    import argparse

    from ondevice.cascade.cli import small_sample

    def said(**kw):
        return small_sample(21, 18, argparse.Namespace(**{"limit": None, "tasks": None, "suite": "rewrite", **kw}))

    assert said().endswith("fewer than 10 of either kind; add a suite (e.g. --suite rewrite,assistant-en: its "
                           "rewrite and summary items)")
    assert said(tasks="rewrite_formal").endswith("; keep more --tasks or add a suite (e.g. --suite "
                                                 "rewrite,assistant-en: its rewrite and summary items)")
    assert said(suite="rewrite,assistant-en").endswith("; add a suite to --suite")
    assert small_sample(40, 20, argparse.Namespace(limit=None, tasks=None, suite="rewrite")) is None
