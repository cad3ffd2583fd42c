"""Tool calls through ``ondevice serve`` and the official openai client: the cases an audit found wrong.

A call cut short reads the same streamed or not (``auto`` too), a forced call is one call and a model's
repetition loop is not several, a stop string does not break a forced call, a streamed reply of calls opens
with ``content: null``, and a tool schema the grammar cannot take gets a 400 that names the tool and the
field. SmolLM2 (a core dependency) shows most; the repetition needs Qwen2.5 (``coder`` extra; skips without).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_serve import TOOLS, _grammar_accepts, _model_path  # get_weather(city), add(a, b)
from test_serve_tools import HERMES_LIKE, QWEN, needs_qwen

from ondevice.serve import BackgroundServer, ServeSettings, structured
from ondevice.serve import schemas as S

WEATHER = [TOOLS[0]]
AFTER_RESULT = [  # a tool loop's second turn: the model has seen a call and its result
    {"role": "user", "content": "What's the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"city": "Oslo", "temp_c": 18})},
    {"role": "user", "content": "And in Paris?"},
]


def _client(settings: ServeSettings):
    with BackgroundServer(settings) as s:
        yield s, openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smol():
    yield from _client(ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=2))


def _whole(client, **kw):
    ch = client.chat.completions.create(model="m", temperature=0, **kw).choices[0]
    return (ch.finish_reason, ch.message.content,
            [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []])


def _streamed(client, **kw):
    """(finish, content, calls) as a client that adds up a stream's deltas reads them (None: no content)."""
    finish, content, calls = None, None, {}
    for c in client.chat.completions.create(model="m", temperature=0, stream=True, **kw):
        if not c.choices:
            continue
        d, finish = c.choices[0].delta, c.choices[0].finish_reason or finish
        if d.content is not None:
            content = (content or "") + d.content
        for t in d.tool_calls or []:
            e = calls.setdefault(t.index, ["", ""])
            e[0] += t.function.name or ""
            e[1] += t.function.arguments or ""
    return finish, content or None, [tuple(calls[i]) for i in sorted(calls)]


def test_auto_call_cut_by_max_tokens_is_the_call_so_far_streamed_or_not(smol):
    """Under ``auto`` the grammar made the reply a call at its first character: cut short, it is the call so
    far (or nothing, its name not yet whole), never the call's JSON as content, and the same streamed."""
    _, client = smol
    full = _whole(client, messages=AFTER_RESULT, tools=WEATHER, tool_choice="auto", max_tokens=60)
    assert full[0] == "tool_calls" and full[2][0][0] == "get_weather", full
    for n in (10, 14):  # the name not yet whole; the arguments begun
        whole = _whole(client, messages=AFTER_RESULT, tools=WEATHER, tool_choice="auto", max_tokens=n)
        assert whole[0] == "length" and whole[1] is None, whole  # no raw call JSON as content
        assert whole == _streamed(client, messages=AFTER_RESULT, tools=WEATHER, tool_choice="auto", max_tokens=n)
        for name, args in whole[2]:
            assert name == "get_weather" and full[2][0][1].startswith(args), whole
    assert _whole(client, messages=AFTER_RESULT, tools=WEATHER, tool_choice="auto", max_tokens=14)[2]


