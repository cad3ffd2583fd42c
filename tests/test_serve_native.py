"""llama-server's own routes on `ondevice serve` (/completion, /completions, /embedding(s), /props, /apply-template,
/lora-adapters): greedy answers equal to the OpenAI routes' on the same server, in llama-server's shapes (whole and
streamed, prompts as text, ids, mixed and several), its fields (n_predict, n_probs, stop, json_schema, logit_bias
forms, samplers, response_fields, n_cmpl), its errors, and LoRA adapters chosen per request at any scale."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import openai
import pytest
from test_adapt_average import _pairs
from test_clients import _model_path
from test_serve_tools import QWEN, needs_qwen

from ondevice.adapt import adapter_file
from ondevice.adapt.average import average
from ondevice.models.store import cached_sha256
from ondevice.serve import BackgroundServer, ServeSettings

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An adapter of SmolLM2 (rank 4 on three layers' attn_v), and the same adapter's change halved, made by
    ``adapt average A A --weights 0.25,0.25``: what the first is at scale 0.5."""
    d = tmp_path_factory.mktemp("native-lora")
    prov = {"base_sha256": cached_sha256(_model_path()), "base_name": "smollm2-135m-instruct"}
    a = adapter_file.write(d / "a.gguf", "llama", 8.0, _pairs(0, 4, scale=0.6), prov)
    half = d / "half.gguf"
    average([str(a), str(a)], half, weights=[0.25, 0.25])
    return a, half


@pytest.fixture(scope="module")
def server(adapters):
    # f32 KV: greedy text does not depend on which cells a sequence sits in, so every route gives the same text
    a, half = adapters
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=1024, threads=1, kv_type="f32",
                             api_key=KEY, adapter=[f"a={a}", f"half={half}"])
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, path: str, body, status: int = 200):
    r = httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=300)
    assert r.status_code == status, r.text
    return r.json()


def events(server, body) -> list[dict]:
    """A native stream's events (each a ``data:`` line); the stream has no [DONE]."""
    with httpx.stream("POST", server.base_url + "/completion", json={**body, "stream": True}, headers=AUTH,
                      timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] != "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines]


def tokenize(server, text: str, add: bool = True) -> list[int]:
    return post(server, "/tokenize", {"content": text, "add_special": add})["tokens"]


def test_completion_is_the_completions_routes_answer_in_llama_servers_shape(server, oai):
    c = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "return_tokens": True})
    assert r["content"] == c.choices[0].text and r["stop"] is True and r["index"] == 0
    assert (r["tokens_evaluated"], r["tokens_predicted"]) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r["stop_type"] == "limit" and r["stopping_word"] == "" and r["truncated"] is False
    assert post(server, "/detokenize", {"tokens": r["tokens"]})["content"] == r["content"] and len(r["tokens"]) == 12
    assert r["prompt"] == PROMPT and r["model"] == oai.models.list().data[0].id and r["id_slot"] in (0, 1)
    assert r["has_new_line"] == ("\n" in r["content"])
    g = r["generation_settings"]
    assert (g["n_predict"], g["temperature"], g["top_k"], g["samplers"][0], g["lora"]) == (12, 0, 40, "penalties", [])
    t = r["timings"]
    assert t["predicted_n"] == 12 and t["prompt_n"] + t["cache_n"] == c.usage.prompt_tokens
    assert t["predicted_per_token_ms"] == pytest.approx(t["predicted_ms"] / 11)  # per gap, as llama-server's
    # /completions is the same route (llama-server's alias), not the OpenAI one
    again = post(server, "/completions", {"prompt": PROMPT, "n_predict": 12, "temperature": 0})
    assert again["content"] == r["content"] and again["tokens"] == []  # tokens only with return_tokens


