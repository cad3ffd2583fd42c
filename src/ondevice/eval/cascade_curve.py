"""``ondevice eval --cascade URL --suite ...``: the deferral curve of a device -> cloud cascade.

Both tiers answer every item once (greedy); the device's per-token log-probabilities and entropies are
kept. Deferring a share ``s`` of the items then costs nothing to simulate: the ``round(s * N)`` items the
device is least sure of take the cloud's score, the rest keep the device's. Three orderings are drawn from
0 to 100% deferred:

- ``confidence``: ours (the fitted combiner, or ``exp(mean logprob)`` without one), least confident first;
- ``random``: the exact expectation of deferring a random subset (a straight line between the tiers);
- ``oracle``: the items where the cloud gains most over the device first (the best any policy can do).

The area under each curve (share on x, mean item score on y, trapezoids) summarises it; ``auc_gain`` is
``(ours - random) / (oracle - random)``, 0 for no better than chance and 1 for the oracle. Each point also
carries the mean latency per request (the device always answers first; deferred items add the cloud's
time) and the cloud tokens spent. Item scores are the suite's primary metric on 0..1, averaged over items.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..engine.records import Sampling
from .runner import _unit
from .suites import Item, score

SHARES = tuple(i / 20 for i in range(21))  # 0, 5, ..., 100 % deferred


def device_answer(model, item: Item, max_tokens: int) -> dict:
    """The device's greedy answer with its per-token statistics, text pieces and latency (all a row's
    features are computed from, see :func:`row_features`)."""
    from ..cascade.confidence import TokenStats

    prompt = item.input if isinstance(item.input, str) else item.messages()
    stats, last = TokenStats(prompt), None
    for g in model.stream(prompt, sampling=Sampling(temp=0.0, max_tokens=max_tokens, token_stats=True)):
        stats.add(g)
        last = g
    return {"device_text": stats.text, "device_s": last.t if last else 0.0,
            "device_tokens": last.generation_tokens if last else 0, "logprobs": stats.logprobs,
            "entropies": stats.entropies, "pieces": stats.pieces, "finish_reason": stats.finish_reason,
            "request": stats.request}


def cloud_answer(cloud, item: Item, max_tokens: int) -> dict:
    from ..cascade.cloud import CloudError

    try:
        a = cloud.chat(item.messages(), temperature=0.0, max_tokens=max_tokens)
    except CloudError as e:
        return {"cloud_text": "", "cloud_s": None, "cloud_tokens": 0, "cloud_error": e.kind,
                "cloud_error_message": e.brief}
    return {"cloud_text": a.text, "cloud_s": a.latency_s, "cloud_tokens": a.prompt_tokens + a.completion_tokens,
            "cloud_error": None, "cloud_error_message": None}


def collect(model, cloud, items: Sequence[Item], *, max_tokens: int = 128, cloud_workers: int = 1,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per item: both answers, their scores (primary metric on 0..1), latencies and token stats.

    With ``cloud_workers > 1`` that many cloud requests are in flight while the device answers (faster on
    a cloud server with as many slots; each cloud latency then includes sharing the cloud with the others).
    """
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, cloud_workers)) as pool:
        pending = [pool.submit(cloud_answer, cloud, it, max_tokens) for it in items] if cloud_workers > 1 else None
        for i, it in enumerate(items):
            d = device_answer(model, it, max_tokens)
            c = pending[i].result() if pending else cloud_answer(cloud, it, max_tokens)
            rows.append(make_row(it, d, c))
            if progress:
                r = rows[-1]
                cs = f"error ({r['cloud_error_message']})" if r["cloud_score"] is None else f"{r['cloud_score']:.3f}"
                progress(f"  [{i + 1}/{len(items)}] {it.id}: device {r['device_score']:.3f}, cloud {cs}")
    return rows


