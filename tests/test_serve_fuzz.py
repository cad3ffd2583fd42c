"""Requests that must never kill or wedge the server: `ondevice serve` fuzzed from its own OpenAPI document
(schemathesis) and with hand-written hypothesis strategies for the fields that document leaves open (JSON schemas,
tool arguments, the Responses API's body), then one plain regression test per finding.

A finding is a 5xx, a reply that is not strict JSON, a stream without its proper end, a request that hangs past
its timeout, the server process dying, or a normal request failing afterwards. Everything runs against a real
server process on loopback with the shipped SmolLM2 (a crash shows as a dead process, not a dead pytest).
Generation is kept to 2 tokens a request: the fuzz is about what a request may hold, not about long replies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import serve_process
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from ondevice.serve.app import ROUTES
from ondevice.serve.schemas import MAX_DEPTH, MAX_STOPS

TIMEOUT = 120  # seconds for one request: a request past it has hung (the server's own --timeout is 100)
MAX_TOKENS = 2
OLLAMA_GENERATING = {"/api/chat", "/api/generate"}  # their length is options.num_predict
NATIVE_GENERATING = {"/completion", "/completions", "/infill"}  # llama-server's own: n_predict, n_cmpl, a native stream
GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", *OLLAMA_GENERATING,
              *NATIVE_GENERATING}
# a valid request costs model time: fewer examples
COMPUTING = GENERATING | {"/v1/embeddings", "/api/embed", "/api/embeddings", "/embedding", "/embeddings"}
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# every operation the server's OpenAPI document lists (test_the_openapi_document_lists_every_route keeps it whole)
OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}", "GET /tokenizer_info",
              "POST /tokenize", "POST /detokenize", "POST /v1/embeddings", "POST /v1/chat/completions",
              "POST /v1/completions", "POST /v1/responses", "POST /v1/messages", "POST /v1/messages/count_tokens",
              "GET /api/tags", "GET /api/ps", "GET /api/version", "POST /api/show", "POST /api/chat",
              "POST /api/generate", "POST /api/embed", "POST /api/embeddings", "POST /completion", "POST /completions",
              "POST /infill", "POST /embedding", "POST /embeddings", "GET /props", "POST /apply-template",
              "GET /lora-adapters", "POST /lora-adapters", "GET /slots", "POST /slots/{id_slot}",
              "POST /v1/responses/input_tokens", "POST /v1/chat/completions/input_tokens", "GET /", "HEAD /",
              "HEAD /api/version", "HEAD /api/tags", "POST /api/pull", "POST /api/create", "POST /api/copy",
              "DELETE /api/delete", "POST /api/push", "GET /v1/responses/{response_id}", "HEAD /health",
              "HEAD /metrics"]
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])  # no shrinking: a bounded run; the example is printed


class Server:
    def __init__(self, proc, url: str, log: Path):
        self.proc, self.base, self.log = proc, url.removesuffix("/v1"), log

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # one thread: where other work shares the cores, llama.cpp's threads wait on each other many times over
    flags = ("--embeddings", "-c", "128", "--parallel", "2", "--max-queue", "2", "--threads", "1",
             "--embeddings-ctx", "64", "--timeout", "100")
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "slots").mkdir()
    with serve_process(tmp, *flags, "--slot-save-path", str(tmp / "slots")) as (proc, url, log):
        yield Server(proc, url, log)


@pytest.fixture(scope="module")
def operations(srv):
    schema = schemathesis.openapi.from_url(srv.base + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op for op in ops}


# ------------------------------------------------------------------ what every reply must be
def _strict_json(text: str):
    """``text`` as JSON, refusing NaN and Infinity (which Python writes and no other JSON reader takes)."""
    def refuse(c):
        raise ValueError(f"{c} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _check_stream(path: str, text: str) -> None:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events, "an empty stream"
    datas = []
    for e in events:
        lines = [x for x in e.split("\n") if x.startswith("data: ")]
        assert lines, f"an event without data: {e[:200]!r}"
        datas.append(lines[-1][len("data: "):])
    last = datas[-1]
    parsed = [_strict_json(d) for d in datas if d != "[DONE]"]
    if path == "/v1/responses":
        assert parsed[-1]["type"] in ("response.completed", "response.incomplete", "response.failed"), last[:300]
    elif path == "/v1/messages":
        assert parsed[-1]["type"] in ("message_stop", "error"), last[:300]
    elif path in NATIVE_GENERATING:  # llama-server's: no [DONE]; the last event ends a reply, or is an error
        assert parsed[-1].get("stop") is True or "error" in parsed[-1], last[:300]
    else:
        assert last == "[DONE]" or "error" in parsed[-1], f"the stream ends without [DONE] or an error: {last[:300]}"


def check_reply(srv: Server, path: str, status: int, ctype: str, body: bytes, sent) -> None:
    """The reply to one fuzzed request is sound, and the server is still up."""
    text = body.decode("utf-8")
    where = f"{path} with {str(sent)[:600]} -> {status} {text[:600]}\n--- server log:\n{srv.tail()}"
    # /infill on a model without fill-in-the-middle tokens (SmolLM2, here) is llama-server's 501, whatever the body
    assert status < 500 or (path == "/infill" and status == 501), where
    assert srv.proc.poll() is None, where
    if ctype.startswith("text/event-stream"):
        _check_stream(path, text)
    elif ctype.startswith("application/x-ndjson"):  # Ollama's stream: one object a line, the last done or an error
        lines = [_strict_json(x) for x in text.splitlines() if x.strip()]
        assert lines and (lines[-1].get("done") is True or "error" in lines[-1]), where
    elif path not in ("/metrics", "/") and (text or status != 200):  # plain text: Prometheus's, Ollama's
        # heartbeat; and a HEAD's reply, which has the headers of a GET's and no body
        payload = _strict_json(text)
        if status >= 400:
            msg = payload["error"] if path.startswith("/api/") else payload["error"]["message"]  # Ollama's shape
            assert isinstance(msg, str) and msg and "\n" not in msg, where


def assert_serving(srv: Server) -> None:
    """A normal request still gets a normal answer."""
    r = httpx.post(srv.base + "/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": MAX_TOKENS})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
    assert httpx.get(srv.base + "/health", timeout=TIMEOUT).json()["status"] == "ok"


def _cheap(path: str, body):
    """The body with at most MAX_TOKENS generated per choice (a missing length means the whole context), at most
    2 choices, 2 prompts and 2 texts to embed: the fuzz is about what a request may hold, not about how long it
    takes to answer (the server's limits on these have tests of their own)."""
    if not isinstance(body, dict):
        return body
    if path in ("/v1/embeddings", "/api/embed", "/embedding", "/embeddings"):
        for key in ("input", "content"):
            if isinstance(body.get(key), list):
                body[key] = body[key][:2]
    elif path in NATIVE_GENERATING:
        n = body.get("n_predict")
        body["n_predict"] = min(n, MAX_TOKENS) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 \
            else MAX_TOKENS
        for key in ("max_tokens", "max_completion_tokens"):
            body.pop(key, None)
        for key in ("n_cmpl", "n"):
            if isinstance(body.get(key), int) and body[key] > 2:
                body[key] = 2
        if isinstance(body.get("prompt"), list) and not any(isinstance(x, int) for x in body["prompt"]):
            body["prompt"] = body["prompt"][:2]
    elif path in OLLAMA_GENERATING:
        opts = body.setdefault("options", {})
        if isinstance(opts, dict):
            n = opts.get("num_predict")
            opts["num_predict"] = min(n, MAX_TOKENS) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 \
                else MAX_TOKENS
    elif path in GENERATING:
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if path == "/v1/completions" and isinstance(body.get("prompt"), list) and body["prompt"] \
                and isinstance(body["prompt"][0], (str, list)):
            body["prompt"] = body["prompt"][:2]
        given_ = [k for k in LENGTH_FIELDS if isinstance(body.get(k), int) and not isinstance(body[k], bool)]
        for k in given_:
            body[k] = min(body[k], MAX_TOKENS)
        if not any(k in body for k in LENGTH_FIELDS):
            body["max_tokens"] = MAX_TOKENS
    return body


# ------------------------------------------------------------------ 1. schemathesis: the OpenAPI document
def test_the_openapi_document_lists_every_route(operations):
    assert {k.split()[1] for k in operations} == ROUTES | {"/v1/models/{model_id}", "/slots/{id_slot}",
                                                          "/v1/responses/{response_id}"}
    assert sorted(operations) == sorted(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_schemathesis_fuzz(srv, operations, operation, mode):
    op = operations[operation]
    bodiless = op.method.upper() in ("GET", "HEAD")
    if bodiless and mode is GenerationMode.NEGATIVE:
        pytest.skip("a GET or HEAD takes no body and at most a path (any string): there is no invalid input to "
                    "generate")

    @settings(FUZZ, max_examples=8 if bodiless else 25 if op.path in COMPUTING else 40)
    @given(case=op.as_strategy(mode))
    def run(case):
        if op.method.upper() == "POST":
            case.body = _cheap(op.path, case.body)
        r = case.call(base_url=srv.base, timeout=TIMEOUT)
        ctype = (r.headers.get("content-type") or [""])[0]
        check_reply(srv, op.path, r.status_code, ctype, r.content, case.body)

    run()
    assert_serving(srv)


# ------------------------------------------------------------------ 2. hypothesis: the fields the document leaves open
def _nest(depth: int, kind: str) -> str:
    """JSON text nested ``depth`` levels (built as text: json.dumps itself stops near 1,000 levels)."""
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    if kind == "properties":
        return '{"type": "object", "properties": {"a": ' * depth + '{"type": "integer"}' + "}}" * depth
    return '{"items": ' * depth + '{"type": "integer"}' + "}" * depth


DEEP = "\x00DEEP:{}:{}:{}\x00"  # a placeholder json.dumps keeps as a string; _body_text puts deep JSON there
leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
# a value of the wrong type, most often: a plain one of each JSON type, or any JSON value
value = st.sampled_from([None, True, 0, -1, 2**64, 1.5, 1e308, "", "x", [], [1], ["x"], {}, {"a": 1}]) | st.recursive(
    leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=16)


def deep(as_text: bool):
    """Deep JSON: as a value, or (``as_text``) as a string holding it (a tool call's arguments)."""
    return st.builds(lambda d, k: DEEP.format(d, k, "text" if as_text else "value"),
                     st.sampled_from([5000, 990, 70, 8]), st.sampled_from(["list", "properties", "items"]))


json_value = value | deep(False) | st.just({"type": "string", "minLength": 10**9}) | st.just({"$ref": "#/nowhere"})
arguments = deep(True) | value.map(json.dumps) | st.text(max_size=20)
text = st.text(max_size=40)
token_ids = st.lists(st.integers(-5, 60_000) | st.integers(-(2**70), 2**70), max_size=6)

role = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
tool_call = st.fixed_dictionaries({"id": text, "function": st.fixed_dictionaries({"name": text, "arguments": arguments})})
message = st.fixed_dictionaries({"role": role}, optional={
    "content": text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_text"])},
                                                     optional={"text": text | value}), max_size=2) | value,
    "tool_calls": st.lists(tool_call, min_size=1, max_size=2), "tool_call_id": text, "name": text})
