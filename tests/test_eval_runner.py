"""Task suites over the real model: per-sample log, summary, store record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ondevice.eval.runner import summarize


def test_summary_is_a_macro_mean_with_tau_on_0_1():
    rows = [
        {"task": "a", "category": "x", "metric": "exact_match", "score": 1.0},
        {"task": "a", "category": "x", "metric": "exact_match", "score": 0.0},
        {"task": "a", "category": "x", "metric": "exact_match", "score": 1.0},
        {"task": "b", "category": "y", "metric": "kendall_tau", "score": -1.0},
    ]
    s = summarize("t", rows, 1.0)
    assert s["tasks"]["a"]["mean"] == pytest.approx(2 / 3)
    assert s["tasks"]["b"]["mean"] == -1.0 and s["tasks"]["b"]["score"] == 0.0
    assert s["score"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert s["score_micro"] == pytest.approx(2 / 4)
    assert s["categories"] == {"x": pytest.approx(2 / 3), "y": 0.0}
    assert s["tasks"]["a"]["metric"] == "exact_match"
    mixed = summarize("t", [*rows, {"task": "a", "category": "x", "metric": "token_f1", "score": 0.5}], 1.0)
    assert mixed["tasks"]["a"]["metric"] == "exact_match+token_f1"  # not the first row's alone


def test_runner_on_a_tiny_user_suite(smol_path, tmp_path, monkeypatch):
    from ondevice.eval.api import evaluate, model_sha256
    from ondevice.eval.record import EvalRecord
    from ondevice.models import resolve
    from ondevice.store import Store

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    suite = tmp_path / "tiny.jsonl"
    items = [
        {"id": "cap", "input": "What is the capital of France? Answer with one word.", "target": "Paris",
         "metric": "exact_match", "task": "qa", "category": "knowledge"},
        {"id": "num", "input": "Reply with the number 4 only.", "target": "4", "metric": "exact_match",
         "task": "count", "category": "format"},
    ]
    suite.write_text("".join(json.dumps(i) + "\n" for i in items))
    db = tmp_path / "db.sqlite"
    (rec,) = evaluate(smol_path, suite=str(suite), max_tokens=8, store=db, log_dir=tmp_path / "logs", threads=2)
    assert rec.test == "suite:tiny" and rec.n_items == 2
    assert 0.0 <= rec.score <= 1.0
    log = [json.loads(x) for x in Path(rec.log).read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in log] == ["cap", "num"]
    for r in log:
        assert {"input", "prediction", "target", "metric", "score", "ttft_s", "decode_tps"} <= set(r)
        assert r["score"] in (0.0, 1.0) and r["generated_tokens"] <= 8
    assert rec.score == pytest.approx(sum(r["score"] for r in log) / 2)
    with Store(db) as s:
        (stored,) = s.records("eval")
    assert stored["test"] == "suite:tiny" and stored["score"] == rec.score
    assert EvalRecord.from_dict(stored) == rec and rec.to_dict()["limit"] is None  # the stored dict reads back
    assert stored["model_sha256"] == model_sha256(resolve(str(smol_path)))
    assert stored["file_size"] == smol_path.stat().st_size


def test_eval_config_one_declaration_for_flags_env_and_api(monkeypatch, tmp_path):
    """EvalConfig is what `ondevice eval`'s flags, ONDEVICE_EVAL_* and ondevice.evaluate's keywords build."""
    import os
    import subprocess
    import sys

    from ondevice.errors import InvalidArgument, ModelNotFound
    from ondevice.eval.api import evaluate, make_config

    monkeypatch.setenv("ONDEVICE_EVAL_MAX_TOKENS", "7")
    monkeypatch.setenv("ONDEVICE_JUDGE_KEY", "k")
    c = make_config(suite="rewrite", log_dir=tmp_path)
    assert c.max_tokens == 7 and c.judge_key == "k" and c.log_dir == str(tmp_path)
    assert make_config(make_config(suite="x", limit=3), limit=5).limit == 5  # keywords over a config
    with pytest.raises(InvalidArgument, match="--topk / ONDEVICE_EVAL_TOPK"):
        make_config(ppl=True, topk=0)
    with pytest.raises(InvalidArgument, match="EvalConfig has no argument 'ctx_sise' \\(did you mean 'ctx_size'\\?\\)"):
        evaluate(None, suite="x", ctx_sise=1)
    with pytest.raises(InvalidArgument, match=r"nothing to evaluate; ask for perplexity \(--ppl; ppl=True\)"):
        evaluate(None)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):  # the model is said first
        evaluate("nope")
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-m", "ondevice.cli", "eval", "--ppl", "--max-tokens", "0"], check=False,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=src))
    assert r.returncode == 2 and "ondevice eval: error: invalid eval settings: --max-tokens" in r.stderr, r.stderr
