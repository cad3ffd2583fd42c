"""Pick records from the store (latest session, a session, or all) and write the HTML report atomically."""

from __future__ import annotations

from pathlib import Path

from ..bench.record import BenchRecord
from ..errors import InvalidArgument


def resolve_session(store, ref: str) -> str:
    """A bench session id from an id or a unique prefix."""
    sessions = [s for s, _, _ in store.sessions("bench")]
    hits = [s for s in sessions if s == ref] or [s for s in sessions if s.startswith(ref)]
    if not hits:
        raise InvalidArgument(f"no bench session matches {ref!r}; list them with `ondevice report --list`")
    if len(hits) > 1:
        raise InvalidArgument(f"{len(hits)} sessions match {ref!r}; give more of the id (list them with "
                              f"`ondevice report --list`)")
    return hits[0]


def load_records(store, session: str | None = None,
                 all_sessions: bool = False) -> tuple[list[BenchRecord], list[str]]:
    """Bench records of ``session`` (default: the latest) or of every session; and the sessions used."""
    if all_sessions:
        recs = store.records("bench", latest=True)
        return [BenchRecord.from_dict(r) for r in recs], sorted({r["_session"] for r in recs})
    if session is None:
        sessions = store.sessions("bench")
        if not sessions:
            n = len(store.records("eval"))
            raise InvalidArgument("the store has no bench records yet; run `ondevice bench` first"
                                  + (f" (its {n} eval record{'s' if n != 1 else ''}: `ondevice report --eval`)"
                                     if n else ""))
        session = sessions[0][0]
    else:
        session = resolve_session(store, session)
    # a resumed config's retry replaces its error
    return [BenchRecord.from_dict(r) for r in store.records("bench", session, latest=True)], [session]


def default_report_path(sessions: list[str]) -> Path:
    """``<home>/reports/bench-<session>.html``: the session id as one file name (a session id is the user's
    text: "exp/1" or "../x" must not reach outside the reports folder)."""
    import re

    from ..models.store import home

    name = sessions[0] if len(sessions) == 1 else f"all-{len(sessions)}-sessions"
    name = re.sub(r"[^\w.+-]+", "-", name).strip("-.") or "session"
    name = name.encode()[:200].decode("utf-8", "ignore")  # a file name holds 255 bytes
    return home() / "reports" / f"bench-{name}.html"


def is_report(path: str | Path) -> bool:
    """Whether ``path`` is a file holding an HTML page ondevice wrote: the generator mark in its head, or the head
    that the bench and cascade reports began with before the mark was added."""
    import re

    from .html import GENERATOR_MARK

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return GENERATOR_MARK.encode() in head or re.match(
        rb"<!DOCTYPE html>\s*<html lang=['\"]en['\"]><head><meta charset=['\"]utf-8['\"]><title>ondevice "
        rb"(bench report|cascade)</title>", head) is not None


def check_report_path(path: str | Path, flag: str | None = "--html", verb: str = "report") -> bool:
    """Refuse, before any work, a report path that cannot be written or that holds a file other than an HTML report
    ondevice wrote (nothing the user had is replaced); True when it holds such a report, which the write replaces.
    ``flag``: how the caller names the path (``--html``; None: the default path, which --html changes; ``path=``:
    a Python call), ``verb``: who writes it."""
    from ..models.store import check_writable

    library = flag == "path="
    fix = "give another path=" if library else "give another --html"
    target = check_writable(path, fix)
    if not target.is_file():
        return False
    if is_report(target):
        return True
    shown = f"path={str(path)!r}" if library else f"--html {path}" if flag else str(path)
    raise InvalidArgument(f"{shown} is there already and is not an HTML report ondevice wrote; {verb} does not "
                          f"replace it: {fix}, or move that one away first")


def write_html(records: list[BenchRecord], store=None, path: str | Path | None = None,
               sessions: list[str] | None = None, *, flag: str | None = "path=", verb: str = "write_html") -> Path:
    """Write the HTML report of ``records`` plus the store's eval records: quality vs speed for the files
    benched here, and the suite retention tables (which need no bench run). An existing file at the path is
    replaced only when it is an HTML report ondevice wrote (:func:`check_report_path`; ``flag``, ``verb``: its
    wording); anything else there is refused, and kept."""
    from ..models.store import atomic_write
    from .html import build_html

    sessions = sessions or sorted({r.session for r in BenchRecord.coerce(records)} - {None, ""})
    evals = store.records("eval") if store is not None else []
    out = Path(path) if path else default_report_path(sessions or ["unsaved"])
    check_report_path(out, flag if path else None, verb)
    page = build_html(records, evals, sessions=sessions)
    try:
        with atomic_write(out, "w", encoding="utf-8") as f:  # makes the folder, or names why it cannot
            f.write(page)
    except OSError as e:
        if e.filename or not e.errno:
            raise
        # a full disk fails in write or flush, whose error names no file: name the report's (the old one is kept)
        raise OSError(e.errno, e.strerror, str(out)) from e
    return out


def write_report(records: list[BenchRecord], store, path: str | Path | None, sessions: list[str], verb: str) -> Path:
    """The CLIs' write of the HTML report (``--html PATH``, else the default path), with a note on stderr when it
    replaced an earlier report there."""
    out = Path(path) if path else default_report_path(sessions or ["unsaved"])
    earlier = out.is_file() and is_report(out)
    written = write_html(records, store, out, sessions, flag="--html" if path else None, verb=verb)
    if earlier:
        say_replaced(written, verb)
    return written


def say_replaced(path: str | Path, verb: str) -> None:
    """The one line a CLI writes when its report replaced an earlier ondevice report at ``path``."""
    import sys

    print(f"ondevice {verb}: note: {path} held an earlier ondevice report; the new one replaced it", file=sys.stderr)
