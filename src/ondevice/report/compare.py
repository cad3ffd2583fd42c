"""``ondevice report --compare A B``: speedup of B over A per test, like llama.cpp's compare-llama-bench.

A and B are session ids or model sha256 prefixes (a unique prefix of either is enough). Two sessions are
matched on model variant + test + settings; two model variants on test + settings (so one file's
speed is set against the other's on the same workload). The kernels column names the extra CPU buffer
types each side's weights really used (CPU_REPACK, AMX, none; '?' for records made before they were
recorded), so a speedup that comes from different kernels is never read as the same configuration's. When the
two sides ran on different machines or llama.cpp builds (``meta``), a warning line naming both comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bench.record import BenchRecord
from ..errors import InvalidArgument
from .formats import HEAD, NOISY_MARK, md_table, noise_legend, quota_throttled, setting
from .machines import compare_warning

MATCH = ("test", "threads", "n_batch", "n_ubatch", "n_ctx", "type_k", "type_v", "flash_attn", "profile")


def _ok_records(store, session: str | None = None, besides: str | None = None) -> list[BenchRecord]:
    """The ok bench records of ``session`` (None: all), leaving out those of the session ``besides``."""
    return [BenchRecord.from_dict(r) for r in store.records("bench", session)
            if r.get("_status") == "ok" and (besides is None or r.get("_session") != besides)]


def select(store, ref: str, besides: str | None = None) -> tuple[str, str, list[BenchRecord]]:
    """(``session``|``model``, the full id, its ok bench records) for a session id or sha256 prefix; a model's
    records leave out those of the session ``besides`` (the other side of a comparison)."""
    sessions = [s for s, _, _ in store.sessions("bench")]
    hits = [s for s in sessions if s == ref] or [s for s in sessions if s.startswith(ref)]
    if len(hits) == 1:
        return "session", hits[0], _ok_records(store, hits[0])
    all_ok = _ok_records(store, besides=besides)
    shas = sorted({r.model_sha256 for r in all_ok if (r.model_sha256 or "").startswith(ref.lower())})
    if len(hits) > 1 or len(shas) > 1:
        raise InvalidArgument(f"{ref!r} matches several sessions or models ({', '.join((hits + shas)[:4])}...); "
                              "give a longer prefix")
    if not shas:
        raise InvalidArgument(f"{ref!r} is neither a bench session nor a model sha256 prefix in the store; "
                              "list them with `ondevice report --list`")
    return "model", shas[0], [r for r in all_ok if r.model_sha256 == shas[0]]


def _latest_by(records: Sequence[BenchRecord], fields: Sequence[str]) -> dict[tuple, BenchRecord]:
    out: dict[tuple, BenchRecord] = {}
    for r in records:  # records come in id order: later ones replace earlier ones
        out[tuple(getattr(r, f) for f in fields)] = r
    return out


def compare_records(a: Sequence[BenchRecord | dict], b: Sequence[BenchRecord | dict], by_model: bool) -> list[dict]:
    """Rows {model, key fields, tps_a, tps_b, std_a, std_b, speedup} for configurations in both sets."""
    fields = list(MATCH) if by_model else ["model_sha256", "copy_index", *MATCH]  # a row per record, as the table
    la, lb = _latest_by(BenchRecord.coerce(a), fields), _latest_by(BenchRecord.coerce(b), fields)
    rows = []
    for key, ra in la.items():
        rb = lb.get(key)
        if rb is None or not ra.tps_mean or rb.tps_mean is None:
            continue
        same = not by_model or ra.model == rb.model
        rows.append({"model": ra.model if same else f"{ra.model} -> {rb.model}",
                     **dict(zip(fields, key)), "tps_a": ra.tps_mean, "std_a": ra.tps_std,
                     "kernels_a": ra.kernels or "?", "kernels_b": rb.kernels or "?",
                     "tps_b": rb.tps_mean, "std_b": rb.tps_std, "speedup": rb.tps_mean / ra.tps_mean,
                     "noisy_a": bool(ra.noisy), "noisy_b": bool(rb.noisy), "load_a": ra.load, "load_b": rb.load,
                     "throttled_a": quota_throttled(ra), "throttled_b": quota_throttled(rb)})
    return rows


def format_compare(rows: Sequence[dict], label_a: str, label_b: str) -> str:
    """A markdown table with the speedup column (B t/s / A t/s; > 1 means B is faster)."""
    if not rows:
        return "(no configuration was measured in both; nothing to compare)\n"
    # the settings rows were matched on that differ between rows get a column, or two rows would look alike
    varying = [f for f in MATCH if f not in ("test", "threads") and len({repr(r.get(f)) for r in rows}) > 1]
    head = ["model", "threads", *(HEAD.get(f, f) for f in varying), "test", "kernels", f"t/s {label_a}",
            f"t/s {label_b}", "speedup"]
    kern = lambda r: r["kernels_a"] if r["kernels_a"] == r["kernels_b"] else f"{r['kernels_a']} -> {r['kernels_b']}"
    mark = lambda r, *sides: f" {NOISY_MARK}" if any(r.get(f"noisy_{s}") for s in sides) else ""
    body = [[str(r["model"]), str(r["threads"]), *(setting(r.get(f)) for f in varying), str(r["test"]), kern(r),
             f"{r['tps_a']:.2f} ± {r['std_a'] or 0:.2f}{mark(r, 'a')}",
             f"{r['tps_b']:.2f} ± {r['std_b'] or 0:.2f}{mark(r, 'b')}",
             f"{r['speedup']:.2f}{mark(r, 'a', 'b')}"] for r in rows]
    throttled = [r[k] for r in rows for k in ("throttled_a", "throttled_b") if r.get(k) is not None]
    note = noise_legend(sum(r.get(f"noisy_{s}", False) for r in rows for s in "ab"), 2 * len(rows), False, throttled)
    table = md_table(head, body, [i > 0 for i in range(len(head))])
    return "\n".join([*table, *([note] if note else [])]) + "\n"


def compare(store, a: str, b: str) -> tuple[list[dict], str]:
    """Rows and the printable table for ``--compare a b``."""
    kind_a, id_a, _ = select(store, a)
    kind_b, id_b, _ = select(store, b)
    if id_a == id_b:
        raise InvalidArgument(f"--compare {a} {b}: both name the {kind_a} {id_a}, so every speedup would be 1.00; "
                              f"give two sessions (`ondevice report --list`), or a model's sha256 prefix and a session")
    # a model against a session: the model's records from the other sessions (its latest would be that session's)
    kind_a, id_a, recs_a = select(store, a, besides=id_b if kind_b == "session" else None)
    kind_b, id_b, recs_b = select(store, b, besides=id_a if kind_a == "session" else None)
    by_model = kind_a == "model" or kind_b == "model"
    rows = compare_records(recs_a, recs_b, by_model)
    # a session id whole (two started in the same second differ only in its tail), a sha256 by its first 16
    label = lambda kind, full: full if kind == "session" else full[:16]
    table = format_compare(rows, label(kind_a, id_a), label(kind_b, id_b))
    warning = compare_warning(recs_a, recs_b) if rows else None  # another machine or build: said before the table
    return rows, (f"{warning}\n\n" if warning else "") + table
