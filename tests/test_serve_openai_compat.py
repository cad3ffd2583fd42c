"""What OpenAI clients really send, against a live server with the official ``openai`` client.

Each case was a 400 or a wrong answer here while llama-server (and the OpenAI API) took it: the schemas pydantic
writes (``list`` -> ``"items": {}``, ``Any`` -> a title only, a recursive model -> a root ``$ref``, a nested
model in a tool -> ``$defs`` under its parameters), an explicit ``null`` for a nullable field, the
``developer`` role, earlier ``tool_calls`` in the history, ``tools`` beside ``response_format``, and the
logprobs of tokens that hold part of a character (an emoji, CJK).
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from test_serve import TOOLS, _grammar_accepts, _model_path
from test_serve_tools import HERMES_LIKE, QWEN, needs_qwen

from ondevice.engine.chat import render
from ondevice.engine.toolcalls import CALL_OPEN
from ondevice.serve import BackgroundServer, ServeSettings, structured
from ondevice.serve import schemas as S
from ondevice.serve.state import message_dicts


class Address(BaseModel):
    city: str
    zip: int


class Person(BaseModel):  # a nested model: its parameters hold "$defs" and a "$ref"
    name: str
    home: Address


class Node(BaseModel):  # recursive: the schema is a root "$ref" into "$defs"
    name: str
    children: list[Node]


class Loose(BaseModel):  # `list` -> {"items": {}}, `Any` -> {"title": "Extra"}: any JSON value
    tags: list
    extra: Any


def _fmt(model: type[BaseModel]) -> dict:
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema()}}


def _plan(**kw) -> structured.Plan:
    return structured.plan(S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw))


@pytest.fixture(scope="module")
def ref_engine():
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    eng = LlamaEngine(_model_path(), EngineConfig(n_ctx=256, n_threads=2, warmup=False))
    yield eng
    eng.close()


def test_the_schemas_pydantic_writes_become_the_grammars_they_mean(ref_engine):
    def accepts(plan, text):
        return _grammar_accepts(ref_engine, plan.grammar, text)

    loose = _plan(response_format=_fmt(Loose))
    assert accepts(loose, '{"tags": [1, "a", null, {"b": [true]}], "extra": "x"}')
    assert accepts(loose, '{"tags": [], "extra": {"k": [1.5]}}')
    assert not accepts(loose, '{"tags": 3, "extra": 1}')  # still a list
    tree = _plan(response_format=_fmt(Node))
    assert accepts(tree, '{"name": "a", "children": [{"name": "b", "children": []}]}')
    assert not accepts(tree, '{"name": "a", "children": [{"name": "b"}]}')  # the nested node is a Node too
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                {"type": "json_schema", "json_schema": {"name": "x"}}):  # OpenAI's schema is optional
        assert accepts(_plan(response_format=fmt), '{"a": 1}') and not accepts(_plan(response_format=fmt), "hi")
    # tools: each one's "$defs" move to the call schema's root, renamed per tool (two tools, two "Address")
    other = {"type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}},
             "$defs": {"Address": {"type": "object", "properties": {"line": {"type": "string"}}, "required": ["line"]}}}
    tree_fn = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}  # itself
    tools = [openai.pydantic_function_tool(Person, name="save"),
             {"type": "function", "function": {"name": "mail", "parameters": other}},
             {"type": "function", "function": {"name": "tree", "parameters": tree_fn}}]
    p = _plan(tools=tools, tool_choice="required")
    assert accepts(p, '{"name": "save", "arguments": {"name": "Ann", "home": {"city": "Oslo", "zip": 150}}}')
    assert not accepts(p, '{"name": "save", "arguments": {"name": "Ann", "home": {"line": "x"}}}')
    assert accepts(p, '{"name": "mail", "arguments": {"to": {"line": "1 Main St"}}}')
    assert accepts(p, '{"name": "tree", "arguments": {"kids": [{"kids": []}]}}')


def test_tools_beside_a_response_format_allow_calls_or_an_answer_in_that_format(ref_engine):
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    auto = _plan(tools=[weather], tool_choice="auto", response_format=_fmt(Address))
    assert _grammar_accepts(ref_engine, auto.grammar, call)
    assert _grammar_accepts(ref_engine, auto.grammar, '{"city": "Paris", "zip": 75001}')
    assert not _grammar_accepts(ref_engine, auto.grammar, "It is sunny.")  # the answer is in the format
    assert not _grammar_accepts(ref_engine, auto.grammar, '{"city": "Paris"}')
    required = _plan(tools=[weather], tool_choice="required", response_format=_fmt(Address))
    assert _grammar_accepts(ref_engine, required.grammar, call)
    assert not _grammar_accepts(ref_engine, required.grammar, '{"city": "Paris", "zip": 75001}')  # calls only


def test_developer_messages_and_earlier_calls_reach_the_template(ref_engine):
    def rendered(messages, template):
        return render(template, message_dicts(S.ChatCompletionRequest(messages=messages).messages))

    smol = ref_engine.chat_template()
    user = {"role": "user", "content": "Hi"}
    assert rendered([{"role": "developer", "content": "Be brief."}, user], smol) == \
        rendered([{"role": "system", "content": "Be brief."}, user], smol)
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
             for i, c in enumerate(("Paris", "Oslo"))]
    history = [user, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "c0", "content": "sunny"}]
    # SmolLM2's template has no tool_calls: the calls are the JSON it is asked to write (an array for two)
    assert ('<|im_start|>assistant\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}]<|im_end|>') in rendered(history, smol)


@needs_qwen
def test_qwen_renders_earlier_calls_as_its_own_tool_call_blocks():
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine
    from ondevice.models import resolve

    eng = LlamaEngine(resolve(QWEN).path, EngineConfig(n_ctx=64, n_threads=1, warmup=False))
    template = eng.chat_template()
    eng.close()

    calls = [{"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    msgs = message_dicts(S.ChatCompletionRequest(messages=[
        {"role": "user", "content": "1+2?"}, {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "3"}]).messages)
    text = render(template, msgs)
    assert f'{CALL_OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n</tool_call>' in text


@pytest.fixture(scope="module")
def client():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=512, threads=2)
    with BackgroundServer(settings) as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_null_is_the_default_for_nullable_fields(client):
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
                               "logprobs", "seed", "stop")}
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **nulls)
    assert len(r.choices) == 1 and r.choices[0].message.content is not None
    c = client.completions.create(model="m", prompt="Once upon a time", max_tokens=None, temperature=0, echo=None,
                                  extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 16  # OpenAI's default max_tokens
    with pytest.raises(openai.BadRequestError, match="messages"):  # a required field sent as null is missing
        client.chat.completions.create(model="m", messages=None)


def test_replies_in_the_pydantic_schemas_and_tools_validate(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "A family tree as JSON."}],
                                       temperature=0, max_tokens=120, response_format=_fmt(Loose))
    if r.choices[0].finish_reason == "stop":  # a reply cut by max_tokens cannot parse; a finished one must
        Loose.model_validate_json(r.choices[0].message.content)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Save Ann, who lives in Oslo."}],
                                       temperature=0, max_tokens=80, tool_choice="required",
                                       tools=[openai.pydantic_function_tool(Person, name="save")])
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "save"
    Person.model_validate_json(call.function.arguments)


def test_logprobs_of_partial_characters_keep_their_bytes_and_offsets(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Translate 'hello world' "
                                                                                         "into Chinese."}],
                                       temperature=0, max_tokens=16, logprobs=True, top_logprobs=3)
    content, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    assert any(e.token.startswith("bytes:") for e in lps), "the reply has no split character: pick another prompt"
    assert b"".join(bytes(e.bytes) for e in lps) == content.encode()  # the bytes rebuild the text
    prompt = "Chinese: 你好世界。 Emoji: 🌍 ok"
    c = client.completions.create(model="m", prompt=prompt, max_tokens=1, echo=True, logprobs=3, temperature=0)
    lp = c.choices[0].logprobs
    assert lp.text_offset[lp.tokens.index("。")] == prompt.index("。")
    assert lp.text_offset[lp.tokens.index(" ok")] == prompt.index(" ok")
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])  # no two alternatives share a name


def test_echoed_control_tokens_take_their_room_in_the_text_offsets(client):
    """A prompt with the chat template's control tokens (what lm-eval's chat tasks send) is echoed with their text,
    but the offsets counted them as empty: 'user' was at 0 in `<|im_start|>user...`, 11 of 13 tokens off."""
    for prompt in ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Plain text here"):
        c = client.completions.create(model="m", prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0)
        text, lp = c.choices[0].text, c.choices[0].logprobs
        assert text.startswith(prompt)
        spans = [(t, o, text[o:o + len(t)]) for t, o in zip(lp.tokens, lp.text_offset) if not t.startswith("bytes:")]
        assert len(spans) >= 4 and all(t == at for t, _, at in spans), spans
        if prompt.startswith("<|im_start|>"):
            assert spans[:2] == [("<|im_start|>", 0, "<|im_start|>"), ("user", 12, "user")], spans


def test_a_streamed_echo_is_the_prompt_as_sent_with_the_same_offsets(client):
    """Streamed with logprobs, the echo was the prompt's tokens detokenized: a ChatML prompt's control tokens were
    dropped from the text (the non-streamed echo keeps them), so the two replies differed."""
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    args = dict(model="m", prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args) if c.choices]
    text = "".join(c.text for c in chunks)
    assert text == whole.text and text.startswith(prompt), (text, whole.text)
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_llama_servers_names_without_v1_lead_to_the_same_routes(client):
    """llama-server serves /chat/completions, /responses, /models and /v1/health beside the /v1 names: an openai
    client given the server's address without /v1 works, and is counted under the route it reached."""
    import httpx

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    bare = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
    kw = {"model": "m", "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8, "temperature": 0}
    assert bare.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content
    assert [m.id for m in bare.models.list()] == [m.id for m in client.models.list()]
    assert bare.responses.create(model="m", input="Hi", max_output_tokens=4).output_text
    assert httpx.get(base + "/v1/health").json()["status"] == "ok"
    metrics = httpx.get(base + "/metrics").text
    assert 'route="/v1/chat/completions",code="200"' in metrics and 'route="other"' not in metrics


def test_llama_servers_n_predict_is_max_tokens(client):
    """llama-server's n_predict, taken before max_tokens as there; -1 runs until the context (512 here) is full."""
    msgs = [{"role": "user", "content": "Count to fifty."}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"n_predict": 3, "ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    c = client.completions.create(model="m", prompt="One, two,", temperature=0,
                                  extra_body={"n_predict": -1, "ignore_eos": True})
    assert c.usage.prompt_tokens + c.usage.completion_tokens == 512 and c.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="n_predict='3' must be an integer >= -1"):
        client.chat.completions.create(model="m", messages=msgs, extra_body={"n_predict": "3"})


