"""One policy for an output file that is there already (helper-155 D10): a writer replaces a file of its own kind (an
HTML report ondevice wrote, a conversation /save wrote) and says so on stderr in one line; any other file is refused
in one line naming the fix, before any work, and kept. And the small consistencies of D17: every `report` view says
an empty store on stderr and exits 0; `eval -fa maybe` is a bad -fa value; `ondevice help [VERB ...]`. All through
the real CLI and real files."""

from __future__ import annotations

import json

import pytest
from test_report import fake

from ondevice.store import Store

KEEP = "keep me\n"
MARK = '<meta name="generator" content="ondevice'


def _store_with_a_session(tmp_path):
    db = tmp_path / "s.sqlite"
    with Store(db) as st:
        r = fake("smol", "c" * 64, "tg8", 1, 10.0, session="s1", config_key="k1")
        st.add("bench", r, session="s1", config_key="k1", model="smol", model_sha256="c" * 64, test="tg8")
    return db


def _cascade_store(tmp_path):
    db = tmp_path / "c.sqlite"
    auc = {"confidence": 0.6, "random": 0.5, "oracle": 0.7}
    rec = {"test": "cascade:rewrite", "split": "all", "model": "/models/m.gguf", "model_sha256": "c",
           "cloud_model": "cloud", "created": 3.0, "at_40": {"quality": 0.6, "of_cloud": 0.9},
           "curve": {"n": 4, "device_score": 0.4, "cloud_score": 0.8, "auc": auc, "auc_gain": 0.5,
                     "device_latency_s": 0.1, "cloud_latency_s": 0.5, "shares": [0.0, 1.0],
                     **{k: {"quality": [0.4, 0.8]} for k in auc}}}
    with Store(db) as s:
        s.add("eval", rec, session="s1", config_key="c", model=rec["model"], model_sha256="c", test=rec["test"])
    return db


# ------------------------------------------------- bench --html
def test_bench_refuses_an_html_path_holding_another_file_before_it_measures(cli, tmp_path, smol_path):
    """`bench --html FILE` replaced a file that was no report (rc 0, the user's text gone)."""
    mine = tmp_path / "exists.html"
    mine.write_text(KEEP)
    r = cli("bench", "-m", str(smol_path), "--tests", "pp8", "-r", "1", "-t", "1", "--no-progress", "--no-roofline",
            "--html", str(mine))
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr == (f"ondevice bench: error: --html {mine} is there already and is not an HTML report ondevice "
                        f"wrote; bench does not replace it: give another --html, or move that one away first\n")
    assert mine.read_text() == KEEP
    assert not (tmp_path / "home" / "data" / "ondevice.sqlite").exists()  # refused before anything was measured


def test_bench_replaces_its_own_report_and_says_so(cli, tmp_path, smol_path):
    out = tmp_path / "r.html"
    said = []
    for _ in range(2):
        r = cli("bench", "-m", str(smol_path), "--tests", "pp8", "-r", "1", "-t", "1", "--no-progress",
                "--no-roofline", "--no-store", "--html", str(out))
        assert r.returncode == 0, r.stderr
        assert f"report: {out}" in r.stdout and MARK in out.read_text()
        said.append([ln for ln in r.stderr.splitlines() if "earlier" in ln])
    assert said == [[], [f"ondevice bench: note: {out} held an earlier ondevice report; the new one replaced it"]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.html")] == []  # no temp file left


# ------------------------------------------------- report --html (and --cascade's page)
def test_report_refuses_an_html_path_holding_another_file_before_the_table(cli, tmp_path):
    db, mine = _store_with_a_session(tmp_path), tmp_path / "notes.html"
    mine.write_text(KEEP)
    r = cli("report", "--db", str(db), "--html", str(mine))
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr == (f"ondevice report: error: --html {mine} is there already and is not an HTML report ondevice "
                        f"wrote; report does not replace it: give another --html, or move that one away first\n")
    assert mine.read_text() == KEEP
    r = cli("report", "--db", str(_cascade_store(tmp_path)), "--cascade", "--html", str(mine))
    assert r.returncode == 2 and r.stdout == "" and "is not an HTML report ondevice wrote" in r.stderr, r.stderr
    assert mine.read_text() == KEEP


def test_report_replaces_a_report_ondevice_wrote_and_says_so(cli, tmp_path):
    db, out = _store_with_a_session(tmp_path), tmp_path / "r.html"
    assert cli("report", "--db", str(db), "--html", str(out)).returncode == 0
    assert MARK in out.read_text()
    r = cli("report", "--db", str(db), "--html", str(out))
    assert r.returncode == 0 and f"report: {out}" in r.stdout, r.stderr
    assert r.stderr == f"ondevice report: note: {out} held an earlier ondevice report; the new one replaced it\n"
    # a report an older ondevice wrote (no generator mark yet) is its own kind too
    old = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>ondevice bench report</title>'
           '<style></style></head><body></body></html>\n')
    out.write_text(old)
    r = cli("report", "--db", str(db), "--html", str(out))
    assert r.returncode == 0 and "held an earlier ondevice report" in r.stderr and MARK in out.read_text(), r.stderr
    # the cascade page: its own default path, replaced the second time with the note
    cdb, page = _cascade_store(tmp_path), tmp_path / "home" / "reports" / "cascade.html"
    assert cli("report", "--db", str(cdb), "--cascade").returncode == 0 and MARK in page.read_text()
    r = cli("report", "--db", str(cdb), "--cascade")
    assert r.returncode == 0 and r.stderr == (f"ondevice report: note: {page} held an earlier ondevice report; the "
                                              f"new one replaced it\n"), r.stderr


