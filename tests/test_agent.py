"""ondevice.agent: tool schemas and validation, confirmation of sensitive tools, the task graph, MCP over
stdio (a real server process through the official client), retrieval, and real constrained calls with the
embedded SmolLM2. The call format, its grammar and the function-calling suite: tests/test_agent_calls.py."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from typing import Literal

import pytest
from conftest import Recording

pytest.importorskip("pydantic")

from ondevice.agent import (
    Agent,
    Node,
    Tool,
    Toolbox,
    call_turn,
    fcsuite,
    run_graph,
    tool,
)
from ondevice.agent.graph import resolve_refs
from ondevice.agent.retrieval import Embedder, ToolIndex
from ondevice.agent.tools import ToolError
from ondevice.errors import InvalidArgument


def book_table(restaurant: str, people: int, time: str = "19:00",
               seating: Literal["inside", "outside"] = "inside", tags: list[str] | None = None) -> dict:
    """Reserve a table at a restaurant.

    Args:
        restaurant: name of the restaurant.
        people: party size,
            at least one.
        time: time of day, HH:MM.
        seating: where to sit.
        tags: notes for the staff.
    """
    return {"restaurant": restaurant, "people": people, "time": time}


# -- schemas and validation -------------------------------------------------------------------------------

def test_schema_from_a_typed_function():
    t = Tool.from_function(book_table)
    assert t.name == "book_table" and t.description == "Reserve a table at a restaurant."
    p = t.parameters
    assert p["type"] == "object" and p["required"] == ["restaurant", "people"]
    assert p["additionalProperties"] is False
    props = p["properties"]
    assert props["people"]["type"] == "integer"
    assert props["people"]["description"] == "party size, at least one."  # continuation lines joined
    assert props["time"]["default"] == "19:00"
    assert props["seating"]["enum"] == ["inside", "outside"]
    assert "title" not in props["restaurant"]
    assert t.output_schema["type"] == "object"
    with pytest.raises(InvalidArgument, match=r"\*a cannot be described"):
        Tool.from_function(lambda *a: None, name="bad")
    with pytest.raises(InvalidArgument, match="name"):
        Tool.from_function(book_table, name="has space")


def test_arguments_are_validated_before_the_call_and_errors_come_back_as_results():
    calls = []

    def add(a: int, b: int = 0) -> int:
        """Add two numbers."""
        calls.append((a, b))
        if a < 0:
            raise ValueError("negative")
        return a + b

    box = Toolbox([add])
    ok = box.call("add", {"a": "2", "b": 3})  # pydantic's lax mode: "2" is an int
    assert ok.ok and ok.value == 5 and ok.args == {"a": 2, "b": 3}
    for args, fragment in (({"b": 1}, "a: Field required"), ({"a": "x"}, "a: Input should be a valid integer"),
                           ({"a": 1, "c": 2}, "c: Extra inputs are not permitted"), ([1], "must be a JSON object")):
        r = box.call("add", args)
        assert not r.ok and r.kind == "invalid" and fragment in r.error, r.error
    assert calls == [(2, 3)]  # no invalid call reached the function
    r = box.call("sub", {"a": 1})
    assert r.kind == "unknown" and "add" in r.error
    r = box.call("add", {"a": -1})
    assert r.kind == "failed" and "ValueError: negative" in r.error and "error (failed)" in r.message()


def test_schema_only_tools_validate_with_json_schema():
    t = Tool("echo", "Echo.", {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}},
                               "required": ["n"]}, fn=lambda n: n)
    box = Toolbox([t])
    assert box.call("echo", {"n": 2}).value == 2
    r = box.call("echo", {"n": 9})
    assert r.kind == "invalid" and "n: 9 is greater than the maximum of 3" in r.error


# -- sensitive tools -------------------------------------------------------------------------------------

def _sensitive_box():
    ran = []

    @tool(sensitive=True)
    def wipe(target: str) -> str:
        """Erase a target."""
        ran.append(target)
        return "wiped"

    def slow(x: int) -> int:
        """Sleep a little and echo."""
        time.sleep(0.05)
        return x

    return Toolbox([wipe, slow]), ran


def test_a_sensitive_tool_never_runs_without_confirmation():
    box, ran = _sensitive_box()
    r = box.call("wipe", {"target": "disk"})  # no one to ask
    assert r.kind == "unconfirmed" and ran == []
    asked = []
    r = box.call("wipe", {"target": "disk"}, confirm=lambda t, a: asked.append((t.name, a)) or False)
    assert r.kind == "unconfirmed" and ran == [] and asked == [("wipe", {"target": "disk"})]
    r = box.call("wipe", {"target": "disk"}, confirm=lambda t, a: 1 / 0)  # a broken confirmer is a no
    assert r.kind == "unconfirmed" and ran == []
    assert box.call("wipe", {"target": "tmp"}, confirm=lambda t, a: True).ok and ran == ["tmp"]
    assert box.call("slow", {"x": 1}).ok  # not sensitive: no confirmation needed


def test_sensitive_tools_under_parallel_execution_ask_one_at_a_time_and_refusals_block_dependants():
    box, ran = _sensitive_box()
    active, most, seen = [0], [0], []
    lock = threading.Lock()

    def confirm(t, args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)  # a slow human: another branch must not ask meanwhile
        seen.append(args["target"])
        with lock:
            active[0] -= 1
        return args["target"] == "tmp"

    nodes = [Node("w1", "wipe", {"target": "disk"}), Node("w2", "wipe", {"target": "home"}),
             Node("w3", "wipe", {"target": "tmp"}), Node("s1", "slow", {"x": 1}), Node("s2", "slow", {"x": 2}),
             Node("after", "slow", {"x": 3}, depends_on=("w1", "s1"))]
    g = run_graph(nodes, box, confirm=confirm, max_workers=6)
    st = {k: n.status for k, n in g.nodes.items()}
    assert st == {"w1": "failed", "w2": "failed", "w3": "done", "s1": "done", "s2": "done", "after": "blocked"}
    assert ran == ["tmp"] and sorted(seen) == ["disk", "home", "tmp"] and most[0] == 1
    assert g.nodes["w1"].result.kind == "unconfirmed" and "blocked by w1" in g.nodes["after"].error


# -- the task graph ----------------------------------------------------------------------------------------

def test_typed_outputs_feed_later_arguments():
    out = {"s1": {"temp_c": 18, "tags": ["a", "b"]}}
    assert resolve_refs({"t": "${s1.temp_c}", "msg": "it is ${s1.temp_c} C", "tag": "${s1.tags.1}"}, out) == \
        {"t": 18, "msg": "it is 18 C", "tag": "b"}
    with pytest.raises(InvalidArgument, match="no 'rain'"):
        resolve_refs("${s1.rain}", out)

    def weather(city: str) -> dict:
        """Weather."""
        return {"city": city, "temp_c": len(city)}

    def double(x: int) -> int:
        """Twice x."""
        return 2 * x

    g = run_graph([Node("s1", "weather", {"city": "Oslo"}),
                   Node("s2", "double", {"x": "${s1.temp_c}"}, depends_on=("s1",))], Toolbox([weather, double]))
    assert g.ok and g.outputs()["s2"] == 8


def test_independent_branches_overlap_and_a_failure_marks_its_dependants():
    def sleep(ms: int, fail: bool = False) -> int:
        """Sleep ms milliseconds."""
        time.sleep(ms / 1000)
        if fail:
            raise RuntimeError("boom")
        return ms

    box = Toolbox([sleep])
    nodes = [Node("a", "sleep", {"ms": 150}), Node("b", "sleep", {"ms": 150}),
             Node("bad", "sleep", {"ms": 10, "fail": True}),
             Node("c", "sleep", {"ms": 1}, depends_on=("a", "b")),
             Node("d", "sleep", {"ms": 1}, depends_on=("bad",)), Node("e", "sleep", {"ms": 1}, depends_on=("d",))]
    g = run_graph(nodes, box)
    st = {k: n.status for k, n in g.nodes.items()}
    assert st == {"a": "done", "b": "done", "bad": "failed", "c": "done", "d": "blocked", "e": "blocked"}
    assert "RuntimeError: boom" in g.nodes["bad"].error and g.nodes["e"].error == "blocked by d"
    t = {(e["node"], e["event"]): e["t"] for e in g.log}
    assert t[("a", "start")] < t[("b", "end")] and t[("b", "start")] < t[("a", "end")]  # the two ran together
    assert t[("c", "start")] >= max(t[("a", "end")], t[("b", "end")])
    seq = run_graph([Node("a", "sleep", {"ms": 30}), Node("b", "sleep", {"ms": 30})], box, parallel=False)
    ts = {(e["node"], e["event"]): e["t"] for e in seq.log}
    assert ts[("b", "start")] >= ts[("a", "end")]  # one by one when asked


def test_a_replan_hook_repairs_the_graph():
    def fetch(url: str) -> str:
        """Fetch a URL."""
        if "bad" in url:
            raise OSError("unreachable")
        return url.upper()

    def length(s: str) -> int:
        """Length of a string."""
        return len(s)

    seen = []

    def replan(graph, failed):
        seen.append(failed.id)
        return [Node(failed.id, "fetch", {"url": "good.example"})]

    nodes = [Node("f", "fetch", {"url": "bad.example"}), Node("n", "length", {"s": "${f}"}, depends_on=("f",))]
    g = run_graph(nodes, Toolbox([fetch, length]), replan=replan)
    assert seen == ["f"] and g.ok and g.outputs()["n"] == len("good.example") and g.replans == 1
    assert [e["event"] for e in g.log if e["node"] == "f"].count("replanned") == 1
    with pytest.raises(InvalidArgument, match="cycle"):
        run_graph([Node("x", "length", {"s": "a"}, depends_on=("y",)),
                   Node("y", "length", {"s": "a"}, depends_on=("x",))], Toolbox([length]))
    with pytest.raises(InvalidArgument, match="unknown z"):
        run_graph([Node("x", "length", {"s": "a"}, depends_on=("z",))], Toolbox([length]))


def test_model_filled_nodes_are_retried_with_the_error_in_view():
    def div(a: int, b: int) -> float:
        """a / b."""
        return a / b

    tries = []

    def fill(node, outputs):  # a stand-in for the actor: wrong first, corrected after seeing the error
        tries.append([a["error"] for a in node.attempts])
        return {"a": 1, "b": 0} if not node.attempts else {"a": 1, "b": 2}

    g = run_graph([Node("q", "div", task="halve one")], Toolbox([div]), fill=fill, max_retries=2)
    assert g.ok and g.outputs()["q"] == 0.5
    assert tries[0] == [] and "ZeroDivisionError" in tries[1][0]
    assert [a["ok"] for a in g.nodes["q"].attempts] == [False, True]
    assert [e["event"] for e in g.log].count("retry") == 1


def test_the_live_log_comes_in_time_order_while_the_model_fills_another_node():
    def sleep(ms: int) -> int:
        """Sleep ms milliseconds."""
        time.sleep(ms / 1000)
        return ms

    def fill(node, outputs):  # a slow model step: the running tool ends while it writes arguments
        time.sleep(0.3)
        return {"ms": 1}

    live = []
    g = run_graph([Node("quick", "sleep", {"ms": 20}), Node("slow", "sleep", task="wait a bit")],
                  Toolbox([sleep]), fill=fill, on_event=live.append)
    assert g.ok and live == g.log
    times = [e["t"] for e in live]
    assert times == sorted(times), [(e["node"], e["event"], e["t"]) for e in live]


# -- MCP ----------------------------------------------------------------------------------------------------

MCP_TOOLS = '''
from ondevice.agent import tool

@tool(read_only=True)
def word_count(text: str) -> dict:
    """Count the words in a text."""
    return {"words": len(text.split())}

@tool(sensitive=True)
def shutdown(minutes: int) -> str:
    """Shut the machine down."""
    raise SystemExit("must never run in a test")
'''


def test_agent_cli_without_tools_says_what_to_give(cli):
    r = cli("agent", "do something")
    assert r.returncode == 2 and "no tools; give --tools FILE.py" in r.stderr


def test_a_tools_file_that_fails_to_import_is_one_line(cli, tmp_path):
    (tmp_path / "broken.py").write_text("x = 1\ndef broken(:\n    pass\n")
    (tmp_path / "boom.py").write_text("import os\nraise RuntimeError('kaboom')\n")
    (tmp_path / "ok.py").write_text(MCP_TOOLS)
    for name, want in (("broken.py", f"{tmp_path / 'broken.py'}, line 2: "),
                       ("boom.py", f"raised RuntimeError: kaboom ({tmp_path / 'boom.py'}, line 2)")):
        r = cli("agent", "hi", "--tools", str(tmp_path / name))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("agent", "hi", "--tools", str(tmp_path / "ok.py"), "--retrieve", "-1")
    assert r.returncode == 2 and "--retrieve -1: K must be >= 0" in r.stderr, r.stderr


def test_mcp_round_trip_through_a_real_stdio_server(tmp_path):
    pytest.importorskip("mcp")
    from ondevice.agent.mcptools import MCPClient

    f = tmp_path / "mytools.py"
    f.write_text(MCP_TOOLS)
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "ONDEVICE_SUPERVISED": ""}
    # the user's way in: `ondevice agent --serve-mcp` (run under the crash supervisor, stdio passed through)
    with MCPClient(sys.executable, ["-m", "ondevice.cli", "agent", "--serve-mcp", "--tools", str(f)], env=env) as c:
        tools = {t.name: t for t in c.tools()}
        assert set(tools) == {"word_count", "shutdown"}
        assert tools["word_count"].parameters["required"] == ["text"] and tools["word_count"].source.startswith("mcp:")
        assert tools["shutdown"].sensitive and not tools["word_count"].sensitive  # from the server's annotations
        assert tools["word_count"].read_only and not tools["shutdown"].read_only  # readOnlyHint, both ways
        box = Toolbox(tools.values())
        r = box.call("word_count", {"text": "one two three"})
        assert r.ok and r.value == {"words": 3}
        assert box.call("word_count", {"txt": "x"}).kind == "invalid"  # caught before the request is sent
        assert box.call("shutdown", {"minutes": 1}).kind == "unconfirmed"  # refused on this side
        # confirmed here, the server still refuses: it has no one to ask over stdio
        r = box.call("shutdown", {"minutes": 1}, confirm=lambda t, a: True)
        # the server's words once, not nested ("error (failed): shutdown failed: RuntimeError: error (unconfirmed): ...")
        assert not r.ok and r.message() == (
            "error (failed): shutdown is sensitive and was not confirmed; it did not run (this MCP server, `ondevice "
            "agent --serve-mcp`, has no one to ask: start it with --yes to let its sensitive tools run)")
        with pytest.raises(ToolError, match=r"^word_count: invalid arguments: text: Input should be a valid string$"):
            c.call("word_count", {"text": 3})  # the server validates too


def test_an_mcp_server_that_never_answers_is_an_error_and_is_not_left_running():
    pytest.importorskip("mcp")
    import psutil

    from ondevice.agent.mcptools import MCPClient
    from ondevice.errors import OndeviceError

    silent = MCPClient(sys.executable, ["-c", "import time; time.sleep(600)"], timeout=2)
    with pytest.raises(OndeviceError, match=r"could not start the MCP server .*no answer in 2 s"):
        silent.start()
    left = [p for p in psutil.Process().children(recursive=True) if "time.sleep(600)" in " ".join(p.cmdline())]
    assert not left, left


def test_mcp_timeout_is_a_flag(cli):
    pytest.importorskip("mcp")
    silent = f"{sys.executable} -c 'import time; time.sleep(600)'"
    r = cli("agent", "hi", "--mcp", silent, "--mcp-timeout", "2")
    assert r.returncode == 2 and "no answer in 2 s" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("agent", "hi", "--mcp", silent, "--mcp-timeout", "0")
    assert r.returncode == 2 and "--mcp-timeout 0.0: give seconds > 0" in r.stderr, r.stderr


def test_a_third_party_mcp_server_with_dotted_names_and_the_env_it_is_given(tmp_path, monkeypatch):
    pytest.importorskip("mcp")
    from ondevice.agent.mcptools import MCPClient

    srv = tmp_path / "srv.py"
    srv.write_text(textwrap.dedent("""
        import os
        from mcp.server.mcpserver import MCPServer

        app = MCPServer("third-party")

        @app.tool(name="weather.get-v2")
        def weather(city: str) -> str:
            \"\"\"Current weather in a city.\"\"\"
            return f"Sunny in {city}; token {os.environ.get('MY_TOKEN')}"

        @app.tool(name="weather_get-v2")
        def clash(city: str) -> str:
            \"\"\"A second tool whose safe name would clash.\"\"\"
            return "second"

        app.run()
    """))
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "MY_TOKEN": "abc"}
    with MCPClient(sys.executable, [str(srv)], env=env) as c:
        assert all(t.sensitive for t in c.tools())  # no annotations: the spec's default, possibly destructive
        box = Toolbox(c.tools(sensitive=False))
        assert sorted(t.name for t in box) == ["weather_get-v2", "weather_get-v2_2"]
        r = box.call("weather_get-v2", {"city": "Oslo"})  # called under the server's own name
        assert r.ok and r.value == {"result": "Sunny in Oslo; token abc"}, r  # the SDK wraps a str result
        assert box.call("weather_get-v2_2", {"city": "Oslo"}).value == {"result": "second"}


def test_every_page_of_an_mcp_servers_tools_is_read(tmp_path):
    """A server that lists its tools two a page (nextCursor): only the first page was read. A picture it returns
    was a successful empty string."""
    pytest.importorskip("mcp")
    from ondevice.agent.mcptools import MCPClient

    srv = tmp_path / "pager.py"
    srv.write_text(textwrap.dedent("""
        import anyio, mcp
        from mcp.server.lowlevel import Server
        from mcp.server.stdio import stdio_server

        types = mcp.types
        ALL = [types.Tool(name=f"tool_{i}", description=f"Tool {i}", input_schema={"type": "object"})
               for i in range(5)]

        async def list_tools(ctx, params):
            at = int(params.cursor) if params and params.cursor else 0
            return types.ListToolsResult(tools=ALL[at:at + 2], next_cursor=str(at + 2) if at + 2 < len(ALL) else None)

        async def call_tool(ctx, params):
            if params.name == "tool_1":  # a picture: a text model is told what it got, not an empty success
                return types.CallToolResult(content=[types.ImageContent(data="iVBORw0KGgo=", mime_type="image/png")])
            return types.CallToolResult(content=[types.TextContent(text=f"ran {params.name}")])

        async def main():
            async with stdio_server() as (r, w):
                server = Server("pager", on_list_tools=list_tools, on_call_tool=call_tool)
                await server.run(r, w, server.create_initialization_options())

        anyio.run(main)
    """))
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with MCPClient(sys.executable, [str(srv)], env=env) as c:
        box = Toolbox(c.tools(sensitive=False))
        assert sorted(t.name for t in box) == [f"tool_{i}" for i in range(5)]
        assert box.call("tool_4", {}).ok
        pic = box.call("tool_1", {})
        assert pic.ok and pic.value == "[image (image/png, 8 bytes): not shown, this model reads text only]", pic
        with MCPClient(sys.executable, [str(srv)], env=env) as other:  # a second server, the same tool names
            box2 = Toolbox([*box, *other.tools(sensitive=False, taken=[t.name for t in box])])
            assert {t.name for t in box2} >= {"tool_0", "tool_0_2"}  # numbered, as within one server; not refused
            assert box2.call("tool_4_2", {}).value == "ran tool_4"  # called under its own name on its server


def test_tools_that_exit_are_async_or_return_the_wrong_type_are_results_not_crashes():
    import asyncio

    def quitter() -> int:
        """Exit the process."""
        sys.exit(4)

    async def double(x: int) -> int:
        """Twice x, computed asynchronously."""
        await asyncio.sleep(0)
        return 2 * x

    def liar() -> dict:
        """Claims a dict."""
        return None

    def strict(x: int) -> int:
        """Checks its own data with pydantic."""
        import pydantic
        return pydantic.TypeAdapter(int).validate_python("not a number")

    box = Toolbox([quitter, double, liar, strict])
    r = box.call("quitter", {})
    assert not r.ok and r.kind == "failed" and "SystemExit: 4" in r.error
    assert box.call("double", {"x": 2}).value == 4

    async def inside_a_loop():  # called from a thread that runs an event loop itself
        return box.call("double", {"x": 5}).value

    assert asyncio.run(inside_a_loop()) == 10
    r = box.call("liar", {})
    assert not r.ok and r.kind == "failed" and "not what its return annotation says: the value: " in r.error
    assert "(arguments)" not in r.error  # the value is wrong, not the arguments
    r = box.call("strict", {"x": 1})  # a pydantic error inside the tool is its own failure
    assert not r.ok and r.kind == "failed" and r.error.startswith("strict failed: ValidationError: "), r.error


# -- retrieval -------------------------------------------------------------------------------------------

def test_lexical_retrieval_finds_the_tool():
    idx = ToolIndex(list(fcsuite.catalog().values()))
    names = [t.name for t in idx.search("Set the thermostat to 21 degrees", 5)]
    assert names[0] == "set_thermostat"
    assert "track_package" in [t.name for t in idx.search("Where is my parcel 1Z999?", 5)]


# -- the real model ---------------------------------------------------------------------------------------

def test_model_embeddings_for_retrieval(smol_path):
    emb = Embedder(smol_path, n_threads=1)
    try:
        v = emb(["set an alarm", "set an alarm", "weather in Oslo"])
        assert v.shape[0] == 3 and abs(float(v[0] @ v[0]) - 1) < 1e-4 and abs(float(v[0] @ v[1]) - 1) < 1e-4
        tools = [fcsuite.catalog()[n] for n in ("set_alarm", "get_weather", "send_sms", "play_music", "calculate",
                                                "lock_door", "navigate", "take_photo")]
        idx = ToolIndex(tools, emb)
        assert idx.mode == "hybrid" and len(idx.search("Set an alarm for 06:45", 3)) == 3
        assert idx.search("Wake me up with an alarm at 06:45", 1)[0].name == "set_alarm"
    finally:
        emb.close()


def test_constrained_call_with_the_small_model_parses_and_validates(smol):
    t = Tool.from_function(book_table)
    turn = call_turn(smol, [{"role": "user", "content": "Book a table for 4 at Luigi's at 20:00."}], [t],
                     constrained=True, max_tokens=120)
    assert turn.calls and turn.calls[0].name == "book_table", turn.text
    t.validate(turn.calls[0].arguments)  # raises if the grammar let anything invalid through
    r = fcsuite.run_item(smol, fcsuite.items()[0], constrained=True)
    assert r["parsed"] == r["valid"] == 1.0, r


def test_agent_plans_and_acts_with_the_small_model(smol):
    log = []

    def get_weather(city: str) -> dict:
        """Current weather in a city."""
        return {"city": city, "temp_c": 18}

    agent = Agent(Toolbox([get_weather]), actor=smol, on_event=log.append)
    run = agent.run("What's the weather in Oslo?")
    d = run.to_dict()
    assert d["turns"][0]["step"] == "plan" and json.loads(d["turns"][0]["text"])["subtasks"]
    assert all(n["tool"] == "get_weather" for n in d["nodes"])  # the plan's grammar allows only real tools
    assert run.ok, d
    assert {e["event"] for e in log} >= {"filled", "start", "end"} and all("t" in e for e in log)


def test_after_its_calls_the_agent_answers_from_their_results(smol):
    """As after an OpenAI or Ollama tool loop, the request gets a reply in words: the model is shown its calls
    as ``tool_calls`` and each result (or error) as a ``tool`` message, and what it writes is the answer."""
    def get_weather(city: str) -> dict:
        """Current weather in a city."""
        return {"city": city, "temp_c": 18, "sky": "light rain"}

    model = Recording(smol)
    for plan in (True, False):  # without a plan SmolLM2 may answer at once, with no call: then that is the answer
        run = Agent(Toolbox([get_weather]), actor=model).run("What's the weather in Oslo?", plan=plan)
        if not plan and not run.nodes:
            assert run.answer and run.turns[-1]["step"] == "call:1", run.to_dict()
            continue
        assert run.ok and run.nodes and run.nodes[0].status == "done", run.to_dict()
        asked = model.asked[-1]
        assert asked[1] == {"role": "user", "content": "What's the weather in Oslo?"}
        call = asked[2]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and call["arguments"] == run.nodes[0].attempts[-1]["args"]
        assert asked[3]["role"] == "tool" and json.loads(asked[3]["content"]) == run.nodes[0].output
        assert run.turns[-1]["step"] == "answer" and run.answer == run.turns[-1]["text"]
        assert run.answer and not run.answer.startswith(("{", "[", "<")), run.answer
        assert run.to_dict()["answer"] == run.answer
    quiet = Agent(Toolbox([get_weather]), actor=smol, answer_tokens=0).run("What's the weather in Oslo?")
    assert quiet.ok and quiet.answer is None and quiet.turns[-1]["step"] != "answer"


def test_agent_cli_prints_the_answer_alone_on_stdout(cli, tmp_path):
    (tmp_path / "weather.py").write_text(textwrap.dedent('''
        from ondevice.agent import tool

        @tool
        def get_weather(city: str) -> dict:
            """Current weather in a city."""
            return {"city": city, "temp_c": 18}
    '''))
    r = cli("agent", "What's the weather in Oslo?", "--tools", str(tmp_path / "weather.py"))
    assert r.returncode == 0, r.stderr
    assert '-> done: {"city": "Oslo", "temp_c": 18}' in r.stderr and "-> done" not in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.strip() and not r.stdout.lstrip().startswith(("{", "[", "<")), r.stdout
    # a tool's str result is printed as it is, not JSON-quoted (as the model and --serve-mcp get it)
    (tmp_path / "weather.py").write_text((tmp_path / "weather.py").read_text().replace(
        '-> dict', '-> str').replace('return {"city": city, "temp_c": 18}', 'return f"{city}: 18 C"'))
    r = cli("agent", "What's the weather in Oslo?", "--tools", str(tmp_path / "weather.py"), "--no-answer")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == 's1 get_weather({"city": "Oslo"}) -> done: Oslo: 18 C', r


def test_a_failed_call_is_shown_to_the_answer_as_an_error(smol):
    def get_weather(city: str) -> dict:
        """Current weather in a city."""
        raise RuntimeError("the weather service is down")

    def get_time(city: str) -> str:
        """The local time in a city."""
        return "14:05"

    model = Recording(smol)
    nodes = [Node("s1", "get_weather", {"city": "Oslo"}), Node("s2", "get_time", {"city": "Oslo"})]
    g = run_graph(nodes, Toolbox([get_weather, get_time]), max_retries=0)
    agent = Agent(Toolbox([get_weather, get_time]), actor=model)
    text = agent.answer("Weather and time in Oslo?", list(g.nodes.values()))
    results = {m["tool_call_id"]: m["content"] for m in model.asked[-1] if m["role"] == "tool"}
    # a str result as its text, as LangGraph's ToolNode and the OpenAI Agents SDK send it (not '"14:05"')
    assert results["call_s2"] == "14:05" and "the weather service is down" in results["call_s1"]
    assert text
    nodes = [Node("s1", "get_weather", {"city": "Oslo"})]
    g = run_graph(nodes, Toolbox([get_weather]), max_retries=0)
    assert agent.answer("Weather in Oslo?", list(g.nodes.values())) is None  # nothing to answer from


def test_plans_become_graph_nodes_and_sops_load(tmp_path):
    from ondevice.agent.agent import SOP, plan_nodes, plan_schema, sop_prompt

    nodes = plan_nodes({"subtasks": [{"id": 1, "task": "a", "tool": "x", "depends_on": []},
                                     {"id": 2, "task": "b", "tool": "y", "depends_on": [1, 1, 2, 3]}]})
    assert [(n.id, n.depends_on) for n in nodes] == [("s1", ()), ("s2", ("s1",))]  # self and later ids dropped
    # a repeated id (a small model's; it aborted the run as a usage error): the same subtask once, another renumbered
    twice = plan_nodes({"subtasks": [{"id": 1, "task": "a", "tool": "x"}, {"id": 1, "task": "a", "tool": "x"},
                                     {"id": 1, "task": "b", "tool": "x", "depends_on": [1]}]})
    assert [(n.id, n.task, n.depends_on) for n in twice] == [("s1", "a", ()), ("s2", "b", ("s1",))]
    assert plan_schema(["x", "y"])["properties"]["subtasks"]["items"]["properties"]["tool"] == {"enum": ["x", "y"]}
    f = tmp_path / "banking.txt"
    f.write_text("Always check the balance before a transfer.\n")
    assert sop_prompt([SOP.load(f)]) == "Procedure 'banking':\nAlways check the balance before a transfer."
    with pytest.raises(InvalidArgument, match="no SOP file"):
        SOP.load(tmp_path / "missing.txt")


def test_direct_retries_count_attempts_on_one_clock(monkeypatch):
    """Without a plan, a failed call is written again by the actor: the corrected call is the tool's attempt 2
    (its first try kept beside it) and every event's time counts from the request's start."""
    import ondevice.agent.agent as agent_mod
    from ondevice.agent import Agent, Toolbox
    from ondevice.agent.calls import Turn
    from ondevice.engine.toolcalls import Call

    def div(a: int, b: int) -> float:
        """a / b."""
        return a / b

    script = iter([{"a": 1, "b": 0}, {"a": 1, "b": 2}])  # a stand-in for the actor: wrong, then corrected

    def turn(*args, **kw):
        time.sleep(0.05)
        return Turn(text="", calls=[Call("div", next(script))], constrained=True)

    monkeypatch.setattr(agent_mod, "call_turn", turn)
    events = []
    run = Agent(Toolbox([div]), actor=object(), on_event=events.append, answer_tokens=0).run("halve one", plan=False)
    assert run.ok and [a["ok"] for a in run.nodes[0].attempts] == [False, True]
    starts = [e for e in events if e["event"] == "start"]
    assert [e["attempt"] for e in starts] == [1, 2] and starts[1]["t"] > starts[0]["t"] + 0.04


def test_async_tools_keep_their_loop_bound_state_between_calls():
    """Each call of an async tool ran on a new event loop: a client or a worker task it kept from its first call
    (an httpx.AsyncClient, a queue) failed on every later call ("Event loop is closed", or a hang)."""
    import asyncio

    state: dict = {}

    async def fetch(n: int) -> str:
        """Ask the worker for an answer."""
        if "queue" not in state:  # made on the first call, as a module-level client or pool is
            state["queue"] = asyncio.Queue()

            async def worker():
                while True:
                    k, fut = await state["queue"].get()
                    fut.set_result(f"answer {k}")

            state["worker"] = asyncio.get_running_loop().create_task(worker())
        fut = asyncio.get_running_loop().create_future()
        await state["queue"].put((n, fut))
        return await asyncio.wait_for(fut, 5)

    box = Toolbox([fetch])
    assert [box.call("fetch", {"n": n}).value for n in (1, 2, 3)] == ["answer 1", "answer 2", "answer 3"]
