"""Tests for ondevice.report: export round trips, the HTML page and its plots, compare, quality vs speed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ondevice.bench.record import BenchRecord
from ondevice.report import build_html, export, pareto, quality_vs_speed, read
from ondevice.report.compare import compare, compare_records
from ondevice.report.formats import columns, parse_md
from ondevice.report.html import summary
from ondevice.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def real_records(tmp_path_factory, smol_path):
    """A tiny real sweep (two tests, two repetitions, one thread), stored in a module-local home."""
    import ondevice

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("ONDEVICE_HOME")
    os.environ["ONDEVICE_HOME"] = str(home)
    try:
        recs = ondevice.bench([str(smol_path)], "pp16,tg4", threads=1, repetitions=2, roofline=False,
                              store=home / "r.sqlite")
    finally:
        if old is None:
            os.environ.pop("ONDEVICE_HOME", None)
        else:
            os.environ["ONDEVICE_HOME"] = old
    assert [r.status for r in recs] == ["ok", "ok"]
    return recs


def fake(model: str, sha: str, test: str, threads: int, tps: float, **kw) -> BenchRecord:
    """A bench record with the fields the report reads (the shape of a real one)."""
    wl = re.match(r"[a-z]+", test).group(0)
    n = int(re.search(r"\d+", test).group(0))
    rec = {"kind": "bench", "status": "ok", "model": model, "model_sha256": sha, "test": test, "workload": wl,
           "n_prompt": n if wl == "pp" else 0, "n_gen": n if wl == "tg" else 0, "n_depth": 0, "threads": threads,
           "n_batch": 2048, "n_ubatch": 512, "n_ctx": 768, "n_ctx_requested": 0, "type_k": "f16", "type_v": "f16",
           "flash_attn": False, "profile": "host", "model_size_bytes": 100 << 20, "model_params": 134_000_000,
           "tps_mean": tps, "tps_std": tps * 0.01, "ttft_s_mean": 0.05, "itl_ms_p50": 8.0, "itl_ms_p99": 9.0,
           "peak_rss_bytes": 200 << 20, "rss_file_bytes": 120 << 20, "rss_anon_bytes": 80 << 20,
           "energy_j_per_token": 0.01, "energy_method": "estimated", "roofline_pct": 40.0,
           "roofline_bound": "memory", "prefill_tps_mean": tps if wl == "pp" else None, "prefill_tps_std": 1.0,
           "created": "2026-01-01T00:00:00+00:00"}
    rec.update(kw)
    return BenchRecord.from_dict(rec)


# ---------------------------------------------------------------- exports
@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_exports_round_trip(real_records, fmt):
    text = export(real_records, fmt)
    back = read(text, fmt)
    every = dict.fromkeys(f.name for f in dataclasses.fields(BenchRecord) if f.name != "extra")
    assert back == [json.loads(json.dumps({**every, **r.to_dict()})) for r in real_records]  # every field and type
    assert BenchRecord.coerce(back) == list(real_records)  # and the typed records back
    failed = dataclasses.replace(real_records[0], status="error", error="boom")
    assert set(read(export([failed], fmt), fmt)[0]) == set(back[0])  # the same keys, whatever the outcome


def test_csv_keeps_tricky_strings_and_none():
    recs = [{"a": "null", "b": "", "c": None, "d": "123", "e": [1, "x"], "f": 'he said "hi", ok'}, {"a": "x"}]
    assert read(export(recs, "csv"), "csv") == recs


def test_md_table_round_trips_its_cells(real_records):
    text = export(real_records, "md")
    rows = parse_md(text)
    cols = columns(real_records)
    assert rows == [{c[0]: c[1](r) for c in cols} for r in real_records]
    assert rows[0]["test"] == "pp16" and rows[1]["test"] == "tg4"
    mean, _std = rows[1]["t/s"].split(" ± ")
    assert float(mean) == pytest.approx(real_records[1].tps_mean, abs=0.006)
    for head in ("model", "size", "params", "threads", "TTFT ms", "ITL p50/p99 ms", "peak RSS MiB", "J/tok",
                 "% roofline"):
        assert head in rows[0]
    if real_records[0].energy_method == "estimated":  # an estimate is labelled in the table itself
        assert rows[0]["J/tok"].endswith("(est.)") and "estimated" in text


def test_sql_export_loads_into_sqlite(real_records):
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.executescript(export(real_records, "sql"))
    got = db.execute("SELECT test, tps_mean FROM bench ORDER BY rowid").fetchall()
    assert got == [(r.test, r.tps_mean) for r in real_records]


def test_non_default_settings_get_columns():
    recs = [fake("m", "a" * 64, "tg128", 1, 10.0), fake("m", "a" * 64, "tg128", 1, 12.0, type_k="q8_0")]
    heads = [c[0] for c in columns(recs)]
    assert "type_k" in heads and "n_batch" not in heads
    oom = fake("m", "a" * 64, "tg128", 1, 0.0, status="oom")
    assert parse_md(export([oom], "md"))[0]["t/s"] == "OOM"


def test_records_stored_by_older_versions_still_read():
    """A record written before some fields existed (no kernels, load, noise) and with a key this version does
    not know reads back typed, reports, and is written back with nothing lost."""
    old = {"schema": 1, "kind": "bench", "session": "s0", "config_key": "k", "status": "ok", "model": "m",
           "model_sha256": "e" * 64, "test": "tg128", "workload": "tg", "n_gen": 128, "threads": 2,
           "tps_mean": 50.0, "tps_std": 0.5, "tps_samples": [49.5, 50.5], "some_future_key": {"x": 1},
           "_id": 7, "_session": "s0", "_status": "ok"}
    rec = BenchRecord.from_dict(old)
    assert rec.tps_samples == (49.5, 50.5) and rec.kernels is None and not rec.noisy and rec.load is None
    assert rec.extra == {"some_future_key": {"x": 1}}  # the store's _bookkeeping is not kept
    back = rec.to_dict()
    assert back["some_future_key"] == {"x": 1} and back["tps_samples"] == [49.5, 50.5] and "_id" not in back
    assert BenchRecord.from_dict(back) == rec
    assert parse_md(export([old], "md"))[0]["t/s"] == "50.00 ± 0.50"  # the table reads a stored dict too
    assert "load" not in parse_md(export([old], "md"))[0]


# ---------------------------------------------------------------- HTML
def test_html_report_has_plots_and_is_self_contained(tmp_path, real_records):
    recs = [fake("m1", "a" * 64, f"pp{n}", t, 100.0 * t + n / 10) for t in (1, 2) for n in (64, 256, 512)]
    recs += [fake("m2", "b" * 64, "tg128", t, 20.0 * t) for t in (1, 2)]
    html = build_html([*recs, *real_records], sessions=["s"])
    assert html.count("<svg") >= 4
    for title in ("Prefill throughput vs prompt length", "Thread scaling", "Memory per model",
                  "Share of the roofline bound achieved"):
        assert title in html
    assert "<polyline" in html and "<rect" in html
    assert not re.search(r'(src|href)="https?://', html)  # nothing loaded from elsewhere
    assert "estimated" in html and "Quality vs speed" in html


def test_report_cli_writes_html_for_latest_session(tmp_path, real_records):
    store_path = tmp_path / "x.sqlite"
    with Store(store_path) as st:
        for r in real_records:
            st.add("bench", r, session=r.session, config_key=r.config_key, model=r.model,
                   model_sha256=r.model_sha256, test=r.test, status=r.status)
    out_html = tmp_path / "rep.html"
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "report", "--db", str(store_path), "--html",
                          str(out_html)], check=False, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, ONDEVICE_HOME=str(tmp_path / "h"), PYTHONPATH=SRC))
    assert res.returncode == 0, res.stderr
    assert f"report: {out_html}" in res.stdout and "| model" in res.stdout
    html = out_html.read_text()
    assert html.count("<svg") >= 1 and "Memory per model" in html and "class=\"summary" in html


# ---------------------------------------------------------------- reading the report as a user would
def test_noisy_records_are_marked_in_table_and_report():
    from dataclasses import replace

    from ondevice.bench.noise import assess

    calm = fake("m", "a" * 64, "tg128", 2, 50.0, load=0.02)
    busy = fake("m", "a" * 64, "pp512", 2, 57.55, tps_std=26.29, load=3.1)
    calm, busy = (replace(r, noise=tuple(why), noisy=bool(why))
                  for r in (calm, busy) for why in [assess(r.tps_mean, r.tps_std, r.load)])
    assert not calm.noisy and busy.noisy
    text = export([calm, busy], "md")
    rows = parse_md(text)
    assert rows[0]["t/s"] == "50.00 ± 0.50" and rows[1]["t/s"] == "57.55 ± 26.29 (!)"
    assert rows[0]["load"] == "0.02" and rows[1]["load"] == "3.10"
    assert "(!) noisy, do not trust (1 of 2)" in text and "--wait-idle" in text
    html = build_html([calm, busy], sessions=["s"])
    assert html.count("class='noisy'") == 1 and "3.10 cores" in html  # the reason, on the row
    summary = re.search(r'<p class="summary warn">(.*?)</p>', html).group(1)
    assert "1 noisy" in summary and "3.10 cores" in summary and "decode 50.0 tok/s (tg128, t=2)" in summary


def test_prefill_plot_leaves_out_the_chat_average_prompt():
    recs = [fake("m", "a" * 64, f"pp{n}", 1, 300.0 + n / 10) for n in (64, 512)]
    recs.append(fake("m", "a" * 64, "chat8x1", 1, 40.0, workload="chat", n_prompt=0, prefill_tps_mean=250.0,
                     prompt_lengths=[200, 290.6]))
    from ondevice.report.html import plot_prompt_length

    chart = plot_prompt_length(recs)
    assert ">64<" in chart and ">512<" in chart and "245.3" not in chart
    assert plot_prompt_length(recs[1:]) is None  # one prompt length: no curve, a note instead
    assert "one prompt length per model" in build_html(recs[1:])


def test_chart_labels_and_legends_are_whole():
    from ondevice.report import svg

    cats = ["tg128@d512 t=1", "tg128@d512 t=2", "pp512 t=1", "pp512 t=2"]
    chart = svg.bar_chart(cats, {"smollm2-135m-instruct": [10.0, 20.0, 30.0, 40.0]}, "Roofline", "%")
    words = re.findall(r"<tspan[^>]*>([^<]*)</tspan>", chart)
    assert words.count("t=1") == 2 and words.count("t=2") == 2 and "tg128@d512" in words  # t=1 vs t=2 told apart
    long = {"anonymous (KV cache, compute buffers, Python)": [1.0], "model file (mmap)": [2.0]}
    chart = svg.bar_chart(["a-model-with-a-long-name"], long, "Memory", "MiB", stacked=True)
    assert ">anonymous (KV cache, compute buffers, Python)</text>" in chart
    many = [f"tg128@d{d} t={t}" for d in (512, 1024, 2048, 4096) for t in (1, 2, 4)]  # too wide: labels turn
    chart = svg.bar_chart(many, {"m": [1.0] * len(many)}, "Roofline", "%")
    assert all(f">{c}</text>" in chart for c in many) and "rotate(-40" in chart
    assert 'style="width:100%;height:auto"' in chart and "viewBox" in chart  # scales to the page


def test_memory_plot_says_what_file_backed_memory_holds():
    from ondevice.report.html import plot_memory

    new = fake("m", "a" * 64, "tg128", 1, 10.0, rss_model_bytes=94 << 20)  # of rss_file 120 MiB
    chart = plot_memory([new])
    assert "model file (mmap)" in chart and "other files (shared libraries)" in chart
    assert re.search(r"m other files \(shared libraries\): 26<", chart)
    old = fake("m", "a" * 64, "tg128", 1, 10.0)  # a record from before rss_model_bytes
    assert "file-backed (model mmap + shared libraries)" in plot_memory([old])


def test_report_screenshot_in_headless_chromium(tmp_path, real_records):
    """The page as a browser draws it (benchmarks/report_screenshot.py does this on a fresh bench session)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from report_screenshot import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    recs = [fake("m1", "a" * 64, f"pp{n}", t, 100.0 * t + n / 10) for t in (1, 2) for n in (64, 512)]
    html = tmp_path / "r.html"
    html.write_text(build_html([*recs, *real_records], sessions=["s"]))
    png = screenshot(html, tmp_path / "r.png", 1200, 1600)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1600)
    assert len(data) > 40_000  # text and charts drawn, not a blank page


