"""``ondevice bench``: llama-bench's flags (comma lists sweep), our records, a table and an HTML report."""

from __future__ import annotations

import argparse
import signal
import sys

from ..config import add_config_arguments, config_from, int_range
from ..engine.args import add_kernel_args, apply_kernel_args
from ..engine.llama_flags import Refused
from ..errors import InvalidArgument
from ..protect.keys import add_key_args, apply_key_args
from .config import FLAGS, BenchConfig


def _ints(text: str) -> list[int]:
    """A comma list of whole numbers and llama-bench's ranges (``16-64+16``, ``128-512*2``)."""
    try:
        items = [n for x in text.split(",") for n in int_range(x)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    try:
        return [int(x) for x in items]  # an empty item (``8,,9``, ``8,``) is an error, as in llama-bench
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of whole numbers or ranges, e.g. 1,2,4 or "
                                         f"16-64+16") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run and how (comma lists and ranges sweep, as in llama-bench: -t 1,2, "
                                 "-p 16-64+16, -b 128-512*2; flags repeat)")
    add_config_arguments(g, BenchConfig, FLAGS)  # one declaration: flag, ONDEVICE_BENCH_* and the API keyword
    g = p.add_argument_group("llama-bench's test flags (turned into --tests)")
    g.add_argument("-p", "--n-prompt", type=_ints, action="extend", help="prompt lengths (pp tests)")
    g.add_argument("-n", "--n-gen", type=_ints, action="extend", help="generation lengths (tg tests)")
    g.add_argument("-pg", type=_ints, action="append", metavar="P,N", help="prompt+generation test (repeatable)")
    g.add_argument("-d", "--n-depth", type=_ints, action="extend", help="KV depths applied to -p/-n/-pg tests")
    g.add_argument("-ngl", "--n-gpu-layers", type=_ints, action="extend", metavar="N",
                   help="accepted for llama-bench's command lines and ignored: ondevice runs on the CPU")
    g = p.add_argument_group("llama-bench's flags that have no meaning here (refused by name, not misread)")
    for names, why in _NOT_HERE.items():
        g.add_argument(*names, nargs="?", action=Refused, why=why, tool="llama-bench", help=argparse.SUPPRESS)
    add_kernel_args(p)
    add_key_args(p)
    o = p.add_argument_group("output and storage")
    o.add_argument("-o", "--output", choices=("md", "csv", "json", "jsonl", "sql"), default="md",
                   help="format of the records on stdout: md (the table), csv, json, jsonl or sql (as llama-bench)")
    o.add_argument("--db", metavar="PATH", help="the records file (default: <ONDEVICE_HOME>/data/ondevice.sqlite)")
    o.add_argument("--no-store", action="store_true", help="keep records in memory only")
    o.add_argument("--html", dest="html_path", metavar="PATH",
                   help="where to write the HTML report (default: <ONDEVICE_HOME>/reports/bench-<session>.html)")
    o.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--progress", dest="no_progress", action="store_false", help="the progress bar (the default)")


# llama-bench's flags for GPUs, other devices and its own I/O: argparse would read ``-nkvo 1`` as ``-n kvo``
_NOT_HERE = {
    ("-nkvo", "--no-kv-offload"): "the KV cache is in CPU memory here",
    ("-sm", "--split-mode"): "one CPU device here: nothing to split",
    ("-mg", "--main-gpu"): "ondevice runs on the CPU",
    ("-ts", "--tensor-split"): "one CPU device here: nothing to split",
    ("-dev", "--device"): "ondevice runs on the CPU",
    ("-rpc", "--rpc"): "ondevice runs locally",
    ("-ncmoe", "--n-cpu-moe"): "every layer is on the CPU here",
    ("-nopo", "--no-op-offload"): "ondevice runs on the CPU",
    ("-ot", "--override-tensor"): "every tensor is on the CPU here",
    ("-mmp", "--mmap"): "the model file is always memory-mapped here",
    ("-lm", "--load-mode"): "the model file is always memory-mapped here",
    ("-embd", "--embeddings"): "bench measures generation; embeddings are served by `ondevice serve`",
    ("-oe", "--output-err"): "records go to stdout in the -o format; errors and progress go to stderr",
    ("-C", "--cpu-mask"): "pin CPUs with --profile cpus=0,1",
    ("--cpu-strict",): "pin CPUs with --profile cpus=0,1",
    ("--poll",): "llama.cpp's default polling is used",
    ("--prio",): "run ondevice under nice/chrt to change its priority",
    ("--delay",): "use --wait-idle to let the machine settle between configurations",
    ("--numa",): "ondevice does not set NUMA modes",
    ("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"): "give the address to -m (-m hf.co/OWNER/REPO:QUANT or "
                                                       "hf://OWNER/REPO/FILE.gguf): it is pulled when missing",
}