def test_anthropic_messages_route_gives_a_cut_auto_call_as_tool_use_not_text(smol):
    """/v1/messages sits on the chat route: its whole reply of a cut call is a tool_use block, as its stream's
    (before, under ``auto``: a text block with the call's JSON)."""
    import anthropic

    srv, _ = smol
    client = anthropic.Anthropic(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=300)
    tools = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": WEATHER[0]["function"]["parameters"]}]
    msgs = [{"role": "user", "content": "What's the weather in Oslo?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                         {"type": "text", "text": "And in Paris?"}]}]
    ask = {"model": "m", "max_tokens": 14, "messages": msgs, "tools": tools, "extra_body": {"temperature": 0}}
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as s:
        for _ in s:
            pass
        streamed = s.get_final_message()
    for r in (whole, streamed):
        assert r.stop_reason == "max_tokens" and [b.type for b in r.content] == ["tool_use"], r.content


def test_a_stop_string_does_not_break_a_forced_call_and_a_cut_call_ends_length(smol):
    _, client = smol
    ask = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": WEATHER,
           "max_tokens": 60, "stop": ["}"]}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        finish, content, calls = _whole(client, tool_choice=choice, **ask)
        assert finish == "tool_calls" and content is None and json.loads(calls[0][1]) == {"city": "Paris"}
        assert _streamed(client, tool_choice=choice, **ask) == (finish, content, calls)
    # auto: a stop string applies (the reply may be text); one that cuts a call leaves it incomplete: "length"
    cut = {**ask, "messages": AFTER_RESULT, "stop": ["Par"]}
    whole = _whole(client, tool_choice="auto", **cut)
    assert whole[0] == "length" and whole[1] is None and whole[2] and whole[2][0][0] == "get_weather", whole
    assert whole == _streamed(client, tool_choice="auto", **cut)


def test_a_streamed_reply_of_calls_opens_with_content_null(smol):
    srv, client = smol
    ask = {"model": "m", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
           "tools": WEATHER, "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json={**ask, "stream": True}, timeout=300) as r:
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}  # as OpenAI, llama-server
    with client.chat.completions.stream(**ask) as s:  # the openai SDK's accumulator: as the whole reply
        final = s.get_final_completion().choices[0].message
    assert final.content is None and final.tool_calls[0].function.name == "get_weather"
    text = {**ask, "tool_choice": "auto", "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
            "max_tokens": 12}
    with client.chat.completions.stream(**text) as s:  # a plain answer after the null: its text, whole
        for _ in s:
            pass
        streamed = s.current_completion_snapshot.choices[0].message.content
    assert streamed and streamed == _whole(client, **{k: v for k, v in text.items() if k not in ("model",
                                                                                                 "temperature")})[1]


BAD_SCHEMAS = [
    ({"x": {"type": "string", "enum": []}}, "parameters.properties.x.enum is empty"),
    ({"x": {"$ref": "#/$defs/Missing"}}, "parameters.properties.x.$ref \"#/$defs/Missing\" names no definition"),
    ([], "parameters.properties is [], not an object"),
    ({"x": {"anyOf": []}}, "parameters.properties.x.anyOf is empty"),
    ({"x": {"type": "strin"}}, "parameters.properties.x.type \"strin\" is not a JSON schema type"),
    ({"x": {"type": "array", "items": 5}}, "parameters.properties.x.items is 5, not a schema"),
]


@pytest.mark.parametrize(("props", "said"), BAD_SCHEMAS)
def test_a_tool_schema_the_grammar_cannot_take_is_a_400_naming_the_tool_and_the_field(smol, props, said):
    _, client = smol
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": props}}}
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Call f"}],
                                           tools=[tool], tool_choice=choice, max_tokens=8)
        msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
        assert f"tool 'f': {said}" in msg and "GBNF" not in msg and "p0-" not in msg, msg


def test_repeated_calls_in_one_reply_are_one_call_streamed_or_not():
    """A repetition loop (the same call again and again) is one call: read whole, or as a stream of it sends
    it; a different call after it still goes out, and a later call cut short goes out as far as it was
    written unless it is the start of the same call again."""
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="required")
    plan = structured.plan(req)
    paris, rome = '{"city": "Paris"}', '{"city": "Rome"}'
    call = '{{"name": "get_weather", "arguments": {}}}'.format
    three = f"[{call(paris)}, {call(paris)}, {call(rome)}]"
    assert [(c.function.name, c.function.arguments) for c in structured.parse_tool_call(three, plan)] == \
        [("get_weather", paris), ("get_weather", rome)]
    for text, cut in ((f"[{call(paris)}, {call(paris)}, {call(paris)[:30]}", []),
                      (f"[{call(paris)}, {call(paris)}, {call(rome)[:-6]}", [("get_weather", '{"city": "R')])):
        content, calls, was_cut = structured.cut_reply(text, plan)
        assert content is None and was_cut
        assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", paris), *cut]
    stream, deltas = structured.ToolStream(plan), []
    for ch in three:
        deltas += stream.feed(ch)[1]
    assert stream.finish() == (True, "") and not stream.rest()
    assert [(d.index, d.function.name) for d in deltas if d.id] == [(0, "get_weather"), (1, "get_weather")]
    assert ["".join(d.function.arguments for d in deltas if d.index == i) for i in (0, 1)] == [paris, rome]