def make_row(it: Item, d: dict, c: dict) -> dict:
    """One item's row from its device and cloud answers (:func:`device_answer`, :func:`cloud_answer`), scored."""
    from ..cascade.confidence import split_of

    return {"id": it.id, "task": it.task, "split": split_of(it.id), "metric": it.metric, **d, **c,
            "device_score": _unit(it.metric, score(it, d["device_text"])[it.metric]),
            "cloud_score": _unit(it.metric, score(it, c["cloud_text"])[it.metric]) if c["cloud_error"] is None
            else None}


def check_answered(rows: Sequence[dict]) -> None:
    """Refuse rows the cloud answered none of (neither a curve nor a combiner can be made), saying why it failed."""
    if any(r.get("cloud_score") is not None for r in rows):
        return
    from ..errors import OndeviceError

    first = rows[0] if rows else {}
    why = f" ({first['cloud_error_message']})" if first.get("cloud_error_message") else ""
    more = "; or raise --cascade-timeout" if first.get("cloud_error") == "timeout" else ""
    raise OndeviceError(f"the cloud answered none of the {len(rows)} items{why}; check the --cascade URL and the "
                        f"cloud server{more}")


def left_out(rows: Sequence[dict], what: str = "the curve") -> str | None:
    """The line saying which items had no cloud answer and were left out of ``what`` (None: none were): a
    smaller n alone hides it, and the left-out items (rate-limited bursts, long answers) are not a random subset."""
    failed = [r["cloud_error"] for r in rows if r.get("cloud_error") is not None]
    if not failed:
        return None
    kinds = ", ".join(f"{k} x{n}" for k, n in Counter(failed).most_common())
    return f"{len(failed)} of {len(rows)} items had no cloud answer ({kinds}): left out of {what}"


def _trapz(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))


def deferral_curve(rows: Sequence[dict], confidence: Sequence[float], shares: Sequence[float] = SHARES) -> dict:
    """Quality, mean latency and cloud tokens at each deferred share, for ours, random and the oracle.

    Rows whose cloud answer failed are left out (a curve needs both answers).
    """
    check_answered(rows)
    keep = [i for i, r in enumerate(rows) if r.get("cloud_score") is not None]
    dev = np.array([rows[i]["device_score"] for i in keep])
    cld = np.array([rows[i]["cloud_score"] for i in keep])
    dev_s = np.array([rows[i]["device_s"] for i in keep])
    cld_s = np.array([rows[i]["cloud_s"] for i in keep])
    tok = np.array([rows[i]["cloud_tokens"] for i in keep], dtype=np.float64)
    conf = np.array([confidence[i] for i in keep])
    n = len(keep)
    orders = {"confidence": np.argsort(conf, kind="stable"), "oracle": np.argsort(-(cld - dev), kind="stable")}
    out: dict = {"shares": list(shares), "n": n}
    for name, order in orders.items():
        q, lat, toks = [], [], []
        for s in shares:
            k = round(s * n)
            deferred = np.zeros(n, dtype=bool)
            deferred[order[:k]] = True
            q.append(float(np.where(deferred, cld, dev).mean()))
            lat.append(float((dev_s + np.where(deferred, cld_s, 0.0)).mean()))
            toks.append(int(tok[deferred].sum()))
        out[name] = {"quality": q, "latency_s": lat, "cloud_tokens": toks}
    frac = [round(s * n) / n for s in shares]  # the share actually deferred (k / n)
    out["random"] = {"quality": [float(dev.mean() + f * (cld.mean() - dev.mean())) for f in frac],
                     "latency_s": [float(dev_s.mean() + f * cld_s.mean()) for f in frac],
                     "cloud_tokens": [round(f * float(tok.sum())) for f in frac]}
    auc = {name: _trapz(frac, out[name]["quality"]) for name in ("confidence", "random", "oracle")}
    span = auc["oracle"] - auc["random"]
    out["auc"] = auc
    out["auc_gain"] = (auc["confidence"] - auc["random"]) / span if span > 1e-12 else None
    out["device_score"], out["cloud_score"] = float(dev.mean()), float(cld.mean())
    out["device_latency_s"], out["cloud_latency_s"] = float(dev_s.mean()), float(cld_s.mean())
    return out