def test_prompts_as_ids_mixed_and_several(server):
    ids = tokenize(server, PROMPT)
    by_text = post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, "temperature": 0})["content"]
    assert post(server, "/completion", {"prompt": ids, "n_predict": 6, "temperature": 0})["content"] == by_text
    # ids then text: the text is tokenized without a BOS, as llama-server's
    head, tail = ids[:2], tokenize(server, PROMPT, add=False)[2:]
    mixed = post(server, "/completion", {"prompt": [*head, post(server, "/detokenize", {"tokens": tail})["content"]],
                                         "n_predict": 6, "temperature": 0})
    assert mixed["tokens_evaluated"] == len(ids)
    several = post(server, "/completion", {"prompt": [PROMPT, ids, {"prompt_string": "Hello"}], "n_predict": 6,
                                           "temperature": 0})
    assert [x["index"] for x in several] == [0, 1, 2] and several[0]["content"] == several[1]["content"] == by_text
    two = post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, "n_cmpl": 2, "seed": 7})
    assert isinstance(two, list) and [x["index"] for x in two] == [0, 1]


def test_stream_pieces_add_up_to_the_whole_reply(server):
    body = {"prompt": PROMPT, "n_predict": 10, "temperature": 0}
    whole = post(server, "/completion", {**body, "return_tokens": True})
    evs = events(server, body)
    *parts, last = evs
    assert all(e["stop"] is False for e in parts) and last["stop"] is True
    assert "".join(e["content"] for e in parts) == whole["content"]
    assert [t for e in parts for t in e["tokens"]] == whole["tokens"]
    assert last["content"] == "" and last["tokens"] == [] and last["stop_type"] == "limit"
    assert [e["tokens_predicted"] for e in parts] == sorted(e["tokens_predicted"] for e in parts)
    assert "timings" in last and "timings" not in parts[0]
    assert "timings" in events(server, {**body, "timings_per_token": True})[0]


def test_a_stop_word_ends_the_reply_and_is_named(server, oai):
    whole = post(server, "/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0})["content"]
    word = whole.split()[1]
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stop": [word]})
    assert r["stop_type"] == "word" and r["stopping_word"] == word and r["content"] == whole[:whole.index(word)]
    assert events(server, {"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stop": [word]})[-1]["stop_type"] \
        == "word"
    chat = "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n"
    eos = post(server, "/completion", {"prompt": chat, "n_predict": 64, "temperature": 0, "return_tokens": True})
    assert eos["stop_type"] == "eos" and eos["tokens_predicted"] < 64
    # the end-of-text token is a generated token, in tokens and the count, as llama-server counts it
    assert eos["tokens_predicted"] == len(eos["tokens"])
    assert eos["tokens"][-1] == tokenize(server, "<|im_end|>", False)[0]
    assert [t for e in events(server, {"prompt": chat, "n_predict": 64, "temperature": 0}) for t in e["tokens"]] \
        == eos["tokens"]


def test_n_probs_gives_the_completions_routes_logprobs_per_token(server, oai):
    c = oai.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 5, "temperature": 0, "n_probs": 3,
                                     "return_tokens": True})
    probs = r["completion_probabilities"]
    assert [p["id"] for p in probs] == r["tokens"]
    assert [p["logprob"] for p in probs] == pytest.approx(c.choices[0].logprobs.token_logprobs, abs=1e-4)
    for p, top in zip(probs, c.choices[0].logprobs.top_logprobs):
        assert len(p["top_logprobs"]) == 3 and p["top_logprobs"][0]["id"] == p["id"]  # greedy: the best one
        assert bytes(p["bytes"]).decode() == p["token"]
        assert {e["token"]: e["logprob"] for e in p["top_logprobs"]} == pytest.approx(top, abs=1e-4)
    streamed = [e for e in events(server, {"prompt": PROMPT, "n_predict": 5, "temperature": 0, "n_probs": 3})
                if not e["stop"]]
    assert [p["id"] for e in streamed for p in e["completion_probabilities"]] == r["tokens"]


