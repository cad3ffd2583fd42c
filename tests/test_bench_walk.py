"""`ondevice bench` and `ondevice report` as a llama-bench user walks them: -pg with a zero side is llama-bench's
pp / tg test; outputs are checked before the sweep; one row per -m; tables aligned on a terminal."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from ondevice.bench import parse_tests
from ondevice.errors import InvalidArgument
from ondevice.report.formats import parse_md
from ondevice.store import Store


def test_pg_with_a_zero_side_is_the_pp_or_tg_test_as_in_llama_bench():
    # llama-bench names -pg 0,N "tgN" and -pg P,0 "ppP"; timed as a pg, pg0,N had no prompt to prefill and
    # sampled its first token from the logits an earlier run left (TTFT ~0, one token for free)
    (tg,) = parse_tests("pg0,16")
    assert (tg.name, tg.kind, tg.n_prompt, tg.n_gen) == ("tg16", "tg", 0, 16)
    (tgd,) = parse_tests("pp0+tg8@d4")
    assert (tgd.name, tgd.kind, tgd.n_depth) == ("tg8@d4", "tg", 4)
    (pp,) = parse_tests("pg32,0")
    assert (pp.name, pp.kind, pp.n_prompt, pp.n_gen) == ("pp32", "pp", 32, 0)
    assert parse_tests("pg8,4")[0].kind == "pg"  # both sides: still the combined test


@pytest.mark.parametrize("bad", ["pg0,0", "pp0+tg0", "pg0,0@d8"])
def test_pg_with_nothing_to_time_is_refused(bad):
    with pytest.raises(InvalidArgument, match="no tokens to time"):
        parse_tests(bad)


def test_cli_pg_zero_prompt_runs_the_tg_test_and_pg_zero_zero_stores_nothing(cli, tmp_path, smol_path):
    db = tmp_path / "b.sqlite"
    r = cli("bench", "-m", str(smol_path), "-pg", "0,4", "-p", "0", "-n", "0", "-r", "1", "-t", "1", "-o", "json",
            "--db", str(db), "--no-roofline", "--no-report", "--no-progress")
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    assert (rec["test"], rec["workload"], rec["n_prompt"], rec["n_gen"]) == ("tg4", "tg", 0, 4)
    assert rec["status"] == "ok" and rec["tps_mean"] > 0
    r = cli("bench", "-m", str(smol_path), "--tests", "pg0,0", "-r", "1", "--db", str(tmp_path / "z.sqlite"),
            "--no-report", "--no-progress")
    assert r.returncode == 2 and "ondevice bench: error: test 'pg0,0' has no tokens to time" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "z.sqlite").exists()  # refused before any work
    # chat1: one token a turn has no decode rate (it ended the sweep in a TypeError, a half-record stored)
    r = cli("bench", "-m", str(smol_path), "--tests", "chat1x1,tg4", "--db", str(tmp_path / "z.sqlite"))
    assert r.returncode == 2 and "test 'chat1x1': a chat test's t/s is its decode after the first token, so it " \
                                 "needs at least 2 tokens" in r.stderr, r.stderr
    assert not (tmp_path / "z.sqlite").exists()


def test_depth_alone_next_to_tests_is_refused_not_the_default_pp512_tg128_added():
    # `--tests tg64 -d 512` ran tg64, pp512@d512 and tg128@d512: -d alone brought llama-bench's -p/-n defaults
    from types import SimpleNamespace

    from ondevice.bench.cli import tests_from_args

    def specs(tests, d, p=None, n=None):
        return tests_from_args(SimpleNamespace(n_prompt=p, n_gen=n, pg=None, n_depth=d, tests=tests))

    with pytest.raises(InvalidArgument, match=r"^-d sets the KV depth of -p/-n/-pg tests; .* --tests tg64@d512$"):
        specs(["chat,tg64"], [512])
    assert specs(["tg4"], [8], p=[0], n=[4]) == ["tg4", "tg4@d8"]  # with -p/-n it still sweeps their tests
    assert specs(None, [0, 16]) == ["pp512", "tg128", "pp512@d16", "tg128@d16"]  # llama-bench's defaults, as there


# ------------------------------------------------- outputs said before measuring, not after
def _no_work_done(r, tmp_path) -> None:
    """Refused in one line before anything ran: no table, no store, no report."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    home = tmp_path / "home"
    assert not (home / "data" / "ondevice.sqlite").exists() and not (home / "reports").exists()


