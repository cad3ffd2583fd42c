"""`ondevice run` and `chat` walked as a user of `ollama run` and llama.cpp's `llama-cli` would (real CLI
subprocesses, the real embedded model, a real pty where the terminal matters)."""

from __future__ import annotations

import json
import re


def _last_record(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------- a chat longer than the context window
def test_chat_keeps_answering_when_the_conversation_outgrows_the_window(cli):
    # ollama and llama-cli forget the oldest turns and go on; every message here gets an answer, said once
    # a script (it ends with /bye): a message a line, as typed; plain piped text would be one message
    script = "Tell me about cats.\nTell me about dogs.\nTell me about birds.\nTell me about fish.\n/bye\n"
    r = cli("chat", "-c", "160", "-n", "60", "--temp", "0", "-t", "2", "--timings", input=script)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TTFT") == 4, r.stderr  # four messages, four answers
    assert "error" not in r.stderr, r.stderr
    assert r.stderr.count("outgrew the 160-token context window") == 1, r.stderr
    assert "/reset starts over, -c/--ctx holds more" in r.stderr


def test_make_room_forgets_the_oldest_exchanges_and_keeps_the_system_prompt(smol):
    from ondevice.engine.cli_chat import Session
    from ondevice.engine.records import Sampling

    s = Session(Sampling(max_tokens=100), "You are terse.", False)
    s.reset()
    for i in range(40):
        s.history += [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 3}]
    s.history.append({"role": "user", "content": "And the last one?"})
    assert len(smol.tokenize_prompt(s.history)) + 100 > smol.engine.n_ctx  # 1024: it does not fit
    before = list(s.history)
    assert s.make_room(smol) > 0
    assert s.history[0] == before[0] and s.history[-1] == before[-1]  # the system prompt and the new message
    assert s.history[1:] == before[len(before) - len(s.history) + 1:]  # the newest exchanges, in order
    assert [m["role"] for m in s.history[1:3]] == ["user", "assistant"]
    assert len(smol.tokenize_prompt(s.history)) + 100 <= smol.engine.n_ctx
    kept = list(s.history)
    assert s.make_room(smol) == 0 and s.history == kept  # it fits: nothing more is forgotten


# ---------------------------------------------------------------- llama-cli's flags: a system prompt, stop strings
def test_run_takes_a_system_prompt_as_chat_does(cli):
    plain = cli("run", "--temp", "0", "-n", "1", "-t", "2", "--timings", "json", "Hi")
    system = cli("run", "--temp", "0", "-n", "1", "-t", "2", "--timings", "json", "-s", "You answer in French.", "Hi")
    assert plain.returncode == 0 and system.returncode == 0, plain.stderr + system.stderr
    assert _last_record(system.stderr)["prompt_tokens"] != _last_record(plain.stderr)["prompt_tokens"]
    r = cli("run", "--raw", "--system", "Be brief.", "Hi")
    assert r.returncode == 2 and "--system goes through the chat template, which --raw turns off" in r.stderr


def test_run_takes_llama_clis_prompt_and_length_flags(cli, tmp_path):
    """llama-cli's -p PROMPT, -f FILE, --ctx-size and --n-predict: the same generation as the words and -c/-n;
    a prompt given twice, or a file that cannot be read, is an error that names the fix."""
    base = ("--raw", "--temp", "0", "--ignore-eos", "-t", "2", "--timings", "json")
    words = cli("run", *base, "-n", "3", "-c", "64", "1, 2, 3,")
    (tmp_path / "p.txt").write_text("1, 2, 3,")
    for given in (("-p", "1, 2, 3,"), ("-f", str(tmp_path / "p.txt")), ("smollm2-135m-instruct", "-p", "1, 2, 3,")):
        r = cli("run", *base, "--n-predict", "3", "--ctx-size", "64", *given)
        assert r.returncode == 0 and r.stdout == words.stdout, r.stderr
        assert _last_record(r.stderr)["generation_tokens"] == 3
    r = cli("run", "hello", "-p", "Hi")
    assert r.returncode == 2 and "the prompt is given twice: as words ('hello') and with -p/--prompt" in r.stderr
    r = cli("run", "-f", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: no such file; check the path given to -f/--file" in r.stderr
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    r = cli("run", "-f", str(tmp_path / "bin.txt"))
    assert r.returncode == 2 and "bin.txt is not UTF-8 text" in r.stderr


def test_run_stops_before_a_stop_string_with_llama_cpp_escapes(cli):
    r = cli("run", "--raw", "--temp", "0", "-n", "40", "--ignore-eos", "-t", "2", "--timings", "json",
            "--stop", ",", "1, 2, 3, 4,")
    assert r.returncode == 0, r.stderr
    assert "," not in r.stdout and r.stdout.strip(), r.stdout
    assert _last_record(r.stderr)["finish_reason"] == "stop"
    # '\n' typed in the shell is a newline, as llama-cli's -r takes it
    r = cli("run", "--raw", "--temp", "0", "-n", "40", "--ignore-eos", "-t", "2", "--timings", "json",
            "--stop", "\\n", "1\n2\n3\n4\n")
    assert r.returncode == 0, r.stderr
    assert "\n" not in r.stdout.rstrip("\n") and r.stdout.strip(), repr(r.stdout)
    assert _last_record(r.stderr)["finish_reason"] == "stop"
    r = cli("run", "--stop", "", "Hi")
    assert r.returncode == 2 and "--stop '' would end every reply before it starts" in r.stderr


# ---------------------------------------------------------------- warnings
def test_a_warning_is_one_line_without_a_source_line(cli):
    r = cli("run", "-c", "9000", "-n", "1", "-t", "2", "Hi")  # past SmolLM2's trained 8192
    assert r.returncode == 0, r.stderr
    assert "ondevice run: warning: --ctx / n_ctx=9000 is more than the 8192 tokens" in r.stderr, r.stderr
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr and "load_from(" not in r.stderr


# ---------------------------------------------------------------- a real terminal: line editing, Ctrl-D
def test_chat_prompt_edits_lines_and_recalls_history_in_a_terminal(tmp_path):
    """As at ollama's and llama-cli's prompt: Ctrl-A moves to the start of the line, Up recalls the last
    line; Ctrl-D at an empty prompt quits with the shell's prompt on a new line."""
    import contextlib
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "chat", "--temp", "0", "-n", "8", "-t", "2"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""

    def read_until(marker: bytes, count: int = 1, timeout: float = 120) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while out.count(marker) < count:
            assert time.monotonic() < end and proc.poll() is None, out.decode(errors="replace")[-2000:]
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)

    try:
        read_until(b">>> ")
        os.write(master, b"show\x01/\n")  # typed "show", Ctrl-A, "/": the line is /show
        read_until(b"timings: off")
        read_until(b">>> ", 2)
        os.write(master, b"\x1b[A\n")  # Up: /show again
        read_until(b"timings: off", 2)
        read_until(b">>> ", 3)
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
        with contextlib.suppress(OSError):  # EIO: the child closed its end
            while select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert text.count("model: smollm2-135m-instruct") == 2, text  # neither line went to the model as a message
    assert text.endswith(">>> \r\n"), repr(text[-40:])


