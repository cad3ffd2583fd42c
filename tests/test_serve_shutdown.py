"""Stopping `ondevice serve` (a real process under its supervisor, real signals): the requests in flight end
at once and cleanly, the process exits promptly with its usual status, and nothing logs a traceback."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import serve_process

PROMPT = "Count from one to a million, in words."
STOP_BUDGET_S = 4  # exit after a stop signal: a behaviour check (the bug waited 5 s), not a benchmark


def _exit_after(proc, t0: float) -> tuple[int, float]:
    rc = proc.wait(timeout=60)
    return rc, time.monotonic() - t0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)],  # a stop: 0, as llama-server
                         ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_the_requests_in_flight_at_once(tmp_path, sig, code):
    """An open stream ends with an error event the OpenAI client raises (it never passes a cut reply off as
    complete); a plain request in flight gets a 503; the server exits within a moment, no traceback."""
    with serve_process(tmp_path, "-np", "2") as (proc, url, log):
        plain: dict = {}

        def post():
            body = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}
            r = httpx.post(url + "/completions", json=body, timeout=60)
            plain.update(status=r.status_code, error=r.json()["error"])

        poster = threading.Thread(target=post)
        poster.start()
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=4000, extra_body={"ignore_eos": True}, stream=True)
        n, t0 = 0, None
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                n += 1
                if n == 20:  # both are generating: stop the server (its supervisor forwards the signal)
                    proc.send_signal(sig)
                    t0 = time.monotonic()
        poster.join(timeout=60)
        rc, took = _exit_after(proc, t0)
    stderr = log.read_text()
    assert plain == {"status": 503, "error": {"message": "the server is shutting down; retry once it is back",
                                              "type": "server_error", "param": None, "code": "shutting_down"}}
    assert rc == code and took < STOP_BUDGET_S, (rc, took, stderr[-3000:])
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("kill", ["process group", "Ctrl-C twice"])
def test_a_repeated_sigint_exits_130_without_a_traceback(tmp_path, kill):
    """`kill -INT -PGID` reaches the serving child twice (directly, and forwarded by its supervisor); Ctrl-C
    pressed twice the same: either is one request to stop."""
    with serve_process(tmp_path, "-np", "1", group=True) as (proc, url, log):
        assert httpx.get(url + "/models", timeout=30).status_code == 200
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        if kill == "Ctrl-C twice":
            time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
        rc, took = _exit_after(proc, t0)
    stderr = log.read_text()
    # nothing in flight here, so no wait to guard against; only a hang (freeing the engine took up to 2.3 s
    # with three busy loops on the two cores: teardown, not a wait)
    assert rc == 130 and took < 3 * STOP_BUDGET_S, (rc, took, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_timeout_logs_one_line_not_a_traceback(tmp_path):
    """A 504 (--timeout) is an expected, classified error: its access log line, nothing more."""
    with serve_process(tmp_path, "-np", "1", "--timeout", "0.5") as (proc, url, log):
        r = httpx.post(url + "/completions", json={"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    stderr = log.read_text()
    assert "Traceback" not in stderr and " failed" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if " 504 " in x]
    assert len(lines) == 1 and "POST /v1/completions 504" in lines[0], stderr[-3000:]
