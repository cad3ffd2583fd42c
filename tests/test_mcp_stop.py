"""``ondevice agent`` with MCP servers, found by an audit (s46): a SIGTERM or SIGHUP during an MCP call left the
server running with parent 1; one Ctrl-C waited for the tool (up to --mcp-timeout); a tool with a broken input
schema was offered, chosen, then "retried" on the same error; a server that died mid-call was called again on the
dead connection. Real components: the CLI in a subprocess under its supervisor (as a user starts it), the
embedded SmolLM2, real MCP servers on the official ``mcp`` SDK, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("mcp")
pytest.importorskip("pydantic")

from conftest import as_a_shell_starts_it

SERVER = textwrap.dedent('''
    import os, sys, time
    import anyio
    import mcp.types as types
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    MODE = os.environ["MODE"]
    with open(os.environ["PIDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    OK = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    TOOLS = [("lookup", OK)]
    if MODE == "mixed":
        TOOLS += [("broken.v2", {"type": "object", "properties": {"x": {"type": "strng"}}}),
                  ("refy", {"type": "object", "properties": {"x": {"$ref": "#/$defs/Nope"}}})]

    async def list_tools(ctx, params):
        return types.ListToolsResult(tools=[types.Tool(
            name=n, description="Look up a fact in the database", input_schema=s,
            annotations=types.ToolAnnotations(read_only_hint=True)) for n, s in TOOLS])

    async def call_tool(ctx, params):
        if MODE == "slow":
            open(os.environ["STARTED"], "w").close()
            time.sleep(600)  # blocks the server, as a sync tool does: its stdin closing goes unnoticed
        if MODE == "crash":
            await anyio.sleep(0.5)  # long enough for a second call to be in flight too
            print("the database is on fire", file=sys.stderr, flush=True)
            os._exit(3)
        return types.CallToolResult(content=[types.TextContent(text="the fact")], is_error=False)

    async def main():
        async with stdio_server() as (r, w):
            await server.run(r, w, server.create_initialization_options())

    server = Server("facts", on_list_tools=list_tools, on_call_tool=call_tool)
    anyio.run(main)
''')

SLOW_TOOL = textwrap.dedent('''
    import os, time
    from ondevice.agent import tool

    @tool
    def lookup(query: str) -> str:
        """Look up a fact in the database."""
        open(os.environ["STARTED"], "w").close()
        time.sleep(600)
        return "the fact"
''')

REQUEST = "Look up the capital of France in the database"


def _agent(tmp_path, mode: str, *flags: str, group: bool = False, **kw) -> tuple[subprocess.Popen, dict]:
    """``ondevice agent`` with the test server in ``mode`` (and ``flags``), started as a shell starts it; its
    Popen and paths (its stderr, the file the tool touches when its call starts, the servers' pids)."""
    (tmp_path / "srv.py").write_text(SERVER)
    paths = {"err": tmp_path / "agent.err", "started": tmp_path / "started", "pids": tmp_path / "pids"}
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), MODE=mode, PIDS=str(paths["pids"]),
               STARTED=str(paths["started"]))
    env.pop("ONDEVICE_SUPERVISED", None)
    mcp = ("--mcp", f"{sys.executable} {tmp_path / 'srv.py'}", "--mcp-env", "MODE", "--mcp-env", "PIDS",
           "--mcp-env", "STARTED") if mode else ()
    with open(paths["err"], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "agent", REQUEST, *mcp, *flags, "-t", "1",
                                 "--no-answer", "--mcp-timeout", "300"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True, start_new_session=group,
                                preexec_fn=as_a_shell_starts_it, **kw)  # noqa: PLW1509 — no thread yet
    return proc, paths


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_started(proc: subprocess.Popen, paths: dict) -> None:
    deadline = time.monotonic() + 240
    while not paths["started"].exists():
        assert proc.poll() is None and time.monotonic() < deadline, paths["err"].read_text()
        time.sleep(0.1)
    time.sleep(0.5)  # well inside the call


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                            (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["SIGTERM-pid", "SIGHUP-pid", "SIGTERM-group", "SIGINT-group"])
def test_a_stop_signal_during_an_mcp_call_ends_the_server_and_exits_at_once(tmp_path, sig, group):
    """To the agent's pid (what a process manager sends; the supervisor forwards it) or to its whole group (what
    ``timeout`` and a terminal's Ctrl-C send: the agent gets it twice, once forwarded): the agent exits within
    seconds, not after the 300 s the call could take, with 128 + the signal; its MCP server is gone, not left
    running with parent 1."""
    proc, paths = _agent(tmp_path, "slow", group=group)
    try:
        _wait_started(proc, paths)
        [server] = [int(p) for p in paths["pids"].read_text().split()]
        assert _alive(server)
        t0 = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, sig)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = paths["err"].read_text()
        assert not _alive(server), f"the MCP server {server} outlived the agent: {err}"
        assert rc == 128 + sig and took < 10, (rc, took, err)
        said = "interrupted (Ctrl-C)" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
        assert f"ondevice agent: {said}; the call to lookup was cancelled and its MCP server ended" in err, err
        assert " stopped   s1 lookup " in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
        for pid in (paths["pids"].read_text().split() if paths["pids"].exists() else []):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def test_a_sigterm_before_any_call_ends_the_servers_too(tmp_path):
    """No call in flight (the model still loading or planning): the servers are ended all the same."""
    proc, paths = _agent(tmp_path, "slow")
    try:
        deadline = time.monotonic() + 120
        while not paths["pids"].exists() or not paths["pids"].read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, paths["err"].read_text()
            time.sleep(0.05)
        [server] = [int(p) for p in paths["pids"].read_text().split()]
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = paths["err"].read_text()
        assert rc == 143 and not _alive(server) and not paths["started"].exists(), (rc, err)
        assert "ondevice agent: stopped by SIGTERM; its MCP servers were ended" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's; elsewhere a "
                    "killed agent still leaves a server busy in a call running")