calls = st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": st.lists(tool_call, min_size=1, max_size=2)})
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "get_weather"]) | text}, optional={"parameters": json_value, "description": text})})
SAMPLING = {"stream": st.booleans(), "n": st.integers(1, 3), "seed": st.integers(0, 2**32), "temperature": leaf,
            "top_k": st.integers(0, 2**63), "stop": text | st.lists(text, max_size=MAX_STOPS + 3),
            "logit_bias": st.dictionaries(st.integers(-3, 50_000).map(str), st.floats(-100, 100), max_size=4),
            "grammar": st.sampled_from(['root ::= "1"', "root ::= (", "root ::= root", ""]) | text,
            "ignore_eos": st.booleans(), "draft": st.sampled_from(["lookup", "none", "model"]),
            "stream_options": st.just({"include_usage": True}) | value, "model": text, "max_tokens": value}
item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference"]),
    "role": st.sampled_from(["user", "assistant", "system"]), "content": text | value, "call_id": text,
    "name": text, "arguments": arguments, "output": text | value})
# an Anthropic content block: text, tool_use, tool_result (its content text or blocks), image, ...
block = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking"]) | text},
                              optional={"text": text | value, "id": text | value, "name": text | value,
                                        "input": value, "tool_use_id": text | value, "is_error": leaf,
                                        "content": text | value})
