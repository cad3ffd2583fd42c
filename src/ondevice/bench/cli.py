"""``ondevice bench``: llama-bench's flags (comma lists sweep), our records, a table and an HTML report."""

from __future__ import annotations

import argparse
import sys

from ..engine.args import add_kernel_args, apply_kernel_args
from ..protect.keys import add_key_args, apply_key_args
from ..errors import InvalidArgument


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of whole numbers, e.g. 1,2,4") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run (comma lists sweep, as in llama-bench)")
    g.add_argument("-m", "--model", type=_strs, action="extend",
                   help="model names, stored variants or .gguf paths (default: the embedded model)")
    g.add_argument("--tests", type=_strs, action="extend", metavar="SPECS",
                   help="tests: ppN, tgN, pgP,N, any with @dD (KV depth), chat[N] "
                        "(default without -p/-n/-pg: pp512,tg128,tg128@d512,chat)")
    g.add_argument("-p", "--n-prompt", type=_ints, action="extend", help="prompt lengths (pp tests)")
    g.add_argument("-n", "--n-gen", type=_ints, action="extend", help="generation lengths (tg tests)")
    g.add_argument("-pg", type=_ints, action="append", metavar="P,N", help="prompt+generation test (repeatable)")
    g.add_argument("-d", "--n-depth", type=_ints, action="extend", help="KV depths applied to -p/-n/-pg tests")
    g.add_argument("-t", "--threads", type=_ints, action="extend", help="threads (default: physical cores)")
    g.add_argument("-b", "--batch-size", type=_ints, action="extend", help="logical batch n_batch (2048)")
    g.add_argument("-ub", "--ubatch-size", type=_ints, action="extend", help="micro-batch n_ubatch (512)")
    g.add_argument("-c", "--ctx-size", type=_ints, action="extend",
                   help="context size (default: just enough for each configuration's tests)")
    g.add_argument("-ctk", "--cache-type-k", type=_strs, action="extend", help="KV cache type of K (f16)")
    g.add_argument("-ctv", "--cache-type-v", type=_strs, action="extend", help="KV cache type of V (f16)")
    g.add_argument("-fa", "--flash-attn", type=_ints, action="extend", help="flash attention 0/1 (0)")
    g.add_argument("--profile", action="append",
                   help="device profile: a name (host, phone-4g, edge-1g) or threads=2,mem=1G,cpus=0 "
                        "(repeat to sweep)")
    g.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions per test")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    g.add_argument("--seed", type=int, default=42, help="seed of the random prompt tokens")
    g.add_argument("--wait-idle", type=float, nargs="?", const=120.0, default=0.0, metavar="SECONDS",
                   help="before each configuration wait until other processes leave the CPU quiet for 3 s, "
                        "at most SECONDS (default when given: 120); noisy records are flagged either way")
    add_kernel_args(p)
    add_key_args(p)
    o = p.add_argument_group("output and storage")
    o.add_argument("-o", "--output", choices=("md", "csv", "json", "jsonl", "sql"), default="md",
                   help="format of the records on stdout: md (the table), csv, json, jsonl or sql (as llama-bench)")
    o.add_argument("--db", metavar="PATH", help="the records file (default: <ONDEVICE_HOME>/data/ondevice.sqlite)")
    o.add_argument("--no-store", action="store_true", help="keep records in memory only")
    o.add_argument("--session", help="session id to record under (with --resume: the one to continue)")
    o.add_argument("--resume", action="store_true", help="skip configurations already stored in the session")
    o.add_argument("--html", dest="html_path", metavar="PATH", help="where to write the HTML report")
    o.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    o.add_argument("--no-roofline", action="store_true", help="skip the hardware probe and %% of roofline")
    o.add_argument("--reprobe", action="store_true",
                   help="measure bandwidth and compute again instead of the cached probe (its date is in the notes)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def tests_from_args(args: argparse.Namespace) -> list[str] | None:
    """The test specs the flags ask for; None means the default set."""
    specs = list(args.tests or [])
    llama_style = any(x is not None for x in (args.n_prompt, args.n_gen, args.pg, args.n_depth))
    if llama_style:
        prompts = args.n_prompt if args.n_prompt is not None else [512]  # llama-bench's defaults
        gens = args.n_gen if args.n_gen is not None else [128]
        depths = args.n_depth or [0]
        for pair in args.pg or []:
            if len(pair) != 2:
                raise InvalidArgument(f"-pg {','.join(map(str, pair))} needs two numbers, e.g. -pg 512,128")
        for d in depths:
            suffix = f"@d{d}" if d else ""
            specs += [f"pp{n}{suffix}" for n in prompts if n > 0]
            specs += [f"tg{n}{suffix}" for n in gens if n > 0]
            specs += [f"pp{a}+tg{b}{suffix}" for a, b in (args.pg or [])]
    return specs or None


def run(args: argparse.Namespace) -> int:
    from ..report.formats import export
    from ..report.write import write_html
    from ..store import Store
    from .api import bench

    tests = tests_from_args(args)
    apply_key_args(args)  # a key source (never the key) in the environment the workers inherit
    apply_kernel_args(args)  # the workers read ONDEVICE_AMX / ONDEVICE_REPACK; each record names what they used
    store = False if args.no_store else (args.db or True)
    if args.no_store and args.resume:
        raise InvalidArgument("--resume needs the store; drop --no-store")
    st = Store(args.db) if store is not False else None
    try:
        records = bench(args.model, tests, threads=args.threads, repetitions=args.repetitions,
                        n_batch=args.batch_size, n_ubatch=args.ubatch_size, n_ctx=args.ctx_size,
                        type_k=args.cache_type_k, type_v=args.cache_type_v,
                        flash_attn=[bool(x) for x in args.flash_attn] if args.flash_attn else None,
                        profile=args.profile, store=st if st is not None else False, session=args.session,
                        resume=args.resume, warmup=not args.no_warmup, seed=args.seed,
                        progress=not args.no_progress, roofline=not args.no_roofline, reprobe=args.reprobe,
                        wait_idle=args.wait_idle)
        sys.stdout.write(export(records, args.output))
        sys.stdout.flush()
        msg_out = sys.stdout if args.output == "md" else sys.stderr
        if records and not args.no_report:
            path = write_html(records, st, args.html_path, [records.session])
            print(f"\nreport: {path}", file=msg_out)
        if st is not None:
            print(f"session: {records.session}", file=msg_out)
    finally:
        if st is not None:
            st.close()
    errors = [r for r in records if r.status == "error"]
    for r in errors:
        print(f"ondevice bench: {r.model} {r.test}: {r.error}", file=sys.stderr)
    if records.interrupted:
        print("ondevice bench: interrupted; the records above were kept"
              + (" (continue with --resume)" if st is not None else ""), file=sys.stderr)
        return 130
    return 1 if errors else 0
