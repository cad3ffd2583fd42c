"""Suite items and the context window: skipped and counted (not fatal), --ctx-size, --strict, the KV
estimate behind the default window, the per-verb overflow advice, and the retention view."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice.errors import ContextOverflow, InvalidArgument
from ondevice.eval.runner import summarize
from ondevice.eval.window import kv_bytes_per_token, suite_window

LONG_WORDS = 300  # "apple " x 300: over a 256-token window, well under 1024


@pytest.fixture()
def mixed_suite(tmp_path) -> Path:
    """One short item and one very long one, in the same task."""
    items = [
        {"id": "short", "input": "Reply with the number 4 only.", "target": "4", "metric": "exact_match",
         "task": "t", "category": "c"},
        {"id": "long", "input": "Count the words: " + "apple " * LONG_WORDS, "target": str(LONG_WORDS),
         "metric": "exact_match", "task": "t", "category": "c"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_an_over_long_item_is_skipped_and_counted_not_fatal(smol_path, mixed_suite, home, tmp_path):
    from ondevice.eval.api import evaluate

    (rec,) = evaluate(smol_path, suite=str(mixed_suite), ctx_size=256, max_tokens=4, threads=1,
                      store=tmp_path / "db.sqlite", log_dir=tmp_path / "logs")
    assert rec.n_ctx == 256 and rec.n_items == 2
    assert (rec.n_scored, rec.n_skipped, rec.coverage) == (1, 1, 0.5)
    (sk,) = rec.skipped
    assert sk["id"] == "long" and sk["prompt_tokens"] > 256 and "context window holds 256" in sk["reason"]
    log = {r["id"]: r for r in map(json.loads, Path(rec.log).read_text(encoding="utf-8").splitlines())}
    assert log["long"]["skipped"] is True and log["long"]["score"] is None and "prediction" not in log["long"]
    assert log["short"].get("skipped") is None and log["short"]["score"] in (0.0, 1.0)
    # the documented rule: score over the scored items; skipped-as-0 divides by all items of the task
    assert rec.score == log["short"]["score"]
    assert rec.score_skipped_as_0 == pytest.approx(log["short"]["score"] / 2)
    assert rec.tasks["t"]["n"] == 1 and rec.tasks["t"]["n_skipped"] == 1


def test_ctx_size_raises_the_window_so_the_long_item_is_scored(smol_path, mixed_suite, home, tmp_path):
    from ondevice.eval.api import evaluate

    (rec,) = evaluate(smol_path, suite=str(mixed_suite), ctx_size=1024, max_tokens=4, threads=1, store=False,
                      log_dir=tmp_path / "logs")
    assert rec.n_ctx == 1024 and rec.n_ctx_requested == 1024
    assert (rec.n_scored, rec.n_skipped, rec.coverage) == (2, 0, 1.0)
    log = [json.loads(x) for x in Path(rec.log).read_text(encoding="utf-8").splitlines()]
    assert log[1]["id"] == "long" and log[1]["prompt_tokens"] > 256 and "prediction" in log[1]


def test_no_store_writes_nothing_unless_a_log_dir_is_asked_for(smol_path, mixed_suite, home, tmp_path):
    from ondevice.eval.api import evaluate

    (rec,) = evaluate(smol_path, suite=str(mixed_suite), ctx_size=256, max_tokens=2, threads=1, store=False)
    assert rec.log is None and rec.n_scored == 1
    assert not list(home.rglob("*.jsonl")) and not list(home.rglob("*.sqlite"))  # no per-sample log, no store


def test_strict_fails_fast_naming_the_flag_and_the_cli_prints_coverage(cli, smol_path, mixed_suite):
    args = ("eval", "-m", str(smol_path), "--suite", str(mixed_suite), "--ctx-size", "256", "--max-tokens", "4",
            "--threads", "1", "--no-store")
    r = cli(*args, "--strict")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("ondevice eval: error: the item 'long'"), err
    assert "context window holds 256" in err and "raise --ctx-size" in err and "drop --strict" in err
    assert "--ctx " not in err  # the perplexity chunk flag is not the fix
    assert "[1/2]" not in r.stderr  # failed before generating anything

    r = cli(*args)  # without --strict: the run goes on
    assert r.returncode == 0, r.stderr
    assert re.search(r"score \S+ on 1/2 items \(coverage 50%\); \S+ counting skipped as 0", r.stdout), r.stdout
    assert "long: skipped (needs" in r.stderr


def test_window_is_capped_at_the_trained_context_and_sized_by_memory(smol_path):
    from ondevice.models import resolve

    info = resolve(str(smol_path)).info
    trained = info.context_length
    assert trained == 8192
    per_token = kv_bytes_per_token(info)
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) values x 2 bytes (f16)
    assert per_token == 30 * 3 * 128 * 2
    w = suite_window(info, 0, available=64 << 30)
    assert (w.n_ctx, w.note) == (trained, None) and w.kv_bytes == trained * per_token
    w = suite_window(info, 100_000, available=64 << 30)
    assert w.n_ctx == trained and "--ctx-size 100000 is above" in w.note and str(trained) in w.note
    # little memory: the default shrinks to what half of it holds; an explicit size that cannot fit is refused
    w = suite_window(info, 0, available=6 * 1024 * per_token)
    assert w.n_ctx == 3072 and "more than half" in w.note
    with pytest.raises(InvalidArgument, match="lower --ctx-size"):
        suite_window(info, 8192, available=1024 * per_token)
    with pytest.raises(InvalidArgument, match="--ctx-size -1 must be >= 0"):
        suite_window(info, -1)


def test_kv_estimate_matches_what_llama_cpp_allocates(smol_path):
    """llama.cpp logs its KV cache size at load (ONDEVICE_VERBOSE=1); the GGUF estimate must agree."""
    from ondevice.models import resolve

    code = ("import ondevice, sys; m = ondevice.load(sys.argv[1], n_ctx=2048, n_threads=1, warmup=False); "
            "m.close()")
    r = subprocess.run([sys.executable, "-c", code, str(smol_path)], check=False, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, ONDEVICE_VERBOSE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"llama_kv_cache[^\n]*size =\s*([\d.]+) MiB", r.stderr)
    assert m, r.stderr[-2000:]
    estimate = 2048 * kv_bytes_per_token(resolve(str(smol_path)).info)
    assert float(m.group(1)) == pytest.approx(estimate / 2**20, rel=0.01)


def test_summary_with_skipped_items():
    rows = [
        {"task": "a", "category": "x", "metric": "exact_match", "score": 1.0},
        {"id": "a2", "task": "a", "category": "x", "metric": "exact_match", "score": None, "skipped": True,
         "skip_reason": "too long", "prompt_tokens": 9000},
        {"id": "b1", "task": "b", "category": "y", "metric": "exact_match", "score": None, "skipped": True,
         "skip_reason": "too long", "prompt_tokens": 9100},
    ]
    s = summarize("t", rows, 1.0)
    assert (s["n_items"], s["n_scored"], s["n_skipped"]) == (3, 1, 2)
    assert s["coverage"] == pytest.approx(1 / 3)
    assert s["score"] == 1.0  # task b has nothing scored: out of the mean, and counted
    assert s["tasks"]["b"]["n"] == 0 and s["tasks"]["b"]["score"] is None and s["tasks"]["b"]["n_skipped"] == 1
    assert s["score_skipped_as_0"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["categories"] == {"x": 1.0}
    assert [x["id"] for x in s["skipped"]] == ["a2", "b1"]


def test_overflow_advice_names_each_verbs_flag(cli):
    e = ContextOverflow(5000, 4096)
    assert "raise -c/--ctx (at most the model's trained context, 8192)" in str(e.advise("-c/--ctx", 8192))
    at_max = str(e.advise("--ctx-size", 4096, "lower --max-tokens", shorten=None))
    assert "raise" not in at_max and "lower --max-tokens" in at_max and "already the model's trained context" in at_max
    # run: -c/--ctx is the window
    r = cli("run", "--ctx", "64", "--raw", "-t", "1", "hello " * 400)
    assert r.returncode == 2 and "raise -c/--ctx" in r.stderr, r.stderr
    # eval: --ctx is the perplexity chunk, refused above the trained context with the flag named
    r = cli("eval", "--ppl", "--ctx", "100000", "--no-store")
    assert r.returncode == 2 and "--ctx/-c 100000 (the perplexity chunk) is above" in r.stderr, r.stderr


def test_c_is_the_perplexity_chunk_as_llama_perplexitys_unless_ctx_says(cli, smol_path):
    """llama-perplexity's -c/--ctx-size is its chunk: with --ppl alone it is ours too (was ignored: 512)."""
    for args, chunk in ((("-c", "64"), 64), (("--ctx-size", "96"), 96), (("-c", "64", "--ctx", "32"), 32)):
        r = cli("eval", "-m", str(smol_path), "--ppl", "--chunks", "1", "-t", "1", "--no-store", "--json", *args)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["n_ctx"] == chunk, (args, r.stdout)
    r = cli("eval", "--ppl", "-c", "8", "--no-store")
    assert r.returncode == 2, r.stderr
    assert "-c / ONDEVICE_EVAL_CTX_SIZE: is also the perplexity chunk" in r.stderr, r.stderr


