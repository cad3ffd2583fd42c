"""``ondevice eval -m MODEL [--ppl ...] [--ref MODEL] [--suite NAME]``: quality next to speed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..report.formats import FORMATS
from .record import EvalRecord

# llama.cpp's spellings (-c: also the ppl chunk; --lora as llama-perplexity's)
FLAGS = {"ctx_size": ["-c", "--ctx-size"], "threads": ["-t", "--threads"], "adapter": ["--adapter", "--lora"],
         "text": ["-f", "--file", "--text"], "seed": ["-s", "--seed"]}  # llama-perplexity's -f FILE, -s N


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_config_arguments
    from .config import EvalConfig

    p.add_argument("-m", "--model", default=None, help="catalog name, stored variant, .gguf path or a download "
                                                         "address (hf.co/OWNER/REPO:QUANT: pulled when missing)")
    from ..engine.llama_flags import add_llama_flags

    add_llama_flags(p, "eval")  # llama-perplexity's copied -ngl 99 ...: ignored with a note, never misread
    from ..models.hf_repo import add_hf_args

    add_hf_args(p)
    # one declaration: flag, ONDEVICE_EVAL_* and ondevice.evaluate's keyword (perplexity and KL divergence
    # follow llama-perplexity's conventions, -c/--ctx-size its chunk; suites run in a -c window)
    g = p.add_argument_group("what to evaluate and how")
    add_config_arguments(g, EvalConfig, FLAGS)
    from ..engine.args import Scaled

    g.add_argument("--lora-scaled", nargs=2, action=Scaled, one=True, dest="adapter", metavar=("PATH", "SCALE"),
                   default=argparse.SUPPRESS, help="llama-perplexity's form of --adapter PATH:SCALE")
    from ..engine.args import add_kernel_args
    from ..protect.keys import add_key_args

    add_kernel_args(p)
    add_key_args(p)
    p.add_argument("-o", "--output", default=None, metavar="OUT.jsonl",
                   help="also append the records to this file (JSON lines; --json prints them)")
    p.add_argument("--db", metavar="PATH", help="the records file, as bench's and report's --db (default: "
                                                "<ONDEVICE_HOME>/data/ondevice.sqlite)")
    p.add_argument("--no-store", action="store_true",
                   help="do not record the results in the store (nor the per-sample suite log, unless --log-dir "
                        "names a folder)")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines")
    from .cascade_curve import add_cascade_arguments

    add_cascade_arguments(p)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_record(r: EvalRecord, out=sys.stdout) -> None:
    test = r.test
    scale = "" if r.adapter_scale is None else f" x {r.adapter_scale:g}"
    adapter = f" + adapter {Path(r.adapter).name}{scale} (sha256 {(r.adapter_sha256 or '')[:12]})" if r.adapter else ""
    kernels = f", kernels {r.kernels}" if r.kernels else ""  # they move the figures a little
    print(f"{r.model} ({(r.file_size or 0) / 1e6:.1f} MB, sha256 {r.model_sha256[:12]}{kernels}){adapter}  {test}",
          file=out)
    if r.corpus is not None:
        c = r.corpus
        print(f"  text: {c['name']} sha256 {c['sha256'][:12]} {c['chars']} chars, {r.corpus_tokens} tokens; "
              f"{r.n_chunks} chunks x {r.n_ctx} ctx, {r.n_scored} tokens scored", file=out)
    if test.startswith("ppl:"):
        print(f"  PPL = {r.ppl:.4f} ± {r.ppl_err:.4f}", file=out)
    elif test.startswith("kld:"):
        print(f"  vs {r.ref_model} (PPL {r.ppl_ref:.4f} ± {r.ppl_ref_err:.4f})"
              f"{' [cached reference]' if r.ref_cached else ''}", file=out)
        # records before kld_exact were top-k: a lower bound where the reference had mass outside it
        exact = r.kld_exact is True or (r.kld_exact is None and not r.ref_tail_mass_mean)
        print(f"  ΔPPL = {r.dppl:+.4f} ± {r.dppl_err:.4f}   KLD {'=' if exact else '>='} {r.kld_mean:.6f} ± "
              f"{r.kld_err:.6f}   median {r.kld_median:.6f}   p99 {r.kld_p99:.6f}   max {r.kld_max:.4f}", file=out)
        print(f"  same top-1 = {100 * r.top1_agree:.2f} ± {100 * r.top1_err:.2f} %   "
              f"Δp RMS = {100 * r.dp_rms:.3f} %", file=out)
        if not exact:
            print(f"  (KLD from the reference's top-{r.topk} only: a lower bound, the reference put "
                  f"{100 * (r.ref_tail_mass_mean or 0):.1f}% of its mass outside them; drop --topk for the exact KLD)",
                  file=out)
    elif r.is_suite:
        limit = "" if r.limit is None else f" (--limit {r.limit})"
        print(f"  {coverage_line(r)}{limit}", file=out)
        print(f"  context window {r.n_ctx or '-'} tokens (trained {r.n_ctx_train or '-'}), "
              f"max {r.max_tokens} new tokens per item; decode {_fmt(r.decode_tps_mean, '.1f')} "
              f"tok/s, TTFT median {_fmt(r.ttft_s_median, '.3f')} s", file=out)
        tasks = r.tasks or {}
        wn, wc, wm = (max([w, *(len(str(x)) for x in col)]) for w, col in (
            (24, tasks), (14, (t["category"] for t in tasks.values())), (16, (t["metric"] for t in tasks.values()))))
        for name, t in tasks.items():
            j = f"  judge {t['judge']:.2f}" if t.get("judge") is not None else ""
            sk = f"  ({t['n_skipped']} skipped)" if t.get("n_skipped") else ""
            print(f"    {name:{wn}s} {t['category']:{wc}s} {t['metric']:{wm}s} n={t['n']:<4d} {_fmt(t['mean'])}{j}{sk}",
                  file=out)
        if r.n_skipped:
            longest = max(r.skipped or (), key=lambda x: x.get("prompt_tokens") or 0)
            at_max = bool(r.n_ctx_train) and (r.n_ctx or 0) >= r.n_ctx_train
            fix = ("lower --max-tokens to cover them (--ctx-size is already the model's trained context, "
                   f"{r.n_ctx_train})" if at_max else "raise --ctx-size or lower --max-tokens to cover them")
            print(f"  {r.n_skipped} items did not fit the window and were skipped (longest: {longest['id']}, "
                  f"{longest['reason']}); {fix}", file=out)
        if warning := truncation_warning(r):
            print(f"  {warning}", file=out)
        if r.log:
            print(f"  per-sample log: {r.log}", file=out)


def truncation_warning(r: EvalRecord) -> str | None:
    """The warning for answers cut by the token budget (their scores may understate the model), or None."""
    if not r.n_truncated:
        return None
    return (f"warning: {r.n_truncated} of {r.n_scored} answers were cut at --max-tokens {r.max_tokens} (finish "
            f"reason 'length') and scored as cut; raise --max-tokens to let them finish")


def coverage_line(r: EvalRecord) -> str:
    """'score 0.41 ± 0.05 on 14/20 items (coverage 70%); 0.29 counting skipped as 0' (skipped: not scored,
    counted; ± the standard error, as lm-eval prints it)."""
    n = r.n_items or 0
    k = n if r.n_scored is None else r.n_scored
    err = "" if r.score_stderr is None else f" ± {r.score_stderr:.4f}"
    line = f"score {_fmt(r.score)}{err} on {k}/{n} items (coverage {100 * k / n if n else 0:.0f}%)"
    if k < n:
        line += f"; {_fmt(r.score_skipped_as_0)} counting skipped as 0"
    return line


# flags only the deferral curve reads, and EvalConfig fields it does not (judge_key: it has an env default)
CASCADE_ONLY = ("cloud_model", "cloud_key_env", "tasks", "combiner")
NOT_WITH_CASCADE = ("ppl", "corpus", "text", "ctx", "chunks", "ref", "topk", "ctx_size", "strict", "temp", "judge",
                    "judge_model", "adapter", "session", "log_dir")
FORMAT_NAMES = (*FORMATS, "html")  # what -o means to `ondevice bench` and `report`
SUITE_ONLY = ("limit", "max_tokens", "strict", "temp", "judge", "judge_model", "seed", "log_dir")  # suite runs read
PPL_ONLY = ("corpus", "ctx", "chunks", "topk")  # only a perplexity run reads these


def check_flags(args: argparse.Namespace, config) -> None:
    """Refuse a flag this run would ignore: the cascade's own without --cascade, and the reverse."""
    from ..errors import InvalidArgument
    from .cascade_curve import CLOUD_TIMEOUT_S

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if not args.cascade:
        given = [flag(n) for n in CASCADE_ONLY if getattr(args, n, None) is not None]
        given += ["--split"] if getattr(args, "split", "all") != "all" else []
        given += ["--cascade-timeout"] if getattr(args, "cascade_timeout", CLOUD_TIMEOUT_S) != CLOUD_TIMEOUT_S else []
        if given:
            raise InvalidArgument(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --cascade URL "
                                  f"(the deferral curve); a suite is run with --suite NAME (lm-eval's --tasks), part "
                                  f"of one with --limit N or a JSONL file of the items you want")
        return
    fields = type(config).model_fields
    given = [flag(n) for n in NOT_WITH_CASCADE if getattr(config, n) != fields[n].default]
    if given:
        it, its = ("it", "its") if len(given) == 1 else ("them", "their")
        raise InvalidArgument(f"--cascade does not use {', '.join(given)}; drop {it}, or run {it} in an `ondevice "
                              f"eval` of {its} own")


