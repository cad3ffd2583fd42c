"""`ondevice run` and `chat` with text piped in, as a user of `ollama run` and `llama-cli` pipes it (real CLI
subprocesses, the real embedded model, greedy and short)."""

from __future__ import annotations

FAST = ("--temp", "0", "-n", "4", "-t", "2")
DOC = "SECRET DOCUMENT: the password is swordfish.\n"


def _prompt_shown(stderr: str) -> str:
    """The prompt --verbose-prompt shows (its text, before the token list)."""
    return stderr.split("prompt: '", 1)[1].split("'\nnumber of tokens in prompt", 1)[0]


def test_run_puts_a_piped_document_before_the_prompts_words(cli):
    # `cat doc | ollama run MODEL "question"`: the document, then the words; a blank line between them
    r = cli("run", *FAST, "--timings", "none", "--verbose-prompt", "What is the password?", input=DOC)
    assert r.returncode == 0, r.stderr
    assert "SECRET DOCUMENT: the password is swordfish.\n\nWhat is the password?" in _prompt_shown(r.stderr)
    assert "note: the 1 line(s) piped on stdin go before the prompt" in r.stderr, r.stderr  # never unseen
    alone = cli("run", *FAST, "--timings", "none", "--verbose-prompt", "What is the password?", input="")
    assert "SECRET" not in alone.stderr and "What is the password?" in _prompt_shown(alone.stderr), alone.stderr


def test_run_says_stdin_is_not_read_with_p(cli):
    # llama-cli's -p never reads stdin: the document is not added, and a note says so (not dropped unseen)
    r = cli("run", *FAST, "--timings", "none", "--verbose-prompt", "-p", "What is the password?", input=DOC)
    assert r.returncode == 0, r.stderr
    assert "SECRET" not in _prompt_shown(r.stderr)
    assert "note: stdin is not read when -p/--prompt gives the prompt" in r.stderr, r.stderr


def test_run_f_drops_the_files_last_newline_as_llama_cli(cli, tmp_path):
    path = tmp_path / "fr.txt"
    path.write_text("The capital of France is\n")  # an editor saves a final newline
    by_file = cli("run", "--raw", *FAST, "--timings", "none", "--verbose-prompt", "-f", str(path))
    by_flag = cli("run", "--raw", *FAST, "--timings", "none", "--verbose-prompt", "-p", "The capital of France is")
    assert by_file.returncode == 0 and by_flag.returncode == 0, by_file.stderr + by_flag.stderr
    assert _prompt_shown(by_file.stderr) == "The capital of France is"
    assert by_file.stdout == by_flag.stdout, (by_file.stdout, by_flag.stdout)


def test_chat_takes_a_piped_document_as_one_message(cli):
    # `ollama run MODEL < doc.txt`: all of stdin is one prompt, one answer (not one answer per line)
    doc = "Summarise this text in one line:\nThe cat sat on the mat.\nIt was warm.\n"
    r = cli("chat", *FAST, "--timings", input=doc)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("TTFT") == 1, r.stderr
    one = cli("run", *FAST, "--timings", "none", "-p", doc.rstrip("\n"), "--no-escape")
    assert r.stdout == one.stdout, (r.stdout, one.stdout)  # the same message as the three lines sent together


def test_chat_st_says_what_stdin_still_held(cli):
    # a script (it holds a /command) is a message a line; -st answers the first and says the rest was not read
    r = cli("chat", *FAST, "-st", input="/set top_k 5\nName a colour.\nName another.\n")
    assert r.returncode == 0 and "top_k = 5" in r.stderr, r.stderr
    assert "-st answered the first message; 1 more line(s) of stdin were not read" in r.stderr, r.stderr
    r = cli("chat", *FAST, "-st", "-p", "Hi", input="Never read.\n")
    assert r.returncode == 0 and "-st answered -p/-f's message; stdin was not read" in r.stderr, r.stderr


