"""``ondevice agent "REQUEST" --tools my_tools.py``: plan, call tools, report every step.

Tools come from Python files or modules (``--tools``), MCP servers over stdio (``--mcp "command args"``)
and ondevice's own (``--builtin``). ``--serve-mcp`` serves the loaded tools as an MCP server on stdio instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("request", nargs="?", help="what to do (or - to read it from stdin)")
    p.add_argument("--tools", action="append", default=[], metavar="FILE.py[:ATTR]",
                   help="tools from a Python file or module (its TOOLS list, an attribute, or every @tool)")
    p.add_argument("--mcp", action="append", default=[], metavar="'COMMAND ARGS'",
                   help="tools from an MCP server started with this command (stdio)")
    p.add_argument("--mcp-env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable to the MCP servers (repeatable; they get only HOME, "
                        "PATH, SHELL, TERM, USER and LOGNAME otherwise, as the MCP SDK does)")
    p.add_argument("--mcp-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long an MCP server may take to start and to answer one call (default 60)")
    p.add_argument("--builtin", action="store_true",
                   help="also offer ondevice's own tools (list_models, device_info, generate)")
    p.add_argument("-m", "--model", default=None, help="model for planning and acting (default: the embedded one)")
    p.add_argument("--planner-model", default=None, help="model that writes the plan (default: --model)")
    p.add_argument("--actor-model", default=None, help="model that writes each call (default: --model)")
    p.add_argument("--no-plan", action="store_true", help="one call turn (parallel calls allowed), no plan step")
    p.add_argument("--no-answer", action="store_true",
                   help="print the tools' results only: no final answer written from them by the model (and "
                        "no reply in words: exit 1 when the model called no tool)")
    p.add_argument("--retrieve", type=int, default=0, metavar="K",
                   help="offer only the K tools most relevant to the request (0: all)")
    p.add_argument("--retrieve-mode", default="lexical", choices=("lexical", "hybrid", "embedding"),
                   help="how --retrieve ranks tools: BM25 (the best measured with SmolLM2, see README), or with "
                        "the model's own embeddings")
    p.add_argument("--sop", action="append", default=[], metavar="FILE", help="a standard operating procedure "
                                                                            "(text added to the prompts)")
    p.add_argument("--yes", action="store_true", help="run sensitive tools without asking")
    p.add_argument("--sequential", action="store_true", help="run independent subtasks one by one")
    p.add_argument("--retries", type=int, default=2, help="corrected tries after a failed or invalid call")
    p.add_argument("--max-arg-chars", type=int, default=80, metavar="N",
                   help="the call grammar's bound on a free string argument (1-1000; default 80): every call ends, "
                        "and a value that reaches it was cut, so the call is refused, never run")
    p.add_argument("--max-arg-items", type=int, default=6, metavar="N",
                   help="the same bound on a list argument's items (1-64; default 6)")
    p.add_argument("--ctx", type=int, default=4096, help="context window of the models")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--log", default=None, metavar="FILE.jsonl", help="append the run (steps, timings) here")
    p.add_argument("--json", action="store_true", help="print the run as JSON")
    p.add_argument("--serve-mcp", action="store_true", help="serve the tools as an MCP server on stdio and exit")


def run(args: argparse.Namespace) -> int:
    from ..engine.cli_run import read_stdin
    from ..errors import InvalidArgument
    from .builtin import builtin_toolbox, load_tools
    from .tools import Toolbox

    if args.serve_mcp:  # it serves --tools / --builtin; what only an agent run reads would be ignored
        unused = [f for f, v in (("--mcp", args.mcp), ("--mcp-env", args.mcp_env), ("--sop", args.sop),
                                 ("a request", args.request)) if v]
        if unused:
            raise InvalidArgument(f"--serve-mcp serves the --tools (or --builtin) tools and nothing else; drop "
                                  f"{', '.join(unused)} (an MCP client connects to each server on its own)")
    box = builtin_toolbox() if (args.builtin or (args.serve_mcp and not args.tools)) else Toolbox()
    for spec in args.tools:
        add_all(box, load_tools(spec), f"--tools {spec}")
    if args.serve_mcp:
        from .mcptools import serve_stdio

        box.no_one_to_ask = ("this MCP server, `ondevice agent --serve-mcp`, has no one to ask: start it with --yes "
                             "to let its sensitive tools run")
        serve_stdio(box, confirm=(lambda t, a: True) if args.yes else None)
        return 0
    if not args.mcp_timeout > 0:  # also NaN
        raise InvalidArgument(f"--mcp-timeout {args.mcp_timeout}: give seconds > 0, e.g. --mcp-timeout 300")
    if args.retries < 0:
        raise InvalidArgument(f"--retries {args.retries} must be >= 0")
    if args.retrieve < 0:
        raise InvalidArgument(f"--retrieve {args.retrieve}: K must be >= 0 (0 offers every tool)")
    request = read_stdin() if args.request in (None, "-") else args.request
    if not request.strip():
        raise InvalidArgument("no request; give one as an argument or on stdin")
    from ..stop_signals import StopOnce

    with StopOnce() as stop:
        return _run_with_servers(args, box, request, stop)


def _run_with_servers(args, box, request: str, stop) -> int:
    """Start the --mcp servers, run the agent, and end the servers however the run ends: a Ctrl-C, SIGTERM or
    SIGHUP included (a server busy in a call does not notice its stdin close, and was left running, parent 1)."""
    from ..errors import InvalidArgument

    clients: list = []
    running: dict[str, str] = {}  # node id -> tool, while its call runs (what a stop leaves behind)
    try:
        from .mcptools import MCPClient

        missing = [n for n in args.mcp_env if n not in os.environ]
        if missing:
            raise InvalidArgument(f"--mcp-env {missing[0]}: no such environment variable here; export it first")
        env = {n: os.environ[n] for n in args.mcp_env} or None
        for cmd in args.mcp:
            if re.match(r"(?i)^\s*[a-z][a-z0-9+.-]*://", cmd):  # what a remote server's address looks like
                raise InvalidArgument(f"--mcp {cmd}: HTTP (and SSE) MCP servers are not supported, only a command "
                                      "that speaks MCP on stdio; run the server on stdio, or through a stdio proxy "
                                      f"such as --mcp 'npx mcp-remote {cmd.strip()}'")
            try:
                parts = shlex.split(cmd)
            except ValueError as e:  # an unclosed quote: shlex's words for it, not a traceback
                raise InvalidArgument(f"--mcp {cmd}: {str(e).lower()}; quote the command as a shell would") \
                    from None
            if not parts:
                raise InvalidArgument("--mcp needs a command, e.g. --mcp 'python -m my_server'")
            c = MCPClient(parts[0], parts[1:], env=env, timeout=args.mcp_timeout)
            clients.append(c)
            c.start()
            add_all(box, c.tools(taken=[t.name for t in box]), f"--mcp {cmd}")
        if not len(box):
            left_out = " (the --mcp servers' tools were all left out: see the warnings above)" if clients else ""
            raise InvalidArgument(f"no tools{left_out}; give --tools FILE.py, --mcp 'COMMAND' or --builtin")
        return _run_agent(args, box, request.strip(), running)
    finally:
        for c in clients:
            try:
                c.close()
            except KeyboardInterrupt:  # the first stop signal landed in close(): it ends what it began
                c.close()
        if stop.signal is not None:
            print(f"\nondevice agent: {stop.said()}{_left_behind(box, running, clients)}", file=sys.stderr)


def _left_behind(box, running: dict[str, str], clients: list) -> str:
    """What a stop did to the calls in flight: an MCP call was cancelled and its server ended; a Python tool's
    thread cannot be stopped, so it was left to end with the process."""
    mcp = [t for t in running.values() if t in box and box.get(t).source.startswith("mcp:")]
    local = [t for t in running.values() if t not in mcp]
    out = "; its MCP servers were ended" if clients and not mcp else ""
    if mcp:
        out += f"; the call to {', '.join(mcp)} was cancelled and its MCP server ended"
    if local:
        out += (f"; {', '.join(local)} (a Python tool) was still running: Python cannot stop a thread, so the call "
                f"was abandoned as the agent exited (what it had done so far stays done)")
    return out


def add_all(box, tools, source: str) -> None:
    """``tools`` into ``box``; a name taken already is refused naming the flag that brought it."""
    from ..errors import InvalidArgument

    for t in tools:
        try:
            box.add(t)
        except InvalidArgument as e:
            raise InvalidArgument(f"{source}: {e}") from None


def _run_agent(args, box, request: str, running: dict[str, str]) -> int:
    from ..engine import load
    from ..engine.args import said_knobs
    from ..errors import ContextOverflow
    from .agent import SOP, Agent, cli_confirm, clip
    from .retrieval import Embedder, ToolIndex

    models: dict[str | None, object] = {}

    def model(name):
        if name not in models:
            models[name] = said_knobs(load(name, n_ctx=args.ctx, n_threads=args.threads))
        return models[name]

    planner = model(args.planner_model or args.model)
    actor = model(args.actor_model or args.model)
    index = embedder = None
    try:
        if args.retrieve and len(box) > args.retrieve:
            if args.retrieve_mode != "lexical":
                embedder = Embedder(actor.path, n_threads=args.threads)
            index = ToolIndex(list(box), embedder, mode=args.retrieve_mode)

        def show(ev: dict) -> None:
            if ev["event"] == "start":
                running[ev["node"]] = ev["tool"]
            elif ev["event"] == "end":
                running.pop(ev["node"], None)
            if not args.json:
                extra = {k: v for k, v in ev.items() if k not in ("t", "event", "node", "tool")}
                print(f"[{ev['t']:8.3f}s] {ev['event']:9s} {ev['node']} {ev['tool']} "
                      f"{json.dumps(extra, default=str)}", file=sys.stderr)

        agent = Agent(box, planner=planner, actor=actor, index=index, top_k=args.retrieve or 5,
                      sops=[SOP.load(p) for p in args.sop], confirm=(lambda t, a: True) if args.yes else cli_confirm,
                      max_retries=args.retries, parallel=not args.sequential, on_event=show,
                      max_arg_chars=args.max_arg_chars, max_arg_items=args.max_arg_items,
                      answer_tokens=0 if args.no_answer else 256)
        try:
            result = agent.run(request, plan=not args.no_plan)
        except ContextOverflow as e:  # the fix is this verb's flag, not the library's n_ctx
            trained = min((getattr(m.engine, "n_ctx_train", 0) for m in models.values()), default=0)
            raise e.advise("--ctx", trained or None) from None
        rec = result.to_dict()
        if args.log:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        if args.json:
            print(json.dumps(rec, indent=2, default=str))
            return 0 if result.ok else 1
        # with an answer, it alone goes to stdout and the steps to stderr (as the live log does)
        steps = sys.stderr if result.answer is not None else sys.stdout
        for n in rec["nodes"]:
            # a one-line str result as it is, not quoted; other results as JSON, so that a step stays one line
            o = n["output"]
            out = n["error"] if n["status"] != "done" else o if isinstance(o, str) and o.isprintable() else \
                json.dumps(o, ensure_ascii=False, default=str)
            if steps is sys.stderr:  # a log beside the answer: a tool's megabytes are in --json and --log
                out = clip(out, 2000)
            print(f"{n['id']} {n['tool']}({json.dumps(n['args'], ensure_ascii=False, default=str)}) "
                  f"-> {n['status']}: {out}", file=steps)
        if rec["nodes"]:
            print(f"{'ok' if result.ok else 'not all subtasks finished'} in {result.seconds:.2f} s", file=steps)
        if result.answer is not None:
            print(result.answer)
        elif not rec["nodes"]:  # --no-answer, and the model replied in words (kept in --json and --log)
            print("ondevice agent: the model called no tool, so there are no results to print; rephrase the "
                  "request, drop --no-plan (a plan always calls a tool) or drop --no-answer to see its reply",
                  file=sys.stderr)
        return 0 if result.ok else 1
    finally:
        if embedder is not None:
            embedder.close()
        for m in models.values():
            m.close()