def test_post_sampling_probs_are_the_chains_probabilities(server):
    """llama-server's post_sampling_probs: each token's probability after the sampler chain (``prob``,
    ``top_probs``). Greedy puts it all on the pick; top_k 3 at temperature 1 renormalises the raw top three; the
    same seed samples the same tokens as without it."""
    greedy = post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0, "n_probs": 3,
                                          "post_sampling_probs": True, "return_tokens": True})
    assert [p["id"] for p in greedy["completion_probabilities"]] == greedy["tokens"]
    for p in greedy["completion_probabilities"]:
        assert p["prob"] == 1.0 and [(t["id"], t["prob"]) for t in p["top_probs"]] == [(p["id"], 1.0)]
        assert "logprob" not in p and "top_logprobs" not in p
    assert greedy["generation_settings"]["post_sampling_probs"] is True
    body = {"prompt": PROMPT, "n_predict": 6, "temperature": 1.0, "top_k": 3, "top_p": 1.0, "min_p": 0.0,
            "seed": 11, "n_probs": 3, "return_tokens": True}
    raw = post(server, "/completion", body)
    after = post(server, "/completion", {**body, "post_sampling_probs": True})
    assert after["tokens"] == raw["tokens"] and after["content"] == raw["content"]
    for r, a in zip(raw["completion_probabilities"], after["completion_probabilities"], strict=True):
        top3 = {t["id"]: np.exp(t["logprob"]) for t in r["top_logprobs"]}
        want = {t: p / sum(top3.values()) for t, p in top3.items()}
        got = {t["id"]: t["prob"] for t in a["top_probs"]}
        assert got == pytest.approx(want, abs=1e-4) and a["prob"] == pytest.approx(want[a["id"]], abs=1e-4)
        assert [t["prob"] for t in a["top_probs"]] == sorted(got.values(), reverse=True)
    streamed = [p for e in events(server, {**body, "post_sampling_probs": True}) if not e["stop"]
                for p in e["completion_probabilities"]]
    assert [(p["id"], p["prob"]) for p in streamed] == [(p["id"], p["prob"]) for p in after["completion_probabilities"]]


def test_json_schema_and_grammar_constrain_the_reply(server):
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    r = post(server, "/completion", {"prompt": "A color as JSON: ", "n_predict": 48, "temperature": 0,
                                     "json_schema": schema})
    assert isinstance(json.loads(r["content"])["color"], str)
    g = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                     "grammar": 'root ::= " red" | " blue"'})
    assert g["content"] in (" red", " blue") and g["generation_settings"]["grammar"]


def test_logit_bias_in_each_of_llama_servers_forms(server):
    body = {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "return_tokens": True}
    first = post(server, "/completion", body)
    tok, text = first["tokens"][0], first["content"]
    for bias in ([[tok, False]], [[tok, -100]], {str(tok): -100}, [[text, False]]):
        r = post(server, "/completion", {**body, "logit_bias": bias})
        assert r["tokens"][0] != tok, bias
        assert r["generation_settings"]["logit_bias"][0]["token"] == tok
    assert post(server, "/completion", {**body, "logit_bias": [[tok, "x"]]})["tokens"] == [tok]  # skipped, as there


def test_samplers_a_subset_in_order_and_response_fields(server, oai):
    body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0}
    greedy = post(server, "/completion", body)["content"]
    # top_k 1 alone decides: greedy whatever the temperature
    r = post(server, "/completion", {**body, "temperature": 1.5, "top_k": 1, "seed": 3, "samplers": ["top_k",
                                                                                                     "temperature"]})
    assert r["content"] == greedy and r["generation_settings"]["top_p"] == 1.0
    assert r["generation_settings"]["samplers"] == ["top_k", "temperature"]
    assert post(server, "/completion", {**body, "samplers": "kt"})["generation_settings"]["min_p"] == 0.0
    # the OpenAI routes take llama-server's samplers too: without "temperature" a temperature of 0 is not applied
    # (llama.cpp then draws from top_k/top_p at temperature 1), as on /completion
    c = oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, seed=3,
                               extra_body={"samplers": ["top_k", "top_p"]})
    drawn = post(server, "/completion", {**body, "seed": 3, "samplers": ["top_k", "top_p"]})["content"]
    assert c.choices[0].text == drawn != greedy
    with pytest.raises(openai.BadRequestError, match="order"):
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    extra_body={"samplers": ["temperature", "top_k"]})
    err = post(server, "/completion", {**body, "samplers": ["temperature", "top_k"]}, status=400)
    assert err["error"]["code"] == 400 and "order" in err["error"]["message"]
    f = post(server, "/completion", {**body, "response_fields": ["content", "generation_settings/n_predict", "nope"]})
    assert f == {"content": greedy, "generation_settings/n_predict": 8}


