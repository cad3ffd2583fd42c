"""LangChain (``langchain-openai``) against `ondevice serve` on loopback, as its users call it: ``ChatOpenAI``
invoke / stream / batch / async with usage, a tool call and its result sent back, structured output by each
method, logprobs, ``OpenAIEmbeddings`` and the completions ``OpenAI`` LLM; and ``langchain-ollama``'s
``ChatOllama``/``OllamaEmbeddings`` over Ollama's native routes. The real embedded model, one server."""

from __future__ import annotations

import asyncio

import openai
import pytest

# the [clients] extra: `make test` installs it, so a missing one is a failure, not a skip
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings
from pydantic import BaseModel
from test_clients import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

MAX_EMBEDDING_INPUTS_BEFORE = 256  # what /v1/embeddings took before; LangChain sends up to 1,000 texts a request


@pytest.fixture(scope="module")
def srv():
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so streamed == invoked exactly
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=2, kv_type="f32",
                             embeddings=True, embeddings_ctx=64)
    with BackgroundServer(settings) as s:
        yield s


def _chat(srv, **kw) -> ChatOpenAI:
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return ChatOpenAI(base_url=srv.base_url + "/v1", api_key="x", model=srv.state.model_id, max_retries=0,
                      timeout=120, **kw)


def _joined(chunks):
    out = chunks[0]
    for c in chunks[1:]:
        out = out + c
    return out


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


def test_invoke_stream_batch_and_async_agree_with_usage(srv):
    llm = _chat(srv, stream_usage=True)
    msg = llm.invoke("Say hello")
    meta, usage = msg.response_metadata, msg.usage_metadata
    assert msg.content and meta["finish_reason"] in ("stop", "length")
    assert meta["model_name"] == srv.state.model_id
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    streamed = _joined(list(llm.stream("Say hello")))
    assert streamed.content == msg.content
    assert streamed.response_metadata["finish_reason"] == meta["finish_reason"]
    assert {k: streamed.usage_metadata[k] for k in ("input_tokens", "output_tokens", "total_tokens")} == \
           {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")}

    hello, bye = llm.batch(["Say hello", "Say bye"])
    assert hello.content == msg.content and bye.content

    async def both():
        return await llm.ainvoke("Say hello"), _joined([c async for c in llm.astream("Say hello")])

    a, astreamed = asyncio.run(both())
    assert a.content == astreamed.content == msg.content
    assert astreamed.usage_metadata["output_tokens"] == usage["output_tokens"]


def test_logprobs_are_the_contents_tokens_when_a_stop_string_cuts_it(srv):
    """The stop string's tokens are not in the content, so not in its logprobs (they were, streamed or not)."""
    llm = _chat(srv, logprobs=True, max_tokens=20)
    whole = llm.invoke("Say hello").content
    assert "!" in whole  # the greedy reply goes on past the stop string
    for msg in (llm.invoke("Say hello", stop=["!"]), _joined(list(llm.stream("Say hello", stop=["!"])))):
        assert msg.content == whole[:whole.index("!")] and msg.response_metadata["finish_reason"] == "stop"
        tokens = msg.response_metadata["logprobs"]["content"]
        assert "".join(t["token"] for t in tokens) == msg.content
        assert all(t["logprob"] <= 0 and not t["top_logprobs"] for t in tokens)


def test_tool_call_round_trip(srv):
    """The model calls the tool; its result goes back as a ToolMessage and the model answers in text."""
    question = HumanMessage("What is the weather in Paris? Use the tool.")
    call = _chat(srv, max_tokens=48).bind_tools([get_weather], tool_choice="required").invoke([question])
    assert call.response_metadata["finish_reason"] == "tool_calls" and not call.invalid_tool_calls
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]
    assert set(call.tool_calls[0]["args"]) == {"city"}
    results = [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in call.tool_calls]
    answer = _chat(srv, max_tokens=24).bind_tools([get_weather], tool_choice="none").invoke(
        [question, call, *results])
    assert isinstance(answer, AIMessage) and answer.content and not answer.tool_calls

    streamed = _joined(list(_chat(srv, max_tokens=48).bind_tools([get_weather], tool_choice="required")
                            .stream([question])))
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in call.tool_calls]
    assert streamed.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output(srv, method):
    prompt = "Alice is 30 years old. Return JSON with keys name and age."
    out = _chat(srv, max_tokens=48).with_structured_output(Person, method=method, include_raw=True).invoke(prompt)
    assert out["parsing_error"] is None, out["raw"]
    assert out["parsed"] == Person(name="Alice", age=30)
    assert out["raw"].response_metadata["finish_reason"] == ("tool_calls" if method == "function_calling" else "stop")