def test_write_html_from_python_keeps_a_file_that_is_no_report(tmp_path):
    from ondevice.errors import InvalidArgument
    from ondevice.report import write_html

    mine = tmp_path / "x.html"
    mine.write_text(KEEP)
    with pytest.raises(InvalidArgument, match=r"^path='.*x\.html' is there already and is not an HTML report "
                                              r"ondevice wrote; write_html does not replace it: give another path=, "
                                              r"or move that one away first$"):
        write_html([fake("smol", "c" * 64, "tg8", 1, 10.0, session="s1")], path=mine)
    assert mine.read_text() == KEEP


# ------------------------------------------------- chat /save
def test_chat_save_refuses_a_file_it_did_not_write_and_replaces_its_own(cli, tmp_path, smol_path):
    mine, conv = tmp_path / "exists.txt", tmp_path / "conv.json"
    mine.write_text(KEEP)
    script = f"/save {mine}\n/save {conv}\n/save {conv}\n/bye\n"
    r = cli("chat", "-m", str(smol_path), input=script)
    assert r.returncode == 0, r.stderr
    assert (f"/save {mine}: that file is there already and is not a conversation /save wrote; /save does not "
            f"replace it: give another file name, or move that one away first\n") in r.stderr, r.stderr
    assert mine.read_text() == KEEP
    assert f"(conversation saved to {conv}; /load {conv} resumes it)\n" in r.stderr
    assert (f"(conversation saved to {conv}, replacing the one saved there before; /load {conv} resumes it)\n"
            in r.stderr), r.stderr
    assert set(json.loads(conv.read_text())) == {"model", "system", "parameters", "messages"}


# ------------------------------------------------- report on an empty store: 0, the sentence on stderr
@pytest.mark.parametrize(("flags", "stdout", "says"), [
    ([], "", "no bench records stored yet; run `ondevice bench` first"),
    (["--all"], "", "no bench records stored yet"),
    (["-o", "json"], "[]\n", "no bench records stored yet"),
    (["--list"], "", "no bench sessions stored yet; run `ondevice bench`"),
    (["--eval"], "", "no eval records stored yet; run `ondevice eval`"),
    (["--eval", "-o", "json"], "[]\n", "no eval records stored yet"),
    (["--fit"], "", "no fit records stored yet; run `ondevice fit MODEL --budget ...`"),
    (["--retention"], "", "no suite eval records with a lineage stored yet"),
    (["--cascade"], "", "no cascade records stored yet; run `ondevice eval --cascade URL --suite rewrite`"),
])
def test_every_report_view_of_an_empty_store_exits_0_with_one_line_on_stderr(cli, tmp_path, flags, stdout, says):
    db = tmp_path / "empty.sqlite"
    with Store(db):
        pass
    r = cli("report", "--db", str(db), *flags)
    assert (r.returncode, r.stdout) == (0, stdout), (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"ondevice report: {says}") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "home" / "reports").exists()  # no empty HTML page (--all wrote bench-unsaved.html)


# ------------------------------------------------- eval -fa VALUE
def test_eval_names_a_bad_fa_value_as_run_does(cli):
    r = cli("eval", "-fa", "maybe", "--ppl")
    assert r.returncode == 2 and "unrecognized arguments" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == ("ondevice eval: error: argument -fa/--flash-attn: invalid value 'maybe': give "
                                         "on, off or auto (or 1, 0, -1) after the flag; it takes a value, as "
                                         "llama.cpp's does")
    ok = cli("eval", "-fa", "on")  # a good value: still ignored with its note (then: nothing to evaluate)
    assert "ondevice eval: note: -fa on is ignored: eval loads its models with its own settings" in ok.stderr
    assert "nothing to evaluate" in ok.stderr and "-fa" not in ok.stderr.splitlines()[-1], ok.stderr


# ------------------------------------------------- ondevice help [VERB ...]
@pytest.mark.parametrize("words", [[], ["run"], ["protect", "encrypt"], ["cascade", "fit"]])
def test_help_verb_prints_the_verbs_help(cli, words):
    r = cli("help", *words)
    want = cli(*words, "--help")
    assert (r.returncode, r.stdout, r.stderr) == (0, want.stdout, "") and want.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: ondevice{''.join(' ' + w for w in words)} ")


def test_help_of_an_unknown_verb_is_the_unknown_verb_line(cli):
    r = cli("help", "rnu")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.startswith("ondevice: error: unknown verb 'rnu'; did you mean 'run'? verbs: run, chat"), r.stderr
    assert cli("help", "nope").returncode == 2
