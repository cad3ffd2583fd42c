"""The `ondevice run` / `chat` commands as a user runs them (real subprocesses, real model)."""

from __future__ import annotations

import json
import os
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
    r = cli("run", "--threads", "-2", "hello")
    assert r.returncode == 2 and "--threads -2 must be >= 1 (0 or -1: the default" in r.stderr
    for default in ("0", "-1"):  # as in llama.cpp (-1) and load(n_threads=0)
        r = cli("run", "--threads", default, "-n", "2", "--timings", "json", "hello")
        assert r.returncode == 0 and json.loads(r.stderr.strip().splitlines()[-1])["generation_tokens"] == 2, r.stderr


def test_prompt_over_context_names_both_numbers(cli):
    # llama.cpp pads the KV to 256 cells; the context asked for is still the limit (a 41-token prompt ran before)
    r = cli("run", "--ctx", "32", "--raw", "hello " * 40)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    m = re.search(r"has (\d+) tokens but the context window holds (\d+)", r.stderr)
    assert m and int(m.group(1)) > 32 and int(m.group(2)) == 32


def test_generation_stops_where_the_asked_context_ends(cli):
    r = cli("run", "--ctx", "48", "--raw", "--temp", "0", "-n", "100", "--ignore-eos", "--timings", "json",
            "hello " * 30)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stderr.strip().splitlines()[-1])
    # the last token generated is never fed back, so it needs no cell: 48 cells hold prompt + all but it
    assert rec["prompt_tokens"] + rec["generation_tokens"] == 49 and rec["finish_reason"] == "length"
    assert "stopped at the end of the 48-token context window; raise -c/--ctx" in r.stderr


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


# ---------------------------------------------------------------- habits (Ollama's, typos, help)
def test_run_takes_a_leading_model_name(cli):
    a = cli("run", "--temp", "0", "-n", "8", "-t", "2", "smollm2", "Name a colour.")
    b = cli("run", "--temp", "0", "-n", "8", "-t", "2", "-m", "smollm2-135m-instruct", "Name a colour.")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()  # the name chose the model; the rest was the prompt


def test_run_one_word_like_a_model_name_says_how_it_was_read(cli):
    r = cli("run", "--temp", "0", "-n", "2", "-t", "2", "smolm2")
    assert r.returncode == 0, r.stderr
    assert "'smolm2' is taken as the prompt" in r.stderr and "ondevice run smollm2-135m-instruct PROMPT" in r.stderr


def test_run_refuses_an_unknown_model_before_the_prompt(cli):
    # as `ollama run MODEL PROMPT`: the unknown word is not sent to the default model as part of the text
    r = cli("run", "nosuchmodel", "Hi")
    assert r.returncode == 2 and "unknown model 'nosuchmodel'" in r.stderr, r.stderr
    assert 'quote them: ondevice run "nosuchmodel Hi"' in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "smolm2", "Hi")
    assert r.returncode == 2 and "did you mean 'smollm2-135m-instruct'?" in r.stderr, r.stderr
    r = cli("run", "./no/such.gguf", "Hi")
    assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_takes_options_between_the_model_and_the_prompt(cli):
    # `ollama run MODEL PROMPT` with flags anywhere; argparse alone ends the words at the first option
    r = cli("run", "smollm2-135m-instruct", "--temp", "0", "-n", "4", "Say hi", "--timings", "json")
    assert r.returncode == 0 and json.loads(r.stderr.strip().splitlines()[-1])["generation_tokens"] == 4, r.stderr
    r = cli("run", "smollm2-135m-instruct", "-n", "4", "--bogus", "Hi")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr, r.stderr
    assert "usage: ondevice run" in r.stderr  # the verb's usage, not the top level's
    # a short usage line above the error: every flag in it came to 38 lines before the one that says what is wrong
    assert r.stderr.splitlines()[0] == "usage: ondevice run [options] [[MODEL] PROMPT ...]", r.stderr
    assert len(r.stderr.splitlines()) == 2, r.stderr


def test_typos_get_did_you_mean(cli):
    r = cli("run", "-m", "smolm2", "hello")
    assert r.returncode == 2 and "did you mean 'smollm2-135m-instruct'?" in r.stderr, r.stderr
    r = cli("bnech", "-r", "1")
    assert r.returncode == 2 and "unknown verb 'bnech'; did you mean 'bench'?" in r.stderr, r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2 and "did you mean" not in r.stderr and "verbs: run, chat" in r.stderr


