"""`ollama run`'s own flags given to `ondevice run` and `chat` (real CLI subprocesses, the real embedded model)."""

from __future__ import annotations

FAST = ("--temp", "0", "-n", "2", "-t", "2")


def test_verbose_is_the_timings_in_run_and_chat_not_a_prefix_of_verbose_prompt(cli):
    r = cli("run", *FAST, "--verbose", "Hi")
    assert r.returncode == 0 and "TTFT" in r.stderr, r.stderr
    assert "number of tokens in prompt" not in r.stderr, r.stderr  # not llama-cli's --verbose-prompt
    r = cli("chat", *FAST, "--verbose", "-st", "-p", "Hi")
    assert r.returncode == 0 and "TTFT" in r.stderr, r.stderr


def test_flags_are_exact_not_prefixes(cli):
    r = cli("run", *FAST, "--verb", "Hi")
    assert r.returncode == 2 and "unrecognized arguments: --verb" in r.stderr, r.stderr


def test_format_json_is_a_json_object_as_ollamas(cli):
    r = cli("run", "--temp", "0", "-n", "6", "-t", "2", "--format", "json", "A cat as JSON")
    assert r.returncode == 0 and r.stdout.lstrip().startswith("{"), (r.stdout, r.stderr)
    r = cli("run", "--format", "yaml", "Hi")
    assert r.returncode == 2 and "invalid choice: 'yaml' (choose from 'json')" in r.stderr, r.stderr
    r = cli("chat", "--format", "json", "-n", "1", "-t", "2", input="/show parameters\n")
    assert r.returncode == 0 and ", format json" in r.stderr, r.stderr  # the same as /set format json


def test_llama_clis_predict_is_n(cli):
    # llama-cli's -n, --predict and --n-predict are one flag
    a = cli("run", "--temp", "0", "-t", "2", "--timings", "none", "--predict", "3", "Hi")
    b = cli("run", "--temp", "0", "-t", "2", "--timings", "none", "-n", "3", "Hi")
    assert a.returncode == 0 and a.stdout == b.stdout, a.stderr