@pytest.mark.parametrize(("body", "says"), [
    ({"prompt": "x", "min_keep": 2}, "min_keep"),
    ({"prompt": {"prompt_string": "x", "multimodal_data": ["aGk="]}}, "text only"),
    ({"prompt": "x", "n_predict": -5}, "n_predict"),
    ({"prompt": "x", "n_probs": 50}, "n_probs"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "lora": [{"id": 9, "scale": 1}]}, "lora[0].id=9"),
    ({"prompt": "x", "lora": [{"id": 0, "scale": 50}]}, "lora.0.scale"),
    ({}, "prompt is required"),
])
def test_bad_fields_are_llama_servers_400_naming_the_field(server, body, says):
    err = post(server, "/completion", body, status=400)["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error" and says in err["message"]


def test_the_key_is_checked_and_refused_in_llama_servers_shape(server):
    r = httpx.post(server.base_url + "/completion", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401


def test_props_apply_template_and_embeddings(server, oai):
    p = httpx.get(server.base_url + "/props", headers=AUTH).json()
    assert p["default_generation_settings"]["n_ctx"] == 1024 and p["total_slots"] == 2
    assert p["default_generation_settings"]["params"]["temperature"] == pytest.approx(0.8)
    assert p["default_generation_settings"]["params"]["n_predict"] == -1
    assert p["chat_template"] == httpx.get(server.base_url + "/tokenizer_info", headers=AUTH).json()["chat_template"]
    assert p["model_path"] == str(_model_path()) and p["eos_token"] == "<|im_end|>"
    msgs = [{"role": "user", "content": "Name a color."}]
    prompt = post(server, "/apply-template", {"messages": msgs})["prompt"]
    chat = oai.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    assert prompt.endswith("<|im_start|>assistant\n") and len(tokenize(server, prompt)) == chat.usage.prompt_tokens
    assert post(server, "/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0})["content"] \
        == chat.choices[0].message.content
    ref = oai.embeddings.create(model="m", input="a red apple").data[0].embedding
    for path, body in (("/embedding", {"content": "a red apple"}), ("/embeddings", {"input": "a red apple"})):
        (e,) = post(server, path, body)
        assert e["index"] == 0 and np.allclose(e["embedding"][0], ref, atol=1e-6)
    assert "embd_normalize" in post(server, "/embedding", {"content": "x", "embd_normalize": -1}, status=400)[
        "error"]["message"]


def _base(oai) -> str:
    return oai.models.list().data[0].id


def _first_logprobs(server, **extra) -> tuple[str, dict]:
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "n_probs": 5, **extra})
    return r["content"], {e["id"]: e["logprob"] for e in r["completion_probabilities"][0]["top_logprobs"]}


def test_lora_per_request_at_any_scale_and_lora_adapters(server, oai, adapters):
    a, half = adapters
    listed = httpx.get(server.base_url + "/lora-adapters", headers=AUTH).json()
    assert [(x["id"], x["name"], x["path"], x["scale"]) for x in listed] == [(0, "a", str(a), 1.0),
                                                                             (1, "half", str(half), 1.0)]
    base = _first_logprobs(server)
    full = _first_logprobs(server, lora=[{"id": 0, "scale": 1.0}])
    assert full[0] == _first_logprobs(server, model=f"{_base(oai)}+a")[0]
    assert full[0] != base[0]
    # scale 0.5 is the halved adapter's change: the same text and first-token logprobs
    at_half = _first_logprobs(server, lora=[{"id": 0, "scale": 0.5}])
    ref = _first_logprobs(server, lora=[{"id": 1, "scale": 1.0}])
    assert at_half[0] == ref[0] and at_half[0] not in (base[0], full[0])
    assert at_half[1] == pytest.approx(ref[1], abs=2e-3)
    assert _first_logprobs(server, lora=[{"id": 0, "scale": 0.0}]) == base  # off: the base, from its cached prefix
    assert _first_logprobs(server, lora=[{"id": 0, "scale": 1.0}]) == full  # not the 0.5 KV of the same prompt
    # the OpenAI routes take the same field
    c = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0,
                               extra_body={"lora": [{"id": 0, "scale": 0.5}]})
    assert c.choices[0].text == at_half[0]
    # POST /lora-adapters: the scale a request naming the adapter gets; an --adapter one not listed keeps its own
    # (it went to 0, and a request naming it got the base model with no word: a llama-server client lists only the
    # adapters it sets); 0 turns one off
    assert post(server, "/lora-adapters", [{"id": 0, "scale": 0.5}]) == {"success": True}
    try:
        assert [x["scale"] for x in httpx.get(server.base_url + "/lora-adapters", headers=AUTH).json()] == [0.5, 1.0]
        assert _first_logprobs(server, model=f"{_base(oai)}+a")[0] == at_half[0]
        assert _first_logprobs(server, model=f"{_base(oai)}+half")[0] == ref[0]
        assert post(server, "/lora-adapters", [{"id": 1, "scale": 0.0}]) == {"success": True}
        assert [x["scale"] for x in httpx.get(server.base_url + "/lora-adapters", headers=AUTH).json()] == [0.5, 0.0]
        assert _first_logprobs(server, model=f"{_base(oai)}+half")[0] == base[0]
        err = post(server, "/lora-adapters", [{"id": 5, "scale": 1}], status=400)["error"]
        assert "lora[0].id=5" in err["message"]
    finally:
        post(server, "/lora-adapters", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}])
    assert "send one of the two" in post(server, "/completion", {"prompt": "x", "model": f"{_base(oai)}+a",
                                                                  "lora": [{"id": 1, "scale": 1}]},
                                         status=400)["error"]["message"]


