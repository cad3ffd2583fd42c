"""Model Context Protocol over stdio, through the official ``mcp`` package (2.x): tools from MCP servers,
and a toolbox served as an MCP server (``ondevice agent --serve-mcp``).

The client keeps one session open on an event loop in a background thread (the MCP SDK is asyncio) and
wraps each server tool as a :class:`~ondevice.agent.tools.Tool` whose code is "call this tool on that
server": it is known by its JSON schema and validated against it before the request leaves. A server
tool that may be destructive is ``sensitive`` (needs confirmation) unless told otherwise: one whose annotations
say so, and one without annotations (the MCP spec's defaults: readOnlyHint false, destructiveHint true).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, OndeviceError
from .calls import schema_problem
from .tools import Confirm, Tool, Toolbox, ToolError, result_text


def _mcp():
    try:
        import mcp
    except ModuleNotFoundError:
        raise OndeviceError("MCP needs the mcp package; install the agent extra: pip install 'ondevice[agent]'") \
            from None
    return mcp


def tool_alias(name: str, taken: set[str]) -> str:
    """A name OpenAI's function calling takes (1-64 of ``A-Za-z0-9_-``) for an MCP tool's name (up to 128
    characters, ``.`` allowed): other characters become ``_``; a clash gets a number. Calls still go out
    under the server's own name."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "tool"
    alias, n = base, 1
    while alias in taken:
        n += 1
        alias = f"{base[:60]}_{n}"
    return alias


WHERE = " (its own messages, if any, are above on stderr)"  # where to look when an MCP server ended

_LAUNCHERS = re.compile(r"^(python[0-9.]*|pypy[0-9.]*|node(js)?|npx|bunx?|deno|uvx?|pipx|sh|bash|ruby|perl|php|java)$")


def server_name(command: str, args: Sequence[str]) -> str:
    """What a server is called in messages: its script or package, not the interpreter that runs it
    (``python srv.py`` is ``srv.py``, ``npx -y @scope/server-x`` is ``server-x``); else the command's name."""
    cmd = command.rsplit("/", 1)[-1]
    if not _LAUNCHERS.match(cmd):
        return cmd
    for i, a in enumerate(args):
        if a in ("-c", "-e", "--eval"):  # code on the command line: no script to name
            break
        if a.startswith("-") or (a == "run" and i == 0):  # an option, or `uv run` / `deno run`
            continue
        return a.rstrip("/").rsplit("/", 1)[-1] or cmd
    return cmd


def dies_with_agent(command: str, args: Sequence[str], env: dict[str, str] | None) -> tuple[str, list[str]]:
    """The command and arguments that start an MCP server so that it ends with this process even when this one is
    killed outright (SIGKILL, the out-of-memory killer): on Linux, through ``with_parent.py`` (the parent-death
    signal, set between fork and exec). Elsewhere, and for a command not found (the SDK says so, as before), as
    they are: a killed agent there leaves a server busy in a call running."""
    if not sys.platform.startswith("linux") or not sys.executable:
        return command, list(args)
    from mcp.client.stdio import get_default_environment

    if shutil.which(command, path=(get_default_environment() | (env or {})).get("PATH", os.defpath)) is None:
        return command, list(args)
    return sys.executable, ["-I", "-S", str(Path(__file__).with_name("with_parent.py")), str(os.getpid()), command,
                            *args]