def test_a_call_cut_before_its_arguments_is_the_call_so_far_by_its_name():
    """max_tokens that end a call after its name, before "arguments" (``{"name": "get_weather", "``), give that
    call with empty arguments, read whole or streamed, not an empty reply (llama-server: the text as content); a
    name cut short is no call. Under /v1/messages its input is then ``{}``."""
    from ondevice.serve.responses import arguments_object

    for choice in ("required", "auto"):
        req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice=choice)
        plan = structured.plan(req)
        listed = [('[{"name": "get_weather"', [("get_weather", "")])] if choice == "required" else []  # auto: no list
        for text, want in (('{"name": "get_weather", "', [("get_weather", "")]), *listed,
                           ('<tool_call>\n{"name": "get_weather",', [("get_weather", "")]),
                           ('{"name": "get_wea', [])):
            content, calls, was_cut = structured.cut_reply(text, plan)
            assert content is None and was_cut, (choice, text)
            assert [(c.function.name, c.function.arguments) for c in calls or []] == want, (choice, text)
            stream, deltas = structured.ToolStream(plan), []
            for ch in text:
                assert stream.feed(ch)[0] is None  # held: never content
                deltas += stream.feed("")[1]
            assert stream.finish() == (False, "") and stream.cut
            deltas += stream.rest()
            assert [(d.function.name, d.function.arguments) for d in deltas if d.id] == want, (choice, text)
    assert arguments_object("") == {}


def test_a_named_tool_choice_is_one_call():
    """OpenAI's named tool_choice forces the call (clients read ``tool_calls[0]``): the grammar ends after it."""
    from ondevice.engine import EngineConfig
    from ondevice.engine.llama import LlamaEngine

    one = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    eng = LlamaEngine(_model_path(), EngineConfig(n_ctx=256, n_threads=2))
    try:
        for template, two in ((None, f"[{one}, {one}]"),
                              (HERMES_LIKE, f"<tool_call>\n{one}\n</tool_call>\n<tool_call>\n{one}\n</tool_call>")):
            for choice, calls in (({"type": "function", "function": {"name": "get_weather"}}, 1), ("required", 2)):
                req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                              tool_choice=choice)
                grammar = structured.plan(req, template).grammar
                assert _grammar_accepts(eng, grammar, one)
                assert _grammar_accepts(eng, grammar, two) == (calls == 2), (template, choice)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def qwen():
    from ondevice.models import resolve

    yield from _client(ServeSettings(model=str(resolve(QWEN).path), port=0, parallel=1, ctx=2048, threads=2))


@needs_qwen
def test_qwen_repeating_a_forced_call_after_a_tool_result_gives_one_call(qwen):
    """Qwen2.5-Coder, after a call and its result, writes the next call again and again: a named tool_choice
    (its grammar ends after one call) and ``required`` (repeats dropped) come back as one call, streamed too."""
    _, client = qwen
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        ask = {"messages": AFTER_RESULT, "tools": WEATHER, "tool_choice": choice, "max_tokens": 96}
        whole = _whole(client, **ask)
        assert whole[0] == "tool_calls" and [(n, json.loads(a)) for n, a in whole[2]] == \
            [("get_weather", {"city": "Paris"})], whole
        assert _streamed(client, **ask) == whole
    # auto, cut short by max_tokens inside its second (repeated) call: the first call, not its JSON as content
    auto = {"messages": AFTER_RESULT, "tools": WEATHER, "tool_choice": "auto", "max_tokens": 20}
    whole = _whole(client, **auto)
    assert whole[1] is None and [n for n, _ in whole[2]] == ["get_weather"], whole
    assert _streamed(client, **auto) == whole


def test_a_cut_calls_arguments_are_its_json_as_far_as_it_goes():
    """Anthropic's ``input`` and Ollama's ``arguments`` are objects: a cut call's text was json.loads'ed (a 500).
    The prefix is read as the anthropic SDK's stream accumulator reads partial JSON."""
    from ondevice.serve.responses import arguments_object

    assert arguments_object('{"city": "Os') == {"city": "Os"}
    assert arguments_object('{"a": 1, "b"') == {"a": 1}
    assert arguments_object('{"a": [1, 2') == {"a": [1, 2]}
    assert arguments_object('{"q": "say \\"hi') == {"q": 'say "hi'}
    assert arguments_object('{"a": "x\\') == {"a": "x"}  # cut inside an escape
    assert arguments_object("") == arguments_object(None) == arguments_object("[1]") == arguments_object("{") == {}
