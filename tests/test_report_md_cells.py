"""Every markdown table of ``ondevice report`` (eval, retention, fit, cascade; the bench tables in test_report.py)
keeps its columns when a cell's text holds ``|`` or a line break: a model path, suite, task or category name is
the user's text. Found by an audit: only the bench tables escaped them (report/formats.py ``md_cell``). Records
go through the real SQLite store and ``ondevice report``'s own entry point."""

from __future__ import annotations

import contextlib
import io
import re

from ondevice.cli import main
from ondevice.report.formats import md_uncell
from ondevice.store import Store

ODD = "a|b\nc"  # a pipe and a line break in one name
CELL = "a\\|b<br>c"  # as a markdown cell shows it


def _tables(text: str) -> list[list[str]]:
    """The runs of consecutive lines that start with ``|``."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    return tables + [cur] * bool(cur)


def _columns(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1  # unescaped pipes, less the row's closing one


def _report(db, *flags) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", *flags, "--db", str(db)]) == 0
    return out.getvalue()


def _assert_tables_hold(text: str, n_tables: int, n_rows: int) -> None:
    tables = _tables(text)
    assert len(tables) == n_tables, text
    for t in tables:
        assert len(t) >= n_rows + 2, text  # header, the --- line, the rows: no row broken over two lines
        assert len({_columns(line) for line in t}) == 1, text  # every row as many columns as the header
        assert all(line.endswith("|") for line in t), text
    assert CELL in text and md_uncell(CELL) == ODD


def _suite(sha, vtype, score, **kw):
    return {"test": f"suite:{ODD}", "model": f"/models/{ODD}-{vtype}.gguf", "model_sha256": sha,
            "family": f"fam {ODD}", "family_sha256": "root", "variant_type": vtype, "quant": "Q4_1 70%",
            "score": score, "score_skipped_as_0": score * 0.7, "coverage": 0.7, "n_scored": 14, "n_items": 20,
            "limit": 20, "seed": 0, "max_tokens": 64, "temp": 0.0, "n_ctx": 8192, "file_size": 90e6,
            "categories": {ODD: score, "qa": score / 2}, "created": 1.0, **kw}


def test_eval_and_retention_tables_escape_pipes_and_line_breaks(tmp_path):
    db = tmp_path / "db.sqlite"
    records = [_suite("f", "F16", 0.4), _suite("q", "Q4_0", 0.3),
               {"test": f"ppl:{ODD}", "model": f"/models/{ODD}.gguf", "model_sha256": "p", "ppl": 12.5,
                "ppl_err": 0.1, "n_ctx": 128, "created": 2.0}]
    with Store(db) as s:
        for r in records:
            s.add("eval", r, session="s1", config_key=r["model_sha256"], model=r["model"],
                  model_sha256=r["model_sha256"], test=r["test"])
    evals = _report(db, "--eval")
    _assert_tables_hold(evals, 1, 3)
    assert f"| ppl:{CELL} | 128 | ? | PPL 12.5000 ± 0.1000 |" in evals, evals  # ?: no kernels recorded
    retention = _report(db, "--retention")
    _assert_tables_hold(retention, 1, 2)
    assert _columns(_tables(retention)[0][0]) == 7 + 2  # the fixed columns and both categories
    assert f"| fam {CELL} | Q4_0 | 90 | 14/20 (70%) | 0.300 | 0.210 | 75% |" in retention, retention


def test_fit_and_cascade_tables_escape_pipes_and_line_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))  # the cascade's HTML page goes under it
    db = tmp_path / "db.sqlite"
    measured = {"size": 90e6, "tg": 50.0, "pp": 300.0, "kld": 0.01, "ppl": 12.0}
    fit = {"model": "fitted", "family": ODD, "budget": "100MB", "threads": 1,
           "quality": {"kind": "suite", "suite": ODD, "limit": 10},
           "candidates": [{"plan": {"ffn": "Q4_0"}, "measured": {**measured, "score": 0.5}}],
           "plan": {"ffn": "Q4_0"}, "shipped": {"model": f"/models/{ODD}.gguf", "size": 98e6, "tg": 40.0,
                                                "pp": 280.0},
           "front": [{"size": 90e6, "tg": 50.0, "pp": 300.0, "kld": 0.01}]}
    auc = {"confidence": 0.6, "random": 0.5, "oracle": 0.7}
    cascade = {"test": f"cascade:{ODD}", "split": "all", "model": f"/models/{ODD}.gguf", "model_sha256": "c",
               "cloud_model": ODD, "created": 3.0, "at_40": {"quality": 0.6, "of_cloud": 0.9},
               "curve": {"n": 4, "device_score": 0.4, "cloud_score": 0.8, "auc": auc, "auc_gain": 0.5,
                         "device_latency_s": 0.1, "cloud_latency_s": 0.5, "shares": [0.0, 1.0],
                         **{k: {"quality": [0.4, 0.8]} for k in auc}}}
    with Store(db) as s:
        s.add("fit", fit, session="s1", config_key="fit", model=fit["model"], model_sha256="f", test="fit")
        s.add("eval", cascade, session="s1", config_key="c", model=cascade["model"], model_sha256="c",
              test=cascade["test"])
    fits = _report(db, "--fit")
    _assert_tables_hold(fits, 2, 1)  # the measured candidates (and the shipped file), the predicted front
    assert _columns(_tables(fits)[0][0]) == 7 and f"{CELL} score (10 items)" in fits, fits
    casc = _report(db, "--cascade")
    _assert_tables_hold(casc, 1, 1)
    assert f"| cascade:{CELL} (all): /models/{CELL}.gguf -> {CELL} | 4 |" in casc, casc
