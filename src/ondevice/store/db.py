"""One SQLite file for bench and eval records, so that speed and quality join on the model variant.

A record is a JSON object; the columns next to it are what we filter and join on. WAL mode, one
transaction per record: a process killed mid-sweep loses at most the record in flight. The schema's version is
the file's ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`): a writer brings an older store up to it and refuses
a newer one before anything is measured; a reader reads a newer one with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError

SCHEMA_VERSION = 1  # PRAGMA user_version; 0: a store written before versions were kept (same tables)
KNOWN_COLUMNS = {"id", "kind", "session", "config_key", "model", "model_sha256", "test", "status", "created", "record"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,              -- 'bench' | 'eval'
    session     TEXT NOT NULL,              -- one sweep / one eval invocation
    config_key  TEXT NOT NULL,              -- stable hash of the configuration (resume skips it)
    model       TEXT NOT NULL,              -- the name the user gave
    model_sha256 TEXT NOT NULL,             -- the variant: joins speed and quality
    test        TEXT NOT NULL,              -- 'pp512', 'tg128', 'ppl:lee', 'suite:assistant-en', ...
    status      TEXT NOT NULL,              -- 'ok' | 'oom' | 'error'
    created     REAL NOT NULL,
    record      TEXT NOT NULL               -- the full record, JSON
);
CREATE INDEX IF NOT EXISTS records_key ON records(kind, config_key);
CREATE INDEX IF NOT EXISTS records_model ON records(model_sha256);
CREATE INDEX IF NOT EXISTS records_session ON records(session);
-- inputs the device was unsure of, with the cloud's answer: data for adapting the device model later
CREATE TABLE IF NOT EXISTS hard_samples (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created     REAL NOT NULL,
    source      TEXT NOT NULL,              -- 'serve' | 'library' | 'eval'
    device_model TEXT NOT NULL,
    device_sha256 TEXT,
    cloud_model TEXT,
    confidence  REAL,
    messages    TEXT NOT NULL,              -- the input, JSON chat messages
    device_answer TEXT,
    cloud_answer TEXT NOT NULL,
    extra       TEXT                        -- JSON: the reply's cascade object (features, latencies, reason)
);
"""


class StoreUnusable(OndeviceError, sqlite3.DatabaseError):
    """A store that is damaged, locked for too long or unwritable; still a ``sqlite3.DatabaseError`` for callers
    that catch one."""


def default_path(create: bool = True) -> Path:
    """``<home>/data/ondevice.sqlite``; its folder is made only when ``create``."""
    from ..models.store import data_dir, home

    return (data_dir() if create else home() / "data") / "ondevice.sqlite"