# ---------------------------------------------------------------- `ollama run MODEL`: the model as a word
def test_chat_takes_the_model_as_its_first_word(cli):
    r = cli("chat", "smollm2", "-n", "4", "-t", "2", input="/show\n")
    assert r.returncode == 0 and "model: smollm2-135m-instruct (chat template)" in r.stderr, r.stderr
    r = cli("chat", "Hello there")  # a first message where the model goes
    assert r.returncode == 2 and "'Hello there' is not a model name" in r.stderr, r.stderr
    assert 'ondevice run "Hello there"' in r.stderr
    r = cli("chat", "gemma3-270m", "-m", "smollm2")
    assert r.returncode == 2 and "two models: 'gemma3-270m' and -m smollm2" in r.stderr, r.stderr
    # the words after the model are the first message (ollama run MODEL PROMPT's habit), as -p: same answer
    given = cli("chat", "smollm2", "What", "is", "2+2?", "-n", "6", "--temp", "0", input="")
    flag = cli("chat", "smollm2", "-p", "What is 2+2?", "-n", "6", "--temp", "0", input="")
    assert given.returncode == 0 and given.stdout.strip() and given.stdout == flag.stdout, given.stderr
    r = cli("chat", "smollm2", "Hi", "-p", "Hello")
    assert r.returncode == 2 and "two first messages: 'Hi' and -p/-f" in r.stderr, r.stderr


def test_chat_on_a_base_model_does_not_write_the_users_turns(cli):
    import pytest

    from ondevice.errors import OndeviceError
    from ondevice.models import resolve

    try:
        path = resolve("gemma3-270m").path  # assembled into the default store once
    except OndeviceError as e:
        pytest.skip(f"gemma3-270m not installed: {e}")
    r = cli("chat", "-m", str(path), "-n", "40", "-t", "2", "--temp", "0", input="Hello, who are you?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "User:" not in r.stdout, r.stdout  # greedy, it went on as "User: Hello, ..."


def test_chat_sends_a_multiline_message_the_input_ends_in(cli):
    # a script whose closing """ is missing: what it wrote is answered, not dropped in silence
    r = cli("chat", "--temp", "0", "-n", "4", "-t", "2", "--timings", input='"""Say\nhello\n')
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TTFT") == 1 and r.stdout.strip(), r.stderr


def test_a_reply_cut_by_n_inside_a_grammar_says_so(cli):
    """-j / --grammar / chat's /set format json, cut by -n before the grammar closed: a note says it may not be
    complete (plain text cut by -n is what the user asked for: no note)."""
    ask = ["-n", "3", "-p", "Give a person with a name and an age as JSON"]
    r = cli("run", "-j", '{"type": "object"}', *ask)
    assert r.returncode == 0 and "(the reply stopped at the 3-token limit, so it may not be complete as its grammar " \
                                 "asks; raise -n)" in r.stderr, r.stderr
    r = cli("run", *ask)
    assert r.returncode == 0 and "stopped" not in r.stderr, r.stderr
    # greedy: sampled, the reply is at times "{}" within 3 tokens, whole, and then rightly without the note
    r = cli("chat", input="/set format json\n/set num_predict 3\n/set temperature 0\nGive a person with a name and "
                          "an age\n")
    assert "it may not be complete as its grammar asks; /set num_predict N gives it more tokens)" in r.stderr, r.stderr


def test_one_token_has_no_decode_rate(cli):
    """The first token comes with the prompt, so one token has no decode rate; it read '0.0 tok/s', like a stall."""
    r = cli("run", "-n", "1", "--ignore-eos", "Hi")
    assert r.returncode == 0 and "| decode 1 tok | peak RSS" in r.stderr, r.stderr
    r = cli("run", "-n", "3", "--ignore-eos", "Hi")
    assert re.search(r"\| decode 3 tok at \d+\.\d tok/s \|", r.stderr), r.stderr
