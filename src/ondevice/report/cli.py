"""``ondevice report``: the HTML report, exports and comparisons of stored bench runs."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session", help="session id or unique prefix (default: the latest bench session)")
    p.add_argument("--all", action="store_true", help="every stored bench session")
    p.add_argument("--list", action="store_true", help="list stored bench sessions and exit")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="speedup of B over A per test; A, B: session ids or model sha256 prefixes")
    p.add_argument("-o", "--output", choices=("html", "md", "csv", "json", "jsonl", "sql"), default="html",
                   help="html writes the report file and prints its path; the others print records to stdout")
    p.add_argument("--html", dest="html_path", metavar="PATH",
                   help="where to write the HTML report (default: <ONDEVICE_HOME>/reports/bench-<session>.html; "
                        "with --cascade, reports/cascade.html)")
    p.add_argument("--cascade", action="store_true",
                   help="the device -> cloud cascade's deferral curves (from `ondevice eval --cascade`): a table "
                        "on stdout and an HTML page")
    p.add_argument("--retention", action="store_true",
                   help="print the suite retention tables (score per category vs the family's F16, with "
                        "coverage) of the stored eval records and exit")
    p.add_argument("--eval", action="store_true",
                   help="print the stored `ondevice eval` records (perplexity, KLD, suite scores) as a table and exit "
                        "(-o csv, json, jsonl or sql: the records)")
    p.add_argument("--fit", action="store_true",
                   help="print the latest `ondevice fit` results: validated variants, stock presets (when "
                        "benchmarks/fit_bench.py measured them) and the predicted front, and exit (-o json or jsonl: "
                        "the fit records)")
    p.add_argument("--db", metavar="PATH", help="the records file (default: <ONDEVICE_HOME>/data/ondevice.sqlite)")


MODES = ("list", "compare", "cascade", "fit", "retention", "eval")  # each prints one thing and exits


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that would be silently ignored together are refused, naming the one to drop."""
    from ..errors import InvalidArgument

    modes = [f"--{m}" for m in MODES if getattr(args, m)]
    if len(modes) > 1:
        raise InvalidArgument(f"{' and '.join(modes)} each print their own table: give one of them")
    if args.session and args.all:
        raise InvalidArgument("--session picks one session and --all takes every one: give one of them")
    given = [f for f, on in (("--session", args.session), ("--all", args.all), (f"-o {args.output}",
                             args.output != "html"), ("--html", args.html_path)) if on]
    extra = [f for f in given if modes and not (modes[0] == "--cascade" and f == "--html")  # cascade draws HTML
             and not (modes[0] == "--fit" and f in ("-o json", "-o jsonl"))  # the fit records as data
             and not (modes[0] == "--eval" and f.startswith("-o "))]  # the eval records as data
    if extra:
        one = len(extra) == 1
        raise InvalidArgument(f"{modes[0]} prints its own table on stdout and exits; {' and '.join(extra)} "
                              f"{'does' if one else 'do'} not apply to it: drop {'it' if one else 'them'}")
    if args.output != "html" and args.html_path:
        raise InvalidArgument(f"-o {args.output} prints records instead of writing the HTML report, so --html has "
                              "nothing to write: drop one of them")


def _none(what: str) -> int:
    """An empty store is a state, not an error: every view says what it lacks on stderr, one line, and exits 0
    (stdout keeps only the view's records: none, or an export's empty form)."""
    print(f"ondevice report: {what}", file=sys.stderr)
    return 0


NO_EVALS = "no eval records stored yet; run `ondevice eval`"


def run(args: argparse.Namespace) -> int:
    from ..store import Store
    from .compare import compare
    from .formats import export
    from .write import check_report_path, load_records, write_report

    _check_flags(args)
    if args.html_path:  # before the table is printed, not after it; a file there that is no report is kept
        check_report_path(args.html_path, "--html", "report")
    with Store(args.db, create=False) as store:  # report only reads: never make an empty store
        if args.list:
            sessions = store.sessions("bench")
            if not sessions:
                return _none("no bench sessions stored yet; run `ondevice bench`")
            for s, created, n in sessions:
                print(f"{s}  {datetime.fromtimestamp(created):%Y-%m-%d %H:%M:%S}  {n} records")
            return 0
        if args.cascade:
            from .cascade import latest, run_report

            if not latest(store.records("eval")):
                return _none("no cascade records stored yet; run `ondevice eval --cascade URL --suite rewrite`")
            return run_report(store, args)
        if args.fit:
            from .fit import fit_markdown

            fits = store.records("fit")
            if args.output != "html":  # an export: its empty form when there are none
                sys.stdout.write(export([{**r, "kind": "fit"} for r in fits], args.output, "fit"))
            elif fits:
                sys.stdout.write(fit_markdown(fits))
            return 0 if fits else _none(fit_markdown([]).rstrip("\n"))
        if args.eval:
            from .evals import eval_markdown

            evals = store.records("eval")
            if args.output not in ("html", "md"):
                sys.stdout.write(export([{**r, "kind": "eval"} for r in evals], args.output, "eval"))
            elif evals:
                sys.stdout.write(eval_markdown(evals))
            return 0 if evals else _none(NO_EVALS)
        if args.retention:
            from .quality import retention, retention_markdown

            rows = retention(store.records("eval"))
            if not rows:
                return _none("no suite eval records with a lineage stored yet; run `ondevice eval --suite NAME` on "
                             "a model and its variants (e.g. benchmarks/smartbench_retention.py)")
            print(retention_markdown(rows))
            return 0
        if args.compare:
            _, table = compare(store, *args.compare)
            sys.stdout.write(table)
            return 0
        if args.session is None and not store.sessions("bench"):  # (a --session that matches none: an error)
            n = len(store.records("eval"))
            if args.output not in ("html", "md"):  # an export's empty form (md's table: none, as --eval's)
                sys.stdout.write(export([], args.output))
            return _none("no bench records stored yet; run `ondevice bench` first"
                         + (f" (its {n} eval record{'s' if n != 1 else ''}: `ondevice report --eval`)" if n else ""))
        records, sessions = load_records(store, args.session, args.all)
        if args.output != "html":
            sys.stdout.write(export(records, args.output))
            return 0
        sys.stdout.write(export(records, "md"))
        path = write_report(records, store, args.html_path, sessions, "report")
        print(f"\nreport: {path}")
    return 0
