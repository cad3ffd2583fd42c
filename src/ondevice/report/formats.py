"""Bench records as text: a llama-bench-style table (md), csv, json, jsonl and sql, and readers back.

Every exporter writes whole records; ``read(text, fmt)`` parses csv/json/jsonl back to the same dicts
(csv cells hold JSON for anything but plain strings, so types survive the trip). The md table is for
people: ``parse_md`` gives its cells back, which is what its round trip can promise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import fields

from ..bench.noise import NOISY_MARK
from ..bench.record import BenchRecord
from ..device.energy import scope_kind
from ..errors import InvalidArgument
from . import llama_bench, machines

FORMATS = ("md", "csv", "json", "jsonl", "sql")
MiB = 1 << 20

# setting -> default; a setting gets a column when any record differs from the default (llama-bench does this)
OPTIONAL = {"n_batch": 2048, "n_ubatch": 512, "type_k": "f16", "type_v": "f16", "flash_attn": None,
            "profile": "host"}
HEAD = {"n_batch": "n_batch", "n_ubatch": "n_ubatch", "type_k": "type_k", "type_v": "type_v",
        "flash_attn": "fa", "profile": "profile"}


def setting(v) -> str:
    return {None: "auto", True: "on", False: "off"}.get(v, str(v)) if v is None or isinstance(v, bool) else str(v)


def _num(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _tps(r: BenchRecord) -> str:
    if r.status != "ok":
        return (r.status or "?").upper()
    return f"{_num(r.tps_mean, '.2f')} ± {_num(r.tps_std, '.2f')}" + (f" {NOISY_MARK}" if r.noisy else "")


def quota_throttled(r: BenchRecord) -> float | None:
    """Seconds the container's CPU quota throttled ``r`` when that is why it is marked noisy, else None."""
    if r.noisy and any("CPU quota throttled" in w for w in r.noise):
        return (r.meta or {}).get("throttled_s") or 0.0
    return None


def noise_note(records: Sequence[BenchRecord]) -> str | None:
    """The line under a table that explains the noisy mark and the load column, when either is shown."""
    throttled = [t for t in map(quota_throttled, records) if t is not None]
    return noise_legend(sum(bool(r.noisy) for r in records), len(records), any(r.load is not None for r in records),
                        throttled)


def noise_legend(n_noisy: int, n: int, load_shown: bool, throttled: Sequence[float] = ()) -> str | None:
    """:func:`noise_note` from counts: ``n_noisy`` of ``n`` figures marked, a load column shown or not; the
    seconds the container's CPU quota throttled each of the marked ones it did (named instead of other work)."""
    from ..bench.noise import NOISY_CV, NOISY_LOAD

    if not n_noisy and not load_shown:
        return None
    quota = (f"; the container's CPU quota throttled {len(throttled)} of them, for up to {max(throttled):.2f} s "
             f"(fewer -t, or a larger quota)" if throttled else "")
    head = (f"{NOISY_MARK} noisy, do not trust ({n_noisy} of {n}): t/s varies over "
            f"{100 * NOISY_CV:.0f}% between repetitions, or other processes kept over {NOISY_LOAD} cores busy"
            f"{quota}; rerun on a quiet machine or with --wait-idle. " if n_noisy else "")
    return head + ("load: cores other processes kept busy during the timed runs (/proc/stat, ours excluded)"
                   if load_shown else "")


def fp32_compute(r: BenchRecord) -> bool:
    """Whether ``r``'s % of roofline is compute-bound against the probe's fp32 matmul roof while its weights run
    int8 dot products (quantized: their roof is several times higher, so the % is not a share of it). Records
    from before ``pct_basis``: every compute-bound one (the roof was always the fp32 one)."""
    basis = (r.roofline or {}).get("pct_basis")
    return basis != "roofline" if basis else r.roofline_bound == "compute"


ROOF_NOTE = ("% roofline (fp32 compute): a share of the probe's fp32 matmul peak; llama.cpp runs quantized weights "
             "as int8 dot products, whose roof is several times higher, so it is not a share of their true roof "
             "(and can pass 100)")


def _roof(r: BenchRecord) -> str:
    if r.roofline_pct is None:
        return "-"
    return f"{r.roofline_pct:.1f} ({'fp32 compute' if fp32_compute(r) else r.roofline_bound or '?'})"


def _energy(r: BenchRecord) -> str:
    v = r.energy_j_per_token
    if v is None:
        return "-"
    return f"{v:.4f}" + ENERGY_MARKS[scope_kind(r.energy_method, r.energy_scope)][0]


# per scope kind: the J/tok cell's mark, and the table's note where a row has it (None: no mark, no note)
ENERGY_MARKS = {
    "package": ("", None),
    "estimated": (" (est.)", "J/tok (est.): estimated from CPU time x watts per core, not measured (no readable "
                  "energy sensor)"),
    "system": (" (sys.)", "J/tok (sys.): measured at the battery or board input: the whole device (screen, radios, "
               "other processes), not the CPU package; not comparable with unmarked (CPU package) figures"),
    "rail": (" (rail)", "J/tok (rail): measured on one CPU power rail of the board (see energy_scope), not the "
             "whole device nor a CPU package figure"),
}


