"""Ollama's native API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, /api/embed,
/api/embeddings) on `ondevice serve`, through the official ollama client: the chat and completions routes' greedy
answers in Ollama's shape (streamed as NDJSON by default, or whole), options mapped to the sampler (num_predict,
stop, seed), format as JSON and as a schema, tool calls with object arguments (Qwen), the model list and details,
embeddings equal to /v1/embeddings', Ollama's errors ({"error": ...} with 404/400/401/503), and a client that
leaves mid-stream freeing its slot."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime

import httpx
import ollama
import openai
import pytest
from test_clients import _model_path
from test_serve_tools import QWEN, needs_qwen

from ondevice.serve import BackgroundServer, ServeSettings

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}  # the chat route's own greedy: no repeat penalty (Ollama: 1.1)
COLOR = [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": "Name a color."}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


@pytest.fixture(scope="module")
def server():
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so every route gives the same text.
    # max_queue 0: a request beyond the two slots is refused at once (Ollama's 503). One thread: on a machine busy
    # with other work, two threads wait on each other at every layer
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=1, kv_type="f32",
                             api_key=KEY, max_queue=0)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base_url, headers=AUTH, timeout=300)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def name(client):
    return client.list().models[0].model


def _slots_busy(server, want: int, within: float = 60.0) -> int:
    """Poll /health until ``want`` slots are busy (a bound on waiting, not a speed assertion)."""
    end = time.monotonic() + within
    while (busy := httpx.get(server.base_url + "/health").json()["slots_processing"]) != want \
            and time.monotonic() < end:
        time.sleep(0.05)
    return busy


def _metric(server, line_start: str) -> float:
    text = httpx.get(server.base_url + "/metrics", headers=AUTH).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_chat_is_the_chat_routes_answer_whole_and_streamed(client, oai, name):
    c = oai.chat.completions.create(model="m", messages=COLOR, max_tokens=24, temperature=0)
    r = client.chat(model=name, messages=COLOR, options={**GREEDY, "num_predict": 24})
    assert r.model == name and r.done and r.message.role == "assistant"
    assert r.message.content == c.choices[0].message.content and not r.message.tool_calls
    assert (r.prompt_eval_count, r.eval_count) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.done_reason == {"stop": "stop", "length": "length"}[c.choices[0].finish_reason]
    assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0
    assert r.created_at.endswith("Z") and datetime.fromisoformat(r.created_at).utcoffset().total_seconds() == 0
    parts = list(client.chat(model=name, messages=COLOR, options={**GREEDY, "num_predict": 24}, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == r.message.content
    assert (parts[-1].eval_count, parts[-1].done_reason) == (r.eval_count, r.done_reason)


def test_options_not_given_are_ollamas_defaults_not_llama_cpps(client, oai, name, server):
    """Ollama samples with repeat_penalty 1.1 over the last 64 tokens, top_p 0.9 and min_p 0 unless told
    otherwise; without them SmolLM2 listed "1. Banana 2. Apple 3. Apple 4. Apple ..." where Ollama's did not."""
    ask = [{"role": "user", "content": "List ten fruits, one per line."}]
    r = client.chat(model=name, messages=ask, options={"temperature": 0, "num_predict": 32})
    c = oai.chat.completions.create(model="m", messages=ask, max_tokens=32, temperature=0, extra_body={
        "repeat_penalty": 1.1, "repeat_last_n": 64, "top_p": 0.9, "min_p": 0.0})
    assert r.message.content == c.choices[0].message.content
    plain = oai.chat.completions.create(model="m", messages=ask, max_tokens=32, temperature=0)
    assert r.message.content != plain.choices[0].message.content  # the penalty changed the greedy list
    whole = httpx.post(server.base_url + "/api/generate", headers=AUTH, timeout=300, json={
        "model": name, "prompt": "Hi", "stream": False, "options": {**GREEDY, "num_predict": 4.0, "num_ctx": 1024.0}})
    assert whole.status_code == 200 and whole.json()["eval_count"] <= 4  # whole numbers as floats, as Ollama takes


