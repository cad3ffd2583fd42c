"""OpenAI's Responses API (POST /v1/responses) on `ondevice serve`, through the official openai client: the same
answer as the chat route, its streamed events as the client's stream helper reads them, function tools and their
results, structured output, logprobs, and one-line refusals of what only OpenAI's servers keep or run."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel
from test_clients import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def client():
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so every route gives the same text
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=2, kv_type="f32")
    with BackgroundServer(settings) as s:
        yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_the_answer_is_the_chat_routes_answer(client):
    r = client.responses.create(model="m", instructions="Answer in one short sentence.", input="Name a color.",
                                max_output_tokens=24, temperature=0)
    c = client.chat.completions.create(model="m", max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": "Name a color."}])
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == c.choices[0].message.content and r.output_text
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    finished = c.choices[0].finish_reason == "stop"
    assert r.status == ("completed" if finished else "incomplete")
    assert r.instructions == "Answer in one short sentence." and r.max_output_tokens == 24


def test_max_output_tokens_reached_is_incomplete(client):
    r = client.responses.create(model="m", input="Tell me a long story about a dragon.", max_output_tokens=5,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output_text
    assert [item.status for item in r.output] == ["incomplete"]  # the message was cut too (OpenAI's)
    events = list(client.responses.create(model="m", input="Tell me a long story about a dragon.",
                                          max_output_tokens=5, temperature=0, stream=True))
    assert [e.item.status for e in events if e.type == "response.output_item.done"] == ["incomplete"]


def test_streamed_events_build_the_same_response(client):
    kw = {"model": "m", "input": "Say hello.", "instructions": "Answer in five words.", "max_output_tokens": 48,
          "temperature": 0}
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    if whole.status == "completed":  # the client's stream helper wants response.completed, as from OpenAI
        with client.responses.stream(**kw) as st:
            assert st.get_final_response().output_text == whole.output_text


def test_a_function_call_and_its_output_sent_back(client):
    ask = [{"role": "user", "content": "What's the weather in Oslo?"}]
    r = client.responses.create(model="m", input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=48,
                                temperature=0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.call_id and call.status == "completed"
    streamed = list(client.responses.create(model="m", input=ask, tools=[WEATHER], tool_choice="required",
                                            max_output_tokens=48, temperature=0, stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == json.loads(call.arguments) and streamed[-1].type == "response.completed"
    # the call and its output go back as input items; the model answers in words
    r2 = client.responses.create(model="m", tools=[WEATHER], max_output_tokens=32, temperature=0, input=[
        *ask, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "light rain, 18 C"}])
    assert r2.output[0].type == "message" and r2.output_text


def test_a_named_tool_choice(client):
    r = client.responses.create(model="m", input="Hi", tools=[WEATHER], max_output_tokens=48, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    assert [o.type for o in r.output] == ["function_call"] and r.output[0].name == "get_weather"


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_with_the_clients_parse(client):
    r = client.responses.parse(model="m", input="Alice is 30 years old. Return her name and age as JSON.",
                               text_format=Person, max_output_tokens=48, temperature=0)
    assert r.output_parsed == Person(name="Alice", age=30)


def test_logprobs_of_the_output_text(client):
    r = client.responses.create(model="m", input="Say hi.", max_output_tokens=6, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens
    assert "".join(t.token for t in lps) == r.output_text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lps)


@pytest.mark.parametrize("bad, words", [
    ({"previous_response_id": "resp_1"}, "send the whole conversation in input"),
    ({"tools": [{"type": "web_search"}]}, "'web_search' tools run on OpenAI's servers"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input_image is not supported: the model reads text only"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "send the item itself"),
    ({"input": [{"foo": 1}]}, r"input\[0\]: cannot tell what this item is"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, r"input\[0\]\.output must be a string"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type must be"),
])
def test_what_only_openai_keeps_or_runs_is_a_400_naming_the_fix(client, bad, words):
    with pytest.raises(openai.BadRequestError, match=words) as e:
        client.responses.create(model="m", **{"input": "hi", **bad})
    if "previous_response_id" in bad:  # OpenAI's param names the field
        assert e.value.body["param"] == "previous_response_id", e.value.body
    assert client.responses.create(model="m", input="hi", max_output_tokens=2).output_text  # still serving


def test_missing_input_and_bad_values_name_the_field(client):
    with pytest.raises(openai.BadRequestError, match="input is required"):
        client.post("/responses", body={"model": "m"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.responses.create(model="m", input="hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match=r"invalid request: max_output_tokens: Input should be greater"):
        client.responses.create(model="m", input="hi", max_output_tokens=-1)


def test_input_token_counts_are_the_prompts_the_routes_decode(client):
    """OpenAI's responses.input_tokens.count and llama-server's /chat/completions/input_tokens: the tokens of the
    prompt that a request would decode (its usage.input_tokens), tools and instructions included."""
    import httpx

    kw = {"instructions": "Answer in one short sentence.", "input": "Name a color."}
    r = client.responses.create(model="m", max_output_tokens=4, temperature=0, **kw)
    counted = client.responses.input_tokens.count(model="m", **kw)
    assert counted.object == "response.input_tokens" and counted.input_tokens == r.usage.input_tokens
    with_tool = client.responses.input_tokens.count(model="m", tools=[WEATHER], **kw)
    assert with_tool.input_tokens > counted.input_tokens  # the tool's definition is in the prompt
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    chat = {"messages": [{"role": "system", "content": kw["instructions"]}, {"role": "user", "content": kw["input"]}]}
    for path in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"):
        assert httpx.post(base + path, json=chat, timeout=60).json() == {"input_tokens": r.usage.input_tokens}
    assert httpx.post(base + "/responses/input_tokens", json=kw, timeout=60).json()["input_tokens"] == \
        r.usage.input_tokens
    bad = httpx.post(base + "/v1/responses/input_tokens", json={**kw, "previous_response_id": "resp_1"}, timeout=60)
    assert bad.status_code == 400 and "previous_response_id" in bad.json()["error"]["message"]
