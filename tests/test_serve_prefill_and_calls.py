"""Requests an audit against llama-server and the OpenAI API found answered wrongly (a live server, the official
``openai`` client): an assistant prefill is continued, a forced call cut short is a partial call and never
the call's JSON as text, ``parameters: {}`` is an object, ``top_p: 0`` and int64 seeds are taken, and a text
part without text is named."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_serve import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def srv():
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=512, threads=2)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_an_assistant_prefill_is_continued_not_answered_anew(srv, client):
    """A last assistant message is the start of the reply (llama-server, Ollama, Anthropic): the prompt ends
    with its text, unclosed, and the reply goes on from it (before, the turn was closed and a new one began)."""
    msgs = [*HELLO, {"role": "assistant", "content": "Ahoy"}]
    shown = httpx.post(srv.base_url + "/apply-template", json={"messages": msgs}).json()["prompt"]
    assert shown.endswith("<|im_start|>assistant\nAhoy"), shown[-60:]
    alone = httpx.post(srv.base_url + "/apply-template", json={"messages": HELLO}).json()["prompt"]
    assert shown == alone + "Ahoy"
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert r.choices[0].message.content == streamed  # the continuation, streamed or not
    assert not r.choices[0].message.content.startswith("<|im_start|>")
    counted = httpx.post(srv.base_url + "/v1/chat/completions/input_tokens", json={"messages": msgs}).json()
    assert r.usage.prompt_tokens == counted["input_tokens"]
    name = httpx.get(srv.base_url + "/api/tags").json()["models"][0]["name"]
    ollama = httpx.post(srv.base_url + "/api/chat", json={"model": name, "messages": msgs, "stream": False,
                                                          "options": {"temperature": 0, "num_predict": 8,
                                                                      "repeat_penalty": 1.0}}).json()
    assert ollama["message"]["content"] == r.choices[0].message.content
    # an assistant message with calls is history, not a prefill
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
    shown = httpx.post(srv.base_url + "/apply-template", json={"messages": [*HELLO, call]}).json()["prompt"]
    assert shown.endswith("<|im_start|>assistant\n")


def test_a_forced_call_cut_short_is_a_partial_call_not_text(client):
    kw = {"model": "x", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": WEATHER,
          "tool_choice": "required", "temperature": 0}
    whole = client.chat.completions.create(**kw, max_tokens=60)
    assert whole.choices[0].finish_reason == "tool_calls"
    args = whole.choices[0].message.tool_calls[0].function.arguments
    for cut in (3, 16):
        r = client.chat.completions.create(**kw, max_tokens=cut)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "length" and m.content is None, m
        if m.tool_calls:  # the name was complete: the arguments written so far
            assert m.tool_calls[0].function.name == "get_weather"
            assert args.startswith(m.tool_calls[0].function.arguments)
        chunks = list(client.chat.completions.create(**kw, max_tokens=cut, stream=True))
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert client.chat.completions.create(**kw, max_tokens=16).choices[0].message.tool_calls  # its head is out


def test_empty_parameters_are_an_object_so_a_forced_call_ends(client):
    r = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Call the ping tool."}], temperature=0, max_tokens=60,
        tools=[{"type": "function", "function": {"name": "ping", "parameters": {}}}], tool_choice="required")
    call = r.choices[0].message.tool_calls[0].function
    assert r.choices[0].finish_reason == "tool_calls" and call.name == "ping"
    assert json.loads(call.arguments) == {}


def test_top_p_zero_and_int64_seeds_are_taken(client):
    kw = {"model": "x", "messages": HELLO, "max_tokens": 8}
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    assert client.chat.completions.create(**kw, temperature=1.0, top_p=0).choices[0].message.content == greedy
    assert client.chat.completions.create(**kw, seed=1 << 40).choices[0].message.content


def test_a_text_part_without_text_is_named(client):
    with pytest.raises(openai.BadRequestError, match="a text part without a string 'text'"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [{"type": "text"}]}])


def test_another_model_ondevice_knows_is_a_404_not_an_answer_from_this_one(srv, client):
    """A request for qwen2.5-coder on a server of SmolLM2 was answered by SmolLM2 (200, "model": smollm2...),
    where /api/chat and /v1/models/{id} said 404; any other name is still answered, as llama-server does."""
    for call in (lambda m: client.chat.completions.create(model=m, messages=HELLO, max_tokens=2),
                 lambda m: client.completions.create(model=m, prompt="Hi", max_tokens=2),
                 lambda m: client.responses.create(model=m, input="Hi", max_output_tokens=16)):
        with pytest.raises(openai.NotFoundError, match="model 'qwen2.5-coder-0.5b-instruct' is not the model this "
                                                        "server serves \\(SmolLM2-135M-Instruct.Q4_1\\); start "
                                                        "`ondevice serve -m qwen2.5-coder-0.5b-instruct`"):
            call("qwen2.5-coder-0.5b-instruct")
        assert call("gpt-4o")  # a name no model here has: this server's model answers
        assert call("smollm2-135m-instruct")  # the catalog's name of the file it was started with
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "gemma3-270m+x", "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_json_that_is_whole_at_exactly_max_tokens_ends_with_stop(client):
    """The reply's grammar was complete with its last allowed token, yet the finish said length, and the openai
    client's .parse() / LangChain's with_structured_output raised LengthFinishReasonError on valid JSON."""
    kw = {"model": "x", "messages": [{"role": "user", "content": "Give me a JSON with name and age"}], "temperature": 0,
          "response_format": {"type": "json_object"}}
    whole = client.chat.completions.create(**kw, max_tokens=64)
    n, text = whole.usage.completion_tokens, whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop" and json.loads(text) is not None
    exact = client.chat.completions.create(**kw, max_tokens=n)
    assert (exact.choices[0].finish_reason, exact.choices[0].message.content) == ("stop", text)
    short = client.chat.completions.create(**kw, max_tokens=n - 1)
    assert short.choices[0].finish_reason == "length"


def test_openai_shapes_that_were_refused_or_ignored(srv, client):
    """An assistant turn with a refusal part (a valid OpenAI message) was a 400 "this is a text model";
    best_of and the deprecated functions/function_call were ignored without a word; responses.retrieve got a bare
    "Not Found"."""
    history = [{"role": "user", "content": "Say something rude."},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot do that."}]},
               {"role": "user", "content": "Then say hello."}]
    assert client.chat.completions.create(model="x", messages=history, max_tokens=2).choices[0].message
    with pytest.raises(openai.BadRequestError, match="best_of=3 is not done here"):
        client.completions.create(model="x", prompt="Once upon", best_of=3, max_tokens=3)
    assert client.completions.create(model="x", prompt="Once upon", best_of=1, max_tokens=2).choices
    with pytest.raises(openai.BadRequestError, match="deprecated functions / function_call are not taken; send "
                                                     "tools"):
        client.chat.completions.create(model="x", messages=HELLO, max_tokens=2, functions=[
            {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}])
    with pytest.raises(openai.NotFoundError, match="ondevice keeps no responses"):
        client.responses.retrieve("resp_abc")
