"""`ondevice eval` as an lm-eval / llama-bench user walks it: -o, flags a run would ignore, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _suite(tmp_path: Path, n: int = 2) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "input": f"Reply with the number {i} only.", "target": str(i),
                                        "metric": "exact_match", "task": "count", "category": "format"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _tests(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return [t for (t,) in c.execute("SELECT test FROM records WHERE kind='eval' ORDER BY id")]


def test_o_with_a_format_name_is_refused_not_a_stray_file(cli, tmp_path, smol_path):
    # `ondevice bench -o json` prints JSON; `ondevice eval -o json` appended the records to a file named "json"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "ondevice.cli", "eval", "-m", str(smol_path), "--suite",
                        str(_suite(tmp_path)), "--max-tokens", "2", "--threads", "1", "--no-store", "-o", "json"],
                       check=False, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home")))
    assert r.returncode == 2, r.stderr
    assert "ondevice eval: error: -o takes the file to append the records to" in r.stderr and "--json" in r.stderr
    assert list(cwd.iterdir()) == []


def test_o_that_cannot_take_the_records_is_refused_before_the_eval_runs(cli, tmp_path, smol_path):
    notes = tmp_path / "notes.txt"  # a text file: the records were appended to it
    notes.write_text("keep me\n")
    r = cli("eval", "-m", str(smol_path), "--suite", str(_suite(tmp_path)), "--max-tokens", "2", "--threads", "1",
            "-o", str(notes))
    assert r.returncode == 2 and f"-o {notes} holds text that is not JSON lines (its last line: 'keep me')" \
        in r.stderr, r.stderr
    assert notes.read_text() == "keep me\n" and _tests(tmp_path / "home" / "data" / "ondevice.sqlite") == []
    # a folder nobody may write in, root included (os.access said yes to root, so the eval ran and its -o failed)
    r = cli("eval", "-m", str(smol_path), "--suite", str(_suite(tmp_path)), "--max-tokens", "2", "--threads", "1",
            "-o", "/proc/ondevice-eval.jsonl")
    assert r.returncode == 2 and "cannot write /proc/ondevice-eval.jsonl: the folder /proc is not writable" in r.stderr
    assert _tests(tmp_path / "home" / "data" / "ondevice.sqlite") == [], r.stderr
    db = tmp_path / "e.sqlite"
    out = tmp_path / "no" / "such" / "out.jsonl"  # its folders are made, as every writer here makes them
    r = cli("eval", "-m", str(smol_path), "--suite", str(_suite(tmp_path)), "--max-tokens", "2", "--threads", "1",
            "--db", str(db), "-o", str(out))
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rec["test"] == "suite:tiny" and rec["n_items"] == 2
    assert _tests(db) == ["suite:tiny"]  # --db, as bench's and report's


@pytest.mark.parametrize(("flags", "says"), [
    (["--tasks", "count"], "--tasks is only for --cascade URL"),
    (["--split", "dev", "--combiner", "c.json"], "--combiner, --split are only for --cascade URL"),
    (["--cascade", "http://127.0.0.1:9/v1", "--ppl", "--temp", "0.5"], "--cascade does not use --ppl, --temp"),
])
def test_flags_the_run_would_ignore_are_refused(cli, tmp_path, smol_path, flags, says):
    # lm-eval's --tasks picks what runs; here it filtered only the cascade's items and a plain eval ran all
    r = cli("eval", "-m", str(smol_path), "--suite", str(_suite(tmp_path)), "--max-tokens", "2", "--threads", "1",
            "--no-store", *flags, timeout=120)
    assert r.returncode == 2 and f"ondevice eval: error: {says}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("flags", "says"), [
    (["--ppl", "--limit", "5"], ("--limit is for task suites (--suite NAME) and this run has none; a perplexity "
                                 "covers the text: --chunks N measures part of it")),
    (["--ppl", "-s", "3", "--max-tokens", "8"], "--max-tokens, -s are for task suites"),
    (["--suite", "SUITE", "--chunks", "2"], "--chunks sets the perplexity run and this run has none; add --ppl"),
    (["--ppl", "--topk", "10"], ("--topk sets how many of the reference's log-probs are kept per token; it needs "
                                 "--ref MODEL")),
])
def test_a_flag_for_the_part_the_run_does_not_hold_is_refused(cli, tmp_path, smol_path, flags, says):
    # llama-perplexity has no --limit: a perplexity run with it measured the whole text and said nothing
    flags = [str(_suite(tmp_path)) if f == "SUITE" else f for f in flags]
    r = cli("eval", "-m", str(smol_path), "--no-store", *flags, timeout=120)
    assert r.returncode == 2 and f"ondevice eval: error: {says}" in r.stderr, r.stderr


def test_interrupted_suite_keeps_the_finished_perplexity_and_names_the_partial_log(tmp_path, smol_path, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt at the second item) after a perplexity: the perplexity record is stored, the
    suite's is not, and the error says where its finished samples are."""
    from ondevice.eval.api import evaluate
    from ondevice.eval.runner import Interrupted

    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    db = tmp_path / "e.sqlite"

    def progress(line: str) -> None:
        if line.lstrip().startswith("[2/"):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        evaluate(smol_path, ppl=True, ctx=64, chunks=1, suite=str(_suite(tmp_path, 4)), max_tokens=2, threads=1,
                 store=db, log_dir=tmp_path / "logs", progress=progress)
    e = info.value
    assert isinstance(e, KeyboardInterrupt) and (e.suite, e.done, e.total) == ("tiny", 2, 4)
    assert e.stored == ["ppl:pydoc"] and _tests(db) == ["ppl:pydoc"]
    assert e.partial.name.endswith(".partial") and e.partial.parent == tmp_path / "logs"
    assert [json.loads(x)["id"] for x in e.partial.read_text(encoding="utf-8").splitlines()] == ["q0", "q1"]
    assert not (tmp_path / "logs" / e.partial.name.split(".jsonl")[0]).with_suffix(".jsonl").exists()