def at_share(curve: dict, share: float, name: str = "confidence") -> dict:
    """The point of ``curve`` nearest ``share`` deferred, with its ratio to the cloud-only score."""
    i = min(range(len(curve["shares"])), key=lambda j: abs(curve["shares"][j] - share))
    q = curve[name]["quality"][i]
    return {"share": curve["shares"][i], "quality": q,
            "of_cloud": q / curve["cloud_score"] if curve["cloud_score"] else None,
            "latency_s": curve[name]["latency_s"][i], "cloud_tokens": curve[name]["cloud_tokens"][i]}


def row_features(row: dict, prefix: int | None = None) -> dict[str, float]:
    """A row's confidence features, as the server computes them from the same answer: all its tokens, or
    the first ``prefix`` (streaming decides on a prefix; an answer that ends sooner is scored whole)."""
    from ..cascade.confidence import features

    lp, ent, pieces = row["logprobs"], row["entropies"], row["pieces"]
    if not prefix or prefix >= len(pieces):
        return features(lp, ent, row["request"], "".join(pieces), row["finish_reason"])
    return features(lp[:prefix], ent[:prefix], row["request"], "".join(pieces[:prefix]), None)


def confidences(rows: Sequence[dict], combiner, prefix: int | None = None) -> list[float]:
    """The combiner's confidence of each row, from all its tokens or the first ``prefix`` (streaming)."""
    return [combiner.predict(row_features(r, prefix)) for r in rows]


def fit_combiner(rows: Sequence[dict], meta: dict | None = None, prefix: int | None = None,
                 features: Sequence[str] | None = None, weighted: bool = True):
    """Fit a :class:`Combiner` on rows (label: the device scored at least the cloud; each answer weighted by
    ``|cloud - device|`` unless ``weighted`` is False); ``features`` None: :data:`FIT_FEATURES`."""
    from ..cascade.confidence import FIT_FEATURES, Combiner, labels_for, weights_for

    check_answered(rows)
    ok = [r for r in rows if r.get("cloud_score") is not None]
    dev, cloud = [r["device_score"] for r in ok], [r["cloud_score"] for r in ok]
    return Combiner.fit([row_features(r, prefix) for r in ok], labels_for(dev, cloud),
                        weights=weights_for(dev, cloud) if weighted else None, features=features or FIT_FEATURES,
                        meta=meta)


def select(items: list[Item], split: str = "all", tasks: Sequence[str] | None = None) -> list[Item]:
    from ..cascade.confidence import split_of
    from ..errors import InvalidArgument

    if split not in ("all", "dev", "test"):
        raise InvalidArgument(f"--split {split!r} must be all, dev or test")
    known = sorted({it.task for it in items})
    if unknown := [t for t in tasks or () if t not in known]:
        raise InvalidArgument(f"--tasks {','.join(unknown)}: no such task in the suite; its tasks are "
                              f"{', '.join(known)}")
    out = [it for it in items if (split == "all" or split_of(it.id) == split) and (not tasks or it.task in tasks)]
    if not out:
        raise InvalidArgument(f"no items left after --split {split} and --tasks {','.join(tasks or [])}; keep more "
                              f"tasks, or --split all")
    return out


def load_items(suites: str, split: str = "all", tasks: Sequence[str] | None = None, limit: int | None = None,
               seed: int = 0) -> list[Item]:
    """Items of one or more comma-separated suites, filtered by split and task, then a stratified subset."""
    from .suites import load_suite, stratified_subset

    items = [it for name in suites.split(",") if name for it in load_suite(name.strip()).items]
    items = select(items, split, tasks)
    return stratified_subset(items, limit, seed) if limit is not None else items


