"""The store's schema version, and reading a store without changing anything beside it (real SQLite files)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import warnings

import pytest
from conftest import tmpfs

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.store import Store
from ondevice.store.db import SCHEMA_VERSION


def _add(st: Store, n: int = 1, session: str = "s") -> None:
    for i in range(n):
        st.add("bench", {"i": i}, session=session, config_key=f"{session}{i}", model="m", model_sha256="h", test="t")


def _store(path, n: int = 2):
    with Store(path) as st:
        _add(st, n)
    return path


def _user_version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_a_new_store_gets_the_schema_version_and_an_old_one_is_brought_up_to_it(tmp_path):
    assert _user_version(_store(tmp_path / "new.sqlite")) == SCHEMA_VERSION
    old = tmp_path / "old.sqlite"  # written before versions (and hard samples) were kept
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, session TEXT NOT "
               "NULL, config_key TEXT NOT NULL, model TEXT NOT NULL, model_sha256 TEXT NOT NULL, test TEXT NOT NULL, "
               "status TEXT NOT NULL, created REAL NOT NULL, record TEXT NOT NULL)")
    db.execute("INSERT INTO records(kind, session, config_key, model, model_sha256, test, status, created, record) "
               "VALUES ('bench', 'old', 'k', 'm', 'h', 'tg8', 'ok', 1.0, '{\"tps_mean\": 5.0}')")
    db.commit()
    db.close()
    with Store(old, create=False) as st:  # a reader changes nothing
        assert [r["tps_mean"] for r in st.records("bench")] == [5.0]
    assert _user_version(old) == 0
    with Store(old) as st:
        _add(st)
        assert len(st.records("bench")) == 2 and st.hard_samples() == []
    assert _user_version(old) == SCHEMA_VERSION


@pytest.mark.parametrize("newer", ["version", "column"])
def test_a_newer_store_is_refused_by_a_writer_before_anything_runs_and_read_with_a_warning(tmp_path, newer):
    path = _store(tmp_path / "s.sqlite")
    db = sqlite3.connect(path)
    if newer == "version":
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 6}")
    else:  # a column a later version fills and this one would not: every add would fail after the measuring
        db.execute("ALTER TABLE records ADD COLUMN machine_id INTEGER NOT NULL DEFAULT 0")
        db.execute("CREATE TABLE r2 AS SELECT * FROM records")
        db.executescript("DROP TABLE records; CREATE TABLE records (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
                         "session TEXT NOT NULL, config_key TEXT NOT NULL, model TEXT NOT NULL, model_sha256 TEXT NOT "
                         "NULL, test TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, record TEXT NOT NULL,"
                         " machine_id INTEGER NOT NULL); INSERT INTO records SELECT * FROM r2; DROP TABLE r2;")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(InvalidArgument) as e:
        Store(path)
    msg = str(e.value)
    assert str(path) in msg and "newer ondevice" in msg and "upgrade ondevice" in msg and "--db" in msg
    assert path.read_bytes() == before
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Store(path, create=False) as st:
            assert len(st.records("bench")) == 2
    assert any("newer ondevice" in str(x.message) for x in w)
    assert path.read_bytes() == before


def test_bench_refuses_a_newer_store_in_one_line_before_measuring(cli, tmp_path):
    path = _store(tmp_path / "s.sqlite")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    r = cli("bench", "-m", "/nonexistent.gguf", "--db", str(path), "--no-report", "--no-progress")
    assert r.returncode == 2 and "newer ondevice" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_reader_leaves_nothing_beside_a_cleanly_closed_store(tmp_path):
    path = _store(tmp_path / "s.sqlite")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["s.sqlite"]
    with Store(path, create=False) as st:
        assert len(st.records("bench")) == 2 and len(st.sessions()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_reader_sees_what_a_writer_adds_while_it_is_open(tmp_path):
    path = _store(tmp_path / "s.sqlite")
    with Store(path, create=False) as reader:
        assert len(reader.records("bench")) == 2
        with Store(path) as writer:  # a bench starts while the report reads
            _add(writer, 3, session="w")
            assert len(reader.records("bench")) == 5
        assert len(reader.records("bench")) == 5


def test_a_checkpoint_between_two_reads_is_not_taken_for_damage(tmp_path):
    """An immutable read keeps the pages it read between queries: a writer that checkpoints its -wal into the file
    in between moved pages under it, the next query failed as "malformed", and the reader told the user to move a
    healthy store aside."""
    path = tmp_path / "s.sqlite"
    with Store(path) as st:
        for i in range(300):
            st.add("bench", {"i": i, "pad": "y" * 300}, session="s", config_key=f"s{i}", model="m",
                   model_sha256="h", test="t")
    with Store(path, create=False) as reader:
        assert reader.records("bench", session="none") == []  # reads a few pages, keeps them
        with Store(path) as writer:
            for i in range(2000):
                writer.add("bench", {"i": i, "pad": "x" * 200}, session="w", config_key=f"w{i}", model="m",
                           model_sha256="h", test="t")
            writer.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert len(reader.records("bench")) == 2300
        assert len(reader.records("bench", session="w")) == 2000


KILLED_WRITER = """
import os, sys
from ondevice.store import Store
st = Store(sys.argv[1])
for i in range(3):
    st.add("bench", {"i": i}, session="late", config_key=f"k{i}", model="m", model_sha256="h", test="t")
os._exit(0)  # killed before a checkpoint: the records are only in the -wal
"""


def _killed_writer(path) -> None:
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True, timeout=60)
    assert (path.parent / (path.name + "-wal")).stat().st_size > 0


def test_records_in_a_wal_without_its_shm_on_a_read_only_disk_are_read(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "ro", "size=4M") as disk:
        path = _store(disk / "s.sqlite")
        _killed_writer(path)
        (disk / "s.sqlite-shm").unlink()  # copied without it, or cleaned up
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with Store(path, create=False) as st:  # read from a temporary copy with its -wal
            assert len(st.records("bench")) == 5 and [s for s, _, _ in st.sessions()][0] == "late"
        assert sorted(p.name for p in disk.iterdir()) == ["s.sqlite", "s.sqlite-wal"]
        # no room for a copy either: the file's records are read, and a warning names the -wal left out
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with Store(path, create=False) as st:
                assert len(st.records("bench")) == 2
        (msg,) = [str(x.message) for x in w]
        assert f"{path}-wal" in msg and "not shown" in msg and "copy" in msg


def test_records_in_the_wal_of_a_killed_writer_are_read_in_a_writable_folder(tmp_path):
    path = _store(tmp_path / "s.sqlite")
    _killed_writer(path)
    with Store(path, create=False) as st:
        assert len(st.records("bench")) == 5


def test_a_newer_store_error_is_an_ondevice_error(tmp_path):
    path = _store(tmp_path / "s.sqlite")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(OndeviceError):
        Store(path)
