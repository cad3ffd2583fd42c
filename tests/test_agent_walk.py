"""A new user's walk through ``ondevice agent``: a tool that returns megabytes, tools ondevice cannot describe,
MCP commands that cannot start or that print on stdout. Real components: the embedded SmolLM2 through
llama.cpp, the CLI in a subprocess, MCP servers as processes through the official client."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
import threading

import pytest
from conftest import Recording

pytest.importorskip("pydantic")

from ondevice.agent import Agent, Node, Tool, Toolbox, run_graph
from ondevice.errors import InvalidArgument, OndeviceError

LOG = "line of log text\n" * 200_000  # 3.4 MB: over the context, and over the chat template's loop limit


def read_log(name: str) -> str:
    """Read a log file by name.

    Args:
        name: the log's name.
    """
    return LOG


def count_lines(text: str) -> int:
    """The number of lines in a text."""
    return text.count("\n")


def test_a_huge_tool_result_is_cut_to_the_context_and_the_run_still_answers(smol):
    """The answer step and a dependant's call are written from a result that is cut (saying so) to fit the
    model's context, instead of the run failing after its tools ran."""
    model = Recording(smol)
    box = Toolbox([read_log, count_lines])
    g = run_graph([Node("s1", "read_log", {"name": "syslog"})], box)
    assert g.ok and len(g.nodes["s1"].output) == len(LOG)
    agent = Agent(box, actor=model, answer_tokens=32)
    text = agent.answer("Read the log named syslog", list(g.nodes.values()))
    assert text and not text.startswith(("{", "[", "<")), text
    (shown,) = [m["content"] for m in model.asked[-1] if m["role"] == "tool"]
    whole = f"[cut: {len(LOG):,} characters in all, the first"  # a str result as its text, not JSON-encoded
    assert whole in shown and shown.startswith(LOG[:200]), shown[-200:]
    assert len(smol.tokenize_prompt(model.asked[-1])) + 32 <= smol.engine.n_ctx
    # a subtask that depends on it: its call is written from the cut result too
    turns: list = []
    node = Node("s2", "count_lines", task="count the log's lines", depends_on=("s1",))
    try:
        args = agent.fill("Count the lines of the syslog", turns)(node, {"s1": LOG})
        assert isinstance(args, dict)
    except OndeviceError as e:  # it copied the log into the call: cut at the grammar's bound, so refused, not run
        assert "text reached the call grammar's bound" in str(e)
    assert turns[-1]["step"] == "act:s2"
    assert whole in model.asked[-1][-1]["content"]