def _process_of(transport) -> Any:
    """The server process of an entered ``stdio_client`` (the SDK keeps it in its generator; None if it moved):
    only read, for its exit status."""
    frame = getattr(getattr(transport, "gen", None), "ag_frame", None)
    return frame.f_locals.get("process") if frame is not None else None


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _OneLine(logging.Handler):
    """The MCP SDK's warnings as one line each on stderr, without the traceback it logs with them: a server that
    prints a banner on stdout would otherwise print pydantic's traceback for each of its lines."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        errors = getattr(exc, "errors", None)
        if record.getMessage().startswith("Failed to parse JSONRPC") and callable(errors) and errors():
            shown = repr(str(errors()[0].get("input", "")))
            line = (f"an MCP server wrote a line on stdout that is not an MCP message: {shown[:200]}; its own "
                    "output belongs on stderr")
        else:
            line = record.getMessage() + (f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                                          if exc is not None else "")
        print(f"ondevice: {line}", file=sys.stderr)


def _quiet_sdk_logs() -> None:
    """One line per SDK warning, unless the application has set up logging itself (then it is its choice)."""
    log = logging.getLogger("mcp")
    if log.handlers or logging.getLogger().handlers:
        return
    log.addHandler(_OneLine(logging.WARNING))
    log.propagate = False


async def _all_tools(session) -> list:
    """Every tool the server lists, page after page (``nextCursor``): a server may list a few per page."""
    tools, cursor, seen = [], None, set()
    while True:
        page = await session.list_tools(params=_mcp().types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor or cursor in seen:  # the last page (or a server that repeats a cursor: stop, not loop)
            return tools
        seen.add(cursor)


def _part_text(c) -> str:
    """A result part as text a text model can read: a text part's text; an image, audio or resource said as what it
    is (a text model cannot see it; an empty result read as success, and the model made up what it showed)."""
    kind = getattr(c, "type", "")
    if kind == "text":
        return c.text
    res = getattr(c, "resource", None)
    if res is not None and isinstance(getattr(res, "text", None), str):  # an embedded text resource: its text
        return res.text
    what = getattr(c, "mime_type", None) or getattr(res, "mime_type", None) or "unknown type"
    where = getattr(c, "uri", None) or getattr(res, "uri", None)
    data = getattr(c, "data", "") or getattr(res, "blob", "") or ""  # base64
    size = len(data) * 3 // 4 - data[-2:].count("=")
    return (f"[{kind or 'content'} ({what}{f', {where}' if where else ''}{f', {size:,} bytes' if size else ''}): "
            f"not shown, this model reads text only]")


class MCPClient:
    """A stdio MCP server process and an open session to it; ``tools()`` wraps its tools."""

    def __init__(self, command: str, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 name: str | None = None, timeout: float = 60.0):
        self.command, self.args, self.env = command, list(args), env
        self.name = name or server_name(command, self.args)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-{self.name}", daemon=True)
        self._stop: asyncio.Event | None = None
        self._session = None
        self._listed: list = []
        self._main: asyncio.Task | None = None  # the session's task, in the loop thread
        self._done = threading.Event()  # set when that task has ended (the server process with it)
        self._process = None  # the server process (the SDK's), when it can be found: its exit status
        self._calls: set = set()  # calls in flight (futures), cancelled by close() and when the server exits
        self._ended = False  # the server exited, or its connection closed: nothing more can run there

    def __enter__(self) -> MCPClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        mcp = _mcp()
        from mcp.client.stdio import stdio_client

        _quiet_sdk_logs()

        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            self._main = asyncio.current_task()
            try:
                command, args = dies_with_agent(self.command, self.args, self.env)
                params = mcp.StdioServerParameters(command=command, args=args, env=self.env)
                transport = stdio_client(params)
                async with transport as (read, write), mcp.ClientSession(read, write) as session:
                    self._process = _process_of(transport)
                    if self._process is not None:
                        asyncio.get_running_loop().create_task(self._watch())
                    await session.initialize()
                    self._listed = await _all_tools(session)
                    self._session = session
                    ready.set()
                    await self._stop.wait()
            except BaseException as e:  # reported to the caller of start(), never lost in the loop thread
                failure.append(e)
            finally:
                ready.set()
                self._done.set()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(main(), self._loop)
        ready.wait(self.timeout)
        if self._session is None:
            why = failure[0] if failure else TimeoutError(f"no answer in {self.timeout:.0f} s")
            while isinstance(why, BaseExceptionGroup) and why.exceptions:  # anyio's task groups wrap the cause
                why = why.exceptions[0]
            how = self._how_it_ended() if failure else None  # a server that exited at start-up: its status
            self.close()
            said = f"; it {how}{WHERE}" if how else ""
            raise OndeviceError(f"could not start the MCP server {self.command} {' '.join(self.args)} ({why}){said}; "
                                "check the command runs and speaks MCP on stdio") from None

    def call(self, name: str, arguments: dict) -> Any:
        """Call a server tool; its structured content (or text) — an error raises (fed back to the model)."""
        if self._ended or self._session is None:
            raise ToolError(self._gone(name, ran=False), "gone")
        fut = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, arguments), self._loop)
        self._calls.add(fut)
        if self._ended:  # it exited as this call was sent, after _watch cancelled the others
            fut.cancel()
        try:
            res = fut.result(self.timeout)
        except TimeoutError:
            fut.cancel()  # the request is cancelled on our side; the server is told by the SDK
            # not the model's mistake, and not retried: the server may go on running it (a sync tool is not
            # stopped by a cancel), so a second try could send, book or pay twice
            raise ToolError(f"the MCP server {self.name} did not answer {name} in {self.timeout:g} s (--mcp-timeout); "
                            "it may still be running there, so it is not called again", "timeout") from None
        except cf.CancelledError:  # the server exited (_watch), or close() while it ran: the agent is stopping
            if not self._ended:
                raise ToolError(f"{name} was cancelled: the MCP server {self.name} was stopped", "gone") from None
            raise ToolError(self._gone(name, ran=True), "gone") from None
        except Exception as e:
            if getattr(e, "code", None) != _mcp().types.CONNECTION_CLOSED:  # the connection closed under it
                raise
            self._ended = True  # no retry can reach a server that is gone
            raise ToolError(self._gone(name, ran=True), "gone") from None
        finally:
            self._calls.discard(fut)
        text = "\n".join(_part_text(c) for c in res.content)
        if res.is_error:  # the server's own words, once: "error (failed): " is added where the model reads it
            raise ToolError(text or f"{name} failed on the MCP server {self.name}", "failed")
        if res.structured_content is not None:
            return res.structured_content
        try:
            return json.loads(text)
        except (json.JSONDecodeError, ValueError):
            return text

    async def _watch(self) -> None:
        """In the loop: when the server process exits, the calls in flight end at once (the SDK can leave a call
        that was being sent then waiting for --mcp-timeout) and later ones do not start."""
        try:
            await self._process.wait()
        except Exception:  # noqa: BLE001 — no exit seen: the calls' own errors and timeouts still end them
            return
        self._ended = True
        for fut in list(self._calls):
            fut.cancel()

    def _how_it_ended(self) -> str | None:
        """How the server's process ended (``exited (status 3)``, ``was killed by SIGKILL``); None while it runs,
        or where there is no process to ask."""
        status = None
        for _ in range(20):  # the exit is seen a moment after the connection closed
            status = getattr(self._process, "returncode", None)
            if status is not None or self._process is None:
                break
            time.sleep(0.05)
        if status is None:
            return None
        return f"was killed by {_signame(-status)}" if status < 0 else f"exited (status {status})"

    def _gone(self, name: str, *, ran: bool) -> str:
        """What to say of a call to ``name`` on a server that exited (how, once the SDK has seen it end), or
        closed its connection: during the call (``ran``), or before it was sent."""
        how, where = self._how_it_ended() or "closed its connection", WHERE
        if ran:
            return (f"the MCP server {self.name} {how} during {name}{where}; it is not called again: {name} may have "
                    f"done part of its work, so check before running the agent again")
        return f"the MCP server {self.name} {how} before {name} was sent{where}; {name} did not run"

    def tools(self, *, sensitive: bool | Sequence[str] | None = None, taken: Sequence[str] = ()) -> list[Tool]:
        """The server's tools. ``sensitive``: True/False for all, a list of names, or None (annotations). ``taken``:
        names in use already (another server's tools): a tool of the same name here gets a number (MCP names are
        unique per server only; the call still goes out under its own name)."""
        out, taken = [], set(taken)
        for t in self._listed:
            ann = t.annotations
            read_only = bool(ann and ann.read_only_hint)
            if sensitive is None:  # the MCP spec's defaults: readOnlyHint false, destructiveHint true
                flag = not read_only and (ann is None or ann.destructive_hint is None or bool(ann.destructive_hint))
            elif isinstance(sensitive, bool):
                flag = sensitive
            else:
                flag = t.name in sensitive
            schema = dict(t.input_schema or {"type": "object", "properties": {}})
            schema.setdefault("type", "object")
            alias = tool_alias(t.name, taken)  # MCP allows names OpenAI's function calling does not
            try:
                tool_ = Tool(name=alias, description=t.description or "", parameters=schema,
                             fn=lambda _n=t.name, **kw: self.call(_n, kw), sensitive=flag, read_only=read_only,
                             output_schema=t.output_schema, source=f"mcp:{self.name}")
                bad = schema_problem(tool_)
            except InvalidArgument as e:  # a root that is not an object
                bad = str(e)
            if bad is not None:  # one bad tool of many: the others still serve; the server's author is told why
                warnings.warn(f"the MCP server {self.name}: tool {t.name} left out: its input schema cannot be used "
                              f"({bad.removeprefix(f'tool {alias!r}: ').removeprefix(f'tool {alias}: ')}); fix it "
                              "in the server", stacklevel=2)
                continue
            taken.add(alias)
            out.append(tool_)
        return out

    def close(self) -> None:
        """End the session and the server process: its stdin is closed and the MCP SDK waits 2 s for it to
        exit, then terminates it. A server that never answered (still starting) is not waited for."""
        for fut in list(self._calls):  # a call in flight: cancelled (the SDK tells the server), not waited for
            self._loop.call_soon_threadsafe(fut.cancel)
        if self._main is not None and self._loop.is_running():
            stop = self._stop.set if self._session is not None else self._main.cancel
            self._loop.call_soon_threadsafe(stop)
            if not self._done.wait(5):  # stuck past the SDK's own clean-up: cancel it, which ends the process
                self._loop.call_soon_threadsafe(self._main.cancel)
                self._done.wait(5)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive():
            self._thread.join(5)
        self._session = None


def serve_stdio(toolbox: Toolbox, *, name: str = "ondevice", confirm: Confirm | None = None) -> None:
    """Serve ``toolbox`` as an MCP server on stdin/stdout until the client hangs up.

    Calls go through :meth:`Toolbox.call` (validation, and confirmation: without ``confirm`` a sensitive
    tool refuses, since stdio belongs to the protocol and no one can be asked).
    """
    mcp = _mcp()
    import anyio
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    types = mcp.types

    async def list_tools(ctx, params) -> Any:
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=t.parameters, output_schema=_output(t),
                       # said for every tool: a client takes one without annotations as destructive (the spec)
                       annotations=types.ToolAnnotations(destructive_hint=t.sensitive, read_only_hint=t.read_only))
            for t in toolbox])

    async def call_tool(ctx, params) -> Any:
        r = await anyio.to_thread.run_sync(lambda: toolbox.call(params.name, params.arguments or {},
                                                                confirm=confirm))
        # a str as its text (multi-line output stays lines), anything else as JSON; is_error says it failed and
        # the client words it for its model
        text = result_text(r.value) if r.ok else r.error
        structured = None
        if r.ok:  # what the output schema listed says: an object, else {"result": value}
            wrap = (t := toolbox.tools.get(params.name)) is not None and _wrapped(t)
            structured = {"result": r.value} if wrap else r.value if isinstance(r.value, dict) else None
        return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=structured,
                                    is_error=not r.ok)

    from .. import __version__

    server = Server(name, version=__version__, on_list_tools=list_tools, on_call_tool=call_tool)

    async def main() -> None:
        async with stdio_server() as (read, write):
            # the SDK points fd 1 at stderr while it serves, but a tool's print() waits in sys.stdout's buffer and
            # reached the wire when it was flushed at exit: the tools' stdout is stderr while serving
            out, sys.stdout = sys.stdout, sys.stderr
            try:
                await server.run(read, write, server.create_initialization_options())
            finally:
                sys.stdout = out

    anyio.run(main)


def _wrapped(t: Tool) -> bool:
    """Whether ``t``'s result goes out as ``{"result": value}`` structured content: a declared return type that is
    not an object, wrapped as the MCP SDK's own server (FastMCP) wraps it."""
    return t.output_schema is not None and t.output_schema.get("type") != "object"


