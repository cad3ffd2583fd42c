"""Ollama's API where ondevice answered otherwise (helper-109's audit): a prompt longer than the context is cut to fit
(``truncate``, on by default) on /api/generate and on a single over-long /api/chat message; an empty /api/embed input
gets no vectors, not an error; ``top_k`` -1 is off; ``format`` JSON's tokens are all the response's (eval_count,
logprobs, num_predict); the management refusals say only what applies. A small context (256) keeps prompts short."""

from __future__ import annotations

import json
import logging

import httpx
import ollama
import openai
import pytest
from test_clients import _model_path

from ondevice.serve import BackgroundServer, ServeSettings

CTX = 256
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}  # the /v1 routes' greedy: no repeat penalty (Ollama's: 1.1)
FILLER = "The old lighthouse keeper counted the ships that passed the northern cliffs each night. " * 30


@pytest.fixture(scope="module")
def server():
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so the routes' answers compare
    with BackgroundServer(ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=CTX, threads=1,
                                        kv_type="f32")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base_url, timeout=300)


@pytest.fixture(scope="module")
def name(client):
    return client.list().models[0].model


def _room(num_predict: int) -> int:
    return CTX - 1 - min(num_predict, CTX // 4)  # truncate leaves the reply its num_predict (a quarter at most)


def _refused(server, route: str, body: dict) -> None:
    """``body`` with truncate: false (the ollama client has no such argument) gets the context error."""
    r = httpx.post(server.base_url + route, timeout=60, json={**body, "truncate": False, "stream": False})
    assert r.status_code == 400 and r.json()["error"].startswith("the prompt has"), r.text


def test_a_raw_prompt_too_long_is_cut_as_ollamas_runner_cuts_it(client, name, server, caplog):
    """Its first num_keep tokens (BOS besides) and its end stay: the answer is the completion of exactly those
    tokens. truncate: false keeps the 400."""
    caplog.set_level(logging.INFO, "ondevice.serve")
    prompt = FILLER + "So the number of ships was"
    st = server.state
    tokens = st.tokenize(prompt)
    room = _room(6)
    keep = 4 + bool(st.engine.add_bos)
    want = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300).completions.create(
        model="m", prompt=tokens[:keep] + tokens[keep + len(tokens) - room:], max_tokens=6, temperature=0)
    g = client.generate(model=name, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 6})
    assert want.usage.prompt_tokens == room and (g.response, g.prompt_eval_count) == (want.choices[0].text, room)
    assert any("tokens were cut after its first" in m for m in caplog.messages), caplog.messages
    _refused(server, "/api/generate", {"model": name, "prompt": prompt, "raw": True, "options": {"num_predict": 6}})


def test_a_templated_prompt_or_one_message_too_long_is_cut_to_fit(client, name, server, caplog):
    """/api/generate and an /api/chat whose last message alone is too long answered 400; Ollama cuts the text (the
    chat template's generation prompt stays) and answers. The /v1 routes refuse as OpenAI's do."""
    caplog.set_level(logging.INFO, "ondevice.serve")
    question = FILLER + "How many ships passed?"
    opts = {"temperature": 0, "num_predict": 8}
    g = client.generate(model=name, prompt=question, options=opts)
    older = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    c = client.chat(model=name, messages=[{"role": "system", "content": "Be terse."}, *older,
                                          {"role": "user", "content": question}], options=opts)
    for r in (g, c):
        assert r.done and _room(8) - 8 < r.prompt_eval_count <= _room(8), r.prompt_eval_count
    assert any("/api/generate: the prompt's text was cut" in m for m in caplog.messages), caplog.messages
    assert any("/api/chat: the 2 oldest messages were dropped" in m for m in caplog.messages), caplog.messages
    _refused(server, "/api/generate", {"model": name, "prompt": question})
    _refused(server, "/api/chat", {"model": name, "messages": [{"role": "user", "content": question}]})
    v1 = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": 8})
    assert v1.status_code == 400 and "the prompt has" in v1.text


