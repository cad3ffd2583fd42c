"""`ondevice serve` under load and over its lifetime, as an operator (proxy, load balancer, Prometheus, systemd)
sees it: a real server under its supervisor on loopback, the embedded model, real clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import as_a_shell_starts_it, serve_process

CHAT = "/v1/chat/completions"
LONG = 3000  # tokens a holder may make (ignore_eos): it keeps the one slot busy until closed


def _body(max_tokens: int, stream: bool = False, content: str = "Tell a story") -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}


def _until(what, check, limit_s: float = 60.0):
    """Wait for ``check()`` to hold (the server acts on a closed connection or a step's end a moment later)."""
    deadline = time.monotonic() + limit_s
    while not (got := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return got


def _metric(base: str, line_start: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start + " ")), 0.0)


def _health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=30).json()


def _content(line: str) -> str | None:
    if not line.startswith("data: {"):
        return None
    choices = json.loads(line[6:]).get("choices") or [{}]
    return choices[0].get("delta", {}).get("content")


@contextlib.contextmanager
def _holding(base: str, tokens: int = LONG):
    """A stream that keeps the one slot busy, generating, until the block ends (then the slot is idle again)."""
    with httpx.Client(timeout=120) as c, c.stream("POST", base + CHAT, json=_body(tokens, stream=True)) as r:
        lines = r.iter_lines()
        assert r.status_code == 200
        next(x for x in lines if _content(x))  # a token: it holds the slot
        yield lines
    _until("the slot idle again", lambda: _health(base)["slots_processing"] == 0 == _health(base)["queue_depth"])


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """One slot, one queue place, pings after 1 s of silence: (base URL, the server's stderr file)."""
    with serve_process(tmp_path_factory.mktemp("busy"), "-np", "1", "--max-queue", "1",
                       "--sse-ping-interval", "1") as (_, url, log):
        yield url.removesuffix("/v1"), log


def test_a_client_that_leaves_the_queue_frees_its_place(busy):
    """A queued request whose client gave up leaves the queue at once: the next client is queued (not a 429
    "queue is full" with nobody waiting), queue_depth counts live requests, and its cancellation is counted."""
    base, _ = busy
    cancelled = _metric(base, "ondevice_requests_cancelled_total")
    with _holding(base):
        with pytest.raises(httpx.ReadTimeout):  # queued behind the holder; the client gives up after 1 s
            httpx.post(base + CHAT, json=_body(8), timeout=httpx.Timeout(60, read=1.0))
        _until("the queue empty once its only client left", lambda: _health(base)["queue_depth"] == 0)
        with httpx.stream("POST", base + CHAT, json=_body(8, stream=True), timeout=60) as r:
            assert r.status_code == 200, r.read()  # queued: its place is free
            assert _health(base)["queue_depth"] == 1
        _until("the queue empty again", lambda: _health(base)["queue_depth"] == 0)
        assert _metric(base, "ondevice_requests_cancelled_total") == cancelled + 2  # both queued ones


def test_a_stream_the_client_leaves_is_logged_and_counted_as_499(busy):
    """nginx's 499 "client went away", with the tokens sent so far, as an abandoned non-stream is: not a 200."""
    base, log = busy
    ok = _metric(base, 'ondevice_requests_total{route="/v1/chat/completions",code="200"}')
    gone = _metric(base, 'ondevice_requests_total{route="/v1/chat/completions",code="499"}')
    n_lines = len(log.read_text().splitlines())
    with _holding(base) as lines:
        next(x for x in lines if _content(x))
    new = log.read_text().splitlines()[n_lines:]
    chat = [x for x in new if f" POST {CHAT} " in x]
    assert len(chat) == 1 and f"POST {CHAT} 499 " in chat[0] and chat[0].endswith("client went away"), new
    assert " tok " in chat[0], chat[0]  # the tokens it had been sent
    assert _metric(base, 'ondevice_requests_total{route="/v1/chat/completions",code="200"}') == ok
    assert _metric(base, 'ondevice_requests_total{route="/v1/chat/completions",code="499"}') == gone + 1


