"""A task graph (UFO³'s TaskConstellation): subtasks with typed dependencies, run in parallel where they can.

Each :class:`Node` calls one tool. Its arguments are given (and may refer to earlier outputs with
``"${s1}"`` or ``"${s1.field.0}"``: a whole-string reference becomes the referred value with its own type,
so typed outputs feed typed parameters) or are filled by a model from the node's natural-language
``task`` when it becomes ready (the ``fill`` callback: Octo-planner's action step). The executor runs on the
calling thread: model steps (``fill``) run there one at a time — one engine, one decoding thread — while
tool calls run in a thread pool, so independent branches whose tools wait on I/O overlap. A failed node
marks every node that depends on it ``blocked``; a ``replan`` hook may repair the graph first. A node whose
call failed or was invalid is refilled with the error in view up to ``max_retries`` times (MobileUse's
reflection), each attempt logged; one whose error cannot change (the tool's own schema is unusable, its MCP
server is gone) is not. Every event is logged with its time. A run stopped by Ctrl-C (or a SIGTERM taken as
one) does not wait for the tools still running: their threads are daemons, left behind as the process exits
(Python cannot stop a thread), and each is logged ``stopped``.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from .tools import Confirm, Toolbox, ToolError, ToolResult

_REF = re.compile(r"\$\{(\w+)((?:\.[\w-]+)*)\}")


@dataclass
class Node:
    """One subtask: a tool, its arguments (or a task for a model to turn into them) and what it waits for."""

    id: str
    tool: str
    args: dict | None = None  # None: the fill callback writes them from ``task``
    task: str = ""
    depends_on: tuple[str, ...] = ()
    status: str = "pending"  # pending | running | done | failed | blocked
    result: ToolResult | None = None
    attempts: list[dict] = field(default_factory=list)  # one per try: args, ok, error, seconds
    error: str | None = None
    filled: dict | None = None  # the arguments the model wrote last (when ``args`` is None)
    replanned: bool = False

    @property
    def output(self) -> Any:
        return self.result.value if self.result is not None and self.result.ok else None


@dataclass
class GraphRun:
    nodes: dict[str, Node]
    log: list[dict]
    seconds: float
    replans: int = 0

    @property
    def ok(self) -> bool:
        return all(n.status == "done" for n in self.nodes.values())

    def outputs(self) -> dict[str, Any]:
        return {k: n.output for k, n in self.nodes.items() if n.status == "done"}


def check_graph(nodes: dict[str, Node]) -> None:
    """Unknown dependencies and cycles are errors (named), before anything runs."""
    for n in nodes.values():
        missing = [d for d in n.depends_on if d not in nodes]
        if missing:
            raise InvalidArgument(f"subtask {n.id} depends on unknown {', '.join(missing)}; "
                                  f"the subtasks are {', '.join(nodes)}")
    state: dict[str, int] = {}

    def visit(k: str, path: list[str]) -> None:
        if state.get(k) == 2:
            return
        if state.get(k) == 1:
            raise InvalidArgument(f"the subtasks form a cycle ({' -> '.join([*path, k])}); remove a dependency")
        state[k] = 1
        for d in nodes[k].depends_on:
            visit(d, [*path, k])
        state[k] = 2

    for k in nodes:
        visit(k, [])


def resolve_refs(value: Any, outputs: dict[str, Any], ids: Collection[str] | None = None) -> Any:
    """``value`` with ``${id.path}`` references replaced by earlier outputs (typed when a whole string). With
    ``ids`` (the graph's node ids), ``${NAME}`` for any other name is text and stays as it is: a shell
    command's ``${HOME}``, a JS template literal's ``${name}``."""
    if isinstance(value, dict):
        return {k: resolve_refs(v, outputs, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, outputs, ids) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _REF.fullmatch(value.strip())
    if whole and (ids is None or whole.group(1) in ids):
        return _lookup(whole.group(1), whole.group(2), outputs)
    return _REF.sub(lambda m: str(_lookup(m.group(1), m.group(2), outputs)) if ids is None or m.group(1) in ids
                    else m.group(0), value)


def _lookup(node_id: str, path: str, outputs: dict[str, Any]) -> Any:
    if node_id not in outputs:
        raise InvalidArgument(f"${{{node_id}{path}}} refers to {node_id}, which has no output yet; "
                              f"list it in depends_on")
    v = outputs[node_id]
    for part in filter(None, path.split(".")):
        if isinstance(v, dict) and part in v:
            v = v[part]
        elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
            v = v[int(part)]
        else:
            raise InvalidArgument(f"${{{node_id}{path}}}: the output of {node_id} has no {part!r}")
    return v


Fill = Callable[[Node, dict[str, Any]], dict]  # (node, outputs of finished nodes) -> arguments
Replan = Callable[[dict[str, Node], Node], list[Node] | None]  # (graph, failed node) -> nodes to add/replace


def run_graph(nodes: list[Node] | dict[str, Node], toolbox: Toolbox, *, fill: Fill | None = None,
              parallel: bool = True, max_workers: int = 4, max_retries: int = 1, confirm: Confirm | None = None,
              replan: Replan | None = None, max_replans: int = 1,
              on_event: Callable[[dict], None] | None = None, t0: float | None = None,
              refs: bool = True) -> GraphRun:
    """Run the graph to the end; every node ends ``done``, ``failed`` or ``blocked``. Event times count from
    ``t0`` (a perf_counter time; default now: a run that continues an earlier one keeps its clock).
    ``refs=False``: arguments are used as they are, with no ``${id}`` references resolved (calls that are not
    a plan's subtasks)."""
    graph = {n.id: n for n in nodes} if isinstance(nodes, list) else dict(nodes)
    check_graph(graph)
    t0 = time.perf_counter() if t0 is None else t0
    log: list[dict] = []
    replans = 0

    lock = threading.Lock()
    stopped = False  # the run was stopped: a tool thread left behind logs nothing more

    def event(name: str, node: Node, at: float | None = None, **kw) -> None:
        """Log an event at ``at`` (a perf_counter time; default now), in seconds from the start of the run.
        Tool threads log their own ends, so the live log stays in time order while the model fills a node."""
        with lock:
            if stopped:
                return
            rec = {"t": round((time.perf_counter() if at is None else at) - t0, 6), "event": name,
                   "node": node.id, "tool": node.tool, **kw}
            log.append(rec)
            if on_event:
                on_event(rec)

    def call(n: Node, args: dict) -> ToolResult:
        result = toolbox.call(n.tool, args, confirm=confirm)
        _ended(n, result, event)
        return result

    pool = _Workers(max(1, max_workers))
    running: dict[cf.Future, Node] = {}
    try:
        while True:
            outputs = {k: n.output for k, n in graph.items() if n.status == "done"}
            for n in graph.values():  # a node waiting on a failure can never run
                if n.status == "pending" and any(graph[d].status in ("failed", "blocked") for d in n.depends_on):
                    bad = [d for d in n.depends_on if graph[d].status in ("failed", "blocked")]
                    n.status, n.error = "blocked", f"blocked by {', '.join(bad)}"
                    event("blocked", n, by=bad)
            ready = [n for n in graph.values()
                     if n.status == "pending" and all(graph[d].status == "done" for d in n.depends_on)]
            for n in ready:
                n.status = "running"
                written = args = n.args  # what the model wrote, recorded if its references cannot be resolved
                try:
                    if args is None:
                        if fill is None:
                            raise InvalidArgument(f"subtask {n.id} has no arguments and no model to write them")
                        written = args = n.filled = fill(n, outputs)
                        event("filled", n, args=args, attempt=len(n.attempts) + 1)
                    if refs:
                        args = resolve_refs(args, outputs, graph)
                except Exception as e:  # a model step or a reference that cannot be resolved
                    # a ToolError says its kind (a schema no grammar takes is not retried); else the try was invalid
                    kind, msg = (e.kind, str(e)) if isinstance(e, ToolError) else \
                        ("invalid", f"{type(e).__name__}: {e}")
                    result = ToolResult(n.tool, written if isinstance(written, dict) else {}, False,
                                        error=msg, kind=kind, started=time.perf_counter())
                    _ended(n, result, event)
                    _finish(n, result, graph, event, max_retries, fill)
                    continue
                event("start", n, args=args, attempt=len(n.attempts) + 1)
                fut = pool.submit(call, n, args)
                running[fut] = n
                if not parallel:  # the sequential baseline: each call ends before the next starts
                    _finish(n, fut.result(), graph, event, max_retries, fill)
                    del running[fut]
            if not running:
                failed = [n for n in graph.values() if n.status == "failed" and not n.replanned]
                if replan and failed and replans < max_replans:
                    for f in failed:
                        f.replanned = True
                        new = replan(graph, f) or []
                        if new:
                            replans += 1
                            _apply_replan(graph, f, new, event)
                    check_graph(graph)
                    if any(n.status == "pending" for n in graph.values()):
                        continue
                if not any(n.status == "pending" for n in graph.values()):
                    break
                continue
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                n = running.pop(fut)
                _finish(n, fut.result(), graph, event, max_retries, fill)
    except BaseException as e:  # Ctrl-C, or a SIGTERM taken as one: the calls in flight are not waited for
        if isinstance(e, KeyboardInterrupt):
            for n in running.values():
                mcp = getattr(toolbox.tools.get(n.tool), "source", "python").startswith("mcp:")
                event("stopped", n, note="not waited for: closing its MCP client cancels it" if mcp else
                      "not waited for: Python cannot stop a thread, so this call is abandoned")
            stopped = True
        pool.shutdown(wait=not stopped)  # another error waits for the calls in flight, as it did
        raise
    pool.shutdown(wait=True)
    return GraphRun(graph, log, time.perf_counter() - t0, replans)


class _Workers:
    """A small thread pool whose threads are daemons: a run stopped by Ctrl-C or SIGTERM exits without waiting
    for a tool still running (``concurrent.futures`` joins its workers at exit, so a tool that sleeps a minute
    held the process that long). Up to ``n`` threads, started as calls come."""

    def __init__(self, n: int) -> None:
        self._n, self._queue, self._threads = n, queue.SimpleQueue(), []
        self._idle = threading.Semaphore(0)

    def submit(self, fn: Callable, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._queue.put((fut, fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._n:
            t = threading.Thread(target=self._work, name=f"ondevice-tool_{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        return fut

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 — the caller's to see, as concurrent.futures does
                    fut.set_exception(e)
            self._idle.release()

    def shutdown(self, wait: bool) -> None:
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


def _ended(n: Node, result: ToolResult, event) -> None:
    event("end", n, at=result.started + result.seconds, ok=result.ok, seconds=round(result.seconds, 6),
          error=result.error, kind=result.kind)


def _finish(n: Node, result: ToolResult, graph: dict[str, Node], event, max_retries: int, fill: Fill | None) -> None:
    """The scheduler's side of a call that ended (logged by ``_ended``): the attempt, the status, a retry."""
    n.attempts.append({"args": result.args, "ok": result.ok, "error": result.error, "kind": result.kind,
                       "seconds": round(result.seconds, 6)})
    if result.ok:
        n.status, n.result, n.error = "done", result, None
        return
    # reflection: a model-filled node gets another try with its errors in view (never an unconfirmed one)
    retry = n.args is None and fill is not None and result.kind in ("invalid", "failed") \
        and len(n.attempts) <= max_retries
    if retry:
        n.status = "pending"
        event("retry", n, attempt=len(n.attempts) + 1, error=result.error)
        return
    n.status, n.result, n.error = "failed", result, result.error


def _apply_replan(graph: dict[str, Node], failed: Node, new: list[Node], event) -> None:
    """Nodes from the re-plan hook: one with the failed node's id replaces it; the rest are added. Nodes
    blocked behind the failure wait again."""
    for n in new:
        if n.id in graph and n.id != failed.id and graph[n.id].status == "done":
            raise InvalidArgument(f"the re-plan replaces {n.id}, which already finished; give it a new id")
        graph[n.id] = n
        event("replanned", n, replaces=failed.id if n.id == failed.id else None)
    for n in graph.values():
        if n.status == "blocked":
            n.status, n.error = "pending", None