# route -> (a valid body, the fields a fuzzed body replaces or adds: 1 to 3 of them, the rest stays valid so that
# a hostile value reaches the code past validation)
ROUTE_FIELDS = {
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}]}, {
        **SAMPLING, "messages": st.lists(calls | message, min_size=1, max_size=3) | value,
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["json_schema", "json_object", "text"])},
            optional={"json_schema": st.fixed_dictionaries({"schema": json_value}), "schema": json_value}) | value,
        "tools": st.lists(tool, max_size=2) | value,
        "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.just(
            {"type": "function", "function": {"name": "f"}}) | value}),
    "/v1/completions": ({"prompt": "hi"}, {
        **SAMPLING, "prompt": text | token_ids | st.lists(text, max_size=3) | st.lists(token_ids, max_size=3) | value,
        "echo": st.booleans(), "logprobs": st.integers(0, 20) | value, "suffix": text}),
    "/v1/responses": ({"input": "hi"}, {
        "input": st.lists(item, min_size=1, max_size=3) | value, "instructions": text | value,
        "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
            {"type": st.sampled_from(["json_schema", "json_object", "text"])}, optional={"schema": json_value})
            | value}) | value,
        "include": st.just(["message.output_text.logprobs"]) | value,
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function") | text, "name": text},
                                                optional={"parameters": json_value}), max_size=2) | value,
        "tool_choice": st.just({"type": "function", "name": "f"}) | value, "max_output_tokens": value,
        "stream": st.booleans(), "top_logprobs": st.integers(0, 20) | value, "previous_response_id": value}),
    "/v1/messages": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}, {
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | text}, optional={
            "content": text | value | st.lists(block, max_size=3)}), min_size=1, max_size=3) | value,
        "system": text | st.lists(block, max_size=2) | value, "stop_sequences": st.lists(text, max_size=3) | value,
        "tools": st.lists(st.fixed_dictionaries({"name": text}, optional={
            "input_schema": json_value, "type": st.just("custom") | text}), max_size=2) | value,
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"]) | text},
                                             optional={"name": st.just("f") | text}) | value,
        "thinking": value, "output_config": value, "stream": st.booleans(), "temperature": leaf}),
    "/completion": ({"prompt": "hi"}, {
        **SAMPLING, "prompt": text | token_ids | st.lists(text | st.integers(-5, 50000), max_size=4)
        | st.lists(text | token_ids | st.fixed_dictionaries({"prompt_string": text | value}), max_size=3) | value,
        "n_predict": st.integers(-3, 4) | value, "n_probs": st.integers(-1, 30) | value, "json_schema": json_value,
        "grammar": text | value, "logit_bias": st.lists(st.tuples(text | st.integers(-5, 60000), leaf).map(list),
                                                           max_size=3) | value,
        "samplers": st.lists(st.sampled_from(["top_k", "top_p", "min_p", "temperature", "dry", "xtc"]) | text,
                             max_size=4) | text | value,
        "response_fields": st.lists(text, max_size=3) | value, "lora": value, "n_cmpl": st.integers(0, 3) | value,
        "return_tokens": leaf, "timings_per_token": leaf, "stream": st.booleans()}),
    "/tokenize": ({"content": "hi"}, {"content": text | value, "prompt": text | value, "with_pieces": leaf,
                                      "add_special": leaf}),
    "/detokenize": ({"tokens": [1, 2]}, {"tokens": token_ids | value}),
    "/v1/embeddings": ({"input": "hi"}, {"input": text | token_ids | st.lists(text, max_size=3) | value,
                                         "dimensions": st.integers(-1, 10**6) | value,
                                         "encoding_format": st.just("base64") | text}),
}


