"""A cancelled request stops the ``llama_decode`` computing for it (engine/abort.py): a client that leaves
during a long prompt's prefill frees its slot and the cores at once, not when that decode ends, and requests
sharing the decode go on with the same output. The real engine throughout; the last test, a real server."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
from conftest import serve_process

from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Generation, Request, Sampling
from ondevice.models import resolve

GREEDY = Sampling(temp=0.0, max_tokens=24)
LONG = "The history of the city is long and full of events that shaped its streets, markets and people. " * 80


class Cancellable(Request):
    """A request as the server's Job cancels one: a flag, then the generator told (serve/batcher.py)."""

    cancelled = False


def _engine(**kw) -> LlamaEngine:
    # f32 KV: a sequence's results do not depend on where its cells are, so outputs compare exactly
    return LlamaEngine(resolve(None).path, EngineConfig(n_ctx=4096, n_threads=1, type_k="f32", type_v="f32", **kw))


def _cancel_once_running(gen: BatchGenerator, req: Request, after: float = 0.3) -> threading.Thread:
    """Cancel ``req`` from another thread (as the event loop does) ``after`` s into the next decode."""
    def run():
        while gen.guard.inflight is None:
            time.sleep(0.01)
        time.sleep(after)
        req.cancelled = True
        gen.cancel(req)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _tokens(gen: BatchGenerator, req: Request) -> list[int]:
    out = []
    while any(s.req is req for s in gen.slots):
        out += [ev.token for r, ev in gen.step() if r is req and isinstance(ev, Generation) and ev.token >= 0]
    return out


def test_cancelled_prefill_stops_its_decode():
    eng = _engine(n_seq_max=1)
    try:
        gen = BatchGenerator(eng)
        toks = eng.tokenize(LONG)
        assert len(toks) > 1500 and eng.n_batch >= len(toks)  # the whole prompt is one llama_decode
        req = Cancellable(tokens=toks, sampling=GREEDY)
        gen.insert(req)
        t = _cancel_once_running(gen, req)
        assert gen.step() == []  # no token: the decode stopped
        t.join()
        slot = gen.slots[0]
        # stopped partway (llama.cpp keeps whole micro-batches done before), and the slot knows what the KV holds
        assert len(slot.cached) < len(toks) and slot.prompt_i == len(slot.cached) == eng.n_past(0)
        gen.remove(req)
        # the slot serves again; a later decode is never stopped by the old flag
        assert _tokens(gen, _insert(gen, Request(tokens=toks[:40], sampling=GREEDY)))
        assert not eng.abort_flag.is_set
    finally:
        eng.close()


def test_live_request_in_an_aborted_decode_keeps_its_output():
    """A live prompt shares a decode with a long cancelled one; the decode is aborted (the cancelled one holds
    most of it), the live slot resumes from what the KV kept, and its greedy tokens are those it gives alone.
    Small micro-batches, so some of them finish before the abort and their KV is kept and reused."""
    eng = _engine(n_seq_max=2, n_ubatch=64)
    try:
        live_toks = eng.tokenize("Write a short poem about the sea and the wind over the harbour at night.") * 4
        alone = BatchGenerator(eng)
        expected = _tokens(alone, _insert(alone, Request(tokens=live_toks, sampling=GREEDY)))
        eng.reset()
        gen = BatchGenerator(eng)
        dead = Cancellable(tokens=eng.tokenize(LONG), sampling=GREEDY)
        gen.insert(dead)
        live = Request(tokens=live_toks, sampling=GREEDY)
        gen.insert(live)
        t = _cancel_once_running(gen, dead, after=1.0)
        assert gen.step() == []
        t.join()
        gen.remove(dead)
        assert _tokens(gen, live) == expected
    finally:
        eng.close()


def _insert(gen, req):
    gen.insert(req)
    return req


def test_client_leaving_mid_prefill_frees_the_slot_and_cores(tmp_path):
    """A 1-slot server: a streaming client sends a long prompt and leaves during its prefill (one decode of
    seconds). The slot is free with the prompt cut short (before the abort it was freed only once the whole
    prompt's KV was computed), and the next request is served."""
    with serve_process(tmp_path, "--parallel", "1", "--threads", "1", "--no-access-log") as (_, base, _log):
        url = base.removesuffix("/v1").removesuffix("/")
        host, port = url.split("//")[1].rsplit(":", 1)
        body = json.dumps({"prompt": LONG, "max_tokens": 8, "stream": True, "temperature": 0}).encode()
        c = socket.create_connection((host, int(port)))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while not httpx.get(url + "/slots").json()[0]["is_processing"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # inside the prefill: 1600 tokens at 1 thread take seconds
        c.close()
        while (slot := httpx.get(url + "/slots").json()[0])["is_processing"]:
            time.sleep(0.02)
        assert slot["n_prompt_tokens"] > 1500 and slot["n_cached"] < slot["n_prompt_tokens"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