def tests_from_args(args: argparse.Namespace) -> list[str] | None:
    """The test specs the flags ask for; None means the default set.

    As in llama-bench, ``-p 0`` runs no prompt test and ``-n 0`` no generation test (``-p 0 -n 0`` with
    nothing else is an error, not the default set); a negative length or depth is an error, and so is ``-d``
    with ``--tests`` but no -p/-n/-pg (the depth goes into a spec: ``tg64@d512``).
    """
    specs = list(getattr(args, "tests", None) or [])
    llama_style = any(x is not None for x in (args.n_prompt, args.n_gen, args.pg, args.n_depth))
    for flag, values in (("-p", args.n_prompt), ("-n", args.n_gen), ("-d", args.n_depth),
                         ("-pg", [v for pair in args.pg or [] for v in pair])):
        if any(v < 0 for v in values or []):
            raise InvalidArgument(f"{flag} {min(values)} is negative; give lengths >= 0 (-p 0 / -n 0 skip the "
                                  f"prompt / generation tests, as in llama-bench)")
    if specs and args.n_depth is not None and all(x is None for x in (args.n_prompt, args.n_gen, args.pg)):
        # -d alone would bring llama-bench's default pp512 and tg128 (at each depth) next to the tests asked for
        from .workloads import parse_tests

        example = next((t.name for t in parse_tests(specs) if t.kind != "chat" and not t.n_depth), "tg128")
        raise InvalidArgument(f"-d sets the KV depth of -p/-n/-pg tests; for --tests write the depth into each "
                              f"spec, e.g. --tests {example}@d{max(args.n_depth)}")
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
        if not specs:
            raise InvalidArgument("nothing to run: -p 0 and -n 0 skip the prompt and generation tests; give "
                                  "-p N, -n N or -pg P,N with N > 0")
    return specs or None


def check_outputs(args: argparse.Namespace, config: BenchConfig) -> None:
    """Refuse, before anything is measured, output flags that contradict each other or a --html path that
    cannot be written or holds a file that is no ondevice report (else the sweep runs to its end and the report is
    lost, or the user's file with it)."""
    no_store, no_report = "--no-store keeps no records", "--no-report writes no report"
    for asked, off, why in ((config.resume and args.no_store, no_store, "--resume continues a stored session"),
                            (args.db and args.no_store, no_store, "--db names the store to write"),
                            (args.html_path and args.no_report, no_report, "--html names the report file")):
        if asked:
            raise InvalidArgument(f"{why} and {off}; drop one of them")
    if args.no_report:
        return
    from ..report.write import check_report_path, default_report_path

    if args.html_path:  # a file there that is no ondevice report is kept: refused now, not after the sweep
        check_report_path(args.html_path, "--html", "bench")
    elif config.session:  # the default path is known before the sweep when the session is
        check_report_path(default_report_path([config.session]), None, "bench")


def run(args: argparse.Namespace) -> int:
    from ..report.formats import export
    from ..report.write import write_report
    from ..store import Store
    from .api import bench

    tests = tests_from_args(args)
    if any(args.n_gpu_layers or []):
        print(f"ondevice bench: -ngl {','.join(map(str, args.n_gpu_layers))} ignored: ondevice runs on the CPU",
              file=sys.stderr)
    apply_key_args(args)  # a key source (never the key) in the environment the workers inherit
    apply_kernel_args(args)  # the workers read ONDEVICE_AMX / ONDEVICE_REPACK; each record names what they used
    config = config_from(BenchConfig, args, verb="bench", what="bench settings", flags=FLAGS,
                         **({"tests": tests} if tests else {}))
    check_outputs(args, config)
    st = Store(args.db) if not args.no_store else None
    try:
        stream = args.output == "jsonl"  # one line per test as it finishes, as llama-bench -o jsonl prints them

        def emit(rec) -> None:
            sys.stdout.write(export([rec], "jsonl"))
            sys.stdout.flush()

        records = bench(config=config, store=st if st is not None else False, progress=not args.no_progress,
                        on_record=emit if stream else None)
        if not stream:
            sys.stdout.write(export(records, args.output))
            sys.stdout.flush()
        msg_out = sys.stdout if args.output == "md" else sys.stderr
        if records and not args.no_report:
            path = write_report(records, st, args.html_path, [records.session], "bench")
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
        how = ("interrupted" if records.exit_code == 130 else
               f"stopped by {signal.Signals(records.exit_code - 128).name}")
        kept = "the records above were kept" if len(records) else "no test had finished"
        print(f"ondevice bench: {how}; {kept}" + (f" (continue with --resume --session {records.session})"
                                                  if st is not None else ""), file=sys.stderr)
        return records.exit_code
    return 1 if errors else 0