def energy_notes(records: Sequence[BenchRecord]) -> list[str]:
    """The notes for the energy marks the table's rows carry."""
    kinds = {scope_kind(r.energy_method, r.energy_scope) for r in records if r.energy_j_per_token is not None}
    return [note for kind, (_, note) in ENERGY_MARKS.items() if kind in kinds and note]


def _size(r: BenchRecord) -> str:
    """llama-bench's size: the tensors' bytes (records made before they were kept: the file's, a little more)."""
    n = r.model_tensor_bytes or r.model_size_bytes
    return f"{n / MiB:.2f} MiB" if n else "-"


def _params(n) -> str:
    if not n:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def columns(records: Sequence[BenchRecord | dict]) -> list[tuple[str, Callable[[BenchRecord], str], str]]:
    """(header, cell, align) for the table; optional setting columns only when they are not default."""
    records = BenchRecord.coerce(records)
    cols: list[tuple[str, Callable[[BenchRecord], str], str]] = [
        ("session", lambda r: str(r.session), "l")] if len({r.session for r in records}) > 1 else []
    if len(machines.distinct(records)) > 1:  # one store, several machines or builds: each row says whose it is
        cols.append(("machine", lambda r: "; ".join(machines.identity(r)), "l"))
    cols += [
        ("model", lambda r: str(r.model), "l"),
        ("size", _size, "r"),
        ("params", lambda r: _params(r.model_params), "r"),
        ("threads", lambda r: str(r.threads), "r"),
    ]
    for key, default in OPTIONAL.items():
        vals = {json.dumps(getattr(r, key)) for r in records}
        if vals != {json.dumps(default)}:
            cols.append((HEAD[key], lambda r, k=key: setting(getattr(r, k)), "r"))
    if {r.n_ctx_requested for r in records} - {0, None}:
        cols.append(("n_ctx", lambda r: str(r.n_ctx), "r"))
    cols += [
        ("test", lambda r: str(r.test), "r"),
        ("t/s", _tps, "r"),
        ("TTFT ms", lambda r: _num(None if r.ttft_s_mean is None else r.ttft_s_mean * 1000, ".1f"), "r"),
        ("ITL p50/p99 ms", lambda r: "-" if r.itl_ms_p50 is None else f"{r.itl_ms_p50:.2f}/{r.itl_ms_p99:.2f}",
         "r"),
        ("peak RSS MiB", lambda r: _num(None if r.peak_rss_bytes is None else r.peak_rss_bytes / MiB, ".1f"), "r"),
        ("J/tok", _energy, "r"),
        ("% roofline", _roof, "r"),
    ]
    if any(r.load is not None for r in records):
        cols.append(("load", lambda r: _num(r.load, ".2f"), "r"))
    return cols


def md_cell(text: str) -> str:
    """A cell as markdown keeps it in its column: ``|`` as ``\\|``, a line break as ``<br>`` (GitHub's)."""
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def md_row(cells: Sequence[str]) -> str:
    """One unpadded markdown table row (the header and the ``---`` line too), each cell through :func:`md_cell`:
    the tables that are not :func:`md_table`'s (eval, retention, fit, cascade) escape as the bench tables do."""
    return "| " + " | ".join(md_cell(str(c)) for c in cells) + " |"