def test_xhh_escapes_are_bytes_of_utf8_as_llama_cli_reads_them(cli):
    # llama.cpp's string_process_escapes writes \xHH as a byte: \xc3\xa9 is é, not 'Ã©'
    r = cli("run", "--raw", "-n", "1", "-t", "2", "--timings", "none", "--verbose-prompt",
            "-p", "Say \\xe4\\xbd\\xa0\\xe5\\xa5\\xbd \\xc3\\xa9!")
    assert r.returncode == 0 and _prompt_shown(r.stderr) == "Say 你好 é!", r.stderr
    r = cli("run", "-n", "1", "--stop", "caf\\xe9")  # a lone Latin-1 byte is not UTF-8 text
    assert r.returncode == 2 and "--stop/-r 'caf\\xe9': \\xHH escapes are bytes" in r.stderr, r.stderr
    assert "(é: \\xc3\\xa9)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("chat", "-n", "1", "-t", "2", input="/set stop \\xe9\n/set stop \\xc3\\xa9\n")
    assert r.returncode == 0 and "/set stop: '\\xe9': \\xHH escapes are bytes" in r.stderr, r.stderr
    assert "stop = ['é']" in r.stderr, r.stderr


def test_text_the_output_encoding_cannot_write_is_replaced_not_a_traceback(cli):
    # a latin-1 stdout (Windows' cp1252 redirected to a file is the common one) and a reply in Chinese
    chinese = ("--grammar", 'root ::= "北京"', "-n", "8", "-t", "2")
    for verb, given in (("run", {"input": "Name a city."}), ("chat", {"input": "Name a city.\n"})):
        r = cli(verb, *chinese, env={"PYTHONIOENCODING": "latin-1"}, **given)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (verb, r.stderr)
        assert r.stdout.startswith("??"), (verb, r.stdout)


def test_chat_takes_a_piped_file_whole_whatever_its_lines_hold(cli):
    # a Python file's docstring and a line that begins with /set are the document's text, not chat's markers
    code = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\nExplain this code.\n'
    notes = "Notes:\n/usr/bin/python is the path.\n/set up the env first.\nSummarise.\n"
    for doc in (code, notes):
        r = cli("chat", *FAST, "--timings", input=doc)
        assert r.returncode == 0 and r.stderr.count("TTFT") == 1, r.stderr
        assert "cannot set" not in r.stderr and "unknown command" not in r.stderr, r.stderr


def test_piped_chat_exits_2_when_its_last_message_is_not_answered(cli):
    # as run's exit status says it: a script sees that the document did not fit the window
    r = cli("chat", "-c", "64", *FAST, input="word " * 100 + "\n")
    assert r.returncode == 2 and "ondevice chat: error: the prompt has" in r.stderr, r.stderr


def test_run_says_it_waits_for_a_pipe_that_stays_quiet(tmp_path):
    # a parent that leaves stdin open (subprocess stdin=PIPE, a notebook) is told why the run waits; it goes on
    # once the pipe ends
    import os
    import select
    import subprocess
    import sys

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    p = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "run", *FAST, "--timings", "none", "Hi"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert select.select([p.stderr], [], [], 120)[0], "nothing said while the pipe stayed open"
        first = p.stderr.readline()
        assert "note: waiting for stdin to end" in first and "</dev/null" in first, first
        out, err = p.communicate("", timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0 and out.strip(), err


def test_an_argument_that_is_not_utf8_says_so(cli):
    # a Latin-1 terminal sends é as the byte 0xe9: the error names that, not escapes or UTF-16 surrogates
    latin1 = "caf\udce9"  # how Python holds the byte; subprocess gives it back to the command as 0xe9
    for args, flag in ((("run", latin1 + " au lait"), "the prompt"), (("run", "-p", latin1), "-p/--prompt"),
                       (("chat", "-s", latin1), "-s/--system"), (("run", "--stop", latin1, "Hi"), "--stop/-r")):
        r = cli(*args, "-n", "1")
        assert r.returncode == 2 and f"{flag}: the text is not UTF-8 (byte 0xe9 at character 3)" in r.stderr, r.stderr
        assert "LANG=C.UTF-8" in r.stderr and "escape" not in r.stderr and "surrogate" not in r.stderr, r.stderr