def cascade_eval(model: str | None, cloud_url: str, suite: str, *, cloud_model: str | None = None,
                 key_env: str | None = None, split: str = "all", tasks: Sequence[str] | None = None,
                 limit: int | None = None, seed: int = 0, max_tokens: int = 128, combiner: str | None = None,
                 timeout: float = 120.0, threads: int | None = None, store: bool | str | os.PathLike = True,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run both tiers over the suite and return (and store) the deferral-curve record."""
    from ..cascade.confidence import combiner_warning, find_combiner
    from ..engine import load
    from ..models.store import data_dir
    from .api import _base, model_sha256

    say = progress or (lambda m: None)
    items = load_items(suite, split, tasks, limit, seed)
    m = load(model, n_threads=threads)
    from ..models.catalog import resolve

    ref = resolve(str(m.path))
    sha = model_sha256(ref)
    comb = find_combiner(sha, combiner)
    cloud = offline_cloud(cloud_url, cloud_model, key_env, timeout)
    session = f"cascade-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        if warning := combiner_warning(comb, m.name):
            say(f"warning: {warning}")
        say(f"cascade eval: {len(items)} items, device {m.name}, cloud {cloud.model_id()} at {cloud.url}")
        rows = collect(m, cloud, items, max_tokens=max_tokens, progress=say)
    finally:
        cloud.close()
        m.close()
    curve = deferral_curve(rows, confidences(rows, comb))
    log = None  # the per-item log goes with the stored record (none with --no-store, as a suite's)
    if store:
        log = Path(data_dir() / "eval-logs" / f"{session}-{sha[:12]}.jsonl")
        write_rows(log, rows)
    record = {**_base(ref, sha), "test": f"cascade:{suite}", "session": session, "cloud_url": cloud.url,
              "cloud_model": cloud.model, "split": split, "tasks": list(tasks or []), "limit": limit,
              "max_tokens": max_tokens, "n_items": len(rows), "cloud_errors": sum(r["cloud_error"] is not None
                                                                                 for r in rows),
              "left_out": left_out(rows),
              "combiner": {"calibrated": comb.calibrated, **comb.meta}, "curve": curve,
              "at_40": at_share(curve, 0.4), "log": str(log) if log else None}
    if store:
        from ..store import Store

        with Store(None if store is True else store) as db:
            db.add("eval", record, session=session, config_key=session, model=record["model"],
                   model_sha256=sha, test=record["test"])
    return record


def offline_cloud(url: str, model: str | None, key_env: str | None, timeout: float):
    """The cloud client of offline batch work (``eval --cascade``, ``cascade fit``): latency does not matter there,
    so a rate-limited (429) or failing (5xx) item is retried with the openai client's back-off, which honours
    Retry-After, instead of being left out of the figures."""
    from ..cascade.cloud import DEFAULT_KEY_ENV, OFFLINE_RETRIES, CloudClient

    return CloudClient(url, model=model, key_env=key_env or DEFAULT_KEY_ENV, timeout=timeout,
                       max_retries=OFFLINE_RETRIES, model_flag="--cloud-model", cooldown=False)


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    from ..models.store import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def print_record(r: dict) -> None:
    c = r["curve"]
    print(f"{r['model']} -> {r['cloud_model']}  {r['test']}  split={r['split']}  n={c['n']}"
          f"  (confidence {_confidence_kind(r['combiner'])})")
    if r.get("left_out"):  # n above is of the items both tiers answered
        print(f"  {r['left_out']}")
    print(f"  device-only {c['device_score']:.4f} ({c['device_latency_s'] * 1e3:.0f} ms/request)   "
          f"cloud-only {c['cloud_score']:.4f} (+{c['cloud_latency_s'] * 1e3:.0f} ms/deferred request)")
    a = r["at_40"]
    print(f"  at {a['share']:.0%} deferred: {a['quality']:.4f} = {a['of_cloud']:.1%} of cloud-only, "
          f"{a['latency_s'] * 1e3:.0f} ms/request, {a['cloud_tokens']} cloud tokens")
    auc = c["auc"]
    gain = "-" if c["auc_gain"] is None else f"{c['auc_gain']:.3f}"
    print(f"  AUC: confidence {auc['confidence']:.4f}  random {auc['random']:.4f}  oracle {auc['oracle']:.4f}"
          f"  (gain over random, of the oracle's: {gain})")
    print("  deferred  confidence  random  oracle  ms/request  cloud tokens")
    for i, s in enumerate(c["shares"]):
        if i % 2 == 0:
            print(f"  {s:7.0%}  {c['confidence']['quality'][i]:10.4f}  {c['random']['quality'][i]:6.4f}  "
                  f"{c['oracle']['quality'][i]:6.4f}  {c['confidence']['latency_s'][i] * 1e3:10.0f}  "
                  f"{c['confidence']['cloud_tokens'][i]:12d}")
    if r["log"]:
        print(f"  per-item log: {r['log']}")


def _confidence_kind(combiner: dict) -> str:
    from ..cascade.confidence import SERVING_ANOTHER

    if combiner.get(SERVING_ANOTHER):
        return f"a combiner fitted for another model, {combiner.get('model')}"
    return "calibrated" if combiner["calibrated"] else "exp(mean logprob), uncalibrated"


def add_cascade_arguments(p) -> None:
    """``ondevice eval``'s cascade flags (the suite, limit, seed, max tokens and threads flags are shared)."""
    g = p.add_argument_group("device -> cloud cascade (deferral curve)")
    g.add_argument("--cascade", default=None, metavar="URL",
                   help="OpenAI-compatible cloud endpoint: draw quality vs share deferred for --suite")
    add_cloud_arguments(g)
    g.add_argument("--split", default="all", choices=("all", "dev", "test"),
                   help="items by a fixed hash of their id: dev (about 40%%, what `ondevice cascade fit` fits on) "
                        "or test")
    g.add_argument("--tasks", default=None, help="comma-separated task names to keep (e.g. rewrite_tone,"
                                                 "notification_summary)")
    g.add_argument("--combiner", default=None, metavar="FILE", help="confidence combiner file (default: the one "
                                                                     "fitted for the model, if any)")
    add_timeout_argument(g)


def add_cloud_arguments(p) -> None:
    """``--cloud-model`` / ``--cloud-key-env``, also spelt as ``ondevice serve`` spells them (``--cascade-model`` /
    ``--cascade-key-env``): the README's commands for serve, fit and eval sit side by side."""
    p.add_argument("--cloud-model", "--cascade-model", dest="cloud_model", default=None,
                   help="model name at the cloud (default: the one it lists; a cloud listing several wants it named)")
    p.add_argument("--cloud-key-env", "--cascade-key-env", dest="cloud_key_env", default=None, metavar="VAR",
                   help="env var holding the cloud's API key (default ONDEVICE_CLOUD_KEY)")


def _seconds(value: str) -> float:
    import argparse

    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"give a number of seconds > 0, not {value!r}")
    return x


