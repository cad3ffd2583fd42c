"""Real clients against `ondevice serve` on loopback: lm-evaluation-harness (completions and chat), the openai
client, curl habits, and the access log (LangChain: test_clients_langchain.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

# [server], [test] and [lmeval] extras: `make test` installs them, so a missing one is a failure, not a skip
import httpx  # noqa: E402
import lm_eval  # noqa: E402, F401
import openai  # noqa: E402

from ondevice.engine.base import EngineConfig
from ondevice.engine.llama import LlamaEngine
from ondevice.serve import BackgroundServer, ServeSettings

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's ChatML, written out

# A multiple-choice task in ChatML: after a whole answer the model's likeliest next token is often
# <|im_end|>, the case where a reply without the generated-token entry loses the answer's last token.
ITEMS = [
    ("What is the capital of France? Answer with one word.", ["Paris", "London", "Rome", "Berlin"], 0),
    ("What colour is the sky on a clear day? Answer with one word.", ["Green", "Blue", "Red", "Black"], 1),
    ("How many legs does a spider have? Answer with a number.", ["6", "4", "8", "10"], 2),
    ("Which animal says moo? Answer with one word.", ["Cat", "Dog", "Duck", "Cow"], 3),
    ("What is 2 + 2? Answer with a number.", ["4", "5", "3", "22"], 0),
    ("Which planet do we live on? Answer with one word.", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do bees make? Answer with one word.", ["Milk", "Silk", "Honey", "Wax"], 2),
    ("Which is the largest ocean? Answer with one word.", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
]


def _model_path() -> Path:
    from ondevice.models import resolve

    return Path(resolve(None).path)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def srv():
    # f32 KV: a sequence's logits do not depend on which cache cells it sits in, so agreement is exact
    settings = ServeSettings(model=str(_model_path()), port=0, parallel=2, ctx=512, threads=2, kv_type="f32",
                             embeddings=False)
    with BackgroundServer(settings) as s:
        yield s


@pytest.fixture(scope="module")
def ref():
    """An independent engine on the same file: raw logits of every position, log-softmax in numpy."""
    eng = LlamaEngine(_model_path(), EngineConfig(n_ctx=512, n_threads=2, type_k="f32", type_v="f32"))

    def logprobs(tokens: list[int]) -> np.ndarray:  # (len(tokens), n_vocab): row i predicts token i + 1
        eng.reset()
        eng.prefill(tokens, logits_all=True)
        out = _log_softmax(eng.all_logits())
        eng.reset()
        return out

    eng.logprobs = logprobs
    yield eng
    eng.close()


# -- lm-evaluation-harness ------------------------------------------------------------------------------
def test_lm_eval_local_completions_agrees_with_raw_logits(srv, ref, tmp_path):
    """`lm_eval --model local-completions` with nothing but base_url, offline, on a local multiple-choice
    task: every log-likelihood it reports equals the one computed from raw logits."""
    _task(tmp_path, "ondevice_mc", [{"question": CHAT.format(q=q), "choices": c, "answer": a} for q, c, a in ITEMS],
          """\
        output_type: multiple_choice
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
        """)
    r, samples = _lm_eval(srv, tmp_path, "local-completions", "ondevice_mc")
    assert "remote tokenizer" in r.stderr.lower() or "remote tokenizer" in r.stdout.lower()
    assert len(samples) == len(ITEMS)

    eos = set(ref.eos_tokens)
    hit_eos, n_req, acc = 0, 0, []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        q, choices, answer = ITEMS[s["doc_id"]]
        # lm-eval's split: trailing whitespace of the context moves to the continuation ("\n" + choice here);
        # the continuation's tokens are those of the whole text past the context's
        ctx = ref.tokenize(CHAT.format(q=q).rstrip(), add_special=False, parse_special=True)
        got = [float(resp[0][0]) for resp in s["resps"]]  # [[loglikelihood, is_greedy]] per choice
        expect = []
        for c in choices:
            whole = ref.tokenize(CHAT.format(q=q) + c, add_special=False, parse_special=True)
            assert whole[:len(ctx)] == ctx
            lp = ref.logprobs(whole)
            expect.append(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))
            hit_eos += int(np.argmax(lp[-1])) in eos
            n_req += 1
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6, err_msg=f"item {s['doc_id']}: {q}")
        acc.append(float(np.argmax(expect) == answer))
        assert float(s["acc"]) == acc[-1]
    # the case the fix is for occurred: the greedy token after a whole answer was end-of-text
    assert hit_eos >= 3, f"only {hit_eos} of {n_req} requests ended on end-of-text; the task no longer tests it"
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["ondevice_mc"]["acc,none"] == pytest.approx(np.mean(acc))


def test_lm_eval_local_chat_completions_generates_what_the_server_answers(srv, tmp_path):
    """`lm_eval --model local-chat-completions --apply_chat_template` on a local generate_until task: each
    generation is the server's greedy answer to the same chat request (lm-eval's stop, token cap and seed)."""
    _task(tmp_path, "ondevice_gen", [{"question": q, "answer": c[a]} for q, c, a in ITEMS[:5]], """\
        output_type: generate_until
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 16
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    _, samples = _lm_eval(srv, tmp_path, "local-chat-completions", "ondevice_gen", "--apply_chat_template")
    assert len(samples) == 5
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    for s in samples:
        q = ITEMS[s["doc_id"]][0]
        (messages,) = s["arguments"]["gen_args_0"]["arg_0"]  # the chat it sent, as JSON text
        assert json.loads(messages) == [{"role": "user", "content": q}]
        direct = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=16,
                                                temperature=0, stop=["\n\n"], seed=1234)
        assert s["resps"][0][0] == direct.choices[0].message.content and s["resps"][0][0], q


