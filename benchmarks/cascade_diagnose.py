"""What limits the cascade's deferral curve: diagnostics over the answers ``cascade_bench.py`` cached.

No generation by default (``--margins`` runs one teacher-forced pass of the device over its cached answers,
``--make-retest`` answers again): both tiers' answers come from the bench's cache (``--rows``).
Each section answers one question about the 95%-of-cloud-at-40%-deferred goal; every "re-split" figure is
the mean ± sd over random dev/test splits of the same items, fitted on dev and drawn on test only.

1. Where is the cloud's advantage? Per task: scores, items the cloud wins, the points it gains.
2. Over- or underfitting? The combiner on its own dev items vs the test items; the penalty held fixed.
3. Do the features carry the signal? The combiner fitted on *all* items and drawn on the same items (an
   in-sample ceiling: no honest fit of these features does better), and each feature's rank correlation
   with what deferring gains.
4. Is the dev split too small? Re-splits with 27 .. 108 dev items.
5. Per-task stakes (the request's instruction tells the task): rank by P(device worse) x the task's mean
   |cloud - device| on dev, paired against the default combiner on the same splits.
6. Is the metric noisy? The same curve with the exact-match tasks scored by ROUGE-L (their extra metric);
   with ``--retest FILE`` (the device's answers made again; ``--make-retest`` makes them, each from an
   empty KV cache), how many item scores a numerically trivial change moves, and the curve on those.
7. ``--margins``: token features the generator does not record (top-1/top-2 margin, top-10 entropy, first
   4 tokens), computed by teacher-forcing the cached answers, added to the text features (paired).
8. ``--self-consistency K``: does the device agree with itself? K more answers sampled at ``--sc-temp``
   (cached in ``--sc-file``), and how much of the greedy answer they repeat (exact, and bigram F1), added to
   the text features (paired). Costs K device answers per request if adopted.
9. ``--spelling``: does the answer still hold words no English word list knows (``pyspellchecker``, MIT;
   ``pip install pyspellchecker``)? The share of the message's unknown words the answer keeps, and the
   share of the answer's words that are new and unknown, added to the text features (paired).
10. ``--vocab-words``: section 9 with the device model's own vocabulary as the word list: a word with no
   whole-word token is rare or misspelled (what the device has at decision time, in any language it has).

    python benchmarks/cascade_diagnose.py --max-tokens 48 --resplits 60
    python benchmarks/cascade_diagnose.py --max-tokens 48 --resplits 60 --margins \\
        --retest /tmp/ondevice-cascade-retest.jsonl --make-retest       # + the retest and section 7 (minutes)
    python benchmarks/cascade_diagnose.py --max-tokens 48 --resplits 60 --self-consistency 2 --spelling
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import cascade_bench

from ondevice.cascade.confidence import (
    FEATURES,
    TEXT_FEATURES,
    Combiner,
    _cv_l2,
    _fit_logistic,
    _sigmoid,
    labels_for,
    weights_for,
)
from ondevice.eval.cascade_curve import at_share, confidences, deferral_curve, fit_combiner, row_features


def of40(test: list[dict], conf) -> tuple[float, float]:
    c = deferral_curve(test, list(conf))
    return at_share(c, 0.4)["of_cloud"], c["auc_gain"]


def splits(rows: list[dict], n: int, n_dev: int, seed: int = 0):
    rng = random.Random(seed)  # the bench's --resplits draws the same splits
    for _ in range(n):
        order = rng.sample(rows, len(rows))
        yield order[:n_dev], order[n_dev:]


def over_splits(rows, method, n, n_dev=54) -> list[tuple[float, float]]:
    return [of40(t, method(d, t)) for d, t in splits(rows, n, n_dev)]


def line(name: str, got: list[tuple[float, float]]) -> str:
    a, g = [x for x, _ in got], [y for _, y in got]
    return (f"{name:44s} {statistics.mean(a):6.1%} ± {statistics.stdev(a):4.1%} of cloud-only at 40%; "
            f"area gain {statistics.mean(g):.3f} ± {statistics.stdev(g):.3f}")


def paired(name: str, rows, method, base, n) -> str:
    d = np.array([of40(t, method(dv, t))[0] - of40(t, base(dv, t))[0] for dv, t in splits(rows, n, 54)])
    return (f"{name:44s} paired vs default {d.mean():+.1%} ± {d.std(ddof=1):.1%} "
            f"(better on {int((d > 0).sum())} of {n} splits, worse on {int((d < 0).sum())})")


def default(dev, test):
    return confidences(test, fit_combiner(dev))


def gain(r: dict) -> float:
    return r["cloud_score"] - r["device_score"]


def instruction(r: dict) -> str:
    """The request's instruction (all but its last paragraph), numbers masked: the task the request tells."""
    paras = [p for p in r["request"].strip().split("\n\n") if p.strip()]
    return re.sub(r"\d+", "#", "\n\n".join(paras[:-1]).lower()) if len(paras) > 1 else ""


