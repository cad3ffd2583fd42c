"""A base model's plain-text transcript ends the reply at the next turn, on every path that renders messages.

Gemma-3-270M (a base model, no chat template) greedily goes on past its answer with the user's next turn
("\\nUser: What is the capital of France?\\nAssistant: ...") until max tokens; the transcript's renderer gives
the stop strings with the prompt, and the CLI, the library, the eval runner and the server apply them.
"""

from __future__ import annotations

import warnings

import openai
import pytest

from ondevice.engine.records import Sampling

ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
LABELS = ("User:", "Assistant:", "System:", "Tool:")


@pytest.fixture(scope="module")
def gemma_path():
    from ondevice.errors import OndeviceError
    from ondevice.models import resolve

    try:
        return resolve("gemma3-270m").path  # assembled into the default store once
    except OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    import ondevice

    model = ondevice.load(str(gemma_path), n_ctx=512, n_threads=2)
    yield model
    model.close()


def _one_turn(text: str) -> None:
    """``text`` is an answer alone: something, no turn of the transcript after it, no held part of a label."""
    assert text.strip(), repr(text)
    assert not any(label in text for label in LABELS), repr(text)
    assert not any(text.endswith(f"\n{label}"[:k]) for label in LABELS for k in range(2, len(label) + 1)), repr(text)


def test_every_turn_after_the_first_starts_with_a_stop_string():
    from ondevice.engine.chat import plain_prompt

    msgs = [*ASK, {"role": "assistant", "content": "Paris."}, {"role": "tool", "content": "{}"},
            {"role": "user", "content": "And Spain?"}]
    text, stops = plain_prompt(msgs)
    lines = text.split("\n")
    assert lines[-1] == "Assistant:" and len(lines) == len(msgs) + 1
    # whatever turn the model writes next on a line of its own, a stop string cuts it
    assert all(any(f"\n{line}".startswith(s) for s in stops) for line in lines[1:]), (lines, stops)


def test_prompt_stops_join_the_requests_own():
    from ondevice.engine.chat import PLAIN_STOPS, PromptTokens
    from ondevice.engine.stops import with_prompt_stops

    s = Sampling(stop=("x", "\nUser:"))
    merged = with_prompt_stops(s, PromptTokens([1, 2], PLAIN_STOPS))
    assert merged.stop[:2] == ("x", "\nUser:") and set(merged.stop) == {"x", *PLAIN_STOPS}
    assert len(merged.stop) == len(set(merged.stop))
    assert with_prompt_stops(s, [1, 2]) is s  # a raw prompt (or a chat template's) brings none


def test_library_messages_stop_at_the_next_turn(gemma, smol):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = gemma.generate(ASK, temp=0, max_tokens=32)
        _one_turn(r.text)
        assert r.finish_reason == "stop"
        chunks = [g.text for g in gemma.stream(ASK, temp=0, max_tokens=32)]
        assert "".join(chunks) == r.text
        # the eval runner's and the agent's path: the prompt's tokens first, then a generation from them
        toks = gemma.tokenize_prompt(ASK)
        assert "".join(g.text for g in gemma.stream_tokens(toks, Sampling(temp=0, max_tokens=32))) == r.text
    # a raw completion is the caller's own text, and a chat template ends its turn itself: no stops added
    assert getattr(gemma.tokenize_prompt("User: hi", chat_template=False), "stops", ()) == ()
    assert getattr(smol.tokenize_prompt(ASK), "stops", ()) == ()


def test_eval_items_with_messages_stop_at_the_next_turn(gemma):
    from ondevice.eval.runner import generate_one
    from ondevice.eval.suites import Item

    item = Item(id="1", input=ASK, target="Paris", metric="exact_match", category="qa", task="qa", provenance="t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text, timings = generate_one(gemma, item, Sampling(temp=0, max_tokens=32))
    _one_turn(text)
    assert timings["finish_reason"] == "stop"


def test_run_with_a_system_prompt_stops_at_the_next_turn(cli, gemma_path):
    r = cli("run", "-m", str(gemma_path), "-s", "You are terse.", "--temp", "0", "-n", "32", "-t", "2",
            "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    _one_turn(r.stdout)


def test_server_chat_stops_at_the_next_turn(gemma_path):
    from ondevice.serve import BackgroundServer, ServeSettings

    settings = ServeSettings(model=str(gemma_path), port=0, parallel=2, ctx=512, threads=2, embeddings=False)
    with BackgroundServer(settings) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=32, temperature=0)
        text = r.choices[0].message.content
        _one_turn(text)
        assert r.choices[0].finish_reason == "stop"
        deltas, finish = [], None
        for chunk in client.chat.completions.create(model="m", messages=ASK, max_tokens=32, temperature=0,
                                                    stream=True):
            for c in chunk.choices:
                deltas.append(c.delta.content or "")
                finish = c.finish_reason or finish
        # what was sent is the answer alone: no part of "\nUser:" went out before the stop was seen
        assert "".join(deltas) == text and finish == "stop", deltas
        # a user's own stop strings still apply beside the transcript's
        cut = client.chat.completions.create(model="m", messages=ASK, max_tokens=32, temperature=0,
                                             stop=[text.split()[-1]])
        assert cut.choices[0].message.content == text[:text.rindex(text.split()[-1])]
        # Ollama's /api/generate on a model without a chat template continues the prompt ({{ .Prompt }}), as raw
        import httpx

        opts = {"temperature": 0, "num_predict": 12}
        gen = [httpx.post(srv.base_url + "/api/generate", timeout=300, json={
            "model": "gemma3-270m", "prompt": "Once upon a time", "stream": False, "options": opts, **raw}).json()
            for raw in ({}, {"raw": True})]
        assert gen[0]["response"] == gen[1]["response"] and not gen[0]["response"].startswith(LABELS), gen