def _task(tmp_path: Path, name: str, rows: list[dict], rest: str) -> None:
    """An lm-eval task ``name`` in ``tmp_path/tasks`` over ``rows`` (a local JSON file; the text is each row's
    question); ``rest``: the task's other YAML keys."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "tasks" / f"{name}.yaml").write_text(head + 'doc_to_text: "{{question}}"\n' + textwrap.dedent(rest))


def _lm_eval(srv, tmp_path: Path, model: str, task: str, *args: str) -> tuple[subprocess.CompletedProcess, list]:
    """``lm_eval --model MODEL`` against ``srv``, offline, on ``task`` from ``tmp_path/tasks``: (the run, its samples)."""
    out = tmp_path / "out"
    route = "chat/completions" if "chat" in model else "completions"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
                        f"base_url={srv.base_url}/v1/{route},model=smollm2,num_concurrent=1,max_retries=1",
                        "--tasks", task, "--include_path", str(tmp_path / "tasks"), "--log_samples",
                        "--output_path", str(out), *args], capture_output=True, text=True, timeout=600, env=env,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r, [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl") for line in f.open()]


def test_tokenizer_routes_in_lm_eval_and_vllm_shapes(srv, ref):
    info = httpx.get(srv.base_url + "/tokenizer_info").json()
    assert info["eos_token"] == ref.token_text(ref.eos_token) == "<|im_end|>"
    assert info["eos_token_id"] == ref.eos_token and info["model_max_length"] == 512
    assert info["chat_template"] and "im_start" in info["chat_template"]
    text = "Hello <|im_end|> world"
    toks = httpx.post(srv.base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert toks["tokens"] == ref.tokenize(text, add_special=False, parse_special=True)
    assert toks["count"] == len(toks["tokens"])
    back = httpx.post(srv.base_url + "/detokenize", json={"tokens": toks["tokens"]}).json()
    assert back["prompt"] == back["content"]
    r = httpx.post(srv.base_url + "/tokenize", json={"add_special_tokens": False})
    assert r.status_code == 400 and "content (or prompt)" in r.json()["error"]["message"]


def test_echo_logprobs_keep_a_sampled_end_of_text(srv, ref):
    """OpenAI's legacy shape: prompt entries, then the generated token's, even when that is end-of-text."""
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    toks = ref.tokenize(CHAT.format(q=ITEMS[0][0]) + "London", add_special=False, parse_special=True)
    lp = ref.logprobs(toks)
    assert int(np.argmax(lp[-1])) in ref.eos_tokens  # greedy next: <|im_end|>
    r = client.completions.create(model="m", prompt=toks, max_tokens=1, echo=True, logprobs=1, temperature=0)
    ch = r.choices[0]
    n = len(toks)
    assert len(ch.logprobs.token_logprobs) == n + 1 and ch.logprobs.tokens[n] == "<|im_end|>"
    assert ch.finish_reason == "stop" and r.usage.completion_tokens == 1
    assert ch.text.endswith("London")  # the end-of-text has an entry but adds no text
    np.testing.assert_allclose(ch.logprobs.token_logprobs[n], lp[-1].max(), atol=2e-3)
    np.testing.assert_allclose(ch.logprobs.token_logprobs[1:n], [lp[i - 1, toks[i]] for i in range(1, n)],
                               atol=2e-3)
    # without logprobs nothing changes: no tokens, no text
    plain = client.completions.create(model="m", prompt=toks, max_tokens=4, temperature=0)
    assert plain.choices[0].text == "" and plain.usage.completion_tokens == 0
    # streamed, the same entry arrives as the last token chunk
    events = list(client.completions.create(model="m", prompt=toks, max_tokens=1, logprobs=1, temperature=0,
                                            stream=True))
    entries = [t for e in events for c in e.choices if c.logprobs for t in c.logprobs.tokens]
    assert entries == ["<|im_end|>"]


# -- curl habits, access log ----------------------------------------------------------------------------
def test_body_without_json_content_type_is_read_as_json(srv):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}, {}):
        r = httpx.post(srv.base_url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 200, (headers, r.text)
        assert r.json()["usage"]["completion_tokens"] == 3
    bad = httpx.post(srv.base_url + "/v1/completions", content=b"prompt=hi", headers={})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


def test_access_log_one_line_per_request(srv, capsys):
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    capsys.readouterr()
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0)
    list(client.completions.create(model="m", prompt="One two", max_tokens=4, temperature=0, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="x", max_tokens=4, temperature=0, top_p=7)
    httpx.get(srv.base_url + "/health")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " ms" in ln]
    assert len(lines) == 3, lines  # a /health probe is logged at debug only, as llama-server skips it
    u = r.usage
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 127\.0\.0\.1 POST ", lines[0]), lines[0]  # date, client
    assert f"POST /v1/chat/completions 200 {u.prompt_tokens}+{u.completion_tokens} tok " in lines[0]
    assert "POST /v1/completions 200 " in lines[1] and "+4 tok" in lines[1]  # streamed: counted at the end
    assert "POST /v1/completions 400 " in lines[2] and "top_p" in lines[2]  # the reason
    assert not any("/health" in ln for ln in lines)


def test_serve_takes_llama_servers_flag_names():
    import argparse

    from ondevice.serve.cli import add_arguments
    from ondevice.serve.settings import settings_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from_args(p.parse_args(["--ctx-size", "768", "-np", "3", "--port", "8081"]))
    assert (s.ctx, s.parallel, s.port) == (768, 3, 8081)
    assert settings_from_args(p.parse_args(["-c", "512"])).ctx == settings_from_args(p.parse_args(["--ctx", "512"])).ctx


def test_access_log_off_by_flag_and_env(monkeypatch, capsys):
    from ondevice.serve.cli import add_arguments
    from ondevice.serve.settings import settings_from_args

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert settings_from_args(p.parse_args(["--no-access-log"])).access_log is False
    monkeypatch.setenv("ONDEVICE_ACCESS_LOG", "0")
    settings = settings_from_args(p.parse_args([]), model=str(_model_path()), port=0, parallel=1, ctx=256,
                                  threads=2, embeddings=False)
    assert settings.access_log is False
    with BackgroundServer(settings) as s:
        capsys.readouterr()
        assert httpx.get(s.base_url + "/health").status_code == 200
        httpx.post(s.base_url + "/v1/completions", json={"prompt": "x", "top_p": 7})
    assert "/health" not in capsys.readouterr().err
