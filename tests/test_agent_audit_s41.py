"""ondevice agent, found by an audit (s41): a --no-plan retry re-ran the calls that had succeeded; ``${NAME}`` in
any argument was a task-graph reference; an MCP call that timed out was retried while it still ran on the server;
pydantic arguments were recorded as their repr; --serve-mcp sent a str result JSON-encoded and let a tool's
print() into the protocol stream; a URL given to --mcp was run as a command. The model's turn is a stand-in where
the point is what the agent does with a call (as in tests/test_agent.py); MCP goes through the real ``mcp``
package and real server processes."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import pytest

pydantic = pytest.importorskip("pydantic")

import ondevice.agent.agent as agent_mod
from ondevice.agent import Agent, Node, Toolbox, run_graph
from ondevice.agent.calls import Turn
from ondevice.engine.toolcalls import Call


def _actor(monkeypatch, *turns: list[Call]) -> list[list[dict]]:
    """The model's call turns, one list of calls per try (the last repeated); returns the messages each saw."""
    seen: list[list[dict]] = []

    def turn(model, msgs, tools, **kw):
        seen.append([dict(m) for m in msgs])
        return Turn(text="[calls]", calls=list(turns[min(len(seen), len(turns)) - 1]), constrained=True)

    monkeypatch.setattr(agent_mod, "call_turn", turn)
    return seen


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "ONDEVICE_SUPERVISED": "",
            "PATH": os.environ.get("PATH", "")}


# -- F6: a --no-plan retry keeps what succeeded ---------------------------------------------------------------

def test_no_plan_retry_does_not_run_a_successful_call_again_and_shows_it(monkeypatch):
    sent = []

    def send_email(to: str) -> str:
        """Send an email."""
        if to == "b@x.org":
            raise RuntimeError("mail server busy")
        sent.append(to)
        return f"sent to {to}"

    # what a small model writes after "that call failed": both calls again
    seen = _actor(monkeypatch, [Call("send_email", {"to": "a@x.org"}), Call("send_email", {"to": "b@x.org"})])
    run = Agent(Toolbox([send_email]), actor=object(), answer_tokens=0, max_retries=2).run("Email a and b", plan=False)
    assert sent == ["a@x.org"], sent  # was a@x.org three times: once per try
    assert len(seen) == 3 and not run.ok
    a, b = run.nodes
    assert (a.id, a.status, len(a.attempts)) == ("c1", "done", 1)
    assert (b.id, b.status, [x["ok"] for x in b.attempts]) == ("c2", "failed", [False, False, False])
    note = seen[1][-1]["content"]  # the retry's prompt says what failed and what is done already
    assert "mail server busy" in note and 'send_email({"to": "a@x.org"}) -> sent to a@x.org' in note, note
    assert "These calls ran already; do not make them again" in note
    assert [e["node"] for e in run.graph.log if e["event"] == "start"] == ["c1", "c2", "c2", "c2"]


def test_no_plan_corrected_call_joins_the_kept_one(monkeypatch):
    sent = []

    def send_email(to: str) -> str:
        """Send an email."""
        if to == "b@x.org":
            raise RuntimeError("no such mailbox")
        sent.append(to)
        return f"sent to {to}"

    _actor(monkeypatch, [Call("send_email", {"to": "a@x.org"}), Call("send_email", {"to": "b@x.org"})],
           [Call("send_email", {"to": "a@x.org"}), Call("send_email", {"to": "b@y.org"})])
    run = Agent(Toolbox([send_email]), actor=object(), answer_tokens=0).run("Email a and b", plan=False)
    assert run.ok and sent == ["a@x.org", "b@y.org"]
    assert [(n.id, n.status, [x["args"]["to"] for x in n.attempts]) for n in run.nodes] == [
        ("c1", "done", ["a@x.org"]), ("c2", "done", ["b@x.org", "b@y.org"])]


# -- F5: ${NAME} that is not a node of the graph is text -----------------------------------------------------