def fuzzed_body(path: str, only: tuple[str, ...] = ()):
    """A valid body of ``path`` with 1 to 3 of its fields fuzzed (``only``: of these fields)."""
    base, fields = ROUTE_FIELDS[path]
    names = st.lists(st.sampled_from(sorted(only or fields)), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda ks: st.fixed_dictionaries({k: fields[k] for k in ks})).map(lambda f: {**base, **f})


def _body_text(body) -> str:
    out = json.dumps(body)
    for d, kind, as_ in set(re.findall(r"\\u0000DEEP:(\d+):(\w+):(\w+)\\u0000", out)):
        nested = _nest(int(d), kind)
        out = out.replace(json.dumps(DEEP.format(d, kind, as_)), json.dumps(nested) if as_ == "text" else nested)
    return out


@pytest.mark.parametrize("path,only,examples", [
    ("/v1/chat/completions", (), 60), ("/v1/chat/completions", ("messages",), 40),
    ("/v1/chat/completions", ("response_format", "tools", "tool_choice"), 40), ("/v1/responses", (), 60),
    ("/v1/messages", (), 60),
    ("/v1/completions", (), 30), ("/completion", (), 40), ("/tokenize", (), 20), ("/detokenize", (), 20), ("/v1/embeddings", (), 20)])