def test_top_level_help_has_examples_and_bench_o_has_help():
    import contextlib
    import io

    import pytest

    from ondevice.cli import main

    for argv, want in ((["--help"], "examples:\n  ondevice run"), (["bench", "--help"], "format of the records")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(argv)
        assert want in out.getvalue(), argv


def test_models_fits_the_terminal(cli):
    r = cli("models", env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("\n\nstore:")[0].splitlines()
    assert len(table) >= 2 and max(len(line) for line in table) <= 100, table
    assert "smollm2-135m-instruct" in r.stdout and ".gguf" in r.stdout  # a cut path keeps its file name


def test_chat_commands_and_multiline_input(cli):
    script = ('/set temperature 0\n/set parameter top_k 5\n/set temp warm\n/set colour blue\n/show\n/frob\n'
              '"""Say the word\nblue, nothing else."""\n/bye\n')
    r = cli("chat", "-n", "8", "-t", "2", "--timings", input=script)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "temp = 0.0" in err and "top_k = 5" in err
    assert "/set temp needs a number" in err and "cannot set 'colour'" in err
    assert "parameters: temp 0.0, top_p" in err and "top_k 5" in err
    assert "unknown command '/frob'; /help lists the commands" in err
    assert err.count("TTFT") == 1  # the two lines between \"\"\" marks were one message, one answer
    assert "/set" not in r.stdout  # no command reached the model


def test_chat_on_a_base_model_warns_once_without_a_source_line(cli):
    import pytest

    from ondevice.errors import OndeviceError
    from ondevice.models import resolve

    try:
        path = resolve("gemma3-270m").path  # assembled into the default store once
    except OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")  # the [models] extra is installed by `make test`
    r = cli("chat", "-m", str(path), "-n", "4", "-t", "2", "--temp", "0", input="Hello\nAgain\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no chat template") == 1 and "warnings.warn" not in r.stderr, r.stderr
    assert ".py:" not in r.stderr


def test_chat_keys_typed_during_an_answer_are_not_echoed(tmp_path):
    """A real terminal (pty): keys pressed while the answer streams appear neither in it nor as input."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "chat", "--temp", "0", "-n", "200", "-t", "2"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""

    def read_until(marker: bytes, start: int = 0, timeout: float = 120, at_least: int = 0) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while marker not in out[start:] or len(out) < at_least:
            assert time.monotonic() < end, out.decode(errors="replace")[-2000:]
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)

    try:
        read_until(b">>> ")
        os.write(master, b"Count from one to one hundred in words, one per line.\n")
        read_until(b"per line.\r\n")  # the terminal's echo of the typed line
        mark = out.index(b"per line.\r\n") + 11
        read_until(b"", at_least=mark + 12)  # the answer is streaming
        os.write(master, b"zqxj")  # typed mid-answer
        read_until(b">>> ", mark, timeout=240)  # the answer ended and the next prompt is up
        answer = out[mark:]
        os.write(master, b"/bye\n")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"zqxj" not in answer, answer.decode(errors="replace")


def test_stdin_that_is_endless_or_not_text_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    with open("/dev/zero", "rb") as zero:  # a pipe that never ends: read up to the limit, then refuse
        r = subprocess.run([sys.executable, "-m", "ondevice.cli", "run", "-n", "2"], stdin=zero, check=False,
                           capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "stdin holds more than 16 MiB" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ondevice.cli", "run", "-n", "2"], input=b"\xd1\xff\xfe", check=False,
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 2 and b"stdin is not UTF-8 text" in r.stderr


def test_a_flag_from_another_tool_says_which_one_is_meant(cli):
    r = cli("run", "--temprature", "0", "hi")
    assert r.returncode == 2 and "unrecognized arguments: --temprature; did you mean --temperature?" in r.stderr
    r = cli("run", "--max-new-tokens", "3", "hi")  # transformers' name (llama-cli's --n-predict is taken as -n)
    assert r.returncode == 2 and "did you mean --max-tokens?" in r.stderr
    # run's flags given to chat: said so (the hint was a flag chat hides and ignores, --draft-min for --draft, or
    # an unrelated one, --prompt for --prompt-cache)
    for flag in ("--draft", "--prompt-cache"):
        r = cli("chat", flag, "x", input="")
        assert r.returncode == 2 and f"{flag} is a flag of `ondevice run`, not of `ondevice chat`" in r.stderr, r.stderr
    r = cli("bench", "--json")  # llama-bench's -o json, and a format of our -o
    assert r.returncode == 2 and "unrecognized arguments: --json; did you mean -o json?" in r.stderr
    # a verb's action (cascade fit) is the parser that knows the flags: its usage, its hint (serve's name, and
    # --cascade-key-env, are taken there too)
    r = cli("cascade", "fit", "--cascade", "http://127.0.0.1:9/v1", "--key-env", "K")
    assert r.returncode == 2, r.stderr
    assert "ondevice cascade fit: error: unrecognized arguments: --key-env K; did you mean --cloud-key-env?" \
        in r.stderr, r.stderr
    r = cli("protect", "keygen", "-o", "k.key", "--bogus")  # an action's one-letter flag is its own, not unknown
    assert r.returncode == 2 and "ondevice protect keygen: error: unrecognized arguments: --bogus" in r.stderr