def test_a_plain_request_streams_ndjson_by_default(server, name):
    body = {"model": name, "messages": COUNT, "options": {**GREEDY, "num_predict": 6}}
    r = httpx.post(server.base_url + "/api/chat", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    objs = [json.loads(line) for line in r.text.splitlines()]
    assert len(objs) > 2 and [o["done"] for o in objs].count(True) == 1 and objs[-1]["done"]
    assert objs[-1]["eval_count"] == 6 and objs[-1]["done_reason"] == "length"
    assert set(objs[-1]) >= {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                             "eval_count", "eval_duration"}


def test_generate_templated_is_chat_and_raw_is_completions(client, oai, name):
    g = client.generate(model=name, system=COLOR[0]["content"], prompt=COLOR[1]["content"],
                        options={**GREEDY, "num_predict": 16})
    c = oai.chat.completions.create(model="m", messages=COLOR, max_tokens=16, temperature=0)
    assert g.response == c.choices[0].message.content and g.prompt_eval_count == c.usage.prompt_tokens
    raw = client.generate(model=name, prompt="1, 2, 3,", raw=True, options={**GREEDY, "num_predict": 10})
    comp = oai.completions.create(model="m", prompt="1, 2, 3,", max_tokens=10, temperature=0)
    assert raw.response == comp.choices[0].text and raw.eval_count == 10 and raw.done_reason == "length"
    assert raw.prompt_eval_count == comp.usage.prompt_tokens
    streamed = list(client.generate(model=name, prompt="1, 2, 3,", raw=True, stream=True,
                                    options={**GREEDY, "num_predict": 10}))
    assert "".join(p.response for p in streamed) == raw.response and streamed[-1].done


def test_options_num_predict_stop_and_seed(client, oai, name):
    cut = client.chat(model=name, messages=COUNT, options={**GREEDY, "num_predict": 5})
    assert cut.eval_count == 5 and cut.done_reason == "length"
    whole = client.chat(model=name, messages=COUNT, options={**GREEDY, "num_predict": 40}).message.content
    assert "5" in whole
    stopped = client.chat(model=name, messages=COUNT, options={**GREEDY, "num_predict": 40, "stop": ["zebra", "5"]})
    assert stopped.message.content == whole[:whole.index("5")] and stopped.done_reason == "stop"
    warm = {"temperature": 1.0, "seed": 1234, "num_predict": 24}
    a, b = (client.chat(model=name, messages=COLOR, options=warm).message.content for _ in range(2))
    o = oai.chat.completions.create(model="m", messages=COLOR, max_tokens=24, temperature=1.0, seed=1234,
                                    extra_body={"repeat_penalty": 1.1, "top_p": 0.9, "min_p": 0.0})  # Ollama's
    assert a == b == o.choices[0].message.content  # the seed reaches the sampler


def test_options_the_chat_route_refuses_are_read_as_ollamas_sampler_reads_them(client, oai, name, server):
    """Ollama takes any temperature (no OpenAI bound of 2; a negative one is greedy), clamps top_p and min_p to
    [0, 1], and reads a repeat_penalty <= 0 as off; the /v1 routes keep OpenAI's bounds."""
    fruits = [{"role": "user", "content": "List ten fruits, one per line."}]
    off = client.chat(model=name, messages=fruits, options={**GREEDY, "num_predict": 32}).message.content
    assert off != client.chat(model=name, messages=fruits, options={"temperature": 0, "num_predict": 32}).message.content
    for route in ("/api/chat", "/api/generate"):  # 0 would make each repeated token certain in llama.cpp: off
        r = httpx.post(server.base_url + route, headers=AUTH, timeout=300, json={
            "model": name, "stream": False, "options": {"temperature": -1, "repeat_penalty": 0, "num_predict": 32},
            **({"messages": fruits} if route == "/api/chat" else {"prompt": fruits[0]["content"]})})
        assert r.status_code == 200, r.text
        assert (r.json().get("message") or {}).get("content", r.json().get("response")) == off
    wide = client.chat(model=name, messages=fruits, options={**GREEDY, "top_p": 1.5, "min_p": -1, "num_predict": 8})
    assert wide.message.content == off[:len(wide.message.content)] and wide.eval_count == 8

    def hot(t: float) -> str:  # raw: the completions route, seeded
        return client.generate(model=name, prompt="1, 2, 3,", raw=True,
                               options={"temperature": t, "seed": 7, "num_predict": 12}).response
    assert hot(2.5) == hot(2.5) != hot(2.0)  # taken as it is, not refused nor clamped to OpenAI's 2
    assert client.chat(model=name, messages=COLOR, options={"temperature": 2.5, "seed": 7, "num_predict": 4}).done
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model="m", messages=COLOR, max_tokens=4, temperature=2.5)