def test_an_html_path_that_cannot_be_written_is_refused_before_the_sweep(cli, tmp_path):
    """The sweep ran to its end (minutes on a real sweep), printed its table, then failed to write the report:
    the exit status said failure and the session line never came."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = {str(tmp_path / "a-folder"): "it is a folder",
             str(tmp_path / "a-file" / "r.html"): f"{tmp_path / 'a-file'} is a file, not a folder",
             "/proc/ondevice-report.html": "the folder /proc is not writable",  # not even by root
             str(tmp_path / "new") + "/": "it names a folder"}  # Path() would drop the slash and write a file "new"
    for path, why in cases.items():
        r = cli("bench", "-p", "32", "-n", "0", "-r", "1", "-t", "1", "--no-progress", "--html", path)
        _no_work_done(r, tmp_path)
        assert r.stderr.startswith("ondevice bench: error: cannot write ") and why in r.stderr, r.stderr
    assert not (tmp_path / "new").exists() and (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize(("flags", "says"), [
    (["--html", "TMP/r.html", "--no-report"], "--html names the report file and --no-report writes no report"),
    (["--db", "TMP/x.sqlite", "--no-store"], "--db names the store to write and --no-store keeps no records"),
    (["--resume", "--no-store"], "--resume continues a stored session and --no-store keeps no records"),
])
def test_output_flags_that_cancel_out_are_refused_before_the_sweep(cli, tmp_path, flags, says):
    # --html with --no-report (or --db with --no-store) ran the whole sweep and silently wrote nothing there
    r = cli("bench", "-p", "32", "-n", "0", "-r", "1", "-t", "1", "--no-progress",
            *(f.replace("TMP", str(tmp_path)) for f in flags))
    _no_work_done(r, tmp_path)
    assert f"ondevice bench: error: {says}; drop one of them" in r.stderr, r.stderr
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "x.sqlite").exists()


def test_report_html_that_cannot_be_written_is_refused_before_the_table(cli, tmp_path):
    from test_report import fake

    db = tmp_path / "s.sqlite"
    with Store(db) as st:
        r = fake("smol", "c" * 64, "tg8", 1, 10.0, session="s1", config_key="k1")
        st.add("bench", r, session="s1", config_key="k1", model="smol", model_sha256="c" * 64, test="tg8")
    (tmp_path / "a-file").write_text("x")
    r = cli("report", "--db", str(db), "--html", str(tmp_path / "a-file" / "r.html"))
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)  # was: the table, then "File exists: ..."
    assert r.stderr.strip() == (f"ondevice report: error: cannot write {tmp_path / 'a-file' / 'r.html'}: "
                                f"{tmp_path / 'a-file'} is a file, not a folder; give another --html")


# ------------------------------------------------- one row per -m, as llama-bench prints
def test_byte_identical_model_files_get_a_row_each_and_resume_still_skips_them(cli, tmp_path, smol_path):
    """`-m a.gguf -m b.gguf` of the same bytes (an A/A check of --interleave, a copy under another name) stored
    records under one config_key, and `ondevice report` kept one of them: the user saw one row for two files."""
    data = Path(smol_path).read_bytes()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(data)
    b.write_bytes(data)
    db = str(tmp_path / "s.sqlite")
    run = ["bench", "--tests", "tg4", "-t", "1", "-r", "1", "--interleave", "--no-roofline", "--no-report",
           "--no-progress", "--db", db, "--session", "aa", "-o", "json"]
    r = cli(*run, "-m", str(a), "-m", str(b), "-m", str(a))  # the same file twice too: llama-bench runs it twice
    assert r.returncode == 0, r.stderr
    swept = json.loads(r.stdout)
    assert [x["model"] for x in swept] == ["a", "b", "a"] and all(x["status"] == "ok" for x in swept)
    assert len({x["config_key"] for x in swept}) == 3
    r = cli("report", "--db", db, "--session", "aa", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert [(x["model"], x["config_key"]) for x in json.loads(r.stdout)] == [(x["model"], x["config_key"])
                                                                              for x in swept]
    again = [*run[:run.index("aa")], "bb", *run[run.index("aa") + 1:]]
    assert cli(*again, "-m", str(a), "-m", str(b), "-m", str(a)).returncode == 0
    r = cli("report", "--db", db, "--compare", "aa", "bb")  # one row per -m there too
    assert r.returncode == 0, r.stderr
    assert [row["model"] for row in parse_md(r.stdout)] == ["a", "b", "a"], r.stdout
    # the dedup config_key exists for holds: resuming measures nothing again, and the first -m of these bytes
    # keeps its variant's key (a file stored under another name is still skipped)
    r = cli(*run, "--resume", "-m", str(b))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["config_key"] == swept[0]["config_key"]
    r = cli(*run, "--resume", "-m", str(a), "-m", str(b), "-m", str(a))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == swept
    with Store(db) as st:
        assert len(st.records("bench", "aa")) == 3  # nothing measured or stored again


def test_a_setting_or_test_given_twice_gets_a_row_each_as_in_llama_bench(cli, tmp_path, smol_path):
    # `-t 1,1 -p 8,8` (llama-bench prints 4 rows) printed 4 rows and stored them under one key: the report showed 1
    db = str(tmp_path / "s.sqlite")
    r = cli("bench", "-m", str(smol_path), "-p", "8,8", "-n", "0", "-t", "1,1", "-r", "1", "--no-roofline",
            "--no-report", "--no-progress", "--db", db, "-o", "json")
    assert r.returncode == 0, r.stderr
    swept = json.loads(r.stdout)
    assert [(x["test"], x["threads"], x["status"]) for x in swept] == [("pp8", 1, "ok")] * 4
    r = cli("report", "--db", db, "-o", "md")
    assert r.returncode == 0, r.stderr
    assert [row["test"] for row in parse_md(r.stdout)] == ["pp8"] * 4, r.stdout
    assert [x["settings"].get("copy", 0) for x in swept] == [0, 1, 2, 3]  # what tells them apart, in the record


# ------------------------------------------------- the figures llama-bench shows
LLAMA_BENCH = Path.home() / ".cache/ondevice-peers/llama.cpp-0.3.36/build/bin/llama-bench"


def test_the_size_column_is_llama_benchs_size_of_the_tensors(cli, smol_path):
    """The table's "size" was the file's (93.81 MiB for the default model) where llama-bench, next to it, says
    92.10 MiB: its size is the tensors' bytes, without the GGUF header and alignment padding."""
    import subprocess

    from gguf import GGUFReader

    tensors = sum(int(t.n_bytes) for t in GGUFReader(smol_path).tensors)  # gguf-py's reading, not ours
    r = cli("bench", "-m", str(smol_path), "--tests", "tg2", "-t", "1", "-r", "1", "--no-roofline", "--no-report",
            "--no-progress", "--no-store")
    assert r.returncode == 0, r.stderr
    (row,) = parse_md(r.stdout)
    assert row["size"] == f"{tensors / 2**20:.2f} MiB" != f"{Path(smol_path).stat().st_size / 2**20:.2f} MiB"
    if LLAMA_BENCH.exists():  # the peer itself, where it is built
        peer = subprocess.run([str(LLAMA_BENCH), "-m", str(smol_path), "-p", "0", "-n", "1", "-r", "1", "-t", "1",
                               "-o", "json"], capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(peer.stdout)[0]["model_size"] == tensors


# ------------------------------------------------- -o sql appends, as llama-bench's `-o sql | sqlite3 db`
def test_sql_exports_append_to_one_table_whatever_the_first_one_held(cli, tmp_path, smol_path):
    """The table took its columns from the first export's records: after a run whose records were errors (no
    metric columns), the next run's INSERTs failed on tps_mean and its records never reached the file."""
    import sqlite3

    common = ["-m", str(smol_path), "-t", "1", "-r", "1", "--no-roofline", "--no-report", "--no-progress",
              "--no-store", "-o", "sql"]
    failed = cli("bench", "--tests", "pp64", "-c", "16", *common)  # a context too small: an error record
    assert failed.returncode == 1 and "ContextOverflow" in failed.stderr, failed.stderr
    ok = cli("bench", "--tests", "tg2", *common)
    assert ok.returncode == 0, ok.stderr
    db = sqlite3.connect(tmp_path / "results.sqlite")
    for run in (failed, ok):
        db.executescript(run.stdout)
    rows = db.execute("SELECT test, status, tps_mean, typeof(tps_mean) FROM bench ORDER BY rowid").fetchall()
    assert [r[:2] for r in rows] == [("pp64", "error"), ("tg2", "ok")]
    assert rows[0][2] is None and rows[1][2] > 0 and rows[1][3] == "real"  # a number, sortable as one
    db.close()


# ------------------------------------------------- the table as a terminal shows it
def test_the_table_stays_aligned_with_wide_characters_in_a_model_name(cli, tmp_path):
    """A model file named in CJK took two terminal columns per character but was padded for one: every cell
    after it in that row was pushed right (in `ondevice bench`, `report -o md` and `report --compare`)."""
    from test_report import fake

    db = tmp_path / "s.sqlite"
    with Store(db) as st:
        for sess in ("s1", "s2"):
            for name in ("模型-中文名字", "smollm2-" + "x" * 80, "a"):
                rec = fake(name, hashlib.sha256(name.encode()).hexdigest(), "tg8", 1, 10.0, session=sess)
                st.add("bench", rec, session=sess, config_key=name, model=name, model_sha256=rec.model_sha256,
                       test="tg8")
    for args in (["-o", "md", "--session", "s1"], ["--compare", "s1", "s2"]):
        r = cli("report", "--db", str(db), *args)
        assert r.returncode == 0, r.stderr
        rows = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
        assert len(rows) == 5 and any("模型" in ln for ln in rows)
        bars = {tuple(i for i, c in enumerate(_columns(ln)) if c == "|") for ln in rows}
        assert len(bars) == 1, "\n".join(rows)  # every | at the same terminal column
        assert [row["model"] for row in parse_md(r.stdout)] == ["模型-中文名字", "smollm2-" + "x" * 80, "a"]


def _columns(line: str) -> list[str]:
    """The line as a terminal lays it out: one entry per column (a wide East Asian character fills two)."""
    import unicodedata

    return [c for ch in line for c in ([ch, ""] if unicodedata.east_asian_width(ch) in "WF" else [ch])]


@pytest.mark.parametrize("bad", ["8,,9", "8,", ",8"])
def test_an_empty_item_in_a_number_list_is_refused_as_in_llama_bench(cli, tmp_path, bad):
    # `-p 8,,9` was read as 8,9 (a typo ran a sweep other than the one asked for); llama-bench refuses it
    r = cli("bench", "-p", bad, "-n", "0", "-r", "1", "-t", "1", "--no-progress", "--db", str(tmp_path / "x.sqlite"))
    assert r.returncode == 2 and f"'{bad}' is not a comma list of whole numbers" in r.stderr, r.stderr
    assert not (tmp_path / "x.sqlite").exists()


def test_llama_bench_ranges_sweep_as_there(cli):
    """llama-bench's ranges (first-last, first-last+step, first-last*mult) in -p/-n/-d and -t/-b/-ub, and a range
    that gives nothing, never ends or gives too much named before anything runs."""
    import argparse

    from ondevice.bench.cli import add_arguments, tests_from_args
    from ondevice.bench.config import FLAGS, BenchConfig
    from ondevice.config import config_from, int_range

    assert int_range("16-64+16") == ["16", "32", "48", "64"] and int_range("1-8*2") == ["1", "2", "4", "8"]
    assert int_range("3-5") == ["3", "4", "5"] and int_range("100-120+16") == ["100", "116"]
    assert int_range("q8_0") == ["q8_0"] and int_range("-1") == ["-1"]  # not a range: as it is
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["-p", "16-64+16,512", "-n", "8-32*2", "-d", "0-512+512", "-t", "1-2", "-b", "128-512*2",
                         "-ub", "64,128-256*2"])
    assert tests_from_args(args) == ["pp16", "pp32", "pp48", "pp64", "pp512", "tg8", "tg16", "tg32",
                                     "pp16@d512", "pp32@d512", "pp48@d512", "pp64@d512", "pp512@d512",
                                     "tg8@d512", "tg16@d512", "tg32@d512"]
    cfg = config_from(BenchConfig, args, verb="bench", what="bench settings", flags=FLAGS)
    assert cfg.threads == [1, 2] and cfg.n_batch == [128, 256, 512] and cfg.n_ubatch == [64, 128, 256]
    for argv, why in ((["-p", "64-16"], "the range 64-16 is empty: its last number is below its first"),
                      (["-n", "1-8*1"], "the range 1-8\\*1 never ends"),
                      (["-t", "0-4*2"], "the range 0-4\\*2 never ends"),
                      (["-b", "1-100000"], "the range 1-100000 gives over 256 values"),
                      (["-p", "16-"], "'16-' is not a comma list of whole numbers or ranges")):
        r = cli("bench", *argv, "--no-store", "--no-report")
        assert r.returncode == 2 and re.search(why, r.stderr) and "Traceback" not in r.stderr, (argv, r.stderr)
