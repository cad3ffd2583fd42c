"""Planner -> actions (Octo-planner): a plan model splits the request into subtasks, an action model turns
each into one constrained function call, and the task graph runs them.

The planner writes ``{"subtasks": [{"id", "task", "tool", "depends_on"}]}`` under a grammar built from a
JSON schema whose ``tool`` is an enum of the offered tools, so every plan parses and names real tools. The
actor (the same model or another: ``planner=``, ``actor=``) writes each subtask's arguments as one call to
that subtask's tool, under the tool's grammar, with the outputs of the subtasks it depends on in view.
Standard operating procedures (MobileAgent's SOPs) are prompt fragments added to both models' system
prompts. With a :class:`~ondevice.agent.retrieval.ToolIndex`, only the top-k tools are offered.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.grammar import schema_grammar
from ..engine.records import Sampling
from ..errors import ContextOverflow, InvalidArgument, OndeviceError
from .calls import MAX_CHARS, MAX_ITEMS, TEXT_RULE, Turn, call_turn, check_calls, cut_value, schema_problem
from .graph import GraphRun, Node, Replan, run_graph
from .retrieval import ToolIndex
from .tools import Confirm, Tool, Toolbox, ToolError, result_text


@dataclass(frozen=True)
class SOP:
    """A standard operating procedure: a named, reusable prompt fragment."""

    name: str
    text: str

    @classmethod
    def load(cls, path: str | Path) -> SOP:
        p = Path(path)
        if not p.is_file():
            raise InvalidArgument(f"no SOP file at {p}; give a text file with the procedure")
        return cls(p.stem, p.read_text(encoding="utf-8").strip())


def sop_prompt(sops: Sequence[SOP]) -> str:
    return "\n\n".join(f"Procedure '{s.name}':\n{s.text}" for s in sops)


PLANNER_SYSTEM = (
    "You plan how to do the user's request with tools. Split it into the fewest subtasks; each subtask is "
    "one call to one tool. A subtask that needs another subtask's result lists that subtask's id in "
    "depends_on; subtasks that do not need each other have no dependency, so they can run at the same time. "
    'Reply with JSON only: {"subtasks": [{"id": 1, "task": "...", "tool": "...", "depends_on": []}]}.'
)

ANSWER_SYSTEM = (
    "You answer the user's request from the results of the tool calls made for it. Reply in plain sentences, "
    "briefly, using only what the results say; if a call failed, say what could not be done."
)


def plan_schema(tool_names: Sequence[str], max_subtasks: int = 6) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["subtasks"], "properties": {
        "subtasks": {"type": "array", "minItems": 1, "maxItems": max_subtasks, "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "task", "tool", "depends_on"],
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": max_subtasks},
                           "task": {"type": "string", "maxLength": 160},
                           "tool": {"enum": list(tool_names)},
                           "depends_on": {"type": "array", "maxItems": max_subtasks,
                                          "items": {"type": "integer", "minimum": 1, "maximum": max_subtasks}}}}}}}


def plan_nodes(plan: dict) -> list[Node]:
    """Graph nodes from a plan; ids become ``s<id>``; a dependency on itself or a later id is dropped. A small
    model may repeat an id (the grammar cannot forbid it): the same subtask again is dropped, another one gets
    the next free id (a dependency on the id means its first subtask)."""
    seen: set[int] = set()
    nodes = []
    for st in plan["subtasks"]:
        i = int(st["id"])
        if i in seen:
            if any(n.id == f"s{i}" and (n.tool, n.task) == (st["tool"], st["task"]) for n in nodes):
                continue
            i = max(seen) + 1
        seen.add(i)
        deps = tuple(f"s{d}" for d in dict.fromkeys(st.get("depends_on", [])) if d in seen and d != i)
        nodes.append(Node(id=f"s{i}", tool=st["tool"], task=st["task"], depends_on=deps))
    return nodes


@dataclass
class AgentRun:
    """What one request did: the plan, the graph run (steps, timings) and every model turn."""

    request: str
    nodes: list[Node]
    graph: GraphRun | None
    turns: list[dict] = field(default_factory=list)
    answer: str | None = None  # the reply to the request: written from the tools' results, or without a tool
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.graph.ok if self.graph is not None else self.answer is not None

    def to_dict(self) -> dict:
        nodes = [{"id": n.id, "tool": n.tool, "task": n.task, "depends_on": list(n.depends_on), "status": n.status,
                  "args": n.attempts[-1]["args"] if n.attempts else n.args, "output": n.output, "error": n.error,
                  "attempts": n.attempts} for n in self.nodes]
        return {"request": self.request, "ok": self.ok, "answer": self.answer, "seconds": round(self.seconds, 4),
                "nodes": nodes, "turns": self.turns, "log": self.graph.log if self.graph else []}


class Agent:
    """Tools, a planner and an actor model (the same one unless given), retrieval, SOPs and confirmation."""

    def __init__(self, toolbox: Toolbox, *, planner=None, actor=None, index: ToolIndex | None = None,
                 top_k: int = 5, sops: Sequence[SOP] = (), confirm: Confirm | None = None, max_retries: int = 2,
                 parallel: bool = True, max_workers: int = 4, replan: Replan | None = None,
                 on_event: Callable[[dict], None] | None = None, answer_tokens: int = 256,
                 max_arg_chars: int = MAX_CHARS, max_arg_items: int = MAX_ITEMS):
        if planner is None and actor is None:
            raise InvalidArgument("an agent needs a model: give planner= and/or actor=")
        if not (1 <= max_arg_chars <= 1000 and 1 <= max_arg_items <= 64):  # llama.cpp's grammar repetition limit
            raise InvalidArgument(f"--max-arg-chars {max_arg_chars} / --max-arg-items {max_arg_items}: give 1 to 1000 "
                                  f"characters and 1 to 64 items (llama.cpp's grammar expands longer bounds too far)")
        # the call grammar's bound on a free string / array: every call ends; a value that reached it is refused
        self.bounds = (max_arg_chars, max_arg_items)
        self.toolbox, self.index, self.top_k = toolbox, index, top_k
        self.planner, self.actor = planner or actor, actor or planner
        self.sops = list(sops)
        self.confirm, self.max_retries = confirm, max_retries
        self.parallel, self.max_workers, self.replan, self.on_event = parallel, max_workers, replan, on_event
        # the answer step's token limit; 0 skips it: the results alone, and a reply in words instead of a call is
        # no answer either (it stays in the run's turns)
        self.answer_tokens = answer_tokens

    def offered(self, request: str) -> list[Tool]:
        """The tools shown to the models for ``request``: the top-k retrieved, or all of them."""
        if self.index is not None and len(self.toolbox) > self.top_k:
            return self.index.search(request, self.top_k)
        return list(self.toolbox)

    # -- the plan step ---------------------------------------------------------------------------
    def plan(self, request: str, tools: Sequence[Tool] | None = None, turns: list | None = None) -> list[Node]:
        tools = list(tools or self.offered(request))
        catalog = "\n".join(f"- {t.name}: {t.description}" for t in tools)
        system = "\n\n".join(x for x in (PLANNER_SYSTEM, f"Tools:\n{catalog}", sop_prompt(self.sops)) if x)
        grammar = schema_grammar(plan_schema([t.name for t in tools]), "the plan schema")
        t0 = time.perf_counter()
        chunks = list(self.planner.stream(
            [{"role": "system", "content": system}, {"role": "user", "content": request}],
            sampling=Sampling(temp=0.0, max_tokens=400, grammar=grammar)))
        text = "".join(g.text for g in chunks)
        if turns is not None:
            turns.append({"step": "plan", "text": text, "seconds": round(time.perf_counter() - t0, 4)})
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as e:
            last = chunks[-1] if chunks else None
            n_ctx = getattr(getattr(self.planner, "engine", None), "n_ctx", None)
            if n_ctx and last is not None and last.finish_reason == "length" and last.generation_tokens < 400:
                # the end of the context window cut the plan, not its token limit
                raise ContextOverflow(last.prompt_tokens + 400, n_ctx, "planner's prompt with room for its plan") \
                    from None
            raise OndeviceError(f"the planner's reply was cut short ({e.msg}); raise max tokens or simplify") from e
        return plan_nodes(plan)

    # -- the action step -------------------------------------------------------------------------
    def fill(self, request: str, turns: list) -> Callable[[Node, dict], dict]:
        """The graph's fill callback: one constrained call to the node's tool (Octo-planner's action step)."""
        def fill(node: Node, outputs: dict) -> dict:
            head = [f"Request: {request}", f"Your subtask: {node.task}"]
            deps = [result_text(outputs.get(d)) for d in node.depends_on]
            # room for the call itself and the tool's schema beside it (call_turn adds them)
            msgs = fit_results(self.actor, deps, lambda texts: [{"role": "user", "content": "\n".join(
                head + [f"Result of {d}: {t}" for d, t in zip(node.depends_on, texts)])}], reserve=512)
            for a in node.attempts:  # reflection: the failed tries and why, before the next one
                msgs += [{"role": "assistant", "content": json.dumps({"name": node.tool, "arguments": a["args"]})},
                         {"role": "user", "content": f"That call failed: {a['error']}. Write a corrected call."}]
            tool = self.toolbox.get(node.tool)
            if (bad := schema_problem(tool)) is not None:  # the tool's fault: the same error on every try
                raise ToolError(f"{bad}; the tool cannot be called until its schema is fixed", "schema")
            turn = call_turn(self.actor, msgs, [tool], constrained=True, system=sop_prompt(self.sops),
                             bounds=self.bounds)
            turns.append(_turn_record(f"act:{node.id}", turn))
            if not turn.calls:
                raise OndeviceError(f"the actor wrote no call for {node.id}: {turn.parse_error}")
            if (cut := cut_value(turn.calls[0], self.bounds)) is not None:  # an invalid try: the next one sees why
                raise OndeviceError(cut)
            return turn.calls[0].arguments
        return fill

    def run(self, request: str, *, plan: bool = True) -> AgentRun:
        """Do ``request``: plan, then act through the task graph (``plan=False``: one call turn, which may
        hold several parallel calls or a plain answer)."""
        t0 = time.perf_counter()
        turns: list[dict] = []
        tools = self.offered(request)
        if plan:
            nodes = self.plan(request, tools, turns)
            g = run_graph(nodes, self.toolbox, fill=self.fill(request, turns), parallel=self.parallel,
                          max_workers=self.max_workers, max_retries=self.max_retries, confirm=self.confirm,
                          replan=self.replan, on_event=self.on_event)
            run = AgentRun(request, list(g.nodes.values()), g, turns)
        else:
            run = self._direct(request, tools, turns, t0)
        if self.answer_tokens and run.graph is not None:
            run.answer = self.answer(request, run.nodes, turns)
        run.seconds = time.perf_counter() - t0
        return run

    # -- the answer step -------------------------------------------------------------------------
    def answer(self, request: str, nodes: Sequence[Node], turns: list | None = None) -> str | None:
        """The reply to ``request`` written by the planner model from the tools' results, the way a chat
        model answers after its calls (OpenAI's and Ollama's tool loop): the calls as the assistant's
        ``tool_calls``, each result (or error) as a ``tool`` message. None when no tool ran to the end."""
        ran = [n for n in nodes if n.status in ("done", "failed") and n.attempts]
        if not any(n.status == "done" for n in ran):
            return None
        calls = [{"type": "function", "id": f"call_{n.id}",
                  "function": {"name": n.tool, "arguments": n.attempts[-1]["args"]}} for n in ran]
        outs = [result_text(n.output) if n.status == "done" else f"error: {n.error}" for n in ran]
        system = "\n\n".join(x for x in (ANSWER_SYSTEM, sop_prompt(self.sops)) if x)
        msgs = fit_results(self.planner, outs, lambda texts: [
            {"role": "system", "content": system}, {"role": "user", "content": request},
            {"role": "assistant", "content": "", "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "name": n.tool, "content": t}
              for c, n, t in zip(calls, ran, texts))], reserve=self.answer_tokens)
        # a reply that starts like a call is not an answer: the grammar lets it start with anything else
        grammar = f"root ::= ondevice-text\n{TEXT_RULE}"
        t0 = time.perf_counter()
        text = "".join(g.text for g in self.planner.stream(
            msgs, sampling=Sampling(temp=0.0, max_tokens=self.answer_tokens, grammar=grammar))).strip()
        if turns is not None:
            turns.append({"step": "answer", "text": text, "seconds": round(time.perf_counter() - t0, 4)})
        return text or None

    def _direct(self, request: str, tools: list[Tool], turns: list, t0: float) -> AgentRun:
        msgs = [{"role": "user", "content": request}]
        ran: dict[str, Node] = {}  # every call that ran, by id: a done one is kept, never run again
        log: list[dict] = []
        for attempt in range(self.max_retries + 1):
            turn = call_turn(self.actor, msgs, tools, constrained=True, parallel=True, allow_text=True,
                             system=sop_prompt(self.sops), bounds=self.bounds)
            turns.append(_turn_record(f"call:{attempt + 1}", turn))
            if turn.calls is None:  # a reply in words: the answer, unless only the tools' results are wanted
                words = turn.text.strip() if self.answer_tokens else None
                if ran:  # words instead of a corrected call: the calls that ran stay, and so does a failure
                    return AgentRun(request, list(ran.values()), GraphRun(ran, log, time.perf_counter() - t0),
                                    turns, answer=words)
                return AgentRun(request, [], None, turns, answer=words)
            problem = check_calls(turn.calls, tools) or next(
                (cut for c in turn.calls if (cut := cut_value(c, self.bounds)) is not None), None)
            if problem is None:
                nodes = _next_nodes(turn.calls, ran)
                if nodes:  # the model's own text: no ${...} references to resolve (a shell command keeps ${HOME})
                    g = run_graph(nodes, self.toolbox, parallel=self.parallel, max_workers=self.max_workers,
                                  confirm=self.confirm, on_event=self.on_event, t0=t0, refs=False)
                    ran.update(g.nodes)
                    log += g.log
                failed = [n for n in ran.values() if n.status == "failed" and n.result.kind == "failed"]
                if not failed or attempt == self.max_retries:
                    return AgentRun(request, list(ran.values()), GraphRun(ran, log, time.perf_counter() - t0), turns)
                problem = "; ".join(n.error for n in failed)
            if attempt == self.max_retries:  # the last try was no valid call: it failed, it did not run
                return self._invalid(request, turn, problem, ran, log, turns, t0)
            msgs += [{"role": "assistant", "content": turn.text},
                     {"role": "user", "content": _retry_note(problem, [n for n in ran.values() if _kept(n)])}]
        raise AssertionError("unreachable")  # every try returns or goes on to the next

    @staticmethod
    def _invalid(request: str, turn: Turn, problem: str, ran: dict[str, Node], log: list, turns: list,
                 t0: float) -> AgentRun:
        """The run of a last try whose calls were invalid: each a failed subtask with the reason, none run (the
        calls that ran before are kept)."""
        from .tools import ToolResult

        ran = dict(ran)
        for n in _next_nodes(turn.calls, ran):
            args = n.args if isinstance(n.args, dict) else {"_": n.args}
            res = ToolResult(n.tool, args, False, error=problem, kind="invalid", started=time.perf_counter())
            n.args, n.status, n.result, n.error = args, "failed", res, problem
            n.attempts.append({"args": args, "ok": False, "error": problem, "kind": "invalid", "seconds": 0.0})
            ran[n.id] = n
        return AgentRun(request, list(ran.values()), GraphRun(ran, log, time.perf_counter() - t0), turns)


def _call_key(tool: str, args) -> str:
    return f"{tool} {json.dumps(args, sort_keys=True, ensure_ascii=False, default=str)}"


def _kept(n: Node) -> bool:
    """A call not to be made again: it succeeded, or it timed out and may still be running."""
    return n.status == "done" or (n.result is not None and n.result.kind == "timeout")


def _next_nodes(calls, ran: dict[str, Node]) -> list[Node]:
    """Nodes for a turn's calls after the calls in ``ran``: a call identical to one that succeeded (or timed out)
    is not run again (a side effect happens once); a new call is the next attempt of a failed one (of the same
    tool first), else a new node."""
    done = {_call_key(n.tool, n.args) for n in ran.values() if _kept(n)}
    failed = [n for n in ran.values() if n.status == "failed" and not _kept(n)]
    fresh = [c for c in calls if _call_key(c.name, c.arguments) not in done]
    prev: dict[int, Node] = {}  # index in fresh -> the failed node it corrects
    for i, c in enumerate(fresh):  # the same tool first, then in order
        if (f := next((f for f in failed if f.tool == c.name), None)) is not None:
            prev[i] = f
            failed.remove(f)
    for i in range(len(fresh)):
        if i not in prev and failed:
            prev[i] = failed.pop(0)
    last = max((int(k[1:]) for k in ran if k[1:].isdigit()), default=0)
    nodes = []
    for i, c in enumerate(fresh):
        f = prev.get(i)
        if f is None:
            last += 1
        nodes.append(Node(id=f.id if f else f"c{last}", tool=c.name, args=c.arguments,
                          attempts=list(f.attempts) if f is not None and f.tool == c.name else []))
    return nodes


def _retry_note(problem: str, kept: Sequence[Node]) -> str:
    """What the model reads before a corrected try: what failed, and what ran already (not to be made again)."""
    note = f"That call failed: {problem}."
    if kept:
        ok = "\n".join(f"- {n.tool}({json.dumps(n.attempts[-1]['args'], ensure_ascii=False, default=str)}) -> "
                       f"{clip(n.result.message(), 500)}" for n in kept)
        note += f"\nThese calls ran already; do not make them again:\n{ok}"
    return f"{note}\nWrite a corrected call."


def clip(text: str, limit: int) -> str:
    """``text`` cut to its first ``limit`` characters, saying so (and how long it was)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... [cut: {len(text):,} characters in all, the first {limit:,} shown]"


def fit_results(model, texts: Sequence[str], compose: Callable[[list[str]], list[dict]], reserve: int) -> list[dict]:
    """``compose(texts)`` with the tools' results ``texts`` cut evenly until the prompt leaves ``reserve`` tokens
    of ``model``'s context free: a tool that returns megabytes must not cost the run its next step (as a chat
    client cuts a long tool result before it goes back to the model)."""
    n_ctx = getattr(getattr(model, "engine", None), "n_ctx", None)
    tokenize = getattr(model, "tokenize_prompt", None)
    if not texts or not n_ctx or tokenize is None:
        return compose(list(texts))
    budget = n_ctx - reserve
    # no tokenizer (or template) pass over more text than the context could hold at >= 1 character a token
    limit = min(max(map(len, texts)), max(64, 4 * budget // len(texts)))
    fixed = len(tokenize(compose(["" for _ in texts])))  # the prompt without the results
    for _ in range(6):
        shown = [clip(t, limit) for t in texts]
        msgs = compose(shown)
        n = len(tokenize(msgs))
        if n <= budget or limit <= 64 or n <= fixed:
            return msgs  # fits, or nothing left to cut (the engine then says the prompt is too long)
        per_token = sum(map(len, shown)) / (n - fixed)  # characters of results per token
        limit = max(64, min(limit - 1, int((budget - fixed) * per_token / len(texts) * 0.95)))
    return msgs


def _turn_record(step: str, turn: Turn) -> dict:
    return {"step": step, "text": turn.text, "calls": [c.__dict__ for c in turn.calls] if turn.calls else None,
            "prompt_tokens": turn.prompt_tokens, "generated_tokens": turn.generated_tokens,
            "seconds": round(turn.seconds, 4)}


def cli_confirm(tool: Tool, args: dict) -> bool:
    """Ask on the terminal before a sensitive tool runs; without a terminal the answer is no."""
    prompt = f"ondevice agent: run sensitive tool {tool.name}({json.dumps(args, default=str)})? [y/N] "
    try:
        with open("/dev/tty", "r+", encoding="utf-8") as tty:
            tty.write(prompt)
            tty.flush()
            return tty.readline().strip().lower() in ("y", "yes")
    except OSError:
        if sys.stdin is not None and sys.stdin.isatty():
            print(prompt, end="", file=sys.stderr, flush=True)
            return sys.stdin.readline().strip().lower() in ("y", "yes")
        print(f"ondevice agent: {tool.name} is sensitive and there is no terminal to confirm it; not run "
              "(pass --yes to allow sensitive tools)", file=sys.stderr)
        return False
