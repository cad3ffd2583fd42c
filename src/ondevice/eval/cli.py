"""``ondevice eval -m MODEL [--ppl ...] [--ref MODEL] [--suite NAME]``: quality next to speed."""

from __future__ import annotations

import argparse
import json
import sys

from .record import EvalRecord


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_config_arguments
    from .config import EvalConfig

    p.add_argument("-m", "--model", default=None, help="catalog name, stored variant or .gguf path")
    # one declaration: flag, ONDEVICE_EVAL_* and ondevice.evaluate's keyword (perplexity and KL divergence
    # follow llama-perplexity's conventions; suites use --ctx-size for their window)
    add_config_arguments(p.add_argument_group("what to evaluate and how"), EvalConfig)
    from ..engine.args import add_kernel_args
    from ..protect.keys import add_key_args

    add_kernel_args(p)
    add_key_args(p)
    p.add_argument("-o", "--output", default=None, metavar="OUT.jsonl", help="also append the summaries here")
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
    print(f"{r.model} ({(r.file_size or 0) / 1e6:.1f} MB, sha256 {r.model_sha256[:12]})  {test}", file=out)
    if r.corpus is not None:
        c = r.corpus
        print(f"  text: {c['name']} sha256 {c['sha256'][:12]} {c['chars']} chars, {r.corpus_tokens} tokens; "
              f"{r.n_chunks} chunks x {r.n_ctx} ctx, {r.n_scored} tokens scored", file=out)
    if test.startswith("ppl:"):
        print(f"  PPL = {r.ppl:.4f} ± {r.ppl_err:.4f}", file=out)
    elif test.startswith("kld:"):
        print(f"  vs {r.ref_model} (PPL {r.ppl_ref:.4f} ± {r.ppl_ref_err:.4f})"
              f"{' [cached reference]' if r.ref_cached else ''}", file=out)
        print(f"  ΔPPL = {r.dppl:+.4f} ± {r.dppl_err:.4f}   KLD = {r.kld_mean:.6f} ± {r.kld_err:.6f}"
              f"   median {r.kld_median:.6f}   p99 {r.kld_p99:.6f}   max {r.kld_max:.4f}", file=out)
        print(f"  same top-1 = {100 * r.top1_agree:.2f} ± {100 * r.top1_err:.2f} %   "
              f"Δp RMS = {100 * r.dp_rms:.3f} %", file=out)
        print(f"  (KLD from the reference's top-{r.topk}: a lower bound; mean reference mass outside it "
              f"{_fmt(r.ref_tail_mass_mean)}, worst-case upper bound {_fmt(r.kld_upper_mean)})", file=out)
    elif r.is_suite:
        limit = "" if r.limit is None else f" (--limit {r.limit})"
        print(f"  {coverage_line(r)}{limit}", file=out)
        print(f"  context window {r.n_ctx or '-'} tokens (trained {r.n_ctx_train or '-'}), "
              f"max {r.max_tokens} new tokens per item; decode {_fmt(r.decode_tps_mean, '.1f')} "
              f"tok/s, TTFT median {_fmt(r.ttft_s_median, '.3f')} s", file=out)
        for name, t in (r.tasks or {}).items():
            j = f"  judge {t['judge']:.2f}" if t.get("judge") is not None else ""
            sk = f"  ({t['n_skipped']} skipped)" if t.get("n_skipped") else ""
            print(f"    {name:24s} {t['category']:14s} {t['metric']:16s} n={t['n']:<4d} {_fmt(t['mean'])}{j}{sk}",
                  file=out)
        if r.n_skipped:
            longest = max(r.skipped or (), key=lambda x: x.get("prompt_tokens") or 0)
            print(f"  {r.n_skipped} items did not fit the window and were skipped (longest: {longest['id']}, "
                  f"{longest['reason']}); raise --ctx-size or lower --max-tokens to cover them", file=out)
        if r.log:
            print(f"  per-sample log: {r.log}", file=out)


def coverage_line(r: EvalRecord) -> str:
    """'score 0.41 on 14/20 items (coverage 70%); 0.29 counting skipped as 0' (skipped: not scored, counted)."""
    n = r.n_items or 0
    k = n if r.n_scored is None else r.n_scored
    line = f"score {_fmt(r.score)} on {k}/{n} items (coverage {100 * k / n if n else 0:.0f}%)"
    if k < n:
        line += f"; {_fmt(r.score_skipped_as_0)} counting skipped as 0"
    return line


def run(args: argparse.Namespace) -> int:
    from ..config import config_from
    from ..engine.args import apply_kernel_args
    from ..protect.keys import apply_key_args
    from .api import evaluate
    from .config import EvalConfig

    apply_key_args(args)  # an encrypted -m/--ref: the key source every load in this process uses
    apply_kernel_args(args)  # every model eval loads (and its reference) uses --amx / --repack

    config = config_from(EvalConfig, args, verb="eval", what="eval settings")
    if args.cascade:
        from .cascade_curve import run_cli

        return run_cli(argparse.Namespace(**{**vars(args), **config.model_dump()}))  # every field, validated

    records = evaluate(args.model, config, store=not args.no_store, progress=lambda m: print(m, file=sys.stderr))
    for r in records:
        if args.json:
            print(json.dumps(r.to_dict(), ensure_ascii=False, default=str))
        else:
            print_record(r)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n")
    return 0