def test_lora_flags_apply_an_adapter_to_every_request_that_names_none_as_llama_server(server, adapters):
    """`serve --lora FILE` (llama-server's meaning): the adapter on every request that names none; `--lora-scaled
    FILE SCALE`; `--lora-init-without-apply`: off until POST /lora-adapters."""
    import argparse

    from ondevice.serve.cli import add_arguments
    from ondevice.serve.settings import settings_from_args

    a = adapters[0]
    base = _first_logprobs(server)[0]
    full = _first_logprobs(server, lora=[{"id": 0, "scale": 1.0}])[0]
    at_half = _first_logprobs(server, lora=[{"id": 1, "scale": 1.0}])[0]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = settings_from_args(parser.parse_args(["--lora", str(a), "--lora-scaled", str(a), "0.5"]))
    assert flags.lora == [str(a), f"{a}:0.5"]
    common = {"model": str(_model_path()), "port": 0, "parallel": 2, "ctx": 1024, "threads": 1, "kv_type": "f32"}
    with BackgroundServer(ServeSettings(**common, lora=[f"{a}:0.5"])) as s:
        assert _first_logprobs(s)[0] == at_half  # no adapter named, no lora field: the --lora one at its scale
        assert _first_logprobs(s, lora=[])[0] == at_half  # an empty list is no choice (llama-server's reading)
        assert _first_logprobs(s, lora=[{"id": 0, "scale": 1.0}])[0] == full
        assert [x["scale"] for x in httpx.get(s.base_url + "/lora-adapters").json()] == [0.5]
    with BackgroundServer(ServeSettings(**common, lora=[str(a)], lora_init_without_apply=True)) as s:
        assert [x["scale"] for x in httpx.get(s.base_url + "/lora-adapters").json()] == [0.0]
        assert _first_logprobs(s)[0] == base
        post(s, "/lora-adapters", [{"id": 0, "scale": 1.0}])
        assert _first_logprobs(s)[0] == full
    with BackgroundServer(ServeSettings(**common, lora=[str(a)], adapter=[f"half={adapters[1]}"])) as s:
        post(s, "/lora-adapters", [{"id": 1, "scale": 1.0}])  # the --lora one (id 0) not listed: off
        assert [x["scale"] for x in httpx.get(s.base_url + "/lora-adapters").json()] == [0.0, 1.0]
        assert _first_logprobs(s)[0] == base
        post(s, "/lora-adapters", [{"id": 0, "scale": 1.0}])  # the --adapter one not listed: kept for its requests
        assert [x["scale"] for x in httpx.get(s.base_url + "/lora-adapters").json()] == [1.0, 1.0]
        assert _first_logprobs(s)[0] == full and _first_logprobs(s, model="m+half")[0] == at_half