def test_tools_ondevice_cannot_describe_are_refused_in_one_line(cli, tmp_path):
    def untyped(city, days=3) -> str:
        """No hints."""
        return city

    with pytest.raises(InvalidArgument, match=r"tool untyped: parameter city has no type hint.*\(e\.g\. city: str\)"):
        Tool.from_function(untyped)

    def typed_but_one(city: str, days=3) -> str:
        """One hint missing."""
        return city

    with pytest.raises(InvalidArgument, match=r"parameter days has no type hint.*\(e\.g\. days: int\)"):
        Tool.from_function(typed_but_one)

    def lock(lock: threading.Lock) -> str:  # a type pydantic has no schema for
        """Takes a lock."""
        return "x"

    with pytest.raises(InvalidArgument, match="tool lock: parameter lock has type .*which has no JSON schema"):
        Tool.from_function(lock)

    (tmp_path / "locky.py").write_text(textwrap.dedent('''
        from typing import Callable
        from ondevice.agent import tool

        @tool
        def apply(cb: Callable[[int], int]) -> int:
            """Apply a callback."""
            return cb(1)
    '''))
    (tmp_path / "bare.py").write_text(textwrap.dedent('''
        def nohint(x):
            """No hints."""
            return x

        TOOLS = [nohint]
    '''))
    (tmp_path / "weather.py").write_text(textwrap.dedent('''
        from ondevice.agent import tool

        @tool
        def get_weather(city: str) -> str:
            """Current weather in a city."""
            return city
    '''))
    f, bare, weather = (str(tmp_path / n) for n in ("locky.py", "bare.py", "weather.py"))
    cases = {
        ("--tools", f): f"error: --tools {f}: tool apply: parameter cb has type Callable[[int], int], which has no "
                        f"JSON schema; use str, int",
        ("--tools", bare): f"error: --tools {bare}: tool nohint: parameter x has no type hint",
        ("--tools", weather, "--tools", weather): f"error: --tools {weather}: a tool named 'get_weather' is already "
                                                  f"registered; give one a different name",
        ("--tools", weather, "--mcp", "python 'server.py"): "error: --mcp python 'server.py: no closing quotation; "
                                                            "quote the command as a shell would",
    }
    for args, want in cases.items():
        r = cli("agent", "What's the weather in Oslo?", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        if args == ("--tools", f):  # the line says where the tool is defined (its decorator's line)
            assert r.stderr.rstrip().endswith(f"({f}, line 5)"), r.stderr


def test_an_mcp_server_that_prints_on_stdout_is_named_without_a_traceback(cli):
    pytest.importorskip("mcp")
    cmd = shlex.join([sys.executable, "-c", "print('Welcome to my server!')"])
    r = cli("agent", "hi", "--mcp", cmd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "an MCP server wrote a line on stdout that is not an MCP message: 'Welcome to my server!'" in r.stderr
    assert "ondevice agent: error: could not start the MCP server" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr


def test_an_mcp_server_that_exits_at_start_up_is_named_with_its_exit_status(cli):
    pytest.importorskip("mcp")
    cmd = shlex.join([sys.executable, "-c", "import sys; print('no config', file=sys.stderr); sys.exit(3)"])
    r = cli("agent", "hi", "--mcp", cmd)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no config" in r.stderr  # its own words, where the message points
    assert "could not start the MCP server" in r.stderr and "; it exited (status 3) (its own messages" in r.stderr


def test_the_cli_answers_after_a_huge_tool_result_and_its_log_line_is_cut(cli, tmp_path):
    """The answer on stdout; the step's line on stderr cut (the whole result stays in --log)."""
    (tmp_path / "logs.py").write_text(textwrap.dedent('''
        from ondevice.agent import tool

        @tool
        def read_log(name: str) -> str:
            """Read a log file by name.

            Args:
                name: the log's name.
            """
            return "line of log text\\n" * 200_000
    '''))
    log = tmp_path / "run.jsonl"
    r = cli("agent", "Read the log named syslog", "--tools", str(tmp_path / "logs.py"), "--ctx", "1024",
            "--threads", "2", "--log", str(log))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip() and not r.stdout.lstrip().startswith(("{", "[", "<")), r.stdout[:500]
    (step,) = [x for x in r.stderr.splitlines() if x.startswith("s1 read_log(")]
    assert "-> done:" in step and "[cut: 3,600,002 characters in all, the first 2,000 shown]" in step, step[-300:]
    assert len(r.stderr) < 20_000
    (rec,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert rec["nodes"][0]["output"] == "line of log text\n" * 200_000 and rec["answer"] == r.stdout.strip()


def _double_tools(folder, name: str, helpers: str) -> None:
    """A tools module ``folder/name`` whose one tool, double, imports twice from ``helpers`` beside it."""
    (folder / "helpers.py").write_text("def twice(x: int) -> int:\n    return 2 * x\n")
    (folder / name).write_text(f"from {helpers} import twice\n\n\ndef double(x: int) -> int:\n"
                               f"    \"\"\"Twice x.\"\"\"\n    return twice(x)\n\n\nTOOLS = [double]\n")


def test_a_tools_file_imports_its_neighbours_and_serve_mcp_refuses_what_it_would_ignore(cli, tmp_path):
    """A tools file that imports a module next to it failed unless ondevice ran from that folder; --serve-mcp
    ignored --mcp, --sop and the rest without a word."""
    _double_tools(tmp_path, "mytools.py", "helpers")
    from ondevice.agent.builtin import load_tools

    (tool,) = load_tools(str(tmp_path / "mytools.py"))
    assert tool.name == "double" and str(tmp_path) not in sys.path
    r = cli("agent", "--serve-mcp", "--tools", str(tmp_path / "mytools.py"), "--mcp", "python srv.py", "--sop",
            "x.txt")
    assert r.returncode == 2 and "--serve-mcp serves the --tools (or --builtin) tools and nothing else; drop --mcp, " \
                                 "--sop" in r.stderr, r.stderr


def test_a_tools_file_with_postponed_annotations_and_a_dataclass_parameter_loads(tmp_path):
    """`from __future__ import annotations` with a dataclass (or pydantic model) parameter was refused: "Event has
    no JSON schema ... use a dataclass or a pydantic model", though it was one."""
    (tmp_path / "cal.py").write_text(textwrap.dedent("""
        from __future__ import annotations

        from dataclasses import dataclass

        @dataclass
        class Event:
            title: str
            hour: int

        def add_event(event: Event) -> str:
            \"\"\"Add an event to the calendar.\"\"\"
            return f"{event.title} at {event.hour}"

        TOOLS = [add_event]
    """))
    from ondevice.agent.builtin import load_tools

    (tool,) = load_tools(str(tmp_path / "cal.py"))
    r = Toolbox([tool]).call("add_event", {"event": {"title": "Dentist", "hour": 9}})
    assert r.ok and r.value == "Dentist at 9", r


def test_toolbox_tools_a_package_folder_and_a_path_without_py(tmp_path, monkeypatch):
    """A Toolbox filled with @box.tool could not be loaded by --tools (and TOOLS of its functions dropped their
    sensitive flags); a package folder or a path without .py got "importing ... raised TypeError; fix the module"."""
    from ondevice.agent.builtin import load_tools

    (tmp_path / "boxfile.py").write_text(textwrap.dedent("""
        from ondevice.agent import Toolbox

        box = Toolbox()

        @box.tool
        def ping(x: str) -> str:
            \"\"\"Ping.\"\"\"
            return x

        @box.tool(sensitive=True)
        def wipe(path: str) -> str:
            \"\"\"Wipe a path.\"\"\"
            return path
    """))
    for spec in (str(tmp_path / "boxfile.py"), f"{tmp_path / 'boxfile.py'}:box"):
        assert {(t.name, t.sensitive) for t in load_tools(spec)} == {("ping", False), ("wipe", True)}, spec
    pkg = tmp_path / "pkg1"
    pkg.mkdir()
    _double_tools(pkg, "__init__.py", ".helpers")
    assert [t.name for t in load_tools(str(pkg))] == ["double"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument, match="give a .py file, a package folder or a module name .*did you mean "
                                              "./boxfile.py\\?"):
        load_tools("./boxfile")
