"""bench as llama-bench runs it: each test gets the context its own length needs (not the sweep's largest), and
``-o jsonl`` prints each test's line as it finishes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from conftest import as_a_shell_starts_it

from ondevice.bench import BenchRecord


def _bench(tmp_path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ondevice.cli", "bench", *flags, "-t", "1", "-r", "1", "--no-roofline",
            "--no-report", "--no-progress"]


def _env(tmp_path) -> dict:
    return dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))


def test_each_test_gets_its_own_context_whatever_else_the_sweep_holds(tmp_path, smol_path):
    both = subprocess.run(_bench(tmp_path, "-m", str(smol_path), "--tests", "pp16,tg4@d600", "--no-store",
                                 "-o", "json"), env=_env(tmp_path), capture_output=True, text=True, timeout=400,
                          check=False)
    assert both.returncode == 0, both.stderr
    recs = [BenchRecord.from_dict(d) for d in json.loads(both.stdout)]
    assert [(r.test, r.status) for r in recs] == [("pp16", "ok"), ("tg4@d600", "ok")]
    # llama-bench sizes each test's context to its own prompt + generated + depth (here in steps of 256)
    assert recs[0].n_ctx == 256 and recs[1].n_ctx == 768, [r.n_ctx for r in recs]
    alone = subprocess.run(_bench(tmp_path, "-m", str(smol_path), "--tests", "pp16", "--no-store", "-o", "json"),
                           env=_env(tmp_path), capture_output=True, text=True, timeout=400, check=False)
    assert alone.returncode == 0, alone.stderr
    solo = BenchRecord.from_dict(json.loads(alone.stdout)[0])
    assert (solo.n_ctx, solo.config_key) == (recs[0].n_ctx, recs[0].config_key)  # the same row for compare
    # -c N still gives every test that one context
    fixed = subprocess.run(_bench(tmp_path, "-m", str(smol_path), "--tests", "pp16,tg4@d600", "-c", "1024",
                                  "--no-store", "-o", "json"), env=_env(tmp_path), capture_output=True, text=True,
                           timeout=400, check=False)
    assert fixed.returncode == 0, fixed.stderr
    assert [r["n_ctx"] for r in json.loads(fixed.stdout)] == [1024, 1024]


def test_jsonl_prints_each_test_as_it_finishes(tmp_path, smol_path):
    db = tmp_path / "runs.sqlite"
    proc = subprocess.Popen(_bench(tmp_path, "-m", str(smol_path), "--tests", "pp16,tg16@d300,tg16@d600", "-o",
                                   "jsonl", "--db", str(db)), env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509
    try:
        first = json.loads(proc.stdout.readline())
        assert first["test"] == "pp16" and first["status"] == "ok"
        with sqlite3.connect(db, timeout=5) as c:  # the line came before the later tests were measured
            stored = c.execute("SELECT COUNT(*) FROM records WHERE kind='bench'").fetchone()[0]
        assert stored < 3, "the first line came only after the whole sweep"
        rest, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in rest.splitlines()]
    assert [r["test"] for r in lines] == ["tg16@d300", "tg16@d600"]  # each once, in sweep order
    assert all("avg_ts" in r for r in [first, *lines])  # llama-bench's field names, as in the batch export