CLOUD_TIMEOUT_S = 120.0  # a whole answer per item (serve's --cascade-timeout waits for a first token)


def add_timeout_argument(p) -> None:
    """``--cascade-timeout``, as ``ondevice serve``'s: how long the cloud may take before it counts as failed."""
    p.add_argument("--cascade-timeout", type=_seconds, default=CLOUD_TIMEOUT_S, metavar="SECONDS",
                   help="seconds the cloud may take to answer an item; past it the item counts as a cloud error "
                        "(default: 120)")


def run_cli(args) -> int:
    """``ondevice eval --cascade URL --suite S``: print (and store) the deferral curve."""
    import sys

    from ..errors import InvalidArgument
    from .cli import store_arg
    from .config import DEFAULT_MAX_TOKENS

    if not args.suite:
        raise InvalidArgument("--cascade needs --suite (e.g. --suite rewrite or --suite rewrite,assistant-en)")
    r = cascade_eval(args.model, args.cascade, args.suite, cloud_model=args.cloud_model, key_env=args.cloud_key_env,
                     split=args.split, tasks=args.tasks.split(",") if args.tasks else None, limit=args.limit,
                     seed=args.seed, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS, combiner=args.combiner,
                     threads=args.threads,
                     timeout=args.cascade_timeout, store=store_arg(args),
                     progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(r, ensure_ascii=False, default=str))
    else:
        print_record(r)
    if args.output:
        from .cli import append_records

        append_records(args.output, [r])
    return 0