def test_dollar_brace_text_in_arguments_is_left_as_it_is(monkeypatch):
    got = []

    def run_shell(cmd: str) -> str:
        """Run a shell command."""
        got.append(cmd)
        return "ok"

    def write_file(path: str, content: str) -> str:
        """Write a file."""
        got.append(content)
        return "written"

    box = Toolbox([run_shell, write_file])
    _actor(monkeypatch, [Call("run_shell", {"cmd": "echo ${HOME} ${c1}"})])
    run = Agent(box, actor=object(), answer_tokens=0).run("echo my home", plan=False)
    assert run.ok and got == ["echo ${HOME} ${c1}"], (got, run.nodes[0].error)  # --no-plan: no references at all
    got.clear()
    js = "const s = `hi ${name}`;"
    g = run_graph([Node("s1", "run_shell", {"cmd": "date"}),
                   Node("s2", "write_file", {"path": "a.js", "content": js}),
                   Node("s3", "write_file", {"path": "b.txt", "content": "${s1} in ${HOME}"}, depends_on=("s1",))], box)
    assert g.ok, {k: n.error for k, n in g.nodes.items()}
    assert sorted(got) == sorted(["date", js, "ok in ${HOME}"])  # a node's output still fills its reference


# -- F4: structured arguments are recorded as JSON -----------------------------------------------------------

class Address(pydantic.BaseModel):
    city: str
    zip: str | None = None


@dataclass
class Item:
    name: str
    n: int = 1


def test_model_and_dataclass_arguments_are_recorded_as_json(monkeypatch):
    def ship(to: Address, items: list[Item]) -> str:
        """Ship items to an address."""
        return f"{len(items)} to {to.city}"

    r = Toolbox([ship]).call("ship", {"to": {"city": "Oslo"}, "items": [{"name": "pear"}]})
    assert r.ok and r.args == {"to": {"city": "Oslo", "zip": None}, "items": [{"name": "pear", "n": 1}]}, r.args
    _actor(monkeypatch, [Call("ship", {"to": {"city": "Oslo"}, "items": [{"name": "pear"}]})])
    rec = Agent(Toolbox([ship]), actor=object(), answer_tokens=0).run("Ship a pear to Oslo", plan=False).to_dict()
    assert rec["nodes"][0]["args"]["to"] == {"city": "Oslo", "zip": None}  # was "city='Oslo' zip=None"


# -- F7: an MCP call that timed out is not retried -----------------------------------------------------------

SLOW_SERVER = """
import sys, time
from mcp.server.mcpserver import MCPServer

app = MCPServer("slow")

@app.tool()
def book(city: str) -> str:
    \"\"\"Book a trip.\"\"\"
    with open(sys.argv[1], "a") as f:
        f.write(city + "\\n")
    time.sleep(60)
    return "booked"

app.run()
"""


def test_an_mcp_call_that_timed_out_is_not_called_again(tmp_path, monkeypatch):
    pytest.importorskip("mcp")
    from ondevice.agent.mcptools import MCPClient

    (tmp_path / "booker.py").write_text(SLOW_SERVER)
    calls = tmp_path / "calls.txt"
    calls.touch()
    with MCPClient(sys.executable, [str(tmp_path / "booker.py"), str(calls)], env=_env()) as c:
        c.timeout = 1.5  # for the calls (the server had the default to start)
        box = Toolbox(c.tools(sensitive=False))
        _actor(monkeypatch, [Call("book", {"city": "Oslo"})])
        run = Agent(box, actor=object(), answer_tokens=0, max_retries=2).run("Book Oslo", plan=False)
        (n,) = run.nodes
        assert n.status == "failed" and n.result.kind == "timeout" and len(n.attempts) == 1
        assert "the MCP server booker.py did not answer book in 1.5 s" in n.error, n.error  # named by its script
        assert "may still be running there" in n.error
        g = run_graph([Node("s1", "book", task="book Oslo")], box, fill=lambda node, out: {"city": "Paris"},
                      max_retries=2)  # a plan's subtask: not refilled either
        assert g.nodes["s1"].result.kind == "timeout" and len(g.nodes["s1"].attempts) == 1

        def pay(amount: int) -> str:
            """Pay."""
            raise RuntimeError("card declined")

        # beside a call that failed, the model writes the timed-out one again: it is not made again either
        seen = _actor(monkeypatch, [Call("book", {"city": "Rome"}), Call("pay", {"amount": 5})])
        run = Agent(Toolbox([*box, pay]), actor=object(), answer_tokens=0, max_retries=1).run("Go", plan=False)
        assert [(n.tool, n.result.kind, len(n.attempts)) for n in run.nodes] == [("book", "timeout", 1),
                                                                                 ("pay", "failed", 2)]
        assert 'book({"city": "Rome"}) -> error (timeout)' in seen[1][-1]["content"]
    assert calls.read_text().split() == ["Oslo", "Paris", "Rome"]  # each asked of the server once