def test_chat_reports_an_overflow_and_keeps_going(cli):
    script = ("word " * 400) + "\nSay hi.\n/bye\n"
    r = cli("chat", "--ctx", "64", "--temp", "0", "-n", "4", "-t", "1", "--timings", input=script)
    assert r.returncode == 0, r.stderr
    # one message past the window: older exchanges were already forgotten, so /reset would not help
    assert "ondevice chat: error: the prompt has" in r.stderr and "raise -c/--ctx" in r.stderr, r.stderr
    assert "/reset" not in r.stderr
    assert r.stderr.count("TTFT") == 1  # the second message was answered


def test_retention_against_the_family_f16(tmp_path):
    from ondevice.cli import main
    from ondevice.report.html import build_html
    from ondevice.report.quality import retention
    from ondevice.store import Store

    def rec(sha, vtype, score, cats, size, **kw):
        return {"test": "suite:smartbench", "model": f"m-{vtype}", "model_sha256": sha, "family": "m",
                "family_sha256": "root", "variant_type": vtype, "quant": "Q4_1 70%", "score": score,
                "score_skipped_as_0": score * 0.7, "coverage": 0.7, "n_scored": 14, "n_items": 20, "limit": 20,
                "seed": 0, "max_tokens": 64, "temp": 0.0, "n_ctx": 8192, "categories": cats, "file_size": size,
                "created": 1.0, **kw}

    records = [rec("f", "F16", 0.40, {"qa": 0.5, "creation": 0.2}, 300e6),
               rec("q", "Q4_0", 0.30, {"qa": 0.45, "creation": 0.1}, 90e6),
               rec("s", None, 0.36, {"qa": 0.5, "creation": 0.3}, 100e6),
               rec("x", "Q8_0", 0.9, {"qa": 0.9}, 150e6, max_tokens=32)]  # other settings: its own group
    rows = retention(records)
    by = {(r["model"], r["max_tokens"]): r for r in rows}
    q = by[("m-Q4_0", 64)]
    assert q["retention"] == pytest.approx(0.75) and q["category_retention"]["qa"] == pytest.approx(0.9)
    assert by[("m-F16", 64)]["retention"] == 1.0 and by[("m-None", 64)]["variant"] == "shipped Q4_1"
    assert by[("m-Q8_0", 32)]["retention"] is None  # no F16 under the same settings
    assert "retention vs F16" in build_html([], records) and "75%" in build_html([], records)
    db = tmp_path / "db.sqlite"
    with Store(db) as s:
        for r in records:
            s.add("eval", r, session="s1", config_key=r["model_sha256"], model=r["model"],
                  model_sha256=r["model_sha256"], test=r["test"])
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", "--retention", "--db", str(db)]) == 0
    assert "| m | Q4_0 | 90 | 14/20 (70%) | 0.300 | 0.210 | 75% |" in out.getvalue(), out.getvalue()
