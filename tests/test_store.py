"""The records store refuses what is not one in one line, and readers never create one."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from conftest import tmpfs

from ondevice.errors import InvalidArgument, OndeviceError
from ondevice.store import Store


def test_a_file_that_is_not_a_store_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    for path in (tmp_path / "notes.txt", tmp_path):  # a text file; a folder
        with pytest.raises(InvalidArgument, match=r"is not an ondevice store \(SQLite\).*give another --db"):
            Store(path)
    with pytest.raises(OndeviceError, match=r"notes.txt is a file, not a folder; give another --db") as e:
        Store(tmp_path / "notes.txt" / "x.sqlite")
    assert isinstance(e.value, OSError)  # still an OSError for callers that catch one


def test_readers_do_not_create_a_store(tmp_path):
    missing = tmp_path / "sub" / "none.sqlite"
    with pytest.raises(InvalidArgument, match="no ondevice store at .*none.sqlite"):
        Store(missing, create=False)
    assert not missing.parent.exists()
    foreign = tmp_path / "other.sqlite"  # someone else's SQLite file gets no tables of ours
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(InvalidArgument, match="other.sqlite is not an ondevice store"):
        Store(foreign, create=False)
    with sqlite3.connect(foreign) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["t"]
    Store(tmp_path / "s.sqlite").close()
    with Store(tmp_path / "s.sqlite", create=False) as st:
        assert st.sessions() == []
    empty = tmp_path / "empty.sqlite"  # a 0-byte file (touched, or left by a full disk) is no foreign database
    empty.touch()
    with pytest.raises(InvalidArgument, match=r"empty.sqlite is empty \(0 bytes\): nothing is recorded there yet; "
                                              r"`ondevice bench --db .*empty.sqlite` or `ondevice eval --db"):
        Store(empty, create=False)
    assert empty.stat().st_size == 0
    Store(empty).close()  # a writer makes it a store
    with Store(empty, create=False) as st:
        assert st.sessions() == []


def test_report_and_bench_name_a_bad_db_in_one_line(cli, tmp_path):
    bad = tmp_path / "notdb.sqlite"
    bad.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for args in (("report", "--db", str(bad)), ("bench", "--db", str(bad), "-p", "8", "-n", "4", "-r", "1")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"ondevice {args[0]}: error: {bad} is not an ondevice store (SQLite): file is " \
                                   f"not a database; give another --db"
    default = tmp_path / "home" / "data" / "ondevice.sqlite"  # the default store (the cli fixture's home), garbage
    default.parent.mkdir(parents=True)
    default.write_bytes(bytes(range(256)) * 144)
    r = cli("report")  # no --db given: "give another --db" was no way back to the default store
    assert r.returncode == 2 and f"move it aside (`mv {default} {default}.not-a-store`" in r.stderr, r.stderr
    r = cli("report", "--db", str(tmp_path / "x" / "none.sqlite"))
    assert r.returncode == 2 and "no ondevice store at" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_writers_refuse_another_programs_database_and_leave_it_as_it_was(cli, tmp_path):
    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    db.close()
    before = foreign.read_bytes()
    with pytest.raises(InvalidArgument, match=r"app.sqlite is not an ondevice store \(SQLite\): a SQLite database of "
                                              r"another program \(its tables: users\), not one ondevice wrote; give "
                                              r"another --db"):
        Store(foreign)
    r = cli("bench", "--db", str(foreign), "-p", "8", "-n", "4", "-r", "1")  # refused before anything runs
    assert r.returncode == 2 and "its tables: users" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert foreign.read_bytes() == before  # no table of ours, not switched to WAL
    assert not (tmp_path / "app.sqlite-wal").exists()
    same_name = tmp_path / "records.sqlite"  # a table that only shares our name is not ours either
    with sqlite3.connect(same_name) as db:
        db.execute("CREATE TABLE records (id INTEGER, body TEXT)")
    db.close()
    for create in (True, False):
        with pytest.raises(InvalidArgument, match=r"its records table is another program's \(no config_key, kind, "
                                                  r"model_sha256, record, session, status, test column\)"):
            Store(same_name, create=create)
    fresh = tmp_path / "fresh.sqlite"  # an empty database (no tables yet) is ours to fill
    sqlite3.connect(fresh).close()
    Store(fresh).close()
    with Store(fresh, create=False) as st:
        assert st.sessions() == []


def test_a_full_disk_is_named_and_the_store_is_not_called_someone_elses(tmp_path):
    """A healthy store on a full disk was "not an ondevice store ...; move it aside": following that advice
    abandons every record. The cause is named and the file left as it is."""
    with tmpfs(tmp_path / "tiny", "size=1M") as disk:
        path = disk / "r.sqlite"
        with Store(path) as st:
            st.add("bench", {"x": 1}, session="s", config_key="k", model="m", model_sha256="h", test="t")
        before = path.read_bytes()
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):  # full: no room for -wal/-shm
            f.write(b"\0" * (2 << 20))
        with pytest.raises(OndeviceError) as e:
            Store(path).close()
        assert "the disk holding it is full" in str(e.value) and "not an ondevice store" not in str(e.value)
        assert "its records are kept" in str(e.value) and "mv " not in str(e.value)
        files = sorted(p.name for p in disk.iterdir())  # with what the failed writer left (an empty -wal)
        with Store(path, create=False) as st:  # a reader needs no room: it reads, and adds no file
            assert len(st.records("bench")) == 1
        assert sorted(p.name for p in disk.iterdir()) == files
        (disk / "filler").unlink()
        assert path.read_bytes() == before
        with Store(path, create=False) as st:
            assert len(st.records("bench")) == 1
