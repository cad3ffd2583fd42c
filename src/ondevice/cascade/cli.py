"""``ondevice cascade fit|export``: fit the confidence combiner on a dev split; export hard samples."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fit", help="fit the confidence combiner on a suite's dev split (both tiers answer it)")
    f.add_argument("-m", "--model", default=None, help="device model: catalog name, stored variant or .gguf path")
    f.add_argument("--cascade", required=True, metavar="URL", help="OpenAI-compatible cloud endpoint")
    from ..eval.cascade_curve import add_cloud_arguments, add_timeout_argument

    add_cloud_arguments(f)
    f.add_argument("--suite", default="rewrite", help="comma-separated suites (default: rewrite)")
    f.add_argument("--tasks", default=None, help="comma-separated task names to keep")
    f.add_argument("--limit", type=int, default=None, help="a stratified subset of N dev items")
    f.add_argument("--max-tokens", type=int, default=128, help="tokens per answer at most")
    f.add_argument("--features", default="text", choices=("text", "tokens", "all"),
                   help="what the combiner weighs: the answer's text against the request (default), its token "
                        "statistics, or both")
    f.add_argument("--threads", type=int, default=None, help="device threads (default: physical cores)")
    add_timeout_argument(f)
    f.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="where to write the combiner (default: the data dir, found by serve/eval for this model)")
    e = sub.add_parser("export", help="write kept hard samples as JSONL {\"messages\": [...]} for fine-tuning")
    e.add_argument("-o", "--output", default="-", metavar="FILE", help="output file (default: stdout)")
    e.add_argument("--model-sha", default=None, help="only samples of the device model with this sha256 prefix")
    e.add_argument("--since", type=float, default=None, metavar="EPOCH", help="only samples kept since this time")
    e.add_argument("--db", default=None, metavar="PATH", help="the store (default: <ONDEVICE_HOME>/data)")


def run(args: argparse.Namespace) -> int:
    if args.action == "export":
        from .samples import export_hard_samples

        n = export_hard_samples(None if args.output == "-" else args.output, store=args.db, since=args.since,
                                device_sha256=args.model_sha)
        if n == 0:  # not an error: a periodic export with --since often has nothing new
            which = " and ".join(flag for flag, v in (("--since", args.since), ("--model-sha", args.model_sha))
                                 if v is not None)
            print(f"0 hard samples: the store holds none{' matching ' + which if which else ''} (serve with --cascade "
                  f"URL --cascade-keep-hard keeps deferred requests with the cloud's answers)"
                  + ("" if args.output == "-" else f"; {args.output} not written"), file=sys.stderr)
            return 0
        print(f"{n} hard samples written" + ("" if args.output == "-" else f" to {args.output}"), file=sys.stderr)
        return 0
    return _fit(args)


def small_sample(n: int, good: int, args: argparse.Namespace) -> str | None:
    """The warning for a dev set with few answers of either label: its thresholds (quantiles of a handful of
    confidences) and AUC are rough, and the share it defers while serving may differ much from the one asked. The
    fix named is one that adds items: a higher --limit where one was given, more --tasks where they were narrowed,
    else another suite."""
    from .confidence import FEW_PER_LABEL

    if min(good, n - good) >= FEW_PER_LABEL:
        return None
    more = [f"raise --limit ({args.limit} now)"] if args.limit else []
    more += ["keep more --tasks"] if args.tasks else []
    more += [f"add a suite (e.g. --suite {args.suite},assistant-en: its rewrite and summary items)"
             if "assistant-en" not in args.suite.split(",") else "add a suite to --suite"]
    return (f"{n} dev answers ({good} where the device did as well as the cloud, {n - good} where it did worse) "
            f"give rough thresholds: fewer than {FEW_PER_LABEL} of either kind; {' or '.join(more)}")


def _fit(args: argparse.Namespace) -> int:
    from ..engine import load
    from ..engine.args import said_knobs
    from ..eval.api import model_sha256
    from ..eval.cascade_curve import collect, fit_combiner, left_out, load_items, offline_cloud
    from ..models.catalog import resolve
    from .confidence import FEATURES, MIN_FIT, TEXT_FEATURES, TOKEN_FEATURES, combiner_path

    say = lambda m: print(m, file=sys.stderr)
    items = load_items(args.suite, "dev", args.tasks.split(",") if args.tasks else None, args.limit)
    if len(items) < MIN_FIT:  # known before any answer is made
        from ..errors import InvalidArgument

        raise InvalidArgument(f"fitting the combiner needs at least {MIN_FIT} dev items, the selection has "
                              f"{len(items)}; raise --limit or give more --tasks/--suite")
    model = said_knobs(load(args.model, n_threads=args.threads))
    sha = model_sha256(resolve(str(model.path)))
    cloud = offline_cloud(args.cascade, args.cloud_model, args.cloud_key_env, args.cascade_timeout)
    try:
        say(f"fitting on {len(items)} dev items: device {model.name}, cloud {cloud.model_id()}")
        rows = collect(model, cloud, items, max_tokens=args.max_tokens, progress=say)
    finally:
        cloud.close()
        model.close()
    comb = fit_combiner(rows, meta={"model": model.name, "model_sha256": sha, "cloud_model": cloud.model,
                                    "suite": args.suite, "split": "dev", "max_tokens": args.max_tokens},
                         features={"text": TEXT_FEATURES, "tokens": TOKEN_FEATURES, "all": FEATURES}[args.features])
    path = comb.save(args.output or combiner_path(sha))
    good = sum(r["device_score"] >= r["cloud_score"] for r in rows if r["cloud_score"] is not None)
    print(f"combiner fitted on {comb.meta['n_fit']} dev answers ({good} where the device did as well as the cloud); "
          f"dev ROC AUC {comb.meta['dev_auc']:.3f} (in-sample)\n{path}")
    for line in (left_out(rows, "the fit"), small_sample(comb.meta["n_fit"], good, args)):
        if line:
            say(f"ondevice cascade: warning: {line}")
    shares = ", ".join(f"{s:.0%} below {comb.threshold_for(s):.6g}" for s in (0.2, 0.4, 0.6))
    given = f" --cascade-combiner {shlex.quote(str(path))}" if args.output else ""  # else found by its model
    print(f"dev answers deferred by threshold: {shares}; serve with --cascade-defer-share 0.4{given} to defer the "
          f"least confident 40% of requests like these")
    return 0