def test_cut_text_keeps_the_texts_first_tokens_and_its_end_across_messages(server):
    from ondevice.serve.truncate import cut_text

    st = server.state
    msgs = [{"role": "system", "content": "Answer as a pirate would."},
            {"role": "user", "content": "Tell me about the sea and its ships, then the weather."}]
    toks = [st.tokenize(m["content"], add_special=False, parse_special=False) for m in msgs]
    over = len(toks[0]) + 2  # all the system text after its first 2 tokens, and the user text's first 4
    cut = cut_text(st, msgs, over, 2)
    assert [m["role"] for m in cut] == ["system", "user"]
    assert cut[0]["content"] == st.detokenize(toks[0][:2])
    assert cut[1]["content"] == st.detokenize(toks[1][4:]) and cut[1]["content"].endswith("then the weather.")
    total = len(toks[0]) + len(toks[1])
    assert cut_text(st, msgs, total + 1, 2) is None  # the text alone cannot make room
    end = cut_text(st, msgs, 3, -1)  # num_keep -1: the whole start, so the text's end goes
    assert end[0] == msgs[0] and end[1]["content"] == st.detokenize(toks[1][:-3])


def test_an_empty_embed_input_is_no_vectors_as_ollama_answers(client, name, server):
    """LangChain's OllamaEmbeddings.embed_documents([]) raised on the 400."""
    for empty in ("", []):
        e = client.embed(model=name, input=empty)
        assert e.model == name and e.embeddings == [] and e.prompt_eval_count == 0
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="no-such-model", input=[])
    assert err.value.status_code == 404
    langchain_ollama = pytest.importorskip("langchain_ollama")
    assert langchain_ollama.OllamaEmbeddings(model=name, base_url=server.base_url).embed_documents([]) == []


def test_top_k_minus_one_is_off_as_in_ollama_and_llama_cpp(client, name, server):
    ask = [{"role": "user", "content": "Name a fruit."}]
    hot = {"temperature": 1.5, "seed": 11, "num_predict": 12}
    off = client.chat(model=name, messages=ask, options={**hot, "top_k": 0}).message.content
    assert client.chat(model=name, messages=ask, options={**hot, "top_k": -1}).message.content == off
    oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    same = [oai.chat.completions.create(model="m", messages=ask, max_tokens=12, temperature=1.5, seed=11,
                                        extra_body={"top_k": k}).choices[0].message.content for k in (0, -1)]
    assert same[0] == same[1]


def test_format_json_tokens_are_all_the_responses(client, name):
    """The hidden ```json fence counted in eval_count and had logprobs that no part of response matched; streamed
    with num_predict 3 the answer was empty."""
    opts = {"temperature": 0, "num_predict": 12}
    g = client.generate(model=name, prompt="hi", format="json", logprobs=True, options=opts)
    assert g.response.startswith("{") and "".join(x.token for x in g.logprobs) == g.response
    assert g.eval_count == len(g.logprobs) == 12  # the fence's 4 tokens took 4 of the 12
    parts = list(client.generate(model=name, prompt="hi", format="json", stream=True, options={**opts,
                                                                                              "num_predict": 3}))
    assert "".join(p.response for p in parts).startswith("{") and parts[-1].eval_count == 3
    c = client.chat(model=name, messages=[{"role": "user", "content": "Give a JSON object with a key name."}],
                    format={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
                    logprobs=True, options=opts)
    assert "".join(x.token for x in c.logprobs) == c.message.content and c.eval_count == len(c.logprobs)
    assert c.done_reason == "length" or isinstance(json.loads(c.message.content), dict)


def test_management_refusals_say_only_what_applies(client, name, server):
    """Serving a model after deleting it, or after "pushing" it, made no sense."""
    for call, says in ((lambda: client.delete(name), "`ondevice rm NAME` deletes a model from the store"),
                       (lambda: client.push(name), "ondevice keeps models on this machine")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.error.endswith(says), err.value.error
    with pytest.raises(ollama.ResponseError, match="copies a model in the store, then serve it with `ondevice serve"):
        client.copy(name, "other")