def _output(t: Tool) -> dict | None:
    """The output schema an MCP client is shown: an object type as it is, another type wrapped in ``result``."""
    if not _wrapped(t):
        return t.output_schema
    inner = {k: v for k, v in t.output_schema.items() if k != "$defs"}  # "#/$defs/..." refs are from the root
    defs = {"$defs": t.output_schema["$defs"]} if "$defs" in t.output_schema else {}
    return {"type": "object", "properties": {"result": inner}, "required": ["result"], **defs}


def main(argv: list[str] | None = None) -> int:
    """``python -m ondevice.agent.mcptools [--tools module:attr ...]``: serve ondevice's tools over stdio."""
    import argparse

    from .builtin import builtin_toolbox, load_tools

    p = argparse.ArgumentParser(prog="python -m ondevice.agent.mcptools")
    p.add_argument("--tools", action="append", default=[], help="module or file.py[:attr] with tools to serve")
    p.add_argument("--no-builtin", action="store_true", help="serve only --tools, not ondevice's own tools")
    a = p.parse_args(argv)
    box = Toolbox() if a.no_builtin else builtin_toolbox()
    for spec in a.tools:
        for t in load_tools(spec):
            box.add(t)
    serve_stdio(box)
    return 0


if __name__ == "__main__":
    sys.exit(main())