def check_parts(args: argparse.Namespace, config) -> None:
    """Refuse a flag typed for the part of an eval this run does not hold (a suite's --limit in a perplexity run,
    a perplexity's --chunks in a suite run), which would be ignored; values from ONDEVICE_EVAL_* are not flags."""
    from ..errors import InvalidArgument

    def typed(names: tuple[str, ...]) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names if n in vars(args)]

    ppl = config.ppl or config.ref or config.text
    if not config.suite and (given := typed(SUITE_ONLY)):
        raise InvalidArgument(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for task suites (--suite "
                              f"NAME) and this run has none" + ("; a perplexity covers the text: --chunks N measures "
                                                                "part of it" if ppl else ""))
    if config.suite and not ppl and (given := typed(PPL_ONLY)):
        it = "it" if len(given) == 1 else "them"
        raise InvalidArgument(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the perplexity run and this "
                              f"run has none; add --ppl to measure it too, or drop {it}")
    if ppl and not config.ref and "topk" in vars(args):
        raise InvalidArgument("--topk sets how many of the reference's log-probs are kept per token; it needs --ref "
                              "MODEL (the KL divergence against it)")


def store_arg(args: argparse.Namespace) -> bool | str:
    """``evaluate``'s ``store``: False (--no-store), the --db file, or True (the default store)."""
    from ..errors import InvalidArgument

    if args.no_store and args.db:
        raise InvalidArgument("--db names the store to write and --no-store writes none; drop one")
    return False if args.no_store else (args.db or True)


def check_output(path: str, inputs: list[tuple[str, str | None]] = ()) -> None:
    """Refuse an -o that is a format name, one of the run's ``inputs`` ((what, path); the records would be appended
    to it), or a path the records cannot be appended to, before any work."""
    from pathlib import Path

    from ..errors import InvalidArgument
    from ..models.store import check_writable

    p = Path(path).expanduser()
    for what, given in inputs:
        g = Path(str(given or "")).expanduser()
        if given and g.is_file() and p.exists() and p.samefile(g):
            raise InvalidArgument(f"-o {path} is {what} of this run: the records would be appended to it; give -o "
                                  f"another file, e.g. -o results.jsonl")
    if path.lower() in FORMAT_NAMES and not p.exists():
        raise InvalidArgument(f"-o takes the file to append the records to (JSON lines), not a format: -o {path} "
                              f"would write a file named {path!r}; for JSON on stdout use --json, or name a file, "
                              f"e.g. -o results.jsonl")
    if p.is_dir():
        raise InvalidArgument(f"-o {path} is a folder; name a file in it, e.g. -o {p / 'results.jsonl'}")
    check_writable(p, "give another -o")  # tries the folder: os.access passes root in /proc or a read-only mount
    if p.is_file() and (last := _last_line(p)) is not None:
        try:
            json.loads(last)
        except ValueError:
            raise InvalidArgument(f"-o {path} holds text that is not JSON lines (its last line: {last[:60]!r}); the "
                                  f"records are appended to the file: give a new file or one of earlier records, "
                                  f"e.g. -o results.jsonl") from None


def _last_line(p) -> str | None:
    """The last non-empty line of the file at ``p`` (read from its end), or None when it has none."""
    with open(p, "rb") as f:
        end, tail = f.seek(0, 2), b""
        while end > 0:  # back a block at a time until the tail holds a whole non-empty line
            start = max(0, end - 65536)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
            lines = tail.splitlines()
            if len([x for x in lines if x.strip()]) > 1 or (end == 0 and lines):
                break
    lines = [x for x in tail.splitlines() if x.strip()]
    return lines[-1].decode("utf-8", "replace") if lines else None


def _check_judge(url: str) -> None:
    """A --judge that is no http(s) URL, said before the first item is generated."""
    from ..errors import InvalidArgument

    if not url.lower().startswith(("http://", "https://")):
        host = url.split("://")[-1].rstrip("/") or "127.0.0.1:8080"
        raise InvalidArgument(f"--judge {url!r} is not an http(s) URL; give the judge's OpenAI-compatible "
                              f"endpoint, e.g. --judge http://{host}/v1")


def append_records(path: str, records: list[dict]) -> None:
    """Append ``records`` to ``path`` as JSON lines, in one write."""
    from pathlib import Path

    from ..models.store import make_parent

    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    make_parent(Path(path).expanduser(), "give another -o")  # a missing folder is made, as every writer here does
    with open(Path(path).expanduser(), "a", encoding="utf-8") as f:
        f.write(text)


def interrupted_line(e) -> str:
    """What a Ctrl-C left: the records stored before it and the suite's finished samples (a .partial log)."""
    line = "ondevice eval: interrupted"
    if e.suite:
        line += f" at item {min(e.done + 1, e.total)}/{e.total} of suite {e.suite}; its score was not stored"
        if e.partial:
            line += f" ({e.done} finished samples are in {e.partial})"
    line += f"; stored: {', '.join(e.stored)}" if e.stored else ("" if e.suite else "; nothing was stored")
    return line


def run(args: argparse.Namespace) -> int:
    from ..config import config_from
    from ..engine.args import apply_kernel_args
    from ..errors import InvalidArgument
    from ..models.hf_repo import hf_address
    from ..protect.keys import apply_key_args
    from .api import evaluate
    from .config import EvalConfig
    from .runner import Interrupted

    args.model = hf_address(args, args.model) or args.model  # -hf OWNER/REPO[:QUANT], as llama-perplexity
    if getattr(args, "text", None) is not None:  # -f FILE is a perplexity text: flags that say otherwise clash
        if "corpus" in vars(args):
            raise InvalidArgument(f"--corpus {args.corpus} and -f {args.text} both give the text; give one")
        if vars(args).get("ppl") is False:
            raise InvalidArgument(f"-f {args.text} gives a text to measure, and --no-ppl turns perplexity off; "
                                  f"drop one")
    apply_key_args(args)  # an encrypted -m/--ref: the key source every load in this process uses
    apply_kernel_args(args)  # every model eval loads (and its reference) uses --amx / --repack

    config = config_from(EvalConfig, args, verb="eval", what="eval settings", flags=FLAGS)
    check_flags(args, config)
    if not args.cascade:
        check_parts(args, config)
    if isinstance(store_arg(args), str):  # a --db that is no store is said now, not after the whole eval
        from ..store import Store

        Store(args.db).close()
    if args.output:
        check_output(args.output, [("the -f text", config.text), ("the suite file", config.suite),
                                   ("the model", args.model), ("the reference", config.ref), ("the store", args.db)])
    if config.judge:
        _check_judge(config.judge)
    if args.cascade:
        from .cascade_curve import run_cli

        return run_cli(argparse.Namespace(**{**vars(args), **config.model_dump()}))  # every field, validated

    try:
        records = evaluate(args.model, config, store=store_arg(args), progress=lambda m: print(m, file=sys.stderr))
    except Interrupted as e:
        print(interrupted_line(e), file=sys.stderr)
        return 130
    for r in records:
        if args.json:
            print(json.dumps(r.to_dict(), ensure_ascii=False, default=str))
            if warning := truncation_warning(r):  # stdout is JSON: said on stderr
                print(f"ondevice eval: {warning}", file=sys.stderr)
        else:
            print_record(r)
    if args.output:
        append_records(args.output, [r.to_dict() for r in records])
    return 0