def test_a_stream_waiting_for_a_slot_sends_sse_pings(busy):
    """--sse-ping-interval (llama-server's): a stream silent that long (queued here) gets an SSE comment, so a
    proxy's idle timeout does not cut it; the openai client skips it."""
    base, _ = busy
    with _holding(base), httpx.stream("POST", base + CHAT, json=_body(8, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        assert _content(next(lines)) == ""  # the role chunk, at once
        first = next(x for x in lines if x)
    assert first == ": ping"


@pytest.mark.parametrize("route, body, ping", [
    ("/v1/messages", {"model": "m", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
     "event: ping"),
    ("/v1/responses", {"model": "m", "max_output_tokens": 8, "stream": True, "input": "Hi"}, ": ping"),
    ("/completion", {"prompt": "Hi", "n_predict": 8, "stream": True}, ": ping"),
])
def test_every_sse_stream_pings_while_it_waits(busy, route, body, ping):
    """The pings reached only the chat and completions streams: Anthropic's Messages stream (its own `ping`
    event, which the anthropic SDK skips), the Responses stream and llama-server's native /completion stream
    (which took `sse_ping_interval` without effect) were silent for the whole wait."""
    base, _ = busy
    with _holding(base), httpx.stream("POST", base + route, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        seen = []
        for line in r.iter_lines():
            seen.append(line)
            if line == ping:
                break
            assert not line.startswith("data: {\"content\""), seen  # a token came first: it was not queued
    assert seen[-1] == ping, seen


def test_a_requests_own_sse_ping_interval_wins(busy):
    """llama-server's per-request `sse_ping_interval`: 0 turns pings off for this stream (the schema dropped it)."""
    base, _ = busy
    seen = []
    with _holding(base), httpx.stream("POST", base + CHAT, json={**_body(8, stream=True), "sse_ping_interval": 0},
                                      timeout=httpx.Timeout(60, read=4.0)) as r:
        with pytest.raises(httpx.ReadTimeout):  # queued 4 s, silent after its role chunk (pings would come each 1 s)
            for line in r.iter_lines():
                seen += [line] if line else []
    assert len(seen) == 1 and _content(seen[0]) == "", seen


def test_probes_answer_head_and_stay_out_of_the_access_log(busy):
    """HEAD /health and /metrics are 200 (HAProxy's httpchk, uptime monitors), and the probes' and scrapes'
    lines are left out of the access log at its default level, as llama-server leaves them out."""
    base, log = busy
    for path in ("/health", "/metrics", "/health"):
        r = httpx.head(base + path, timeout=30)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    text = log.read_text()
    assert " /health " not in text and " /metrics " not in text, text[-2000:]


def test_a_request_that_times_out_waiting_is_a_retryable_503_and_a_long_one_a_504(tmp_path):
    """Waiting for a slot past --timeout is overload: 503 with Retry-After (the openai client retries it), not
    the 504 "ask for fewer tokens" of a generation that took too long, which the holder gets, as an error
    event that the access log and the metrics count as that 504, not as a 200.

    The holder's slot frees at its deadline, a moment before the deadline of the request queued behind it: too
    little time to compute that request's long prompt at the prefill rate the server measured (on the holder's
    prompt), so it is answered the 503 at once and never started, rather than given the slot to run out of time
    in a prefill and get a 504 after the compute is spent. Whatever the machine's speed, the wait is to blame:
    it took most of the request's time. ``-t 1``: a steadier prefill on a loaded machine."""
    with serve_process(tmp_path, "-np", "1", "-t", "1", "--timeout", "6") as (_, url, log):
        base = url.removesuffix("/v1")
        holder = _body(LONG, stream=True, content="Tell a story about " + "a cat " * 25)  # >= 64 tokens
        with httpx.Client(timeout=120) as c, c.stream("POST", base + CHAT, json=holder) as held:
            lines = held.iter_lines()
            assert held.status_code == 200
            next(x for x in lines if _content(x))  # its prompt is in: a prefill rate measured
            r = httpx.post(base + CHAT, json=_body(8, content="other " * 3500), timeout=60)
            events = [x for x in lines if x.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "timeout"
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_timeout" and "busy" in err["message"], err
        assert "-token prompt" in err["message"] and "not started" in err["message"], err  # the prefill rule's
        assert int(r.headers["retry-after"]) >= 1 and "x-should-retry" not in r.headers
        _until("both timeouts counted", lambda: _metric(base, "ondevice_requests_cancelled_total") == 2)
        assert _metric(base, f'ondevice_requests_total{{route="{CHAT}",code="504"}}') == 1
        assert _metric(base, f'ondevice_requests_total{{route="{CHAT}",code="503"}}') == 1
        assert _metric(base, "ondevice_prompt_tokens_total") < 3500  # the long prompt was never started
        assert _metric(base, "ondevice_prefill_tokens_per_second") > 0  # the rate the rule read, shown
        text = log.read_text()
        assert f"POST {CHAT} 504 " in text and f"POST {CHAT} 503 " in text and f"POST {CHAT} 200 " not in text
        # the same prompt at an idle server: no wait to blame, so it is started, even where it cannot finish in
        # time (a 504 that says to raise --timeout), never a 503 "busy" that the openai client retries at once
        r = httpx.post(base + CHAT, json=_body(1, content="other " * 3500), timeout=60)
        assert r.status_code in (200, 504) and _metric(base, "ondevice_prompt_tokens_total") > 3500, r.text


def test_retry_after_on_a_full_queue_covers_the_running_generation(tmp_path):
    """The 429's Retry-After is estimated from what the busy slot still has to generate, not a 1 s guess that
    makes clients retry and fail long before a slot frees."""
    with serve_process(tmp_path, "-np", "1", "--max-queue", "0") as (_, url, _log):
        base = url.removesuffix("/v1")
        with _holding(base, tokens=3500) as lines:
            for _ in range(8):  # a few steps measured
                next(x for x in lines if _content(x))
            r = httpx.post(base + CHAT, json=_body(8), timeout=60)
        assert r.status_code == 429, r.text
        # thousands of tokens left: many seconds at any speed this model decodes on a CPU
        assert 5 <= int(r.headers["retry-after"]) <= 3600, r.headers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loading_is_a_503_at_once_and_sigterm_exits_0(tmp_path):
    """While the model loads, every request is answered at once with llama-server's 503 "Loading model" (a
    probe can tell loading from hung); a SIGTERM (systemctl stop) then stops it with status 0, as llama-server."""
    port = _free_port()
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    log_path = tmp_path / "serve.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "serve", "--port", str(port),
                                 "--no-embeddings"], stderr=log, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509 — no thread yet
        try:
            base, seen = f"http://127.0.0.1:{port}", []
            with httpx.Client(timeout=httpx.Timeout(60, connect=1)) as c:
                while "on http://" not in log_path.read_text():
                    assert proc.poll() is None, log_path.read_text()
                    try:
                        r = c.get(base + "/health") if len(seen) % 2 == 0 else c.post(base + CHAT, json=_body(4))
                    except httpx.ConnectError:  # not listening yet
                        time.sleep(0.01)
                        continue
                    seen.append((r.status_code, r.text, "ready" if "on http://" in log_path.read_text() else ""))
                loading = [s for s in seen if not s[2]]
                assert loading and all(s[0] == 503 for s in loading), seen[:5]
                assert json.loads(loading[0][1]) == {"error": {"message": "Loading model", "type": "unavailable_error",
                                                               "code": 503}}
                assert c.get(base + "/health").json()["status"] == "ok"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in log_path.read_text()


def test_an_ollama_route_refused_for_a_full_queue_is_logged_and_counted_as_the_503_it_answers(busy):
    """Ollama's clients get its 503 for a full queue: the access log and /metrics say 503 too, not the 429 the
    OpenAI routes answer (a 5xx-rate alert must see what the proxy saw)."""
    base, log = busy
    with _holding(base), httpx.stream("POST", base + CHAT, json=_body(8, stream=True), timeout=60) as queued:
        assert queued.status_code == 200 and _health(base)["queue_depth"] == 1
        r = httpx.post(base + "/api/generate", json={"model": "smollm2-135m-instruct", "prompt": "hi", "stream": False}, timeout=60)
    assert r.status_code == 503 and "queue is full" in r.json()["error"], r.text
    assert _metric(base, 'ondevice_requests_total{route="/api/generate",code="503"}') == 1
    assert _metric(base, 'ondevice_requests_total{route="/api/generate",code="429"}') == 0
    assert "POST /api/generate 503 " in log.read_text()


def test_metrics_carry_llama_servers_names_too(busy):
    """llama-server's metric names (its --metrics), from the same counts: its dashboards and alerts work."""
    base, _ = busy
    with _holding(base):
        busy_now = _metric(base, "llamacpp:requests_processing")
    assert busy_now == 1
    text = httpx.get(base + "/metrics", timeout=30).text
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text
    for ours, theirs in (("ondevice_prompt_tokens_total", "llamacpp:prompt_tokens_total"),
                         ("ondevice_generation_tokens_total", "llamacpp:tokens_predicted_total"),
                         ("ondevice_decode_steps_total", "llamacpp:n_decode_total"),
                         ("ondevice_queue_depth", "llamacpp:requests_deferred")):
        assert _metric(base, ours) == _metric(base, theirs), (ours, theirs)
    assert _metric(base, "llamacpp:prompt_tokens_total") > 0
    assert _metric(base, "llamacpp:prompt_seconds_total") > 0 and _metric(base, "llamacpp:tokens_predicted_seconds_total") > 0
    assert _metric(base, "llamacpp:requests_processing") == 0


def test_slots_answers_while_a_long_prompt_prefills(tmp_path):
    """GET /slots reads the slots as they are: it does not wait for the batcher's step to end (a long prompt's
    prefill is one step of seconds on a CPU, and a monitor polling /slots would time out when busiest)."""
    with serve_process(tmp_path, "-np", "1") as (_, url, _log):
        base = url.removesuffix("/v1")
        with httpx.stream("POST", base + CHAT, json=_body(4, stream=True, content="word " * 1900), timeout=120):
            def processing():
                slot = httpx.get(base + "/slots", timeout=120).json()[0]
                return slot if slot["is_processing"] else None

            slot = _until("the slot busy", processing)
        assert slot["n_prompt_tokens"] > 1900 and slot["next_token"][0]["n_decoded"] == 0, slot  # still prefilling
