"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) on `ondevice serve`, through the official
anthropic client: the chat route's answer in Anthropic's shape, stop reasons (end_turn, max_tokens, stop_sequence
with the string that matched, tool_use), tool calls and their results, streamed events as the client's stream
helper assembles them, token counts, the x-api-key header, and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from test_clients import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

KEY = "sekret"
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "What's the weather in Oslo?"}]
GREEDY = {"temperature": 0}  # the anthropic client has no temperature argument (any more): the body carries it


@pytest.fixture(scope="module")
def server():
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so every route gives the same text
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=2, kv_type="f32",
                             api_key=KEY)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_the_answer_is_the_chat_routes_answer(server, client):
    m = client.messages.create(model="m", max_tokens=24, extra_body=GREEDY, system="Answer in one short sentence.",
                               messages=[{"role": "user", "content": "Name a color."}])
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="m", max_tokens=24, temperature=0, messages=[
            {"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": "Name a color."}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == c.choices[0].message.content
    assert (m.usage.input_tokens, m.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[c.choices[0].finish_reason]
    assert m.stop_sequence is None


def test_system_blocks_and_a_content_block_list_are_the_same_prompt(client):
    kw = {"model": "m", "max_tokens": 12, "extra_body": GREEDY}
    a = client.messages.create(system="Answer in French.", messages=[{"role": "user", "content": "Say hello."}], **kw)
    b = client.messages.create(system=[{"type": "text", "text": "Answer in French."}], **kw,
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}])
    assert a.content[0].text == b.content[0].text and a.usage.input_tokens == b.usage.input_tokens
    longer = client.messages.count_tokens(model="m", system="Answer in French, in three words at most.",
                                          messages=[{"role": "user", "content": "Say hello."}])
    assert longer.input_tokens > a.usage.input_tokens  # the system prompt is in the prompt


