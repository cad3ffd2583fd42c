"""The `ondevice run` / `chat` commands as a user runs them (real subprocesses, real model)."""

from __future__ import annotations

import json
import re


def test_run_streams_text_and_prints_timings(cli):
    r = cli("run", "--temp", "0", "-n", "12", "-t", "2", "What is 2+2?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for word in ("prompt", "TTFT", "tok/s", "peak RSS"):
        assert word in r.stderr


def test_run_reads_stdin_and_is_deterministic_when_greedy(cli):
    a = cli("run", "--temp", "0", "-n", "16", "-t", "2", "--timings", "json", input="Name a large animal.")
    b = cli("run", "--temp", "0", "-n", "16", "-t", "2", "--timings", "json", "-", input="Name a large animal.")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    rec = json.loads(a.stderr.strip().splitlines()[-1])
    assert rec["prompt_tokens"] > 5 and rec["generation_tokens"] >= 1 and rec["peak_rss_bytes"] > 50e6


def test_ignore_eos_generates_exactly_n(cli):
    r = cli("run", "--raw", "--temp", "0", "-n", "40", "--ignore-eos", "-t", "2", "--timings", "json", "Hi.")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["generation_tokens"] == 40


def test_unknown_model_lists_known_names(cli):
    r = cli("run", "-m", "no-such-model", "hello")
    assert r.returncode == 2
    assert "no-such-model" in r.stderr and "smollm2-135m-instruct" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_flag_value_names_the_flag(cli):
    r = cli("run", "--top-p", "1.5", "hello")
    assert r.returncode == 2 and "--top-p" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "--threads", "0", "hello")
    assert r.returncode == 2 and "--threads" in r.stderr


def test_prompt_over_context_names_both_numbers(cli):
    # llama.cpp rounds the context up (to 256 here), so the message must name the real size
    r = cli("run", "--ctx", "64", "--raw", "hello " * 400)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    m = re.search(r"has (\d+) tokens but the context window holds (\d+)", r.stderr)
    assert m and int(m.group(1)) > 400 > int(m.group(2)) >= 64


def test_chat_multi_turn_with_reset_and_bye(cli):
    script = "My name is Zed.\n/reset\nHello again.\n/bye\nthis line is never read\n"
    r = cli("chat", "--temp", "0", "-n", "16", "-t", "2", "--timings", input=script)
    assert r.returncode == 0, r.stderr
    assert "(conversation cleared)" in r.stderr
    assert r.stderr.count("TTFT") == 2  # two answers, then /bye


def test_every_verb_has_working_help():
    import contextlib
    import io

    import pytest

    from ondevice.cli import VERBS, main

    for verb in VERBS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0 and "usage: ondevice " + verb in out.getvalue(), verb