def test_ctrl_c_mid_suite_says_what_was_kept(tmp_path, smol_path):
    db = tmp_path / "home" / "data" / "ondevice.sqlite"  # the default store
    args = [sys.executable, "-m", "ondevice.cli", "eval", "-m", str(smol_path), "--suite", str(_suite(tmp_path, 40)),
            "--max-tokens", "16", "--threads", "1", "--log-dir", str(tmp_path / "logs")]
    # Ctrl-C's default action in the child, as a terminal's shell gives it (see test_bench's interrupt test)
    proc = subprocess.Popen(args, env=dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    lines = []
    t0 = time.time()
    while not any(x.lstrip().startswith("[1/") for x in lines):
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(lines)
        lines.append(line)
        assert time.time() - t0 < 240, "no item finished"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = "".join(lines) + err
    if proc.returncode == 0:
        pytest.skip("the suite finished before the interrupt landed")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "ondevice eval: interrupted at item " in err and "of suite tiny; its score was not stored" in err, err
    partial = Path(err.split("finished samples are in ", 1)[1].split(")", 1)[0])
    assert partial.parent == tmp_path / "logs" and partial.name.endswith(".partial")
    assert len(partial.read_text(encoding="utf-8").splitlines()) >= 1
    assert _tests(db) == []


def test_a_model_with_nan_logits_gets_an_error_not_a_stored_ppl_of_nan(cli, tmp_path, smol_path):
    import shutil

    import numpy as np
    from gguf import GGUFReader

    nan = tmp_path / "nan.gguf"  # structurally a valid GGUF: its output norm is NaN, so every logit is
    shutil.copy(smol_path, nan)
    reader = GGUFReader(nan, "r+")
    next(t for t in reader.tensors if t.name == "output_norm.weight").data[...] = np.nan
    reader.data.flush()
    del reader
    r = cli("eval", "-m", str(nan), "--ppl", "--ctx", "64", "--chunks", "1", "--threads", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ondevice eval: error: the model computed NaN or infinite logits" in r.stderr and "nan" not in r.stdout
    assert _tests(tmp_path / "home" / "data" / "ondevice.sqlite") == []
    r = cli("eval", "-m", str(smol_path), "--ref", str(nan), "--ctx", "64", "--chunks", "1", "--threads", "1")
    assert r.returncode == 2 and "NaN or infinite logits as the reference (nan)" in r.stderr, r.stderr
    assert _tests(tmp_path / "home" / "data" / "ondevice.sqlite") == []
    assert not list((tmp_path / "home" / "data").glob("eval-cache/*"))  # no reference of NaNs cached


def test_the_task_table_stays_aligned_with_long_category_names():
    import io

    from ondevice.eval.cli import print_record
    from ondevice.eval.record import EvalRecord

    tasks = {"rewrite_tone": {"category": "rewriting", "metric": "rouge_l", "n": 3, "mean": 0.25},
             "notification_summary": {"category": "notification_summary", "metric": "rouge_l", "n": 2, "mean": 0.5}}
    r = EvalRecord.from_dict({"test": "suite:assistant-en", "model": "m", "model_sha256": "0" * 64, "n_items": 5,
                              "n_scored": 5, "score": 0.375, "max_tokens": 8, "tasks": tasks})
    buf = io.StringIO()
    print_record(r, buf)
    rows = [line for line in buf.getvalue().splitlines() if "n=" in line]
    assert len(rows) == 2 and len({line.index("rouge_l") for line in rows}) == 1, rows  # one column each
    assert len({line.index("n=") for line in rows}) == 1, rows


def test_inputs_and_a_judge_that_is_no_url_are_refused_before_any_work(cli, tmp_path):
    """-o naming the -f text (or the suite, the model) appended JSON records to it, exit 0: the next run measured
    another text. --judge without http:// was a urllib traceback after the first item."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    before = text.read_bytes()
    r = cli("eval", "-f", str(text), "-c", "32", "--chunks", "1", "-o", str(text))
    assert r.returncode == 2 and f"-o {text} is the -f text of this run: the records would be appended" in r.stderr
    assert text.read_bytes() == before
    r = cli("eval", "--suite", "rewrite", "--limit", "1", "--judge", "127.0.0.1:8080", "--judge-model", "x")
    assert r.returncode == 2 and "--judge '127.0.0.1:8080' is not an http(s) URL; give the judge's OpenAI-compatible " \
                                 "endpoint, e.g. --judge http://127.0.0.1:8080/v1" in r.stderr, r.stderr
    r = cli("eval", "--tasks", "rewrite")  # lm-eval's flag for what --suite is here
    assert r.returncode == 2 and "a suite is run with --suite NAME (lm-eval's --tasks)" in r.stderr, r.stderr


def test_a_damaged_reference_cache_is_recomputed_not_a_traceback(tmp_path):
    from ondevice.eval.ppl import load_ref

    for data in (b"", b"PK\x03\x04 cut short", b"not a zip"):  # empty, truncated (BadZipFile, EOFError)
        (tmp_path / "ref.npz").write_bytes(data)
        assert load_ref(tmp_path / "ref.npz", 1, 16) is None