def test_hypothesis_fuzz_of_open_fields(srv, path, only, examples):
    with httpx.Client(base_url=srv.base, timeout=TIMEOUT) as client:

        @settings(FUZZ, max_examples=examples)
        @given(body=fuzzed_body(path, only))
        def run(body):
            raw = _body_text(_cheap(path, body))
            r = client.post(path, content=raw.encode("utf-8", "surrogatepass"),
                            headers={"Content-Type": "application/json"})
            check_reply(srv, path, r.status_code, r.headers.get("content-type", ""), r.content, raw[:600])

        run()
    assert_serving(srv)


def test_no_request_was_answered_with_a_5xx(srv):
    """Over every test above (the access counts: a reply the client never read would show as 499)."""
    codes = re.findall(r'requests_total\{route="([^"]*)",code="(\d+)"\}', httpx.get(srv.base + "/metrics").text)
    bad = [(r, c) for r, c in codes if (c.startswith("5") or c == "499") and (r, c) != ("/infill", "501")]
    assert ("/v1/chat/completions", "200") in codes and not bad, codes


# ------------------------------------------------------------------ 3. one regression test per finding
def _post(srv: Server, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(srv.base + path, content=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def _error(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"], err
    return err["message"]


@pytest.mark.parametrize("depth", [900, 100_000])
def test_deeply_nested_tool_call_arguments_are_400(srv, depth):
    """Were a 500 (RecursionError parsing the arguments, or rendering them into the prompt)."""
    args = "[" * depth + "]" * depth
    chat = {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": args}}]},
                         {"role": "user", "content": "x"}], "max_tokens": MAX_TOKENS}
    msg = _error(_post(srv, "/v1/chat/completions", chat))
    assert "tool_calls[0].function.arguments nests" in msg and f"at most {MAX_DEPTH}" in msg, msg
    resp = {"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": args},
                      {"role": "user", "content": "x"}], "max_output_tokens": MAX_TOKENS}
    assert "arguments nests" in _error(_post(srv, "/v1/responses", resp))
    assert_serving(srv)