def test_format_json_and_schema(client, name):
    ask = [{"role": "user", "content": "Reply with a JSON object with one key \"color\"."}]
    r = client.chat(model=name, messages=ask, format="json", options={**GREEDY, "num_predict": 60})
    assert r.done_reason == "stop" and isinstance(json.loads(r.message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"], "additionalProperties": False}
    g = client.generate(model=name, prompt="Describe a cat.", format=schema, options={**GREEDY, "num_predict": 60})
    pet = json.loads(g.response)
    assert set(pet) == {"name", "age"} and isinstance(pet["age"], int)


def test_logprobs(client, oai, name):
    r = client.chat(model=name, messages=COLOR, options={**GREEDY, "num_predict": 8}, logprobs=True, top_logprobs=2)
    c = oai.chat.completions.create(model="m", messages=COLOR, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=2)
    assert [(x.token, round(x.logprob, 4)) for x in r.logprobs] == \
        [(x.token, round(x.logprob, 4)) for x in c.choices[0].logprobs.content]
    assert all(len(x.top_logprobs) == 2 for x in r.logprobs)


def test_tags_show_ps_version(server, client, name):
    path = _model_path()
    m = client.list().models
    assert [x.model for x in m] == [name] and name.endswith(":latest")
    assert m[0].size == path.stat().st_size
    assert m[0].digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    d = m[0].details
    assert (d.format, d.family, d.quantization_level, d.parameter_size) == ("gguf", "llama", "Q4_1", "134.5M")
    shown = client.show(name)
    assert shown.capabilities == ["completion", "tools"]  # tools in a system note: SmolLM2's template has none
    assert shown.template == server.state.template and shown.details.family == "llama"
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 8192
    # the file says apache-2.0: shown in its SPDX spelling, as `ondevice models` shows it (models/licences.py)
    assert shown.modelinfo["general.license"] == "apache-2.0" and shown.license == "Apache-2.0"
    assert client.show(name.removesuffix(":latest")).details == shown.details  # the tag may be left out
    ps = client.ps().models
    assert [x.model for x in ps] == [name] and ps[0].context_length == 1024
    version = httpx.get(server.base_url + "/api/version", headers=AUTH).json()["version"]
    assert [int(x) for x in version.split(".")] >= [0, 5, 0]  # structured outputs, tool calls: clients check
    for method in ("GET", "HEAD"):  # the ollama CLI's heartbeat (HEAD /) before each command
        r = httpx.request(method, server.base_url + "/", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "running" in httpx.get(server.base_url + "/", headers=AUTH).text


def test_embeddings_are_v1_embeddings(client, oai, name):
    e = client.embed(model=name, input=["The cat sat.", "Stock prices fell."])
    v1 = oai.embeddings.create(model="m", input=["The cat sat.", "Stock prices fell."])
    assert e.model == name and len(e.embeddings) == 2 and e.prompt_eval_count == v1.usage.prompt_tokens
    for got, want in zip(e.embeddings, v1.data):
        assert got == pytest.approx(want.embedding, abs=1e-6)
    assert client.embeddings(model=name, prompt="The cat sat.").embedding == pytest.approx(e.embeddings[0], abs=1e-6)
    assert len(client.embed(model=name, input="The cat sat.", dimensions=8).embeddings[0]) == 8
    long = "word " * 700  # over --embeddings-ctx (512): Ollama's default truncate cuts it; truncate false refuses it
    assert len(client.embed(model=name, input=long).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=name, input=long, truncate=False)
    assert err.value.status_code == 400 and "embeddings accept at most" in err.value.error


def test_the_load_call(client, name):
    g = client.generate(model=name, prompt="")
    assert g.done and g.done_reason == "load" and g.response == ""
    c = client.chat(model=name, messages=[])
    assert c.done and c.done_reason == "load" and c.message.content == ""


def test_an_unknown_model_is_404(client):
    for call in (lambda: client.chat(model="llama3.2", messages=COLOR), lambda: client.generate("llama3.2", "Hi"),
                 lambda: client.show("llama3.2"), lambda: client.embed(model="llama3.2", input="x"),
                 lambda: client.chat(model="llama3.2", messages=[])):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and err.value.error.startswith("model 'llama3.2' not found")


@pytest.mark.parametrize("body, says", [
    ({"options": {"temperature": "hot"}}, "options.temperature"),
    ({"options": {"num_ctx": "big"}}, "options.num_ctx='big' must be a whole number"),
    ({"options": {"num_predict": "many"}}, "options.num_predict"),
    ({"options": "hot"}, "options must be an object"),
    ({"format": "xml"}, "format must be"),
    ({"format": {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}, "format cannot be turned"),
    ({"think": True}, "think"),
    ({"messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]}, "messages[0].images"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role"),
    ({"messages": "Hi"}, "messages must be a list"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"fn": 1}]}]}, "messages[0].tool_calls[0]"),
])
def test_bad_chat_fields_are_400_naming_the_field(server, name, body, says):
    r = httpx.post(server.base_url + "/api/chat", headers=AUTH, timeout=60,
                   json={"model": name, "messages": COLOR, "stream": False, **body})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert says in r.json()["error"], r.json()