def md_uncell(text: str) -> str:
    """:func:`md_cell` undone."""
    return text.replace("<br>", "\n").replace("\\|", "|")


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """The lines of a GitHub markdown table, padded like llama-bench's; ``right``: which columns align right.
    Cells are padded by the columns a terminal shows (a wide CJK character takes two), so rows stay aligned;
    ``|`` and line breaks in a cell are escaped (:func:`md_cell`), so a row stays one line of its columns."""
    from ..models.cli import display_width

    head = [md_cell(h) for h in head]
    rows = [[md_cell(c) for c in row] for row in rows]
    widths = [max(display_width(h), *(display_width(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        pad = [" " * (w - display_width(c)) for c, w in zip(cells, widths)]
        return "| " + " | ".join(p + c if r else c + p for c, p, r in zip(cells, pad, right)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if r else ("-" * w) for w, r in zip(widths, right)) + " |"
    return [line(head), sep, *(line(row) for row in rows)]


def to_md(records: Sequence[BenchRecord | dict]) -> str:
    """The terminal table (GitHub markdown, padded like llama-bench's)."""
    if not records:
        return "(no records)\n"
    records = BenchRecord.coerce(records)
    cols = columns(records)
    out = md_table([c[0] for c in cols], [[c[1](r) for c in cols] for r in records], [c[2] == "r" for c in cols])
    notes = []
    notes += energy_notes(records)
    if any(r.workload in ("pp", "tg", "pg") for r in records):
        notes.append("pp/tg use random token ids, as llama-bench does")
    if any(r.roofline_pct is not None and fp32_compute(r) for r in records):
        notes.append(ROOF_NOTE)
    if noise := noise_note(records):
        notes.append(noise)
    return "\n".join(out) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def parse_md(text: str) -> list[dict[str, str]]:
    """The table's rows as {header: cell} (notes after the table are ignored)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    split = lambda ln: [md_uncell(c.strip()) for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])]
    head = split(lines[0])
    return [dict(zip(head, split(ln))) for ln in lines[2:]]


def _cell(v) -> str:
    if v is None:
        return "null"  # "" means the record has no such key
    if isinstance(v, str):
        try:  # a string that would read back as JSON (or as empty) is written quoted
            json.loads(v)
        except ValueError:
            return v if v else '""'
        return json.dumps(v)
    return json.dumps(v, sort_keys=True)


def _uncell(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


def _keys(records: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return keys


def to_csv(records: Sequence[dict]) -> str:
    keys = _keys(records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in records:
        w.writerow([_cell(r.get(k)) if k in r else "" for k in keys])
    return buf.getvalue()


SQL_TYPES = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL"}  # a field's declared type -> its column's


def _record_type(kind: str):
    """The typed record of a ``kind`` whose fields make its SQL table's columns (None: only the keys met)."""
    if kind == "eval":
        from ..eval.record import EvalRecord

        return EvalRecord
    return BenchRecord if kind == "bench" else None


def to_sql(records: Sequence[dict], table: str = "bench") -> str:
    """``CREATE TABLE`` + ``INSERT`` statements (sqlite3 dialect), as llama-bench's ``-o sql``, into ``table``
    (each record kind has its own: ``bench``, ``eval``, ``fit``; see :func:`export`).

    The table has a column for every field of the kind's record class (:class:`BenchRecord` for ``bench``),
    typed by its declaration, whatever these records hold: one export appended after another to the same file
    (``ondevice bench -o sql | sqlite3 results.db``, as llama-bench's README does) finds every column it inserts
    into, though the first held only error records (no metrics) or no chat test; a bench and an eval export go
    into one file side by side. Keys no field declares (another version's) follow.
    """
    cls = _record_type(table)
    declared = {f.name: SQL_TYPES.get(str(f.type).replace(" | None", ""), "TEXT") for f in fields(cls)
                if f.name != "extra"} if cls else {}
    keys = [*declared, *(k for k in _keys(records) if k not in declared)]

    def typ(k: str) -> str:
        if k in declared:
            return declared[k]
        vals = [r.get(k) for r in records if r.get(k) is not None]
        if vals and all(isinstance(v, (bool, int)) for v in vals):
            return "INTEGER"
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return "REAL"
        return "TEXT"

    def lit(v) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, (int, float)):
            return repr(v) if math.isfinite(v) else "NULL"
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        return "'" + s.replace("'", "''") + "'"

    out = [f"CREATE TABLE IF NOT EXISTS {table} (\n" + ",\n".join(f"  \"{k}\" {typ(k)}" for k in keys) + "\n);"]
    for r in records:
        out.append(f"INSERT INTO {table} ({', '.join(chr(34) + k + chr(34) for k in keys)}) VALUES "
                   f"({', '.join(lit(r.get(k)) for k in keys)});")
    return "\n".join(out) + "\n"


def export(records: Sequence[BenchRecord | dict], fmt: str, kind: str = "bench") -> str:
    """Records in ``fmt`` (md, csv, json, jsonl or sql); typed records are written as their stored dicts, bench
    records with llama-bench's field names added (:mod:`.llama_bench`). ``kind``: that of records without one
    (sql: the table written when there are none)."""
    if fmt == "md":
        return to_md(records)
    every = dict.fromkeys(f.name for f in fields(BenchRecord) if f.name != "extra")  # the same keys, ok or not
    recs = [{k: v for k, v in ({**every, **r.to_dict()} if isinstance(r, BenchRecord) else r).items()
             if not k.startswith("_")} for r in records]  # no store bookkeeping
    recs = [{**r, **llama_bench.fields(r)} if r.get("kind", "bench") == "bench" else r for r in recs]
    if fmt == "csv":
        return to_csv(recs)
    if fmt == "json":
        return json.dumps(recs, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in recs)
    if fmt == "sql":  # a table per kind: bench and eval rows have different columns
        kinds = dict.fromkeys(str(r.get("kind") or kind) for r in recs) or {kind: None}
        return "".join(to_sql([r for r in recs if str(r.get("kind") or kind) == k], re.sub(r"\W", "_", k))
                       for k in kinds)
    raise InvalidArgument(f"-o {fmt!r} is not an output format; use one of {', '.join(FORMATS)}")


def read(text: str, fmt: str) -> list[dict]:
    """Parse an export back into records (csv, json, jsonl; without the llama-bench fields the export added) or
    table rows (md)."""
    if fmt == "json":
        return [llama_bench.strip(r) for r in json.loads(text)]
    if fmt == "jsonl":
        return [llama_bench.strip(json.loads(line)) for line in text.splitlines() if line.strip()]
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        head = rows[0]
        return [llama_bench.strip({k: _uncell(v) for k, v in zip(head, row) if v != ""}) for row in rows[1:]]
    if fmt == "md":
        return parse_md(text)
    raise InvalidArgument(f"cannot read format {fmt!r}; use csv, json, jsonl or md")