def test_a_json_schema_nested_past_the_limit_is_400_naming_the_field(srv):
    schema = _nest(MAX_DEPTH, "items")
    body = ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "response_format": {"type": '
            '"json_schema", "json_schema": {"name": "x", "schema": ' + schema + "}}}")
    msg = _error(_post(srv, "/v1/chat/completions", body))
    assert msg.startswith("invalid request: response_format: response_format nests") and "$defs" in msg, msg


def test_more_stop_strings_than_the_limit_are_400(srv):
    """Were accepted without limit: each is looked for after every token, on the one computing thread that
    every request shares, so a body of short stop strings made each token of every reply wait."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": MAX_TOKENS,
            "stop": [f"s{i}" for i in range(MAX_STOPS + 1)]}
    msg = _error(_post(srv, "/v1/chat/completions", body))
    assert msg == f"invalid request: stop: stop has {MAX_STOPS + 1} strings but this server takes at most {MAX_STOPS}; send fewer"
    body["stop"] = body["stop"][:MAX_STOPS]
    assert _post(srv, "/v1/chat/completions", body).status_code == 200


def test_more_prompts_than_the_server_holds_are_refused_before_they_are_read(srv):
    """Every prompt was tokenized and given a sampler before the count was checked, so a list of many thousand
    prompts cost seconds of work for its 400. A bad token id past the limit shows which comes first now."""
    r = _post(srv, "/v1/completions", {"prompt": [[1, 2]] * 10 + [[-1]], "max_tokens": MAX_TOKENS})
    msg = _error(r)
    assert "asks for 11 generations" in msg and "--parallel + --max-queue" in msg, msg


@pytest.mark.parametrize("body,says", [
    ("[" * 100_000 + "]" * 100_000, f"nests deeper than this server reads JSON; send at most {MAX_DEPTH} levels"),
    ('{"messages": [{"role": "user", "content": "x"}], "seed": ' + "7" * 5000 + "}", "longer than 4300 digits"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "is not UTF-8"),
])
def test_a_body_json_cannot_read_says_why(srv, body, says):
    """Was 'There was an error parsing the body' with no reason and no fix."""
    r = _post(srv, "/v1/chat/completions", body)
    assert r.json()["error"]["code"] == "invalid_json"
    assert says in _error(r)


def test_a_syntax_error_names_the_reason_and_place(srv):
    msg = _error(_post(srv, "/v1/chat/completions", '{"messages": [}'))
    assert msg.startswith("the request body is not valid JSON (Expecting value at character 14)"), msg


@pytest.mark.parametrize("extra,says", [
    ({"text": {"format": "json_object"}}, "text.format must be an object"),
    ({"include": "message.output_text.logprobs"}, "include must be a list of strings"),
])
def test_responses_fields_of_the_wrong_type_are_400(srv, extra, says):
    """Were a 500 ('str' object has no attribute 'get'; argument of type 'int' is not iterable)."""
    assert says in _error(_post(srv, "/v1/responses", {"input": "hi", "max_output_tokens": MAX_TOKENS, **extra}))


def test_an_error_message_stays_one_line(srv):
    """A field name with a newline in it came back raw: a two-line error (found by schemathesis)."""
    body = {"messages": [{"role": "user", "content": "x"}], "cascade": {"a\nb": 1}}  # cascade forbids extra keys
    msg = _error(_post(srv, "/v1/chat/completions", body))
    assert "\n" not in msg and "a\\nb" in msg, msg


def test_an_unexpected_error_is_counted_as_a_500(smol_path):
    """The access log and /metrics counted a request that failed with a bug as 499 ('client went away')."""
    from ondevice.serve import BackgroundServer, ServeSettings

    settings_ = ServeSettings(model=str(smol_path), port=0, parallel=1, ctx=64, threads=1, embeddings=False,
                              access_log=False)
    with BackgroundServer(settings_) as s:
        @s.app.get("/boom")
        async def boom():  # a route with a bug, added to the real app
            raise RuntimeError("a bug")

        r = httpx.get(s.base_url + "/boom", timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert 'requests_total{route="other",code="500"} 1' in httpx.get(s.base_url + "/metrics").text