def test_browser_pages_on_this_machine_may_call_the_api():
    """CORS: a page from localhost (any port) gets its preflight answered and may read the reply, even with an
    API key (a browser's preflight carries none); a page from elsewhere gets no CORS grant unless listed."""
    import httpx

    from ondevice.serve.settings import settings_from_args

    def preflight(base, origin):
        return httpx.options(base + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    settings = ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=2, api_key="k",
                             embeddings=False)
    with BackgroundServer(settings) as s:
        ok = preflight(s.base_url, "http://localhost:3000")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert preflight(s.base_url, "https://evil.example").status_code == 403  # not an allowed origin
        for app in ("vscode-webview://abc123", "app://obsidian.md", "tauri://localhost", "http://0.0.0.0:8080"):
            assert preflight(s.base_url, app).status_code == 200, app  # Ollama lets these in by default
        r = httpx.get(s.base_url + "/v1/models", headers={"Origin": "http://127.0.0.1:5173", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
        r = httpx.get(s.base_url + "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers  # refused, as by Ollama
        assert httpx.post(s.base_url + "/chat/completions", json={"messages": []}).status_code == 401  # an alias too
        assert httpx.get(s.base_url + "/v1/health").status_code == 200  # public, as /health and llama-server's
    from ondevice.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--cors.*'localhost:3000' is not an origin"):
        settings_from_args(None, cors="localhost:3000")
    assert settings_from_args(None, cors="app://obsidian.md,http://localhost:3000").cors  # any scheme's origin


def test_api_keys_as_llama_server_takes_them(tmp_path):
    """--api-key KEY1,KEY2 and --api-key-file (one key per line), as llama-server: any of them opens the server."""
    import httpx

    from ondevice.errors import InvalidArgument
    from ondevice.serve.settings import settings_from_args

    keys = tmp_path / "keys.txt"
    keys.write_text("c\n\n  d  \n")
    settings = settings_from_args(None, model=str(_model_path()), port=0, parallel=1, ctx=256, threads=2,
                                  api_key="a, b", api_key_file=str(keys), embeddings=False)
    with BackgroundServer(settings) as s:
        def status(key):
            return httpx.get(s.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

        assert [status(k) for k in ("a", "b", "c", "d")] == [200] * 4
        assert [status(k) for k in ("e", "a, b", "a,b", "cd")] == [401] * 4
        # without a key: the health check and Ollama's heartbeat at /, as llama-server leaves them open
        assert [httpx.request(m, s.base_url + p).status_code for m, p in (("GET", "/health"), ("GET", "/"),
                                                                           ("HEAD", "/"), ("GET", "/api/tags"))] \
            == [200, 200, 200, 401]
    keys.write_text("\n \n")
    with pytest.raises(InvalidArgument, match="--api-key-file.*holds no key"):
        settings_from_args(None, api_key_file=str(keys))
    with pytest.raises(InvalidArgument, match="--api-key.*holds no key"):  # ',' would have left it open
        settings_from_args(None, api_key=",")
    keys.write_bytes(b"\0" * (2 << 20))  # as /dev/zero, which was read to a MemoryError
    with pytest.raises(InvalidArgument, match="--api-key-file.*over 1 MiB, not a file of keys"):
        settings_from_args(None, api_key_file=str(keys))


def test_sampling_left_out_is_llama_cpps_not_openais():
    """OpenAI's defaults (temperature 1, no top-k/min-p) let a 135M model ramble to the end of its context;
    llama-server and `ondevice run` use llama.cpp's, and so does the server for what a request leaves out."""
    from ondevice.engine.records import Sampling
    from ondevice.serve.sampling import request_sampling as _sampling

    msgs = [{"role": "user", "content": "Hi"}]
    s = _sampling(S.ChatCompletionRequest(messages=msgs), 16)
    d = Sampling()
    assert (s.temp, s.top_p, s.top_k, s.min_p) == (d.temp, d.top_p, d.top_k, d.min_p) == (0.8, 0.95, 40, 0.05)
    s = _sampling(S.ChatCompletionRequest(messages=msgs, temperature=1.0, top_k=0), 16)
    assert (s.temp, s.top_p, s.top_k, s.min_p) == (1.0, 0.95, 0, 0.05)  # what it gives is taken as given


def test_top_logprobs_needs_logprobs_and_pieces_keep_their_bytes(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):  # as OpenAI and llama-server
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)
    import httpx

    base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    text = "🌍 ok"
    pieces = httpx.post(base + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    # llama-server's shape: the text of a whole piece, the bytes of one that holds part of a character
    assert any(isinstance(p["piece"], list) for p in pieces)
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                    for p in pieces) == text.encode()


def test_a_response_format_reply_may_be_in_a_json_block_as_llama_servers_and_its_content_is_the_value(
        client, ref_engine):
    p = _plan(response_format=_fmt(Address))
    value = '{"city": "Oslo", "zip": 150}'
    for text in (value, f"```json\n{value}\n```", f"```\n{value}```"):
        assert _grammar_accepts(ref_engine, p.grammar, text)
    for text in (f"```json\n{value}\n``` and so on", f"Sure: {value}", f"```python\n{value}\n```", f"{value}\n```"):
        assert not _grammar_accepts(ref_engine, p.grammar, text)
    # SmolLM2, asked for a person without being told "JSON": forced to open with "{", it padded the keys with
    # blank lines ('{\n  "name"\n\n:\n\n"name"\n\n,...') and ran out of tokens; allowed a block, as llama-server's
    # grammar allows it, it writes the object (llama-server's reply to the same request: Shelter, 25)
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    kw = {"model": "m", "messages": [{"role": "user", "content": "Give a person"}], "temperature": 0, "max_tokens": 32,
          "response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": person}}}
    r = client.chat.completions.create(**kw)
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "`" not in content
    assert set(json.loads(content)) == {"name", "age"}
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == content


@pytest.mark.parametrize("text,content", [
    ('```json\n{"a": "x`y"}\n```', '{"a": "x`y"}'),
    ('```\n[1,\n 2]```', "[1,\n 2]"),
    ('{"a": 1}', '{"a": 1}'),
    ('"a ``` b"', '"a ``` b"'),
    ('```json\n{"a": "b``', '{"a": "b'),  # cut by max_tokens: what may be the closing fence is not content
    ("```js", ""),
])
def test_a_json_block_comes_off_a_reply_in_any_pieces_the_tokens_make(text, content):
    assert structured.unfence(text) == content
    for cut in range(len(text) + 1):
        s = structured.FormatStream()
        assert s.feed(text[:cut]) + s.feed(text[cut:]) + s.finish() == content
    s = structured.FormatStream()
    assert "".join(s.feed(ch) for ch in text) + s.finish() == content


def test_a_template_that_asks_for_tool_call_blocks_still_takes_a_bare_call(ref_engine):
    """Qwen2.5, after calls and their results in the history, writes its next call as bare JSON; the grammar
    allowed only a <tool_call> block or a fenced one there, so the model was forced to start otherwise: a stray
    ">" went to content before the call (LangGraph's ReAct loop ended with the answer ">")."""
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="auto")
    p = structured.plan(req, HERMES_LIKE)
    one = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    for text in (one, f"{one}\n{one}", f"<tool_call>\n{one}\n</tool_call>\n{one}", f"```json\n{one}\n```"):
        assert _grammar_accepts(ref_engine, p.grammar, text), text
    content, calls = structured.split_reply(one, p)
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("add", {"a": 2, "b": 3})]