def test_the_responses_api_answers_as_the_chat_api_does(srv):
    """ChatOpenAI(use_responses_api=True) (reasoning=..., include=... switch it on too) posts to /v1/responses; the
    server answered 404 there (llama-server serves it). Text, stream, usage and a tool call as through chat."""
    question = "Name a color."
    via_chat = _chat(srv).invoke(question)
    llm = _chat(srv, use_responses_api=True)
    via_responses = llm.invoke(question)
    assert via_responses.text == via_chat.text and via_chat.text
    assert via_responses.usage_metadata["input_tokens"] == via_chat.usage_metadata["input_tokens"]
    assert _joined(list(llm.stream(question))).text == via_chat.text
    tools = _chat(srv, use_responses_api=True, max_tokens=48).bind_tools([get_weather], tool_choice="get_weather")
    call = tools.invoke("What's the weather in Oslo?")
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_embeddings_of_more_texts_than_the_old_cap_in_one_request_as_langchain_sends_them(srv):
    """OpenAIEmbeddings sends up to 1,000 texts a request (OpenAI takes 2,048); this server took 256."""
    texts = [f"note {i}" for i in range(MAX_EMBEDDING_INPUTS_BEFORE + 1)]
    emb = OpenAIEmbeddings(base_url=srv.base_url + "/v1", api_key="x", model=srv.state.model_id, max_retries=0,
                           check_embedding_ctx_length=False)  # plain text: LangChain's token ids are tiktoken's
    vecs = emb.embed_documents(texts)
    one = emb.embed_query(texts[-1])
    assert len(vecs) == len(texts) and {len(v) for v in vecs} == {len(one)}
    assert vecs[-1] == pytest.approx(one, abs=1e-6)


def test_token_ids_of_another_vocabulary_get_an_error_that_names_langchains_switch(srv):
    """What OpenAIEmbeddings sends by default: its texts as OpenAI's tiktoken ids (written out here; tiktoken's
    files are not reachable offline). Ids past this model's vocabulary are a 400 that says what to change."""
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary.*check_embedding_ctx_length=False"):
        client.embeddings.create(model=srv.state.model_id, input=[[15339, 1917], [100255]])
    with pytest.raises(openai.BadRequestError, match=r"outside the vocabulary") as e:  # LangChain's hint: embeddings'
        client.completions.create(model=srv.state.model_id, prompt=[100255], max_tokens=2)
    assert "LangChain" not in str(e.value)


def test_completions_llm_invoke_stream_and_logprobs_with_a_stop(srv):
    def llm(**kw):
        return OpenAI(base_url=srv.base_url + "/v1", api_key="x", model=srv.state.model_id, max_tokens=8,
                      temperature=0, max_retries=0, **kw)

    text = llm().invoke("Once upon a time")
    assert text and "".join(llm().stream("Once upon a time")) == text
    assert llm().batch(["Once upon a time", "One, two,"])[0] == text
    assert " was" in text  # so the stop string below cuts the reply
    for streaming in (False, True):
        got = llm(logprobs=1, streaming=streaming).generate(["Once upon a time"], stop=[" was"]).generations[0][0]
        lp = got.generation_info["logprobs"]
        assert got.text == text[:text.index(" was")] and got.generation_info["finish_reason"] == "stop"
        assert "".join(lp["tokens"]) == got.text, streaming  # the stop string's token was listed too
        assert len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(lp["tokens"])


def test_chat_ollama_answers_as_chat_openai_does(srv):
    """LangChain's ChatOllama posts to Ollama's /api/chat (NDJSON, streamed even for invoke), OllamaLLM to
    /api/generate: the same text, token counts and structured output as ChatOpenAI on /v1; OllamaEmbeddings gets
    /v1/embeddings' vectors."""
    question = "Say hello"
    want = _chat(srv).invoke(question)
    # repeat_penalty 1: the chat route's greedy (Ollama's own default penalty, 1.1, is the /api routes' default)
    llm = ChatOllama(base_url=srv.base_url, model=srv.state.model_id, temperature=0, num_predict=12, repeat_penalty=1)
    got = llm.invoke(question)
    assert got.content == want.content and got.content
    assert {k: got.usage_metadata[k] for k in ("input_tokens", "output_tokens")} == \
           {k: want.usage_metadata[k] for k in ("input_tokens", "output_tokens")}
    assert got.response_metadata["done_reason"] == ("length" if want.response_metadata["finish_reason"] == "length"
                                                    else "stop")
    assert _joined(list(llm.stream(question))).content == want.content
    generate = OllamaLLM(base_url=srv.base_url, model=srv.state.model_id, temperature=0, num_predict=12,
                         repeat_penalty=1)
    assert generate.invoke(question) == "".join(generate.stream(question)) == want.content  # /api/generate
    person = ChatOllama(base_url=srv.base_url, model=srv.state.model_id, temperature=0, num_predict=48,
                        repeat_penalty=1)
    out = person.with_structured_output(Person, method="json_schema").invoke(
        "Alice is 30 years old. Return JSON with keys name and age.")
    assert out == Person(name="Alice", age=30)
    text = "a note about the weather"
    vec = OllamaEmbeddings(base_url=srv.base_url, model=srv.state.model_id).embed_query(text)
    ref = OpenAIEmbeddings(base_url=srv.base_url + "/v1", api_key="x", model=srv.state.model_id, max_retries=0,
                           check_embedding_ctx_length=False).embed_query(text)
    assert vec == pytest.approx(ref, abs=1e-6)
