"""The function-calling suite written for ondevice (``ondevice eval --suite function-calling``).

``data/function_calling_tools.jsonl`` is a catalog of 109 phone-assistant tools (OpenAI function objects);
``data/function_calling.jsonl`` holds 100 requests in four categories: ``single`` (one tool offered, call it),
``choose`` (pick the right one of four), ``parallel`` (two calls in one reply) and ``none`` (nothing offered
fits: the model must not call). Each request lists the tools offered and the expected calls as allowed values
per argument (``null`` among them: the argument may be absent; an argument not listed must be absent). A reply
scores 1 when its calls match the expected ones in any order: same names, every argument of the JSON type the
tool's schema declares (as BFCL's AST checker: ``"12"`` for an integer is wrong, ``12`` for a number is right)
and one of its allowed values after normalisation (case, spaces, trailing punctuation; numbers by value).
Every item is run twice, constrained by the tool-call grammar and unconstrained (free text, its
``<tool_call>`` blocks or else the first JSON in it read as the call), so the summary compares the two per
category. :func:`run_item` (agent_bench) and ``ondevice eval`` (:func:`eval_items`, run by ``eval.runner``)
ask every item through ``calls.call_request``: the tools offered the way the model's own chat template does,
the grammar in its call format, the same prompt and grammar for the same item and model.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from ..engine.toolcalls import reply
from .calls import Call, call_request, check_calls, read_calls, schema_tool, starts_like_call
from .tools import Tool

CATEGORIES = ("single", "choose", "parallel", "none")
MODES = ("constrained", "unconstrained")
POLICY = {"parallel": True, "allow_text": True}  # every item: calls may be parallel, a plain answer is allowed


@lru_cache(maxsize=1)
def catalog() -> dict[str, Tool]:
    """The suite's tools by name (schemas only: the suite scores calls, it never runs them)."""
    text = (resources.files("ondevice") / "data" / "function_calling_tools.jsonl").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line.strip():
            t = schema_tool(json.loads(line))
            out[t.name] = t
    return out