def test_max_tokens_cut(client):
    m = client.messages.create(model="m", max_tokens=5, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Tell me a long story about a dragon."}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5 and m.content[0].text


def test_a_stop_sequence_is_reported_with_the_string_that_matched(client):
    ask = {"model": "m", "max_tokens": 40, "extra_body": GREEDY,
           "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]}
    whole = client.messages.create(**ask).content[0].text
    assert "5" in whole
    m = client.messages.create(stop_sequences=["zebra", "5"], **ask)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "5"
    assert m.content[0].text == whole[:whole.index("5")]
    with client.messages.stream(stop_sequences=["zebra", "5"], **ask) as st:
        final = st.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", "5", m.content[0].text)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_forced_tool_call(client, choice):
    m = client.messages.create(model="m", max_tokens=48, extra_body=GREEDY, messages=ASK, tools=[WEATHER],
                               tool_choice=choice)
    assert m.stop_reason == "tool_use"
    [call] = m.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    assert isinstance(call.input, dict) and call.input == {"city": "Oslo"}


def test_a_tool_result_sent_back(client):
    m = client.messages.create(model="m", max_tokens=48, extra_body=GREEDY, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "any"})
    [call] = m.content
    back = [*ASK, {"role": "assistant", "content": [call.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": [{"type": "text", "text": "light rain, 18 C"}]}]}]
    r = client.messages.create(model="m", max_tokens=32, extra_body=GREEDY, messages=back, tools=[WEATHER])
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text" and r.content[0].text
    # the result is in the prompt: its tokens are counted
    n = client.messages.count_tokens(model="m", messages=back, tools=[WEATHER]).input_tokens
    assert n == r.usage.input_tokens
    without = client.messages.count_tokens(model="m", messages=back[:2], tools=[WEATHER]).input_tokens
    assert n > without + len("light rain, 18 C") // 4


def test_streamed_text_builds_the_same_message(client):
    kw = {"model": "m", "max_tokens": 32, "extra_body": GREEDY, "system": "Answer in five words.",
          "messages": [{"role": "user", "content": "Say hello."}]}
    whole = client.messages.create(**kw)
    events = list(client.messages.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == ["content_block_stop",
                                                                                   "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens  # known at the start, as Anthropic's
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == whole.content[0].text
    with client.messages.stream(**kw) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens, final.usage.input_tokens) == (
        whole.stop_reason, whole.usage.output_tokens, whole.usage.input_tokens)


def test_streamed_tool_use_through_the_stream_helper(client):
    kw = {"model": "m", "max_tokens": 48, "extra_body": GREEDY, "messages": ASK, "tools": [WEATHER],
          "tool_choice": {"type": "any"}}
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as st:
        events = list(st)
        final = st.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert (final.content[0].name, final.content[0].input) == (whole.content[0].name, whole.content[0].input)


def test_count_tokens_is_the_prompt_of_the_reply(client):
    kw = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Name a fruit."}]}
    n = client.messages.count_tokens(**kw).input_tokens
    assert n > 5 and n == client.messages.create(max_tokens=2, **kw).usage.input_tokens


@pytest.mark.parametrize("bad, status, kind, words", [
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens is required"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     400, "invalid_request_error", r"messages\[0\]\.content\[0\]: image blocks are not supported"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error",
     "web_search_20250305.* is a server tool"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error",
     "the model has no extended thinking"),
    ({"temperature": 5}, 400, "invalid_request_error", "temperature"),
    ({"stop_sequences": [""]}, 400, "invalid_request_error", "stop contains an empty string"),
])
def test_refusals_come_in_anthropics_error_shape(server, client, bad, status, kind, words):
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **bad}
    r = httpx.post(server.base_url + "/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                   json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == status and r.json()["type"] == "error" and r.json()["error"]["type"] == kind
    assert "\n" not in r.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match=words):  # what the client raises, with the message
        client.post("/v1/messages", body={k: v for k, v in body.items() if v is not None}, cast_to=object)


def test_a_wrong_x_api_key_is_an_authentication_error(server, client):
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in e.value.body["error"]["message"]
    # the OpenAI routes keep OpenAI's error shape
    r = httpx.post(server.base_url + "/v1/chat/completions", headers={"x-api-key": "nope"}, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and "type" not in r.json()
    # a route of Anthropic's this server lacks (Message Batches): a 404 in its shape, as its SDK reads it
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.batches.list()
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error", e.value.body
    assert client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]).content


def test_langchain_chat_anthropic(server):
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    llm = langchain_anthropic.ChatAnthropic(model="m", base_url=server.base_url, api_key=KEY, max_tokens=64,
                                            temperature=0, max_retries=0)  # LangChain sends it
    reply = llm.invoke("Name a color.")
    assert isinstance(reply.content, str) and reply.content
    assert "".join(c.content for c in llm.stream("Name a color.") if isinstance(c.content, str)) == reply.content
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What's the weather in Oslo?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert called.tool_calls[0]["args"] == {"city": "Oslo"}


def test_models_list_and_retrieve_in_anthropics_shape_as_openais_too(server, client):
    """The Anthropic SDK's models.list / models.retrieve get its ModelInfo fields; the openai client still parses
    the same routes' answers, and gets OpenAI's fields only without the anthropic-version header."""
    cards = server.state.model_cards()
    listed = list(client.models.list())
    assert [m.id for m in listed] == [c.id for c in cards]
    m = listed[0]
    assert (m.type, m.display_name, m.created_at.timestamp()) == ("model", cards[0].id, cards[0].created)
    assert client.models.retrieve(m.id) == m
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-none")
    page = httpx.get(server.base_url + "/v1/models", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert (page.json()["has_more"], page.json()["first_id"], page.json()["last_id"]) == (False, m.id, cards[-1].id)
    for headers in ({}, {"anthropic-version": "2023-06-01"}):  # the extra fields do not bother the openai client
        o = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, default_headers=headers)
        assert [x.id for x in o.models.list()] == [c.id for c in cards]
        got = o.models.retrieve(m.id)
        assert (got.id, got.created, got.owned_by) == (m.id, cards[0].created, "ondevice")
        assert ("display_name" in got.model_extra) == bool(headers)