class Store:
    """The records file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path | None = None, *, create: bool = True, timeout: float = 30.0):
        """Open the store at ``path`` (default: :func:`default_path`); ``create=False`` (readers such as
        ``ondevice report``) opens it read-only, and refuses a missing file, or a SQLite file without a records
        table, rather than make one: a reader never changes the file, so a store on a read-only disk reads too.
        ``timeout``: seconds to wait for another process's write to finish.

        Raises:
            InvalidArgument: no store there (with ``create=False``), or a file that is not an ondevice store.
            StoreUnusable: the file is damaged, or another process kept it locked for longer than ``timeout``.
        """
        self.path = Path(path).expanduser() if path else default_path(create=create)
        self.timeout = timeout
        self._seen: tuple | None = None  # read as immutable: the file as it was then (see _connect_read_only)
        self._copy: str | None = None  # read from a temporary copy: its folder
        if not create and not self.path.exists():
            verbs = "`ondevice bench`, `eval` (`--cascade` too), `fit` or `serve --cascade-keep-hard`"  # its writers
            fix = (f"record one with {verbs}" if not path
                   else f"give the --db that {verbs} wrote, or leave --db out for the default store")
            raise InvalidArgument(f"no ondevice store at {self.path}; {fix}")
        if not create and self.path.is_file() and self.path.stat().st_size == 0:  # SQLite's empty database
            where = f" --db {self.path}" if path else ""
            raise InvalidArgument(f"{self.path} is empty (0 bytes): nothing is recorded there yet; `ondevice bench"
                                  f"{where}` or `ondevice eval{where}` records into it")
        if self.path.is_dir():
            raise InvalidArgument(f"{self.path} is not an ondevice store (SQLite): it is a folder; give another --db "
                                  f"(the store's file, e.g. {self.path / 'ondevice.sqlite'})")
        if create:
            from ..models.store import make_parent

            make_parent(self.path, "give another --db")
        self.db = None
        try:
            with self._translated():
                self.db = self._connect() if create else self._connect_read_only()
                self._check_ours(create)
                self._check_version(create)
                if create:
                    # a writer finds a damaged table root now, not after a sweep has run (cheap: one path down the
                    # tree, not PRAGMA quick_check's every page; damage elsewhere is named when a query meets it)
                    if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='records'").fetchone():
                        self.db.execute("SELECT id FROM records ORDER BY id DESC LIMIT 1").fetchall()
                    self.db.execute("PRAGMA journal_mode=WAL")
                    self.db.execute("PRAGMA synchronous=NORMAL")
                    self.db.executescript(SCHEMA)
                    if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # an older store
                        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except StoreUnusable:
            self._close()
            raise
        except sqlite3.DatabaseError as e:  # not a database, a directory, an unreadable file, someone else's DB
            self._close()
            if not any(w in str(e) for w in ("file is not a database", "another program", "no records table")):
                raise StoreUnusable(f"cannot use {self.path} ({e}); check it and its folder, or give another "
                                    f"--db") from None  # not proof the file is someone else's: no advice to move it
            fix = ("give another --db" if path else f"move it aside (`mv {self.path} {self.path}.not-a-store`: the "
                   f"next bench or eval starts a new one there), or give another --db")
            raise InvalidArgument(f"{self.path} is not an ondevice store (SQLite): {e}; {fix}") from None
        except BaseException:
            self._close()
            raise

    def _check_ours(self, create: bool) -> None:
        """Refuse a SQLite file that another program made: a writer would add our tables to it (and switch it to
        WAL), a reader would misread a table that only shares a name. An empty database is ours to fill."""
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables.discard("sqlite_sequence")
        if not tables and create:
            return
        if "records" not in tables:
            raise sqlite3.DatabaseError(f"a SQLite database of another program (its tables: "
                                        f"{', '.join(sorted(tables)) or 'none'}), not one ondevice wrote" if tables
                                        else "no records table")
        cols = {row[1] for row in self.db.execute("PRAGMA table_info(records)")}
        missing = sorted({"kind", "session", "config_key", "model_sha256", "test", "status", "record"} - cols)
        if missing:
            raise sqlite3.DatabaseError(f"its records table is another program's (no {', '.join(missing)} column)")

    def _check_version(self, create: bool) -> None:
        """Refuse to write a store a newer ondevice made (its schema version, or a records column this version
        would not fill), before anything is measured; a reader reads what it knows of one, with a warning."""
        from .. import __version__

        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        required = sorted(name for _, name, _, notnull, default, pk in self.db.execute("PRAGMA table_info(records)")
                          if notnull and default is None and not pk and name not in KNOWN_COLUMNS)
        if version <= SCHEMA_VERSION and not required:
            return
        what = (f"store schema {version}; ondevice {__version__} knows up to {SCHEMA_VERSION}" if
                version > SCHEMA_VERSION else f"its records need a {', '.join(required)} column this version "
                                              f"does not write")
        if create:
            raise InvalidArgument(f"{self.path} was written by a newer ondevice ({what}): nothing was changed or "
                                  f"measured; upgrade ondevice (`pip install -U ondevice`) to record into it, or "
                                  f"give another --db")
        warnings.warn(f"{self.path} was written by a newer ondevice ({what}); showing the records as this version "
                      f"reads them: upgrade ondevice (`pip install -U ondevice`) to see all of them", stacklevel=3)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)

    def _signature(self) -> tuple:
        """What changes when a writer touches the store: the file's inode, size and mtime, and its -wal's size."""
        st = self.path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns, _size(self._wal)

    @property
    def _wal(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that cannot write the file, and leaves nothing beside it.

        * No -wal (or an empty one: a store closed cleanly, every record in the file): read as ``immutable``,
          which needs no -shm or -wal file, free space or write access to the folder. A writer may start while
          it reads: each query checks the file did not change under it (:meth:`_fetch`), else reads again
          through a shared connection.
        * A -wal with records not yet in the file (a writer is running, or one was killed): ``mode=ro``, which
          shares the writer's -shm index. Where that cannot be made (a read-only folder, a full disk), the store
          and its -wal are read from a temporary copy; where that cannot be made either, the file alone is read
          and a warning names the -wal whose records are not shown.
        """
        uri = self.path.resolve().as_uri()
        if not _size(self._wal):
            self._seen = self._signature()
            return sqlite3.connect(f"{uri}?immutable=1", timeout=self.timeout, isolation_level=None, uri=True)
        db = sqlite3.connect(f"{uri}?mode=ro", timeout=self.timeout, isolation_level=None, uri=True)
        try:
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if not any(w in str(e) for w in ("unable to open", "readonly", "disk I/O error")):
                raise
            reason = str(e)
        copy = self._read_copy()
        if copy is not None:
            return copy
        warnings.warn(f"{self._wal} holds {_size(self._wal)} bytes of recent records that cannot be read here "
                      f"({reason}; no room for a temporary copy either); they are not shown: copy {self.path} and "
                      f"{self._wal} together to a writable place and give the copy as --db", stacklevel=4)
        return sqlite3.connect(f"{uri}?immutable=1", timeout=self.timeout, isolation_level=None, uri=True)

    def _read_copy(self) -> sqlite3.Connection | None:
        """A connection to a temporary copy of the store and its -wal (removed on close), or None."""
        folder = db = None
        try:
            folder = tempfile.mkdtemp(prefix="ondevice-store-")
            for src in (self.path, self._wal):
                shutil.copyfile(src, Path(folder) / src.name)
            db = sqlite3.connect(Path(folder) / self.path.name, timeout=self.timeout, isolation_level=None)
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except (OSError, sqlite3.Error):
            if db is not None:
                db.close()
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            return None
        self._copy = folder
        return db

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors that are the file's state (damaged, locked, unwritable) as one line naming the file
        and the fix; others pass through."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise StoreUnusable(f"{self.path} is locked: another process (a running `ondevice bench`, `eval` "
                                    f"or `serve`?) kept it busy for over {self.timeout:g} s; let it finish "
                                    f"and run this again") from None
            if "malformed" in msg or "corrupt" in msg:
                raise StoreUnusable(f"{self.path} is damaged ({msg}); move it aside (`mv {self.path} "
                                    f"{self.path}.damaged`: the next bench or eval starts a new one there) or "
                                    f"recover its records with `sqlite3 {self.path} .recover | sqlite3 "
                                    f"recovered.sqlite`") from None
            if isinstance(e, sqlite3.OperationalError) and any(
                    w in msg for w in ("readonly", "full", "disk I/O error", "unable to open")):
                raise StoreUnusable(f"cannot use {self.path} ({msg}): {self._room()}; its records are kept: "
                                    f"run this again once it is fixed, or give another --db") from None
            if isinstance(e, sqlite3.IntegrityError):  # a constraint this version does not know of
                raise StoreUnusable(f"cannot add to {self.path} ({msg}): a newer ondevice's store? its records "
                                    f"are kept: upgrade ondevice (`pip install -U ondevice`) or give another "
                                    f"--db") from None
            raise

    def _room(self) -> str:
        """What stops SQLite here: the free space and write access of the store's folder, as far as they tell."""
        import shutil

        folder = self.path.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return "check that its folder exists and is writable and its disk has space"
        if free < 1 << 20:
            return f"the disk holding it is full ({free >> 10} KiB free); free some space there"
        if not os.access(folder, os.W_OK):
            return f"its folder {folder} is not writable (a read-only disk?); SQLite writes beside the file"
        return "check its folder's permissions and its disk"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.db is not None:
            self.db.close()
        if self._copy:
            shutil.rmtree(self._copy, ignore_errors=True)
            self._copy = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._translated():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _fetch(self, q: str, args: list) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of a read. Read as immutable, a writer that changed the file meanwhile (seen in
        its signature, or as pages that no longer fit together: a checkpoint under the immutable read) makes it
        open the store again as :meth:`_connect_read_only` does (which sees the writer's -wal) and read again."""
        with self._translated():
            for attempt in range(3):
                try:
                    cur = self.db.execute(q, args)
                    rows = cur.fetchall()
                    if self._seen is None or self._signature() == self._seen:
                        return [c[0] for c in cur.description or ()], rows
                except sqlite3.DatabaseError:
                    if self._seen is None or attempt == 2:  # not an immutable read a writer changed: the error
                        raise
                self._reopen()
            return [c[0] for c in cur.description or ()], rows  # changing all along: the last read, whole

    def _reopen(self) -> None:
        self.db.close()
        self._seen = None
        self.db = self._connect_read_only()

    def _query(self, q: str, args: list) -> list[tuple]:
        return self._fetch(q, args)[1]

    def add(self, kind: str, record, *, session: str, config_key: str, model: str, model_sha256: str,
            test: str, status: str = "ok") -> int:
        """Write one record, a dict or a typed record with ``to_dict`` (committed before returning)."""
        if not isinstance(record, dict):
            record = record.to_dict()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO records(kind, session, config_key, model, model_sha256, test, status, created, record)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (kind, session, config_key, model, model_sha256, test, status, time.time(),
                 json.dumps(record, sort_keys=True, default=str)))
            return int(cur.lastrowid)

    def done_keys(self, kind: str, session: str | None = None) -> set[str]:
        """Configuration keys already recorded (any status), for ``--resume``."""
        q, args = "SELECT config_key FROM records WHERE kind=?", [kind]
        if session:
            q += " AND session=?"
            args.append(session)
        return {r[0] for r in self._query(q, args)}

    def sessions(self, kind: str | None = None) -> list[tuple[str, float, int]]:
        """(session, first created, number of records), newest first."""
        q = "SELECT session, MIN(created), COUNT(*) FROM records"
        args: list = []
        if kind:
            q += " WHERE kind=?"
            args.append(kind)
        q += " GROUP BY session ORDER BY MIN(created) DESC"
        return [(s, c, n) for s, c, n in self._query(q, args)]

    def records(self, kind: str | None = None, session: str | None = None,
                model_sha256: str | None = None, latest: bool = False) -> list[dict]:
        """Records as dicts (the JSON record plus ``_id``, ``_session``, ``_status``, ``_created``).

        ``latest``: only the last record of each configuration in a session; an error row written before a
        ``--resume`` retried the configuration is superseded by the retry's record.
        """
        q = "SELECT id, session, status, created, record FROM records WHERE 1=1"
        if latest:
            q += (" AND NOT EXISTS (SELECT 1 FROM records AS later WHERE later.kind = records.kind AND"
                  " later.session = records.session AND later.config_key = records.config_key AND"
                  " later.id > records.id)")
        args: list = []
        for col, val in (("kind", kind), ("session", session), ("model_sha256", model_sha256)):
            if val is not None:
                q += f" AND {col}=?"
                args.append(val)
        q += " ORDER BY id"
        out = []
        for rid, sess, status, created, rec in self._query(q, args):
            d = json.loads(rec)
            d.update(_id=rid, _session=sess, _status=status, _created=created)
            out.append(d)
        return out

    def add_hard_sample(self, *, source: str, device_model: str, device_sha256: str | None, cloud_model: str | None,
                        confidence: float | None, messages: list[dict], device_answer: str | None,
                        cloud_answer: str, extra: dict | None = None) -> int:
        """Keep one deferred input with the cloud's answer (committed before returning)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO hard_samples(created, source, device_model, device_sha256, cloud_model, confidence,"
                " messages, device_answer, cloud_answer, extra) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (time.time(), source, device_model, device_sha256, cloud_model, confidence,
                 json.dumps(messages, ensure_ascii=False), device_answer, cloud_answer,
                 json.dumps(extra or {}, sort_keys=True, default=str)))
            return int(cur.lastrowid)

    def hard_samples(self, since: float | None = None, device_sha256: str | None = None) -> list[dict]:
        """Kept hard samples, oldest first (``messages`` and ``extra`` decoded)."""
        q, args = "SELECT * FROM hard_samples WHERE 1=1", []
        if since is not None:
            q += " AND created >= ?"
            args.append(since)
        if device_sha256:
            q += " AND device_sha256 LIKE ?"
            args.append(device_sha256 + "%")
        if not self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='hard_samples'", []):
            return []  # a store written before hard samples were kept, opened read-only
        cols, rows = self._fetch(q + " ORDER BY id", args)
        out = []
        for row in rows:
            d = dict(zip(cols, row))
            d["messages"] = json.loads(d["messages"])
            d["extra"] = json.loads(d["extra"] or "{}")
            out.append(d)
        return out

    def add_many(self, kind: str, rows: Iterable[tuple[dict, dict]]) -> None:
        for record, cols in rows:
            self.add(kind, record, **cols)


def _size(path: Path) -> int:
    """A file's size; 0 for none."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