def staked(k: float = 3.0):
    """P(device worse) from the default combiner x the instruction's mean |cloud - device| on dev (shrunk to
    the dev mean by ``k`` pseudo-items): the expected points lost by keeping the device's answer."""
    def method(dev, test):
        p = confidences(test, fit_combiner(dev))
        mean = float(np.mean([abs(gain(r)) for r in dev]))
        by: dict[str, list[float]] = {}
        for r in dev:
            by.setdefault(instruction(r), []).append(abs(gain(r)))
        stake = [(sum(by.get(instruction(r), [])) + k * mean) / (len(by.get(instruction(r), [])) + k) for r in test]
        return [-(1 - pi) * s for pi, s in zip(p, stake)]
    return method


def logistic(names: list[str], feats: dict[str, dict[str, float]]):
    """The default fit (weighted, penalty by CV on dev) over any named features, ``feats`` by item id."""
    def method(dev, test):
        x = np.array([[feats[r["id"]][f] for f in names] for r in dev])
        d, c = [r["device_score"] for r in dev], [r["cloud_score"] for r in dev]
        y, sw = np.array(labels_for(d, c), dtype=float), np.array(weights_for(d, c))
        sw = sw / sw.mean()
        mu, sd, w = _fit_logistic(x, y, _cv_l2(x, y, sw), sw)
        xt = np.array([[feats[r["id"]][f] for f in names] for r in test])
        return _sigmoid(np.hstack([(xt - mu) / sd, np.ones((len(xt), 1))]) @ w).tolist()
    return method


def _adapters(args) -> tuple:
    return (args.device_adapter,) if args.device_adapter else ()


def load_rows(args, path: str) -> list[dict]:
    a = types.SimpleNamespace(max_tokens=args.max_tokens, rows=path, fresh=False, threads=1, cloud_slots=1,
                              cloud_model=args.cloud_model, cloud_url="http://127.0.0.1:9/v1", limit=None,
                              device_adapter=args.device_adapter)
    rows = cascade_bench.answers(a, cascade_bench.load_items(None), cascade_bench.Cloud(a))
    return [r for r in rows if r["cloud_score"] is not None]


def make_retest(args, path: str) -> None:
    """The device's answers made again, each from an empty KV cache (the bench's run reused the previous
    prompt's prefix, so its prefill differed numerically), the cloud's cached answers beside them."""
    import json

    import ondevice
    from ondevice.eval.cascade_curve import device_answer

    cached: dict[str, dict] = {}
    for line in Path(args.rows).read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        cached.setdefault(e["id"], {}).update({k: e[k] for k in ("device", "cloud") if isinstance(e.get(k), dict)
                                               and (k == "cloud" or ("adapter" in e[k]["key"]) == bool(args.device_adapter))})
    m = ondevice.load(None, n_threads=1, adapters=_adapters(args))
    try:
        with open(path, "w", encoding="utf-8") as f:
            for it in cascade_bench.load_items(None):
                m.reset()
                d = {**device_answer(m, it, args.max_tokens), "key": cached[it.id]["device"]["key"]}
                f.write(json.dumps({"id": it.id, "device": d, "cloud": cached[it.id]["cloud"]}) + "\n")
    finally:
        m.close()