# ---------------------------------------------------------------- compare
def test_compare_sessions_prints_speedups(tmp_path):
    with Store(tmp_path / "c.sqlite") as st:
        for sess, scale in (("20260101-000000-aaaa", 1.0), ("20260102-000000-bbbb", 1.5)):
            for test, tps in (("pp512", 300.0), ("tg128", 120.0)):
                r = fake("smol", "c" * 64, test, 2, tps * scale)
                st.add("bench", r, session=sess, config_key=f"{test}", model="smol", model_sha256="c" * 64,
                       test=test)
        rows, table = compare(st, "20260101", "20260102-000000-bbbb")
    assert [r["test"] for r in rows] == ["pp512", "tg128"]
    assert all(r["speedup"] == pytest.approx(1.5) for r in rows)
    assert "speedup" in table and "1.50" in table
    # the columns name each session whole (cut to 16 characters, two sessions of one second read the same)
    assert "t/s 20260101-000000-aaaa" in table and "t/s 20260102-000000-bbbb" in table, table
    res = subprocess.run([sys.executable, "-m", "ondevice.cli", "report", "--db", str(tmp_path / "c.sqlite"),
                          "--compare", "20260101", "20260102"], check=False, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert res.returncode == 0 and res.stdout.count("1.50") == 2, res.stderr


def test_compare_a_model_with_a_session_it_ran_in_uses_its_other_sessions(tmp_path):
    """`--compare SHA SESSION` set the session's records against themselves (the model's latest are that session's):
    every speedup 1.00. The same session twice is refused."""
    from ondevice.errors import InvalidArgument

    with Store(tmp_path / "c.sqlite") as st:
        for sess, tps in (("20260101-000000-aaaa", 100.0), ("20260102-000000-bbbb", 150.0)):
            st.add("bench", fake("smol", "c" * 64, "tg128", 2, tps), session=sess, config_key="tg128", model="smol",
                   model_sha256="c" * 64, test="tg128")
        rows, _ = compare(st, "cccc", "20260102-000000-bbbb")
        assert [r["speedup"] for r in rows] == [pytest.approx(1.5)]
        with pytest.raises(InvalidArgument, match="both name the session 20260101-000000-aaaa, so every speedup"):
            compare(st, "20260101", "20260101-000000-aaaa")


def test_compare_two_model_variants_by_sha_prefix():
    a = [fake("q8", "aa" + "0" * 62, "tg128", 2, 100.0), fake("q8", "aa" + "0" * 62, "pp512", 2, 400.0)]
    b = [fake("q4", "bb" + "0" * 62, "tg128", 2, 150.0), fake("q4", "bb" + "0" * 62, "pp64", 2, 1.0)]
    rows = compare_records(a, b, by_model=True)
    assert len(rows) == 1 and rows[0]["speedup"] == pytest.approx(1.5) and rows[0]["model"] == "q8 -> q4"


def test_compare_unknown_ref_names_the_fix(tmp_path):
    from ondevice.errors import InvalidArgument

    with Store(tmp_path / "e.sqlite") as st, pytest.raises(InvalidArgument, match="report --list"):
        compare(st, "nope", "nada")


def test_an_ambiguous_session_prefix_says_how_many_match(tmp_path):
    from ondevice.errors import InvalidArgument
    from ondevice.report.write import resolve_session

    with Store(tmp_path / "e.sqlite") as st:
        for sess in ("20260101-000000-aaaa", "20260102-000000-bbbb"):
            st.add("bench", fake("smol", "c" * 64, "tg8", 1, 10.0), session=sess, config_key=sess, model="smol",
                   model_sha256="c" * 64, test="tg8")
        with pytest.raises(InvalidArgument, match=r"^2 sessions match '2026'; give more of the id"):
            resolve_session(st, "2026")
        with pytest.raises(InvalidArgument, match=r"^no bench session matches '2025'; list them"):
            resolve_session(st, "2025")
        assert resolve_session(st, "20260102") == "20260102-000000-bbbb"


# ---------------------------------------------------------------- quality vs speed
def test_pareto_front():
    pts = [(10, 0.5), (20, 0.4), (5, 0.6), (8, 0.45), (20, 0.4)]
    assert pareto(pts) == [True, True, True, False, True]
    assert pareto([(10, 8.0), (20, 7.5), (5, 9.0), (4, 7.0)], higher_y_better=False) == [False, True, False, True]


def test_quality_vs_speed_joins_on_sha_and_marks_front():
    bench = [fake("q8", "a" * 64, "tg128", 2, 80.0), fake("q4", "b" * 64, "tg128", 2, 120.0),
             fake("q2", "c" * 64, "tg128", 2, 100.0), fake("q4", "b" * 64, "pp512", 2, 500.0)]
    evals = [{"kind": "eval", "model": "q8", "model_sha256": "a" * 64, "test": "ppl:lee", "ppl": 10.0},
             {"kind": "eval", "model": "q4", "model_sha256": "b" * 64, "test": "ppl:lee", "ppl": 11.0},
             {"kind": "eval", "model": "q2", "model_sha256": "c" * 64, "test": "ppl:lee", "ppl": 15.0},
             {"kind": "eval", "model": "q4", "model_sha256": "b" * 64, "test": "suite:assistant-en", "score": 0.3},
             {"kind": "eval", "model": "zz", "model_sha256": "d" * 64, "test": "ppl:lee", "ppl": 9.0}]
    pts = quality_vs_speed([*bench, *evals])
    by = {(p["eval_test"], p["model"]): p for p in pts}
    assert ("ppl:lee", "zz") not in by  # no bench run of that file: nothing to plot it against
    assert by[("ppl:lee", "q4")]["tps"] == 120.0 and by[("ppl:lee", "q4")]["metric"] == "ppl"
    assert by[("ppl:lee", "q8")]["pareto"] and by[("ppl:lee", "q4")]["pareto"]
    assert not by[("ppl:lee", "q2")]["pareto"]  # slower than q4 and worse perplexity
    assert by[("suite:assistant-en", "q4")]["higher_is_better"]
    html = build_html(bench, evals)
    assert "Quality vs speed: ppl:lee" in html and "Pareto front" in html


def test_compare_headers_keep_whole_session_ids():
    from ondevice.report.compare import format_compare

    row = {"model": "m", "threads": 2, "test": "tg8", "kernels_a": "none", "kernels_b": "none", "tps_a": 10.0,
           "std_a": 0.1, "tps_b": 11.0, "std_b": 0.2, "speedup": 1.1}
    head = format_compare([row], "20261202-102819-aaaa11", "20261202-102819-bbbb22").splitlines()[0]
    assert "t/s 20261202-102819-aaaa11" in head and "t/s 20261202-102819-bbbb22" in head


def test_compare_keeps_the_noisy_marks():
    from ondevice.report.compare import format_compare
    from ondevice.report.formats import NOISY_MARK

    a = [fake("q8", "aa" + "0" * 62, "tg128", 2, 100.0)]
    b = [fake("q4", "bb" + "0" * 62, "tg128", 2, 150.0)]
    rows = compare_records(a, [fake("q4", "bb" + "0" * 62, "tg128", 2, 150.0, noisy=True)], by_model=True)
    assert rows[0]["noisy_b"] and not rows[0]["noisy_a"]
    text = format_compare(rows, "A", "B")
    row = text.splitlines()[2]
    assert row.count(NOISY_MARK) == 2  # B's t/s and the speedup that uses it
    assert "noisy, do not trust (1 of 2)" in text
    assert NOISY_MARK not in format_compare(compare_records(a, b, by_model=True), "A", "B")


@pytest.mark.parametrize("flags, says", [
    (["--compare", "a", "b", "-o", "csv"], "--compare prints its own table on stdout and exits; -o csv does not"),
    (["--list", "-o", "json"], "--list prints its own table"),
    (["--session", "x", "--all"], "give one of them"),
    (["-o", "csv", "--html", "x.html"], "so --html has nothing to write"),
    (["--list", "--fit"], "--list and --fit each print their own table"),
    (["--cascade", "--session", "x"], "--cascade prints its own table on stdout and exits; --session does not"),
])
def test_flags_that_would_be_ignored_together_are_refused(cli, flags, says):
    r = cli("report", *flags)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_report_of_a_failed_run_says_why():
    bad = [fake("m", "a" * 64, t, 1, 0.0, status="error", error="model load failed: boom") for t in ("pp16", "tg8")]
    head, _ = summary(bad)
    assert "0 of 2 runs ok" in head and "pp16: model load failed: boom" in head and "tg8: model" in head


def test_compare_shows_the_settings_that_tell_its_rows_apart():
    """Rows are matched on batch, KV types, flash attention ...: where those differ between rows, they are shown
    (compare-llama-bench does the same), else two pp32 rows would look alike."""
    from ondevice.report.compare import format_compare

    sha = "aa" + "0" * 62
    a = [fake("m", sha, "pp32", 1, 100.0), fake("m", sha, "pp32", 1, 90.0, n_batch=64, flash_attn=None)]
    b = [fake("m", sha, "pp32", 1, 110.0), fake("m", sha, "pp32", 1, 99.0, n_batch=64, flash_attn=None)]
    lines = format_compare(compare_records(a, b, by_model=True), "A", "B").splitlines()
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in (lines[0], lines[2], lines[3])]
    assert cells[0][:5] == ["model", "threads", "n_batch", "fa", "test"] and "type_k" not in cells[0]
    assert cells[1][2:4] == ["2048", "off"] and cells[2][2:4] == ["64", "auto"]


def test_the_table_of_several_sessions_says_which_session_each_row_is():
    """`report --all` mixes sessions: two equal-looking rows are told apart by a session column (one session: none)."""
    a = fake("m", "s", "tg4", 1, 20.0, session="20260101-000000-aaaa")
    b = fake("m", "s", "tg4", 1, 30.0, session="20260102-000000-bbbb")
    assert "session" not in [c[0] for c in columns([a])]
    cols = columns([a, b])
    assert cols[0][0] == "session" and [cols[0][1](r) for r in (a, b)] == [a.session, b.session]
    table = export([a, b], "md")
    assert "| session " in table and a.session in table and b.session in table
