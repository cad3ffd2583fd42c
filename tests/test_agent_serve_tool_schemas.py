"""A tool whose ``parameters`` is not an object schema (found by an audit, s46): under ``tool_choice: "required"``
the grammar made the model write an array, sent as ``{"_": [...]}`` whole and ``[...]`` streamed, neither of
which matched the tool. OpenAI refuses such a tool with a 400; so does ``ondevice serve``, on every API that takes
tools, and ``ondevice agent`` refuses it when its tools are loaded. Real server (the embedded SmolLM2), real
HTTP clients."""

from __future__ import annotations

import httpx
import openai
import pytest

pytest.importorskip("pydantic")

from ondevice.serve import BackgroundServer, ServeSettings

ARRAY = {"type": "array", "items": {"type": "string"}}
SAID = ("tool 'cities': parameters must be a JSON schema of type \"object\", not \"array\" (a call's arguments are "
        "a JSON object); make the value a property: {\"type\": \"object\", \"properties\": {\"value\": THIS_SCHEMA}, "
        "\"required\": [\"value\"]}")


@pytest.fixture(scope="module")
def base_url(smol_path):
    with BackgroundServer(ServeSettings(model=str(smol_path), port=0, parallel=1, ctx=1024, threads=1)) as s:
        yield s.base_url


def _message(r: httpx.Response) -> str:
    body = r.json()
    err = body.get("error")
    return err if isinstance(err, str) else err["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_refuse_a_tool_whose_parameters_are_not_an_object(base_url, stream):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tool = {"type": "function", "function": {"name": "cities", "description": "cities", "parameters": ARRAY}}
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Oslo?"}], tools=[tool],
                                           tool_choice=choice, max_tokens=8, stream=stream)
        assert SAID in e.value.body["message"], e.value.body


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"input": "Oslo?", "tools": [{"type": "function", "name": "cities", "parameters": ARRAY}],
                       "tool_choice": "required", "max_output_tokens": 16}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Oslo?"}], "stream": False,
                   "tools": [{"type": "function", "function": {"name": "cities", "parameters": ARRAY}}]}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Oslo?"}], "max_tokens": 8,
                      "tools": [{"name": "cities", "input_schema": ARRAY}], "tool_choice": {"type": "any"}}),
], ids=["responses", "ollama", "anthropic"])
def test_the_other_apis_refuse_it_too(base_url, path, body):
    model = httpx.get(base_url + "/api/tags").json()["models"][0]["name"]  # Ollama's API wants the served name
    r = httpx.post(base_url + path, json={"model": model, **body}, timeout=120)
    assert r.status_code == 400 and SAID in _message(r), (r.status_code, r.text)


def test_an_object_schema_is_still_taken(base_url):
    tool = {"type": "function", "function": {"name": "cities", "parameters": {
        "type": "object", "properties": {"value": ARRAY}, "required": ["value"]}}}
    r = httpx.post(base_url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Oslo?"}], "tools": [tool], "tool_choice": "required",
        "max_tokens": 24, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    args = call["function"]["arguments"]  # an object with the array in it (cut at max_tokens, maybe)
    assert args.startswith("{") and '"value": [' in args, call


def test_the_agent_refuses_such_a_tool_when_it_is_loaded():
    from ondevice.agent import Tool
    from ondevice.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"^tool cities: parameters must be a JSON schema with type 'object'$"):
        Tool(name="cities", description="cities", parameters=ARRAY, fn=lambda **kw: kw)