def test_a_server_is_named_by_its_script():
    from ondevice.agent.mcptools import server_name

    assert server_name("/usr/bin/python3", ["-u", "/srv/weather.py"]) == "weather.py"
    assert server_name("python", ["-m", "my_server"]) == "my_server"
    assert server_name("npx", ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"]) == "server-filesystem"
    assert server_name("uv", ["run", "srv.py"]) == "srv.py"
    assert server_name("/opt/bin/weather-mcp", ["--port", "3"]) == "weather-mcp"
    assert server_name("python", ["-c", "import x"]) == "python"


# -- F2, F12: --serve-mcp sends text as text and keeps its stdout for the protocol ----------------------------

SERVED_TOOLS = """
from ondevice.agent import tool

@tool
def read_note() -> str:
    \"\"\"Read the note.\"\"\"
    return 'Line one: "hi"\\nLine two: café'

@tool
def count(n: int) -> int:
    \"\"\"n as a count.\"\"\"
    return n

@tool
def weather(city: str) -> dict:
    \"\"\"Weather, with a debug print.\"\"\"
    print("debug: looking up", city)
    return {"city": city, "temp_c": 18}
"""


def test_serve_mcp_sends_a_str_as_its_text_and_keeps_prints_off_the_wire(tmp_path, caplog):
    pytest.importorskip("mcp")
    import asyncio

    import mcp
    from mcp.client.stdio import stdio_client

    (tmp_path / "tools.py").write_text(SERVED_TOOLS)
    params = mcp.StdioServerParameters(command=sys.executable, env=_env(), args=[
        "-m", "ondevice.cli", "agent", "--serve-mcp", "--yes", "--tools", str(tmp_path / "tools.py")])

    async def main():
        async with stdio_client(params, errlog=err) as (r, w), mcp.ClientSession(r, w) as s:
            await s.initialize()
            return [await s.call_tool(name, args) for name, args in
                    (("read_note", {}), ("count", {"n": 3}), ("weather", {"city": "Oslo"}))]

    with open(tmp_path / "stderr.txt", "w") as err:
        note, count, weather = asyncio.run(asyncio.wait_for(main(), 120))
    assert note.content[0].text == 'Line one: "hi"\nLine two: café'  # was '"Line one: \\"hi\\"\\nLine two: café"'
    assert note.structured_content == {"result": 'Line one: "hi"\nLine two: café'}  # as FastMCP wraps a str
    assert count.content[0].text == "3" and count.structured_content == {"result": 3}
    assert json.loads(weather.content[0].text) == weather.structured_content == {"city": "Oslo", "temp_c": 18}
    # the tool's print() goes to stderr; it reached the client's stdout (the protocol) when flushed at exit
    assert not [r.getMessage() for r in caplog.records if "JSONRPC" in r.getMessage()]
    assert "debug: looking up Oslo" in (tmp_path / "stderr.txt").read_text()


# -- F9: a URL is not a command -------------------------------------------------------------------------------

def test_an_http_mcp_server_is_refused_in_one_line(cli):
    r = cli("agent", "hi", "--mcp", "http://127.0.0.1:19050/mcp")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "HTTP (and SSE) MCP servers are not supported" in r.stderr
    assert "npx mcp-remote http://127.0.0.1:19050/mcp" in r.stderr, r.stderr