def test_a_num_ctx_above_the_slot_context_is_served_in_it_as_ollama_clamps(server, name, caplog):
    """Clients send num_ctx routinely (8192 from an editor plug-in); Ollama serves in what it holds and logs it."""
    r = httpx.post(server.base_url + "/api/chat", headers=AUTH, timeout=60, json={
        "model": name, "messages": COLOR, "stream": False, "options": {"num_ctx": 8192, "num_predict": 4}})
    assert r.status_code == 200 and r.json()["done"], r.text
    assert any("options.num_ctx=8192 is above" in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("body, says", [
    ({"template": "{{ .Prompt }}"}, "template"), ({"suffix": "end"}, "suffix"), ({"images": ["aGk="]}, "images"),
    ({"context": [1, 2, 3]}, "context"), ({"raw": True, "system": "Be brief."}, "system"),
])
def test_what_generate_refuses_is_400(client, name, body, says):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=name, prompt="Hi", **body)
    assert err.value.status_code == 400 and err.value.error.startswith(says)


def test_errors_come_in_ollamas_shape(server, name):
    r = httpx.post(server.base_url + "/api/chat", json={"model": name, "messages": COLOR})  # no API key
    assert r.status_code == 401 and list(r.json()) == ["error"] and "API key" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.base_url, headers={"Authorization": "Bearer wrong"}).list()
    assert err.value.status_code == 401
    r = httpx.post(server.base_url + "/api/chat", headers={**AUTH, "Content-Type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, json={"messages": "x"})
    assert r.status_code == 400 and isinstance(r.json()["error"], dict)  # other routes keep OpenAI's shape


def test_messages_become_the_chat_routes():
    """Tool calls carry their arguments as an object (the chat route: JSON text, with an id); a tool message names
    its tool (rendered by templates that show a tool's name); thinking from another model is not read."""
    from ondevice.serve.ollama import _messages

    got = _messages([{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "thinking": "hm", "tool_calls": [
                         {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "tool_name": "get_weather", "content": "18 C"}])
    assert got == [{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1_0", "type": "function", "function": {
                       "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                   {"role": "tool", "content": "18 C", "name": "get_weather"}]


class _LongStream:
    """A raw generate streaming up to 400 tokens (counting goes on), read until tokens flow; it holds its slot
    until closed (its response and line iterator are kept: collecting them would close the stream)."""

    def __init__(self, server, name):
        self.cm = httpx.stream("POST", server.base_url + "/api/generate", headers=AUTH, timeout=300, json={
            "model": name, "prompt": "1, 2, 3, 4, 5,", "raw": True, "options": {**GREEDY, "num_predict": 400}})
        self.resp = self.cm.__enter__()
        assert self.resp.status_code == 200
        self.lines = self.resp.iter_lines()
        for _ in range(3):
            assert not json.loads(next(self.lines))["done"]

    def close(self) -> None:
        self.cm.__exit__(None, None, None)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, name):
    made = _metric(server, "ondevice_generation_tokens_total")
    cancelled = _metric(server, "ondevice_requests_cancelled_total")
    stream = _LongStream(server, name)
    assert _slots_busy(server, 1) == 1
    stream.close()  # gone mid-stream
    assert _slots_busy(server, 0) == 0
    assert _metric(server, "ondevice_requests_cancelled_total") == cancelled + 1
    assert _metric(server, "ondevice_generation_tokens_total") - made < 400  # stopped, not run to its end
    assert _metric(server, 'ondevice_requests_total{route="/api/generate"') >= 1  # counted under its route


def test_a_full_server_is_ollamas_503(client, server, name):
    streams = [_LongStream(server, name) for _ in range(2)]  # both slots, and no queue (max_queue 0)
    try:
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=name, messages=COLOR, options={"num_predict": 2})
        assert err.value.status_code == 503 and "queue" in err.value.error
    finally:
        for stream in streams:
            stream.close()
    assert _slots_busy(server, 0) == 0


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def qwen():
    from ondevice.models import resolve

    settings = ServeSettings(model=str(resolve(QWEN).path), port=0, parallel=1, ctx=1024, threads=1)
    with BackgroundServer(settings) as s:
        c = ollama.Client(host=s.base_url, timeout=300)
        yield c, c.list().models[0].model, openai.OpenAI(base_url=s.base_url + "/v1", api_key="-", max_retries=0)


@needs_qwen
def test_qwen_tool_calls_have_object_arguments_and_results_go_back(qwen):
    client, name, oai = qwen
    assert client.show(name).capabilities == ["completion", "tools", "insert"]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat(model=name, messages=ask, tools=[WEATHER], options={**GREEDY, "num_predict": 60})
    assert [(c.function.name, c.function.arguments) for c in r.message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert r.done_reason == "stop" and not r.message.content
    parts = list(client.chat(model=name, messages=ask, tools=[WEATHER], stream=True,
                             options={**GREEDY, "num_predict": 60}))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the call and its result go back; the answer is the chat route's to the same conversation, from the same prompt
    back = ask + [r.message, {"role": "tool", "tool_name": "get_weather", "content": "18 C and sunny"}]
    answer = client.chat(model=name, messages=back, tools=[WEATHER], options={**GREEDY, "num_predict": 40})
    sent = ollama.Tool.model_validate(WEATHER).model_dump(exclude_none=True)  # the client's order: required first
    c = oai.chat.completions.create(model="m", tools=[sent], temperature=0, max_tokens=40, messages=ask + [
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}])
    assert answer.prompt_eval_count == c.usage.prompt_tokens > r.prompt_eval_count
    assert answer.message.content == (c.choices[0].message.content or "")
    assert [(x.function.name, x.function.arguments) for x in answer.message.tool_calls or []] == \
        [(x.function.name, json.loads(x.function.arguments)) for x in c.choices[0].message.tool_calls or []]


@needs_qwen
def test_qwen_generate_with_a_suffix_fills_in_the_middle(qwen):
    """Ollama's /api/generate with a suffix (what Continue's Ollama autocomplete sends): the model's FIM prompt,
    as Ollama's code-model templates render it."""
    client, name, oai = qwen
    before, after = "def fib(n):\n    ", "\n    return a\n"
    r = client.generate(model=name, prompt=before, suffix=after, options={**GREEDY, "num_predict": 32})
    fim = f"<|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>"
    c = oai.completions.create(model="m", prompt=fim, max_tokens=32, temperature=0)
    assert r.response == c.choices[0].text and "a, b" in r.response
    assert r.prompt_eval_count == c.usage.prompt_tokens
    streamed = "".join(p.response for p in client.generate(model=name, prompt=before, suffix=after, stream=True,
                                                           options={**GREEDY, "num_predict": 32}))
    assert streamed == r.response


def test_pull_of_the_served_model_succeeds_and_management_calls_say_what_to_do(client, name, server):
    """`ollama.pull(MODEL)` (an app's "make sure it is pulled") got a bare 404 that read like a wrong URL."""
    assert client.pull(name).status == "success"
    with pytest.raises(ollama.ResponseError, match="not found; this server serves"):
        client.pull("llama3.2")
    with pytest.raises(ollama.ResponseError, match="/api/delete: this server manages no models over its API; "
                                                   "`ondevice rm NAME` deletes a model from the store"):
        client.delete(name)
    with pytest.raises(ollama.ResponseError, match="/api/copy: this server manages no models"):
        client.copy(name, "other")
    for path in ("/api/version", "/api/tags"):  # HEAD: a liveness probe, as Ollama answers it
        assert httpx.head(server.base_url + path, headers=AUTH, timeout=30).status_code == 200


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns_as_ollama_does(client, name, server):
    """Open WebUI and ChatOllama chats stopped with a 400 once they outgrew the context; Ollama drops the oldest
    turns (truncate, on by default), keeping the system message and the last one."""
    turn = "Tell me more about the history of the old lighthouse on the northern cliffs and its keepers. " * 3
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(20):
        msgs += [{"role": "user", "content": f"{i}: {turn}"}, {"role": "assistant", "content": turn}]
    msgs.append({"role": "user", "content": "Say OK."})
    r = client.chat(model=name, messages=msgs, options={**GREEDY, "num_predict": 4})
    assert r.done and 0 < r.prompt_eval_count <= 1024 - 4, r.prompt_eval_count
    refused = httpx.post(server.base_url + "/api/chat", headers=AUTH, timeout=300, json={
        "model": name, "messages": msgs, "stream": False, "truncate": False, "options": {"num_predict": 4}})
    assert refused.status_code == 400 and "tokens" in refused.json()["error"]


def test_the_servers_notes_are_dated_and_prefixed_as_its_other_lines(tmp_path, smol_path):
    """A served num_ctx clamp (a warning) and an Ollama cut (the log notes each cut, as the README says) come out
    of a real `ondevice serve` on stderr dated as the access lines and worded as the start-up notes."""
    import re

    from conftest import serve_process

    with serve_process(tmp_path, "-m", str(smol_path), "-c", "512", "-np", "1") as (_, url, log):
        base = url.removesuffix("/v1")
        served = httpx.get(base + "/api/tags").json()["models"][0]["name"]
        r = httpx.post(base + "/api/generate", timeout=120, json={
            "model": served, "prompt": "ships and boats " * 300, "raw": True, "stream": False,
            "options": {"num_ctx": 4096, "num_predict": 2, "temperature": 0}})
        assert r.status_code == 200, r.text
        lines = log.read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ondevice serve: "
    assert any(re.match(stamp + r"warning: options\.num_ctx=4096 is above", x) for x in lines), lines
    assert any(re.match(stamp + r"note: /api/generate: \d+ of the prompt's \d+ tokens were cut", x)
               for x in lines), lines
