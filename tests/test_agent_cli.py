"""``ondevice agent``'s flags and exits as a user meets them: --no-answer when the model calls no tool, a tools
file that exits while imported, -t, a context window too small (the advice names --ctx) and --builtin's help.
Real components: the embedded SmolLM2 through llama.cpp, the CLI in a subprocess."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("pydantic")

from ondevice.agent import Agent, Toolbox
from ondevice.agent.builtin import builtin_toolbox
from ondevice.cli import build_parser

WEATHER = textwrap.dedent('''
    from ondevice.agent import tool

    @tool
    def get_weather(city: str) -> dict:
        """Current weather in a city."""
        return {"city": city, "temp_c": 18}
''')


def get_weather(city: str) -> dict:
    """Current weather in a city."""
    return {"city": city, "temp_c": 18}


def test_no_answer_keeps_a_reply_in_words_out_of_the_answer(smol):
    """``answer_tokens=0`` is the tools' results alone: a model that replies in words instead of calling a tool
    (SmolLM2 does, offered the choice: see README) gives no answer, and the run is not ok; its text stays in
    the turns."""
    run = Agent(Toolbox([get_weather]), actor=smol, answer_tokens=0).run("What's the weather in Oslo?", plan=False)
    assert not run.nodes, f"SmolLM2 called a tool here; this test needs a reply in words: {run.to_dict()}"
    assert run.answer is None and not run.ok and run.to_dict()["answer"] is None
    assert run.turns[-1]["step"] == "call:1" and run.turns[-1]["text"].strip(), run.turns


def test_the_cli_under_no_answer_prints_no_model_text_and_says_no_tool_was_called(cli, tmp_path):
    (tmp_path / "tools.py").write_text(WEATHER)
    args = ("agent", "What's the weather in Oslo?", "--tools", str(tmp_path / "tools.py"), "--no-plan",
            "--no-answer", "-t", "2")
    r = cli(*args)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert "ondevice agent: the model called no tool, so there are no results to print; rephrase the request, " \
           "drop --no-plan" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli(*args, "--json")
    rec = json.loads(r.stdout)
    assert r.returncode == 1 and rec["ok"] is False and rec["answer"] is None and rec["nodes"] == [], rec
    assert rec["turns"][-1]["text"].strip(), rec["turns"]  # the model's words are kept, just not as the answer


def test_a_tools_file_that_exits_while_imported_is_one_line(cli, tmp_path):
    cases = {"exit3.py": ("import sys\n\nsys.exit(3)\n", "called sys.exit(3)", 3),
             "exit0.py": ("import sys\nsys.exit(0)\n", "called sys.exit(0)", 2),
             "bare.py": ("raise SystemExit\n", "called sys.exit()", 1)}
    for name, (code, said, line) in cases.items():
        (tmp_path / name).write_text(code)
        r = cli("agent", "hi", "--tools", str(tmp_path / name))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
        want = (f"ondevice agent: error: --tools {tmp_path / name}: importing {tmp_path / name} {said} "
                f"({tmp_path / name}, line {line}); a tools module must not exit when imported: fix the module")
        assert r.stderr.strip() == want, r.stderr


def test_threads_have_the_short_flag_the_other_verbs_give_them():
    for flag in ("-t", "--threads"):
        assert build_parser("agent").parse_args(["agent", "hi", flag, "3"]).threads == 3


def test_a_context_window_too_small_names_the_ctx_flag(cli, tmp_path):
    """The prompt longer than --ctx, and a plan the end of the window would cut: both say to raise --ctx (the
    flag), not the library's n_ctx."""
    (tmp_path / "tools.py").write_text(WEATHER)
    for ctx, said in (("64", "the prompt has "), ("160", "the planner's prompt with room for its plan has ")):
        r = cli("agent", "What's the weather in Oslo?", "--tools", str(tmp_path / "tools.py"), "--ctx", ctx,
                "-t", "2")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
        assert f"ondevice agent: error: {said}" in r.stderr and "n_ctx" not in r.stderr, r.stderr
        assert f"but the context window holds {ctx}; shorten it or raise --ctx (at most the model's trained " \
               f"context, " in r.stderr, r.stderr


def test_the_help_names_the_builtin_tools(cli):
    r = cli("agent", "--help")
    text = " ".join(r.stdout.split())  # argparse wraps the lines
    names = [t.name for t in builtin_toolbox()]
    assert r.returncode == 0 and f"also offer ondevice's own tools ({', '.join(names)})" in text, r.stdout
    # the two that only read say so to MCP clients (--serve-mcp --builtin), which may then run them unasked
    assert {t.name for t in builtin_toolbox() if t.read_only} == {"list_models", "device_info"}