@lru_cache(maxsize=1)
def items() -> tuple[dict, ...]:
    text = (resources.files("ondevice") / "data" / "function_calling.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


# -- scoring --------------------------------------------------------------------------------------------

def norm(v: Any) -> Any:
    """A value for comparison: the eval metrics' normalisation (case, spaces, outer punctuation; numbers and
    numeric strings by value; "true"/"false" as booleans)."""
    from ..eval.metrics import _canon

    return _canon(v)


def call_matches(call: Call, expected: dict) -> bool:
    if call.name != expected["name"]:
        return False
    allowed = expected["arguments"]
    if any(k not in allowed for k in call.arguments):
        return False
    for k, options in allowed.items():
        if k not in call.arguments:
            if None not in options:
                return False
        elif norm(call.arguments[k]) not in [norm(o) for o in options if o is not None]:
            return False
    return True


def calls_match(calls: list[Call] | None, expected: list[dict]) -> bool:
    """Every expected call matched by exactly one predicted call (any order); no call when none expected."""
    if not expected:
        return not calls
    if not calls or len(calls) != len(expected):
        return False
    left = list(calls)
    for e in expected:
        hit = next((c for c in left if call_matches(c, e)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def score_reply(text: str, item: dict, constrained: bool, offered: list[Tool] | None = None) -> dict:
    """``correct`` (1/0), ``parsed`` (a call could be read, or a plain answer), ``valid`` (calls validate
    against the offered tools' schemas) for a reply to ``item``."""
    calls, why = read_calls(text, lenient=not constrained)
    tools = offered if offered is not None else [catalog()[n] for n in item["tools"]]
    looks_like_call = starts_like_call(text) or (not constrained and calls is not None)
    parsed = calls is not None or not looks_like_call
    problem = check_calls(calls, tools) if calls else None
    # correct needs valid too: an argument of another JSON type than its schema declares ("12" for an integer) is
    # wrong, as in BFCL's AST checker (the tools' own check, jsonschema: 12 passes for a number, 12.0 for an integer)
    return {"correct": float(calls_match(calls, item["expected"]) and problem is None), "parsed": float(parsed),
            "valid": float(parsed and problem is None), "calls": [c.__dict__ for c in calls] if calls else None,
            "problem": problem or (why if looks_like_call and calls is None else None)}


# -- running ------------------------------------------------------------------------------------------

def request(model, item: dict, *, constrained: bool, tools: list[Tool] | None = None):
    """``(messages, tools for the template, grammar)`` of ``item`` for ``model`` (``calls.call_request``)."""
    tools = tools if tools is not None else [catalog()[n] for n in item["tools"]]
    return call_request(model, [{"role": "user", "content": item["query"]}], tools, constrained=constrained,
                        **POLICY)


def run_item(model, item: dict, *, constrained: bool, tools: list[Tool] | None = None,
             max_tokens: int = 200) -> dict:
    """One reply to ``item`` (with ``tools`` offered instead of the item's own, e.g. retrieved) and its scores."""
    from ..engine.records import Sampling

    msgs, shown, grammar = request(model, item, constrained=constrained, tools=tools)
    s = Sampling(temp=0.0, max_tokens=max_tokens, grammar=grammar)
    # under the grammar a reply whose first character is not a call's is a plain answer to the end: the
    # rest cannot change its score, so it is not generated
    text, last, cut = reply(model, model.tokenize_prompt(msgs, tools=shown), s, stop_at_answer=constrained)
    return {"answer_cut": cut, "id": item["id"], "category": item["category"],
            "mode": "constrained" if constrained else "unconstrained", "text": text,
            **score_reply(text, item, constrained, tools),
            "prompt_tokens": last.prompt_tokens if last else 0, "cached_tokens": last.cached_tokens if last else 0,
            "generated_tokens": last.generation_tokens if last else 0, "seconds": last.t if last else 0.0}


def summarize(rows: list[dict]) -> dict:
    """Accuracy, parse and validity rates per mode and category (and over all items of a mode)."""
    out: dict[str, dict] = {}
    for mode in sorted({r["mode"] for r in rows}):
        rs = [r for r in rows if r["mode"] == mode]
        per = {}
        for cat in [*CATEGORIES, "all"]:
            sel = rs if cat == "all" else [r for r in rs if r["category"] == cat]
            if sel:
                per[cat] = {"n": len(sel), "accuracy": sum(r["correct"] for r in sel) / len(sel),
                            "parsed": sum(r["parsed"] for r in sel) / len(sel),
                            "valid": sum(r["valid"] for r in sel) / len(sel)}
        out[mode] = per
    return out


# -- as an eval suite -----------------------------------------------------------------------------------

def eval_items() -> list:
    """The suite as ``eval`` items: each request twice (task ``<category>/<mode>``, category = the mode).

    An item's input is the request alone; its ``meta`` carries the tools offered (OpenAI function objects),
    the policy (:data:`POLICY`) and whether it is ``constrained``, so the runner offers them the way the
    model's chat template does and builds the grammar in its call format through ``calls.call_request``,
    the path :func:`run_item` (agent_bench) takes. The target is the item as JSON, scored by the
    ``tool_calls`` metric (``tool_calls_valid`` beside it).
    """
    from ..eval.suites import Item

    register_metrics()
    out = []
    for it in items():
        specs = [catalog()[n].spec() for n in it["tools"]]
        for mode in MODES:
            constrained = mode == "constrained"
            out.append(Item(id=f"{it['id']}/{mode}", input=[{"role": "user", "content": it["query"]}],
                            target=json.dumps({**it, "constrained": constrained}), metric="tool_calls",
                            category=mode, task=f"{it['category']}/{mode}",
                            provenance="ondevice function-calling suite (data/function_calling.jsonl)",
                            extra_metrics=("tool_calls_valid",),
                            meta={"tools": specs, **POLICY, "constrained": constrained,
                                  "unit": it["id"], "stratum": it["category"]}))  # --limit: both modes of a request
    return out


def register_metrics() -> None:
    from ..eval.metrics import METRICS, metric

    if "tool_calls" in METRICS:
        return

    @metric("tool_calls")
    def tool_calls(prediction: str, target: str) -> float:
        t = json.loads(target)
        return score_reply(prediction, t, t["constrained"])["correct"]

    @metric("tool_calls_valid")
    def tool_calls_valid(prediction: str, target: str) -> float:
        t = json.loads(target)
        return score_reply(prediction, t, t["constrained"])["valid"]
