"""Records from different machines or llama.cpp builds are named as such (compare, HTML, md, build_commit); eval
records export to their own SQL table; md cells keep ``|`` and line breaks; a failed report write names its file.
All on real SQLite stores in tmp_path."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import tmpfs
from test_report import fake

from ondevice.report import export
from ondevice.report.compare import compare
from ondevice.report.formats import parse_md
from ondevice.report.html import build_html
from ondevice.report.llama_bench import fields
from ondevice.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")
EPYC = {"cpu_model": "AMD EPYC", "physical_cores": 2, "logical_cores": 2, "memory_total_bytes": 25 << 30,
        "ondevice": "0.1.0", "llama_build": "llama-cpp-python 0.3.36; CPU : AVX2 = 1 |"}
M2 = {**EPYC, "cpu_model": "Apple M2 Pro", "physical_cores": 10, "logical_cores": 10,
      "llama_build": "llama-cpp-python 0.3.40; Metal"}


def _store(path: Path, sides) -> Path:
    with Store(path) as st:
        for sess, meta, tps in sides:
            for test in ("pp512", "tg128"):
                r = fake("smol", "c" * 64, test, 2, tps, meta=meta, session=sess)
                st.add("bench", r, session=sess, config_key=test, model="smol", model_sha256="c" * 64, test=test)
    return path


def _report(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ondevice.cli", "report", "--db", str(db), *args], check=False,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=SRC, ONDEVICE_HOME=str(db.parent / "home")))


def test_compare_warns_when_the_sides_ran_on_different_machines_or_builds(tmp_path):
    db = _store(tmp_path / "c.sqlite", [("a-1", EPYC, 100.0), ("b-1", M2, 150.0), ("c-1", EPYC, 120.0),
                                        ("d-1", {**EPYC, "llama_build": "llama-cpp-python 0.3.36; CPU : AVX = 1 |"},
                                         110.0), ("e-1", {**EPYC, "memory_total_bytes": (25 << 30) - (4 << 20)},
                                                  105.0)])
    with Store(db, create=False) as st:
        rows, table = compare(st, "a-1", "b-1")
        assert len(rows) == 2 and table.startswith("warning: A ran on AMD EPYC (2 cores")
        first = table.splitlines()[0]
        assert "Apple M2 Pro (10 cores" in first and "0.3.40" in first and "machines and llama.cpp builds" in first
        _, same = compare(st, "a-1", "c-1")  # one machine, one build: no warning
        assert not same.startswith("warning") and "warning" not in same
        _, rebooted = compare(st, "a-1", "e-1")  # MemTotal moved by 4 MiB (another kernel): the same machine
        assert "warning" not in rebooted
        _, build = compare(st, "a-1", "d-1")
        assert "compare llama.cpp builds," in build.splitlines()[0]
    r = _report(db, "--compare", "a-1", "b-1")
    assert r.returncode == 0 and r.stdout.startswith("warning: A ran on AMD EPYC"), r.stderr


def test_the_html_and_md_name_each_records_machine(tmp_path):
    db = _store(tmp_path / "h.sqlite", [("a-1", EPYC, 100.0), ("b-1", M2, 150.0)])
    out = tmp_path / "r.html"
    r = _report(db, "--all", "--html", str(out))
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    head = html.split('class="summary', 1)[1].split("</p>", 1)[0]
    assert "on 2 different machines or llama.cpp builds" in head and " warn" in head.split(">", 1)[0]
    assert "<b>smol</b> on Apple M2 Pro (10 cores, 25.0 GiB), llama-cpp-python 0.3.40" in head
    m2_line = [ln for ln in head.split("<br>") if "Apple M2 Pro" in ln][0]
    assert "decode 150.0 tok/s" in m2_line  # the M2's figure, credited to the M2
    epyc_line = [ln for ln in head.split("<br>") if "<b>smol</b> on AMD EPYC" in ln][0]
    assert "decode 100.0 tok/s" in epyc_line
    device = html.split("<h2>Device</h2>", 1)[1].split("</table>", 1)[0]
    assert "AMD EPYC" in device and "Apple M2 Pro" in device and "llama-cpp-python 0.3.40; Metal" in device
    rows = parse_md(_report(db, "--all", "-o", "md").stdout)
    assert {row["machine"].split(";")[0] for row in rows} == {"AMD EPYC (2 cores, 25.0 GiB)",
                                                              "Apple M2 Pro (10 cores, 25.0 GiB)"}
    one = _store(tmp_path / "one.sqlite", [("a-1", EPYC, 100.0)])  # one machine: no column, the headline names it
    assert "machine" not in parse_md(_report(one, "--all", "-o", "md").stdout)[0]
    r = _report(one, "--all", "--html", str(out))
    assert r.returncode == 0 and "2 of 2 runs ok on AMD EPYC (2 cores)." in out.read_text()


def test_build_commit_names_the_llama_cpp_build():
    a, b = (fields({"meta": m}) for m in (EPYC, {**EPYC, "llama_build": "llama-cpp-python 0.3.36; Metal"}))
    assert a["build_commit"].startswith("ondevice-0.1.0+llama-cpp-python-0.3.36-") and " " not in a["build_commit"]
    assert a["build_commit"] != b["build_commit"]  # two builds of one version group apart
    assert fields({"meta": {"ondevice": "0.1.0"}})["build_commit"] == "ondevice-0.1.0"  # no build recorded
    html = build_html([fake("smol", "c" * 64, "tg8", 1, 5.0, meta=EPYC)])
    assert "llama-cpp-python 0.3.36; CPU" in html


def test_eval_sql_goes_to_its_own_table_beside_the_bench_one(tmp_path):
    db = _store(tmp_path / "e.sqlite", [("a-1", EPYC, 100.0)])
    with Store(db) as st:
        st.add("eval", {"kind": "eval", "test": "ppl:lee", "model": "smol", "model_sha256": "c" * 64, "ppl": 12.5,
                        "corpus": {"name": "lee"}, "created": "2026-01-01T00:00:00+00:00"},
               session="e-1", config_key="e", model="smol", model_sha256="c" * 64, test="ppl:lee")
    bench, evals = _report(db, "--all", "-o", "sql"), _report(db, "--eval", "-o", "sql")
    assert bench.returncode == 0 and evals.returncode == 0, (bench.stderr, evals.stderr)
    assert "CREATE TABLE IF NOT EXISTS eval (" in evals.stdout and "bench" not in evals.stdout
    for order in ((bench, evals), (evals, bench)):  # piped into one database, either way round, twice
        out = sqlite3.connect(tmp_path / f"results-{id(order)}.db")
        for part in (*order, *order):
            out.executescript(part.stdout)
        assert out.execute("SELECT COUNT(*) FROM bench").fetchone()[0] == 4
        assert out.execute("SELECT test, ppl, json_extract(corpus, '$.name') FROM eval").fetchall() == [
            ("ppl:lee", 12.5, "lee")] * 2
        cols = {row[1] for row in out.execute("PRAGMA table_info(eval)")}
        assert "ppl" in cols and "avg_ts" not in cols and "tps_mean" not in cols
        out.close()
    empty = export([], "sql", "eval")
    assert empty.startswith("CREATE TABLE IF NOT EXISTS eval (") and '"ppl" REAL' in empty


def test_md_cells_keep_pipes_and_line_breaks(tmp_path):
    db = _store(tmp_path / "m.sqlite", [])
    with Store(db) as st:
        for sess, model in (("a\nb", "q | 4"), ("c", "plain")):
            r = fake(model, "d" * 64, "pp8", 1, 10.0, meta=EPYC, session=sess)
            st.add("bench", r, session=sess, config_key=model, model=model, model_sha256="d" * 64, test="pp8")
    text = _report(db, "--all", "-o", "md").stdout
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 4 and all(ln.endswith("|") for ln in table), text
    assert "q \\| 4" in text and "a<br>b" in text
    rows = parse_md(text)
    assert [(r["session"], r["model"], r["test"]) for r in rows] == [("a\nb", "q | 4", "pp8"), ("c", "plain", "pp8")]


def test_a_failed_report_write_names_the_file(tmp_path):
    """On a full disk the error came from write/flush, which names no file: the message said only "No space left
    on device". The old report is kept."""
    with tmpfs(tmp_path / "tiny", "size=64K") as disk:
        db = _store(tmp_path / "w.sqlite", [("a-1", EPYC, 100.0)])
        out = disk / "r.html"
        out.write_text("old report")
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (1 << 20))
        r = _report(db, "--all", "--html", str(out))
        assert r.returncode == 2 and str(out) in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert out.read_text() == "old report" and sorted(p.name for p in disk.iterdir()) == ["filler", "r.html"]