def test_the_access_log_counts_the_tokens_of_a_reply_whose_response_fields_leave_them_out(server, caplog):
    """`/completion` with `response_fields: ["content"]` was logged `200 0+0 tok`: the counts were read from the
    reply after its fields were filtered."""
    import logging

    with caplog.at_level(logging.INFO, logger="ondevice.access"):
        whole = post(server, "/completion", {"prompt": PROMPT, "n_predict": 3, "temperature": 0})
        assert post(server, "/completion", {"prompt": PROMPT, "n_predict": 3, "temperature": 0,
                                             "response_fields": ["content"]}) == {"content": whole["content"]}
        counts = f"{whole['tokens_evaluated']}+{whole['tokens_predicted']} tok"
        deadline = time.monotonic() + 10  # a request's line is logged as its app call ends: after the client has it
        while len(lines := [r.getMessage() for r in caplog.records if "/completion" in r.getMessage()]) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)
    assert len(lines) == 2 and all(counts in ln for ln in lines), (counts, lines)


def test_a_missing_lora_file_is_named_by_its_own_flag(tmp_path):
    """`serve --lora /missing.gguf` said "--adapter /missing.gguf: no such file" (the adapter loader's flag)."""
    from ondevice.errors import InvalidArgument
    from ondevice.serve.state import ServerState

    for flag, field in (("--lora", "lora"), ("--adapter", "adapter")):
        with pytest.raises(InvalidArgument, match=f"^{flag} {tmp_path}/missing.gguf: no such file"):
            ServerState(ServeSettings(model=str(_model_path()), port=0, parallel=1, ctx=256, threads=1,
                                      **{field: [str(tmp_path / "missing.gguf")]}))


# ------------------------------------------------------------------ /infill: fill-in-the-middle (code models)
def test_infill_on_a_model_without_fill_in_the_middle_tokens_is_llama_servers_501(server, oai):
    err = post(server, "/infill", {"input_prefix": "def f():", "input_suffix": ""}, status=501)["error"]
    assert err["type"] == "not_supported_error" and "qwen2.5-coder" in err["message"]
    with pytest.raises(openai.BadRequestError, match="does not support insert"):  # OpenAI's suffix: a 400
        oai.completions.create(model="m", prompt="def f():", suffix="\n", max_tokens=4)


