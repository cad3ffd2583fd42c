"""`ondevice chat` used as a user of `ollama run` or llama.cpp's `llama-cli -cnv` would: llama-cli's -p/-f
(the first message), -st, -r and -cnv, and Ollama's /set stop, /show info, /clear and /set system \"\"\" (real
CLI subprocesses, the real embedded model, greedy and short)."""

from __future__ import annotations

import pytest

Q = "Say one sentence about the sea.\\nKeep it short."  # as typed in a shell: -p makes \n a newline (llama-cli's)
TYPED = '"""Say one sentence about the sea.\nKeep it short."""'  # the same message typed at the >>> prompt
FAST = ("--temp", "0", "-n", "12", "-t", "2")


@pytest.fixture()
def first(cli):
    """The greedy answer to Q alone (chat -st -p): what a fresh conversation says to it."""
    r = cli("chat", *FAST, "-st", "-p", Q)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout


def _cut(answer: str) -> tuple[str, str]:
    """A stop string from the middle of ``answer`` and the text an answer stopped there shows (what is before it)."""
    text = answer.rstrip("\n")
    # three characters past the middle, no space among them (/set stop takes words)
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 2) if not any(map(str.isspace, text[i:i + 3])))
    return stop, text[:text.index(stop)]


def test_p_is_the_first_message_and_stdin_goes_on_after_it(cli, first):
    # the same message, the same answer as `run -p` (escapes included); then the piped lines are chat as usual
    r = cli("run", *FAST, "-p", Q)
    assert r.returncode == 0 and r.stdout == first, (r.stdout, first)
    r = cli("chat", *FAST, "--timings", "-p", Q, input="/show parameters\nAnd another?\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TTFT") == 2 and "parameters: temp 0.0" in r.stderr, r.stderr
    assert r.stdout.startswith(first) and r.stdout != first, r.stdout  # -p's answer came first


def test_p_text_is_a_message_not_a_command(cli):
    r = cli("chat", *FAST, "--timings", "-st", "-p", "/show")
    assert r.returncode == 0 and r.stderr.count("TTFT") == 1 and "model:" not in r.stderr, r.stderr


def test_st_quits_after_one_answer(cli, first):
    r = cli("chat", *FAST, "--timings", "-st", "-p", Q, input="Never read.\n")
    assert r.returncode == 0 and r.stderr.count("TTFT") == 1 and r.stdout == first, r.stderr
    # without -p: the first message typed or piped is the turn (a /command before it is not)
    r = cli("chat", *FAST, "--timings", "-st", input="/set top_k 5\nName a colour.\nName another.\n")
    assert r.returncode == 0 and r.stderr.count("TTFT") == 1 and "top_k = 5" in r.stderr, r.stderr


def test_f_is_the_first_message_from_a_file(cli, first, tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("Say one sentence about the sea.\nKeep it short.\n")  # llama-cli drops the file's last newline
    r = cli("chat", *FAST, "-st", "-f", str(path))
    assert r.returncode == 0 and r.stdout == first, (r.stdout, first, r.stderr)


def test_f_errors_name_the_file_in_one_line(cli, tmp_path):
    missing = tmp_path / "nope.txt"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for path, said in ((missing, "no such file; check the path given to -f/--file"), (bad, "is not UTF-8 text"),
                       (empty, "the first message is empty")):
        r = cli("chat", "-f", str(path))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and said in lines[0], r.stderr
        assert lines[0].startswith("ondevice chat: error:") and path.name in lines[0], r.stderr
    r = cli("chat", "-p", "Hi", "-f", str(bad))  # one first message
    assert r.returncode == 2 and "not allowed with argument" in r.stderr, r.stderr


def test_r_ends_the_answer_before_its_text_and_works_with_stop(cli, first):
    stop, shown = _cut(first)
    for flags in (("-r", stop), ("-r", stop, "--stop", "never-said"), ("--stop", stop, "-r", "never-said")):
        r = cli("chat", *FAST, "-st", "-p", Q, *flags)
        assert r.returncode == 0 and r.stdout == shown + "\n", (flags, r.stdout, shown)
    r = cli("chat", "-n", "1", "-t", "2", "-r", "A", "--stop", "B", "-r", "\\n", input="/show parameters\n")
    assert r.returncode == 0 and "stop ['A', 'B', '\\n']" in r.stderr, r.stderr


def test_set_stop_and_clear(cli, first):
    # /clear: the same message gets the answer of a fresh conversation; /set stop ends the next one early
    stop, shown = _cut(first)
    r = cli("chat", *FAST, "-p", Q, input=f"/clear\n{TYPED}\n/clear\n/set stop {stop}\n{TYPED}\n/set stop\n/show\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == first + first + shown + "\n", (r.stdout, first, shown)
    assert r.stderr.count("(conversation cleared)") == 2 and f"stop = [{stop!r}]" in r.stderr, r.stderr
    assert "stop = []" in r.stderr and "stop [" not in r.stderr.split("stop = []")[1], r.stderr  # cleared


def test_show_info_parts_and_conversation_flags(cli):
    script = "/show info\n/show system\n/show colour\n/set num_ctx 4096\n/set seed -1\n/show parameters\n/help\n"
    r = cli("chat", "-cnv", "-i", "-c", "256", "-t", "2", "-s", "Be brief.", input=script)
    err = r.stderr
    assert r.returncode == 0, err
    assert "model: smollm2-135m-instruct (chat template)\ncontext: 256 tokens (trained: 8192" in err, err
    assert "system: Be brief." in err and "/show takes info, parameters, system, template or license" in err
    assert "the context window is set when the model loads (256 tokens now)" in err and "-c/--ctx N" in err
    assert "seed = -1 (random)" in err and "parameters:" in err
    assert "/clear" in err and '/set system """' in err  # /help names what works
    assert r.stdout == ""  # no command reached the model


def test_set_system_over_several_lines(cli):
    script = '/set system """You are a pirate.\nAlways say arr.\n"""\n/show system\n/set system """Short."""\n/show\n'
    r = cli("chat", "-n", "1", "-t", "2", input=script)
    assert r.returncode == 0, r.stderr
    assert "system: You are a pirate.\nAlways say arr.\n" in r.stderr, r.stderr
    assert "system: Short.\n" in r.stderr and r.stderr.count("(system prompt set") == 2, r.stderr
    assert r.stdout == ""  # neither the lines nor the closing marks were sent as messages