def margins(args, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per answer: mean and min top-1/top-2 log-probability margin, share of near ties (< log 2), top-10
    entropy, and both over the first 4 tokens, from one teacher-forced decode of prompt + cached answer."""
    import ondevice
    from ondevice.engine.logprobs import log_softmax

    items = {it.id: it for it in cascade_bench.load_items(None)}
    m = ondevice.load(None, n_threads=1, adapters=_adapters(args))
    eng, out = m.engine, {}
    try:
        for r in rows:
            it = items[r["id"]]
            ptoks = m.tokenize_prompt(it.input if isinstance(it.input, str) else it.messages())
            toks = eng.tokenize(r["device_text"], add_special=False, parse_special=False) if r["device_text"] else []
            toks += [eng.eos_token] if r["finish_reason"] == "stop" else []
            seq = ptoks + toks
            eng.reset()
            eng.decode_batch([(t, p, 0, p >= len(ptoks) - 1) for p, t in enumerate(seq)])
            top = -np.sort(-log_softmax(eng.all_logits())[: len(toks)], axis=1)[:, :10]  # (n_answer, 10)
            eng.reset()
            mg = top[:, 0] - top[:, 1]
            p = np.exp(top) / np.exp(top).sum(1, keepdims=True)
            ent = -(p * np.log(p)).sum(1)
            out[r["id"]] = {"mean_margin": float(mg.mean()), "min_margin": float(mg.min()),
                            "tied_share": float((mg < np.log(2)).mean()), "first4_margin": float(mg[:4].mean()),
                            "top10_entropy": float(ent.mean()), "first4_top10_entropy": float(ent[:4].mean())}
    finally:
        m.close()
    return out


def samples(args, rows: list[dict]) -> dict[str, list[str]]:
    """``--self-consistency K`` sampled device answers per item (seeds 1000..), made once into ``--sc-file``."""
    import json

    import ondevice

    path = Path(args.sc_file)
    key = {"k": args.self_consistency, "temp": args.sc_temp, "max_tokens": args.max_tokens}
    have: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            if e.get("key") == key:
                have[e["id"]] = e["samples"]
    todo = [it for it in cascade_bench.load_items(None) if it.id not in have and it.id in {r["id"] for r in rows}]
    if todo:
        m = ondevice.load(None, n_threads=2, adapters=_adapters(args))
        try:
            with path.open("a", encoding="utf-8") as f:
                for it in todo:
                    prompt = it.input if isinstance(it.input, str) else it.messages()
                    have[it.id] = [m.generate(prompt, temp=args.sc_temp, max_tokens=args.max_tokens, seed=1000 + k).text
                                   for k in range(args.self_consistency)]
                    f.write(json.dumps({"id": it.id, "key": key, "samples": have[it.id]}) + "\n")
        finally:
            m.close()
    return have


def _bigram_f1(a: str, b: str) -> float:
    from ondevice.cascade.confidence import _bigrams, _words

    x, y = _bigrams(_words(a)), _bigrams(_words(b))
    p = sum(g in set(y) for g in x) / len(x) if x else 0.0
    r = sum(g in set(x) for g in y) / len(y) if y else 0.0
    return 2 * p * r / (p + r) if p + r else float(x == y)


def agreement(rows: list[dict], got: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    from ondevice.cascade.confidence import _words

    return {r["id"]: {"sc_exact": float(np.mean([_words(s) == _words(r["device_text"]) for s in got[r["id"]]])),
                      "sc_f1": float(np.mean([_bigram_f1(r["device_text"], s) for s in got[r["id"]]]))}
            for r in rows}


def vocabulary_words() -> set[str]:
    """The words the device model's tokenizer has a whole-word token for (lower case): a word it has to
    split is rare or misspelled, which the device knows without a word list."""
    import ondevice

    m = ondevice.load(None, n_threads=1)
    try:
        e = m.engine
        pieces = (e.token_bytes(t).decode("utf-8", "replace") for t in range(e.n_vocab))
        return {w.lower() for p in pieces if (w := p.strip()).isalpha() and len(w) > 1}
    finally:
        m.close()


def spelling(rows: list[dict], known=None) -> dict[str, dict[str, float]]:
    from ondevice.cascade.confidence import _LABEL, _words

    if known is None:
        from spellchecker import SpellChecker

        known = SpellChecker().word_frequency.dictionary
    out = {}
    for r in rows:
        paras = [p for p in r["request"].strip().split("\n\n") if p.strip()]
        sw = _words(_LABEL.sub("", paras[-1].strip()) if len(paras) > 1 else r["request"])
        ow = _words(r["device_text"])
        unknown = {w for w in sw if w.isalpha() and w not in known}
        out[r["id"]] = {"kept_unknown": sum(w in set(ow) for w in unknown) / len(unknown) if unknown else 0.0,
                        "new_unknown": sum(w.isalpha() and w not in known and w not in set(sw) for w in ow)
                        / len(ow) if ow else 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="/tmp/ondevice-cascade-bench-answers.jsonl", help="cascade_bench's cache")
    ap.add_argument("--retest", default=None, metavar="FILE", help="the same items' answers made again (same format)")
    ap.add_argument("--make-retest", action="store_true", help="first make --retest FILE: the device answers "
                                                              "again, each from an empty KV cache (minutes)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--cloud-model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--resplits", type=int, default=60)
    ap.add_argument("--device-adapter", default=None, metavar="FILE.gguf",
                    help="the adapted device's answers (cascade_bench.py --device-adapter FILE made them)")
    ap.add_argument("--margins", action="store_true", help="section 7 (loads the device model, a few minutes)")
    ap.add_argument("--self-consistency", type=int, default=0, metavar="K", help="section 8: K sampled answers "
                                                                                 "per item (made once, minutes)")
    ap.add_argument("--sc-temp", type=float, default=0.7)
    ap.add_argument("--sc-file", default="/tmp/ondevice-cascade-samples.jsonl")
    ap.add_argument("--spelling", action="store_true", help="section 9 (needs pyspellchecker)")
    ap.add_argument("--vocab-words", action="store_true", help="section 10: section 9 with the device model's own "
                                                               "vocabulary as the word list (no dependency)")
    args = ap.parse_args()
    if args.make_retest:
        if not args.retest:
            ap.error("--make-retest needs --retest FILE (where to write the answers)")
        make_retest(args, args.retest)
    rows, n = load_rows(args, args.rows), args.resplits
    dev = [r for r in rows if r["split"] == "dev"]
    test = [r for r in rows if r["split"] == "test"]

    print(f"== 1. where the cloud's advantage is ({len(rows)} items; gain = cloud - device, points of 0..1)")
    print(f"{'task':22s} {'metric':14s}  n  dev/test  device  cloud  cloud wins  device wins  cloud's net gain")
    total = sum(gain(r) for r in rows)
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        g = [gain(r) for r in rs]
        print(f"{task:22s} {rs[0]['metric']:14s} {len(rs):3d}  {sum(r['split'] == 'dev' for r in rs):3d}/"
              f"{sum(r['split'] == 'test' for r in rs):<3d}  {np.mean([r['device_score'] for r in rs]):6.3f} "
              f"{np.mean([r['cloud_score'] for r in rs]):6.3f} {sum(x > 0 for x in g):11d} {sum(x < 0 for x in g):12d}"
              f"  {sum(g):6.2f} ({sum(g) / total:.0%})")

    print(f"\n== 2. over- or underfitting (the fixed split: {len(dev)} dev, {len(test)} test)")
    comb = fit_combiner(dev)
    print(f"default combiner (l2 {comb.meta['l2']} by CV on dev): at 40% deferred "
          f"{of40(dev, confidences(dev, comb))[0]:.1%} of cloud-only on its own dev items, {of40(test, confidences(test, comb))[0]:.1%} on test")
    for l2 in (0.1, 1.0, 10.0, 100.0, 1000.0):
        def fixed(d, t, l2=l2):
            ds, cs = [r["device_score"] for r in d], [r["cloud_score"] for r in d]
            c = Combiner.fit([row_features(r) for r in d], labels_for(ds, cs), weights=weights_for(ds, cs), l2=l2)
            return confidences(t, c)
        print(line(f"penalty held at l2 = {l2:g}, {n} re-splits", over_splits(rows, fixed, n)))
    print(line(f"penalty by CV on dev (default), {n} re-splits", over_splits(rows, default, n)))

    print("\n== 3. do the features carry the signal?")
    for name, feats in (("text features", TEXT_FEATURES), ("tokens + text", FEATURES)):
        c = fit_combiner(rows, features=feats)
        print(f"in-sample ceiling, {name}: fitted on all {len(rows)} items and drawn on them: "
              f"{of40(rows, confidences(rows, c))[0]:.1%} of cloud-only at 40% (l2 {c.meta['l2']})")
    from scipy.stats import spearmanr

    g = [gain(r) for r in rows]
    feats = {r["id"]: row_features(r) for r in rows}
    print("rank correlation with the gain of deferring: " + ", ".join(
        f"{f} {spearmanr([feats[r['id']][f] for r in rows], g)[0]:+.2f}" for f in FEATURES))

    print("\n== 4. is the dev split too small? (re-splits, the rest drawn)")
    for n_dev in (27, 54, 81, 108):
        print(line(f"{n_dev} dev items, {len(rows) - n_dev} drawn", over_splits(rows, default, n, n_dev)))

    print("\n== 5. per-task stakes from the request's instruction")
    print(line("P(worse) x instruction stake (k=3)", over_splits(rows, staked(), n)))
    print(paired("P(worse) x instruction stake (k=3)", rows, staked(), default, n))

    print("\n== 6. is the metric noisy?")
    from ondevice.eval.metrics import rouge_l

    items = {it.id: it for it in cascade_bench.load_items(None)}
    soft = [r | {"device_score": rouge_l(r["device_text"], items[r["id"]].target),
                 "cloud_score": rouge_l(r["cloud_text"], items[r["id"]].target)}
            if r["metric"] == "exact_match" else r for r in rows]
    c = deferral_curve([r for r in soft if r["split"] == "test"], default([r for r in soft if r["split"] == "dev"],
                                                                           [r for r in soft if r["split"] == "test"]))
    print(f"exact-match tasks scored by ROUGE-L: random {at_share(c, 0.4, 'random')['of_cloud']:.1%}, oracle "
          f"{at_share(c, 0.4, 'oracle')['of_cloud']:.1%} at 40% (fixed split)")
    print(line("  default combiner, re-splits", over_splits(soft, default, n)))
    if args.retest:
        again = {r["id"]: r for r in load_rows(args, args.retest)}
        both = [r for r in rows if r["id"] in again]
        flips = [abs(r["device_score"] - again[r["id"]]["device_score"]) for r in both]
        changed = sum(r["device_text"] != again[r["id"]]["device_text"] for r in both)
        print(f"retest ({args.retest}): {changed} of {len(both)} device answers differ; {sum(f > 0 for f in flips)} "
              f"item scores move (mean |change| {np.mean(flips):.3f}, {sum(f >= 0.99 for f in flips)} flip 0 <-> 1); "
              f"device-only {np.mean([r['device_score'] for r in both]):.3f} -> "
              f"{np.mean([again[r['id']]['device_score'] for r in both]):.3f}")
        rerows = [again[r["id"]] for r in both]
        print(line("  default combiner on the retest answers", over_splits(rerows, default, n)))
        # the oracle of one run of the device applied to the other: how much of the oracle is the noise
        by_first = sorted(range(len(both)), key=lambda i: -gain(both[i]))
        first = set(by_first[: round(0.4 * len(both))])
        q = np.mean([gain(rerows[i]) if i in first else 0.0 for i in range(len(both))])
        print(f"  the first run's oracle order applied to the retest answers: "
              f"{(np.mean([r['device_score'] for r in rerows]) + q) / np.mean([r['cloud_score'] for r in rerows]):.1%}"
              f" of cloud-only at 40% (all items)")

    if args.margins:
        print("\n== 7. token features the generator does not record (teacher-forced), added to the text features")
        extra = margins(args, rows)
        merged = {i: feats[i] | extra[i] for i in feats}
        for name, more in (("+ margins", ["mean_margin", "min_margin", "tied_share"]),
                           ("+ first 4 tokens", ["first4_margin", "first4_top10_entropy"]),
                           ("+ top-10 entropy", ["top10_entropy"])):
            m = logistic(list(TEXT_FEATURES) + more, merged)
            print(line(name, over_splits(rows, m, n)))
            print(paired(name, rows, m, default, n))

    for flag, title, extra_of, groups in (
            (args.self_consistency, (f"8. self-consistency: {args.self_consistency} answers sampled at temp "
                                     f"{args.sc_temp}, agreement with the greedy answer"), lambda: agreement(rows, samples(args, rows)),
             (("+ exact agreement", ["sc_exact"]), ("+ bigram F1 agreement", ["sc_f1"]),
              ("+ both", ["sc_exact", "sc_f1"]))),
            (args.spelling, "9. unknown words (pyspellchecker's English list) kept from the message or added",
             lambda: spelling(rows), (("+ kept unknown", ["kept_unknown"]),
                                      ("+ kept and new unknown", ["kept_unknown", "new_unknown"]))),
            (args.vocab_words, "10. words with no whole-word token in the device's own vocabulary, kept or added",
             lambda: spelling(rows, vocabulary_words()), (("+ kept unknown", ["kept_unknown"]),
                                                              ("+ kept and new unknown", ["kept_unknown", "new_unknown"])))):
        if not flag:
            continue
        print(f"\n== {title}, added to the text features")
        extra = extra_of()
        merged = {i: feats[i] | extra[i] for i in feats}
        for name, more in groups:
            m = logistic(list(TEXT_FEATURES) + more, merged)
            print(line(name, over_splits(rows, m, n)))
            print(paired(name, rows, m, default, n))


if __name__ == "__main__":
    main()
