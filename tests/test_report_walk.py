"""What `ondevice report` meets in real stores: ``created`` written two ways, a damaged or busy file, a store
from an older version that a reader must not change. Every store here is a real SQLite file."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import datetime

import pytest
from test_report import fake

from ondevice.report import quality_vs_speed
from ondevice.report.cascade import latest as latest_cascade
from ondevice.report.quality import retention
from ondevice.store import Store
from ondevice.store.db import SCHEMA

A, B = "a" * 64, "b" * 64


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _eval(sha: str, model: str, created, **kw) -> dict:
    return {"kind": "eval", "model": model, "model_sha256": sha, "test": "ppl:lee", "created": created, **kw}


def _add(st: Store, kind: str, rec: dict, session: str) -> None:
    st.add(kind, rec, session=session, config_key=hashlib.sha256(repr(rec).encode()).hexdigest()[:16],
           model=rec["model"], model_sha256=rec["model_sha256"], test=rec["test"])


def test_created_reads_iso_and_epoch_alike():
    from ondevice.store.record import created_now, created_time

    iso = "2026-12-03T08:30:00+00:00"
    t = _epoch(iso)
    assert created_time(iso) == created_time(t) == created_time("2026-12-03T08:30:00Z") == t
    assert created_time("2026-12-03T10:30:00+02:00") == t  # another zone: the same instant
    assert created_time("2026-12-03T08:30:00") == t  # no zone: UTC, as every writer means it
    assert created_time(str(t)) == t  # an epoch read back from a CSV export as text
    assert created_time(None) == created_time("") == created_time("soon") == 0.0  # missing: oldest
    assert created_time(created_now()) > t - 86400 * 365


def test_one_store_with_iso_and_epoch_created_reports_the_newest(tmp_path, cli):
    """Eval and fit records carried ``time.time()`` and bench records ISO 8601; a store holds both, and a
    record written with either must compare with the other by the time it means, not crash the report."""
    db = tmp_path / "mixed.sqlite"
    with Store(db) as st:
        for sha, model, tps in ((A, "q8", 80.0), (B, "q4", 120.0)):
            _add(st, "bench", fake(model, sha, "tg128", 2, tps, session="s1").to_dict(), "s1")
        # q8's perplexity measured three times: epoch (oldest), ISO (newest, in another zone), epoch (middle)
        _add(st, "eval", _eval(A, "q8", _epoch("2026-12-01T00:00:00+00:00"), ppl=30.0), "e1")
        _add(st, "eval", _eval(A, "q8", "2026-12-03T02:00:00+01:00", ppl=10.0), "e2")
        _add(st, "eval", _eval(A, "q8", _epoch("2026-12-02T00:00:00+00:00"), ppl=20.0), "e3")
        _add(st, "eval", _eval(B, "q4", "2026-12-02T00:00:00+00:00", ppl=11.0), "e4")
        _add(st, "eval", _eval(B, "q4", _epoch("2026-12-01T00:00:00+00:00"), ppl=99.0), "e5")
        # a suite's F16 and Q4 made as variants of one family: the retention view's newest per variant
        suite = {"test": "suite:assistant-en", "family": "smol", "family_sha256": "f" * 64, "limit": 8}
        _add(st, "eval", {**suite, "kind": "eval", "model": "f16", "model_sha256": "c" * 64, "variant_type": "F16",
                          "score": 0.8, "created": "2026-12-02T00:00:00+00:00"}, "e6")
        _add(st, "eval", {**suite, "kind": "eval", "model": "f16", "model_sha256": "c" * 64, "variant_type": "F16",
                          "score": 0.4, "created": _epoch("2026-12-01T00:00:00+00:00")}, "e7")
        _add(st, "eval", {**suite, "kind": "eval", "model": "q4", "model_sha256": B, "variant_type": "Q4_0",
                          "score": 0.6, "created": _epoch("2026-12-03T00:00:00+00:00")}, "e8")
        evals = st.records("eval")
        bench = st.records("bench")
    ppl = {p["model"]: p["quality"] for p in quality_vs_speed([*bench, *evals]) if p["eval_test"] == "ppl:lee"}
    assert ppl == {"q8": 10.0, "q4": 11.0}
    (q4,) = [r for r in retention(evals) if r["model"] == "q4"]
    assert q4["retention"] == pytest.approx(0.6 / 0.8)  # against the newer F16 (ISO), not the older (epoch)
    r = cli("report", "--db", str(db), "--html", str(tmp_path / "r.html"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    html = (tmp_path / "r.html").read_text()
    assert "Quality vs speed: ppl:lee" in html


def test_cascade_records_of_either_created_pick_the_newest():
    base = {"test": "cascade:rewrite", "model_sha256": A, "cloud_model": "big", "split": "test", "curve": {}}
    recs = [{**base, "n": 1, "created": _epoch("2026-12-01T00:00:00+00:00")},
            {**base, "n": 2, "created": "2026-12-02T00:00:00+00:00"},
            {**base, "n": 3, "created": _epoch("2026-11-30T00:00:00+00:00")}]
    assert [r["n"] for r in latest_cascade(recs)] == [2]


def _store_with_records(path, n: int = 400) -> None:
    with Store(path) as st:
        for i in range(n):
            rec = {**fake("q8", A, "tg128", 2, 80.0 + i).to_dict(), "session": "s1", "pad": "x" * 200, "i": i}
            _add(st, "bench", rec, "s1")
    with sqlite3.connect(path) as db:  # fold the WAL into the file, as after a clean exit
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_damaged_store_is_named_in_one_line_by_report_and_bench(tmp_path, cli):
    db = tmp_path / "s.sqlite"
    _store_with_records(db)
    with sqlite3.connect(db) as c:
        page = c.execute("PRAGMA page_size").fetchone()[0]
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name='records'").fetchone()[0]
    with open(db, "r+b") as f:  # the records table's root page overwritten (a bad sector, a torn copy)
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)
    for args in (("report", "--db", str(db)), ("report", "--db", str(db), "--list"),
                 ("bench", "--db", str(db), "-p", "8", "-n", "4", "-r", "1", "--no-roofline")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith(f"ondevice {args[0]}: error: {db} is damaged (database disk image is "
                                           f"malformed); move it aside"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_store_busy_longer_than_the_timeout_is_named(tmp_path):
    db = tmp_path / "s.sqlite"
    Store(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of writing
    try:
        with Store(db, timeout=0.2) as st, pytest.raises(sqlite3.DatabaseError, match=r"is locked: another "
                                                          r"process .* kept it busy for over 0.2 s") as e:
            _add(st, "bench", fake("q8", A, "tg128", 2, 80.0).to_dict(), "s1")
        assert "ondevice" in type(e.value).__module__  # one line at the CLI (an OndeviceError), still a DB error
        with Store(db, create=False, timeout=0.2) as st:  # reading is not blocked by the writer
            assert st.records("bench") == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_report_reads_an_older_store_without_changing_it(tmp_path, cli):
    """A store written before hard samples were kept (records table only, rollback journal) reads as it is:
    the report, `report --list` and `cascade export` leave its bytes alone and make no -wal/-shm files."""
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as c:
        c.executescript(SCHEMA.split("-- inputs the device")[0])  # the schema of the first versions
        rec = fake("q8", A, "tg128", 2, 80.0, session="s1").to_dict()
        c.execute("INSERT INTO records(kind, session, config_key, model, model_sha256, test, status, created, record)"
                  " VALUES ('bench', 's1', 'k', 'q8', ?, 'tg128', 'ok', 1764000000.0, ?)", (A, _json(rec)))
    before = db.read_bytes()
    for args in (("report", "--db", str(db), "--html", str(tmp_path / "r.html")), ("report", "--db", str(db), "--list"),
                 ("cascade", "export", "--db", str(db))):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("old.sqlite*")) == ["old.sqlite"]
    assert "tg128" in (tmp_path / "r.html").read_text()


def _json(rec: dict) -> str:
    import json

    return json.dumps(rec, sort_keys=True)


def test_a_session_id_with_slashes_writes_its_report_inside_the_reports_folder(tmp_path, cli):
    home = tmp_path / "home"
    with Store(tmp_path / "s.sqlite") as st:
        _add(st, "bench", fake("q8", A, "tg128", 2, 80.0, session="exp/../../out").to_dict(), "exp/../../out")
    r = cli("report", "--db", str(tmp_path / "s.sqlite"))
    assert r.returncode == 0, r.stderr
    written = home / "reports" / "bench-exp-..-..-out.html"
    assert f"report: {written}" in r.stdout and written.is_file()
    assert sorted(p.name for p in (home / "reports").iterdir()) == [written.name]
    assert not list(tmp_path.rglob("out.html"))


def test_a_store_of_eval_records_only_is_listed_and_exported(tmp_path, cli):
    """`ondevice report` refused a store holding only eval records ("no bench records yet"): a perplexity run's
    record could be read back only with sqlite. `report --eval` lists them as eval printed them, or exports them."""
    import json

    db = tmp_path / "evals.sqlite"
    r = cli("eval", "--ppl", "--chunks", "2", "-c", "128", "--db", str(db))
    assert r.returncode == 0, r.stderr
    ppl = next(ln for ln in r.stdout.splitlines() if "PPL = " in ln).split("PPL = ")[1]  # "9.3306 ± 2.1267"
    r = cli("report", "--db", str(db))
    assert r.returncode == 0 and r.stdout == "", r.stdout  # no bench records is a state, said as every view says it
    assert r.stderr == ("ondevice report: no bench records stored yet; run `ondevice bench` first (its 1 eval record: "
                        "`ondevice report --eval`)\n"), r.stderr
    r = cli("report", "--eval", "-o", "jsonl", "--db", str(db))
    rec = json.loads(r.stdout)
    assert rec["kind"] == "eval" and rec["test"] == "ppl:pydoc" and f"{rec['ppl']:.4f}" == ppl.split(" ")[0]
    assert rec["kernels"] in ("none", "CPU_REPACK")  # what the load used: they move the figure
    r = cli("report", "--eval", "--db", str(db))
    assert r.returncode == 0 and f"| ppl:pydoc | 128 | {rec['kernels']} | PPL {ppl} |" in r.stdout, r.stdout
    assert cli("report", "--eval", "--all", "--db", str(db)).returncode == 2  # --all picks bench sessions