def test_line_limits_cut_a_less_indented_line_and_stop_after_a_late_newline():
    from ondevice.engine.stops import LineLimits

    lines = LineLimits(4, 0)
    assert lines.feed("x = 1", 0) == ("x = 1", False)  # the first line is never checked
    assert lines.feed("\n    y = 2\n  ", 0) == ("\n    y = 2\n  ", False)  # indent 4: kept; 2 so far: undecided
    assert lines.feed("z", 0) == ("", True)  # the line's text starts at indent 2: cut before it
    assert LineLimits(4, 0).feed("a\n\nb", 0) == ("a\n", True)  # an empty line has no indent either
    assert LineLimits(4, 0).feed("a\n\tb", 0) == ("a\n\t", True)  # a tab counts one, as llama-server's
    late = LineLimits(0, 0.5)
    assert late.feed("a = 1", 9) == ("a = 1", False)  # no newline: goes on
    assert late.feed(" # x\nb", 0.4) == (" # x\nb", False)  # a newline in time: goes on
    assert late.feed("\n", 0.6) == ("\n", True)  # a newline past the limit: ends after it


@pytest.fixture(scope="module")
def coder():
    settings = ServeSettings(model=str(QWEN), port=0, parallel=1, ctx=4096, threads=1, kv_type="f32", api_key=KEY)
    with BackgroundServer(settings) as s:
        yield s


@needs_qwen
def test_infill_builds_llama_servers_repo_level_prompt_and_fills_the_middle(coder):
    body = {"input_prefix": "def fib(n):\n    ", "input_suffix": "\n    return a\n", "n_predict": 32, "temperature": 0,
            "input_extra": [{"filename": "util.py", "text": "def add(a, b):\n    return a + b\n"}]}
    r = post(coder, "/infill", body)
    # what llama-server's /infill decodes for this request (its reply's prompt, the same build, by hand)
    want = ("<|repo_name|>myproject\n<|file_sep|>util.py\ndef add(a, b):\n    return a + b\n<|file_sep|>filename\n"
            "<|fim_prefix|>def fib(n):\n    <|fim_suffix|>\n    return a\n<|fim_middle|>")
    assert r["prompt"] == want and r["tokens_evaluated"] == len(tokenize(coder, want, add=False))
    assert r["content"] == post(coder, "/completion", {"prompt": want, "n_predict": 32, "temperature": 0})["content"]
    assert "a, b" in r["content"]  # it fills in the two names the suffix returns
    # OpenAI's completions suffix: the plain fill-in-the-middle prompt (Ollama's templates, DeepSeek's FIM API)
    oai = openai.OpenAI(base_url=coder.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    plain = "<|fim_prefix|>def fib(n):\n    <|fim_suffix|>\n    return a\n<|fim_middle|>"
    c = oai.completions.create(model="m", prompt=body["input_prefix"], suffix=body["input_suffix"], max_tokens=32,
                               temperature=0)
    assert c.usage.prompt_tokens == len(tokenize(coder, plain, add=False))
    assert c.choices[0].text == oai.completions.create(model="m", prompt=plain, max_tokens=32, temperature=0)\
        .choices[0].text
    with pytest.raises(openai.BadRequestError, match="no echo"):
        oai.completions.create(model="m", prompt="x", suffix="y", echo=True, max_tokens=2)
    # llama.vscode's request: the infill sampler last, lines indented less than the body end the reply
    vs = post(coder, "/infill", {"input_prefix": "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
                                                 "    def push(self, x):\n        ", "input_suffix": "",
                                 "samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99, "n_indent": 8,
                                 "n_predict": 64, "seed": 3, "t_max_predict_ms": 60000})
    assert vs["generation_settings"]["samplers"][-1] == "infill" and vs["stop_type"] == "limit"
    assert vs["tokens_predicted"] < 64
    later = vs["content"].split("\n")[1:]
    assert all(len(x) - len(x.lstrip(" \t")) >= 8 for x in later[:-1]) and not later[-1].strip()
    err = post(coder, "/infill", {"input_prefix": "x", "input_suffix": "", "samplers": ["infill", "top_k"]}, status=400)
    assert "infill: last only" in err["error"]["message"]
    assert "input_suffix is required" in post(coder, "/infill", {"input_prefix": "x"}, status=400)["error"]["message"]