def test_an_agent_killed_outright_during_an_mcp_call_takes_its_server_with_it(tmp_path):
    """SIGKILL (what the out-of-memory killer sends) runs no ``finally``: the server, busy in a call and deaf to its
    stdin closing, was left running with parent 1. The agent is the server's parent (the supervisor's child, the
    process that holds the model: the one the OOM killer picks)."""
    proc, paths = _agent(tmp_path, "slow")
    try:
        _wait_started(proc, paths)
        [server] = [int(p) for p in paths["pids"].read_text().split()]
        agent = _parent(server)
        with open(f"/proc/{agent}/cmdline") as f:
            assert "ondevice.cli\0agent" in f.read() and agent != proc.pid  # the agent, under its supervisor
        with open(f"/proc/{server}/cmdline") as f:  # the server itself, under its own pid (the launcher exec'd it)
            assert f.read().split("\0")[1] == str(tmp_path / "srv.py")
        os.kill(agent, signal.SIGKILL)
        rc = proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = paths["err"].read_text()
        assert not _alive(server), f"the MCP server {server} outlived the agent killed outright: {err}"
        assert rc == 137 and "ondevice agent: error: killed (SIGKILL)" in err, (rc, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in (paths["pids"].read_text().split() if paths["pids"].exists() else []):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def test_one_ctrl_c_during_a_python_tool_exits_without_waiting_for_it(tmp_path):
    """A Python tool's thread cannot be stopped: the agent says so and exits (130) instead of waiting the
    600 s the tool sleeps."""
    (tmp_path / "tools.py").write_text(SLOW_TOOL)
    proc, paths = _agent(tmp_path, "", "--tools", str(tmp_path / "tools.py"), group=True)
    try:
        _wait_started(proc, paths)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
        err = paths["err"].read_text()
        assert rc == 130 and time.monotonic() - t0 < 10, (rc, err)
        assert "ondevice agent: interrupted (Ctrl-C); lookup (a Python tool) was still running: Python cannot stop " \
               "a thread, so the call was abandoned as the agent exited" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _finished(proc, paths) -> tuple[str, str]:
    """The agent's stdout and stderr once it exits (killed after 300 s)."""
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, paths["err"].read_text()


def test_mcp_tools_with_unusable_schemas_are_left_out_with_a_warning_and_the_rest_serve(tmp_path):
    proc, paths = _agent(tmp_path, "mixed", "--json")
    out, err = _finished(proc, paths)
    assert "ondevice agent: warning: the MCP server srv.py: tool broken.v2 left out: its input schema cannot be " \
           "used (parameters.properties.x.type \"strng\" is not a JSON schema type; " in err, err
    assert "ondevice agent: warning: the MCP server srv.py: tool refy left out: its input schema cannot be used " \
           "(parameters.properties.x.$ref \"#/$defs/Nope\" names no definition in the schema; add it under $defs); " \
           "fix it in the server" in err, err
    assert err.count("warning:") == 2, err
    rec = json.loads(out)  # the plan offered lookup alone, and its call ran (SmolLM2 may plan a second one)
    assert {n["tool"] for n in rec["nodes"]} == {"lookup"}, rec
    assert ("done", "the fact") in [(n["status"], n["output"]) for n in rec["nodes"]], rec


def test_an_mcp_server_that_exits_during_a_call_is_said_so_and_not_called_again(tmp_path):
    proc, paths = _agent(tmp_path, "crash", "--json")
    out, err = _finished(proc, paths)
    nodes = json.loads(out)["nodes"]  # SmolLM2 may plan the lookup twice, and write an invalid call first
    kinds = [[a["kind"] for a in n["attempts"]] for n in nodes]
    assert proc.returncode == 1 and any("gone" in k for k in kinds), (kinds, err)
    for node, k in zip(nodes, kinds):  # nothing is tried after the server is gone
        if "gone" in k:
            assert k.index("gone") == len(k) - 1 and node["status"] == "failed", (node, err)
            assert node["error"].startswith("the MCP server srv.py exited (status 3) during lookup (its own "
                                            "messages, if any, are above on stderr); it is not called again") or \
                node["error"].endswith("before lookup was sent (its own messages, if any, are above on stderr); "
                                       "lookup did not run"), node
    assert err.count("the database is on fire") == 1 and len(paths["pids"].read_text().split()) == 1, err


def test_calls_in_flight_when_the_server_exits_end_at_once_and_later_ones_do_not_run(tmp_path):
    """Two calls in flight when the server exits: both end at once (one was left waiting out --mcp-timeout, the
    SDK's send to a dead server never returning), saying so; a call after that is not sent at all."""
    from concurrent.futures import ThreadPoolExecutor

    from ondevice.agent import Toolbox
    from ondevice.agent.mcptools import MCPClient

    (tmp_path / "srv.py").write_text(SERVER)
    env = {"MODE": "crash", "PIDS": str(tmp_path / "pids"), "STARTED": str(tmp_path / "started")}
    client = MCPClient(sys.executable, [str(tmp_path / "srv.py")], env=env, timeout=300)
    client.start()
    try:
        box = Toolbox(client.tools())
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda q: box.call("lookup", {"query": q}), ["Oslo", "Lima"]))
        assert time.monotonic() - t0 < 10, results
        for r in results:
            assert not r.ok and r.kind == "gone" and r.error.startswith(
                "the MCP server srv.py exited (status 3) during lookup (its own messages, if any, are above on "
                "stderr); it is not called again: lookup may have done part of its work"), r
        later = box.call("lookup", {"query": "Rome"})
        assert later.kind == "gone" and later.error == "the MCP server srv.py exited (status 3) before lookup was " \
            "sent (its own messages, if any, are above on stderr); lookup did not run", later
    finally:
        client.close()
    [pid] = (tmp_path / "pids").read_text().split()
    assert not _alive(int(pid))


def test_a_tool_whose_schema_no_grammar_takes_is_not_retried(smol):
    """The fill step fails on the tool's own schema: the same error on every try, so one try, kind ``schema``."""
    from ondevice.agent import Agent, Tool, Toolbox

    bad = Tool(name="lookup", description="Look up a fact in the database", fn=lambda **kw: "the fact",
               parameters={"type": "object", "properties": {"query": {"type": "strng"}}})
    events: list[dict] = []
    run = Agent(Toolbox([bad]), actor=smol, answer_tokens=0, max_retries=2, on_event=events.append).run(REQUEST)
    assert run.nodes and not run.ok
    for node in run.nodes:  # SmolLM2 may plan the lookup more than once
        assert node.status == "failed" and [a["kind"] for a in node.attempts] == ["schema"], node.attempts
        assert "parameters.properties.query.type \"strng\" is not a JSON schema type" in node.error and \
            node.error.endswith("the tool cannot be called until its schema is fixed"), node.error
    assert not [e for e in events if e["event"] == "retry"], events
