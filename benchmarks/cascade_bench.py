"""Device -> cloud cascade: quality vs share deferred, and what the cascade costs when nothing is deferred.

Device: SmolLM2-135M-Instruct (in this process). Cloud: a REAL second server on loopback, ``ondevice serve -m
qwen2.5-coder-0.5b-instruct`` (the ``[coder]`` extra), reached over HTTP with the openai client.

Part 1, the deferral curve: every item of the ``rewrite`` suite and the rewrite/summary tasks of
``assistant-en`` is answered by both tiers (greedy). The confidence combiner is fitted on the dev split
(40% of the items, by a hash of their id) and the curves are drawn on the test split only. Printed: score
at 40% deferred vs cloud-only, the area under the curve for our confidence vs random vs the oracle, the
uncalibrated exp(mean logprob) for reference, and the streaming trade-off (confidence from the first N
tokens only: the AUC it keeps, and the first-token delay it costs, N x the device's time per token).

Part 2, overhead when nothing is deferred: two ``ondevice serve`` processes of the device model, one plain
and one with ``--cascade URL --cascade-threshold 0`` (scores every answer, defers none), answer the same
requests in alternating order per round; the ratio of their latencies is the cascade's cost (goal <= 1.05).
Streaming TTFT is compared the same way (the cascade buffers --cascade-prefix-tokens first).

Both tiers' answers are cached (``--rows``, keyed by each model file's sha256 and max_tokens), so refitting,
new features and redrawing the curves cost no generation. The curve part prints the combiner as fitted now
(text features, weighted), tokens + text, the token-only combiner of before, exp(mean logprob), random and
the oracle; ``--resplits N`` refits on N random dev/test splits for the spread.

    python benchmarks/cascade_bench.py                       # all items, 3 overhead rounds
    python benchmarks/cascade_bench.py --limit 60 --rounds 2 # bounded (a shared CPU)
    python benchmarks/cascade_bench.py --max-tokens 48 --threads 1 --skip-overhead --resplits 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ASSISTANT_TASKS = ("rewrite_fix", "rewrite_tone", "rewrite_shorten", "notification_summary")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, threads: int = 2, slots: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, ONDEVICE_ACCESS_LOG="0", ONDEVICE_SUPERVISED="1")  # no supervisor: a kill hits it
    p = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "serve", "--port", str(port), "-np", str(slots), "-c", "2048",
                          "-t", str(threads), "--no-embeddings", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if p.poll() is not None:
            sys.exit(f"server {args} exited: {p.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return p, url
        except OSError:
            time.sleep(0.5)
    p.kill()
    sys.exit(f"server {args} did not start")


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()


def load_items(limit: int | None):
    from ondevice.eval.suites import load_suite, stratified_subset

    items = load_suite("rewrite").items + [it for it in load_suite("assistant-en").items
                                           if it.task in ASSISTANT_TASKS]
    return stratified_subset(items, limit, 0) if limit else items


class Cloud:
    """The cloud tier's server, started on first use (a run whose cloud answers are all cached needs none)."""

    def __init__(self, args):
        self.args, self.proc, self._url = args, None, args.cloud_url

    def url(self) -> str:
        if self._url is None:
            self.proc, self._url = start_server("-m", self.args.cloud_model, threads=self.args.threads,
                                                slots=self.args.cloud_slots)
        return self._url

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def answers(args, items, cloud: Cloud) -> list[dict]:
    """Both tiers' answers to every item: from the cache (``--rows``) where they were made from the same model
    files (sha256) and max_tokens, else generated and appended to it item by item (a killed run resumes).
    Scores are recomputed from the texts on every run, so refitting, new features or a metric change need
    no new answers."""
    from concurrent.futures import ThreadPoolExecutor

    import ondevice
    from ondevice.cascade.cloud import CloudClient
    from ondevice.eval.cascade_curve import cloud_answer, device_answer, make_row
    from ondevice.models.catalog import resolve
    from ondevice.models.store import cached_sha256

    device = {"sha256": cached_sha256(resolve(None).path)[:16], "max_tokens": args.max_tokens}
    if args.device_adapter:  # a LoRA on the device model (e.g. benchmarks/cascade_adapt.py's): its own answers
        device["adapter"] = cached_sha256(Path(args.device_adapter))[:16]
    # a --cloud-url's answers are that endpoint's, not --cloud-model's: cached under its address
    cloud_key = ({"url": args.cloud_url} if args.cloud_url
                 else {"sha256": cached_sha256(resolve(args.cloud_model).path)[:16]})
    keys = {"device": device, "cloud": {**cloud_key, "max_tokens": args.max_tokens}}
    path = Path(args.rows)
    cache: dict[str, dict] = {}
    if path.is_file() and not args.fresh:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            for tier, key in keys.items():
                if isinstance(e.get(tier), dict) and e[tier].get("key") == key:
                    cache.setdefault(e["id"], {})[tier] = e[tier]
    todo = {tier: [it for it in items if tier not in cache.get(it.id, {})] for tier in keys}
    print(f"cache {path}: {len(todo['device'])} device and {len(todo['cloud'])} cloud answers of {len(items)} "
          f"to make", file=sys.stderr)
    if todo["device"] or todo["cloud"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        adapters = (args.device_adapter,) if args.device_adapter else ()
        model = ondevice.load(None, n_threads=args.threads, adapters=adapters) if todo["device"] else None
        client = CloudClient(cloud.url(), timeout=600) if todo["cloud"] else None
        t0 = time.perf_counter()
        # cloud requests run alongside the device (its latencies then include sharing the cloud's slots)
        with ThreadPoolExecutor(max_workers=args.cloud_slots) as pool, path.open("a", encoding="utf-8") as f:
            pending = {it.id: pool.submit(cloud_answer, client, it, args.max_tokens) for it in todo["cloud"]}
            try:
                need = {it.id for tier in todo.values() for it in tier}
                for i, it in enumerate(it for it in items if it.id in need):
                    got = cache.setdefault(it.id, {})
                    if "device" not in got:
                        got["device"] = {**device_answer(model, it, args.max_tokens), "key": keys["device"]}
                    if it.id in pending:
                        got["cloud"] = {**pending[it.id].result(), "key": keys["cloud"]}
                    f.write(json.dumps({"id": it.id, **got}, ensure_ascii=False) + "\n")
                    f.flush()
                    print(f"  [{i + 1}] {it.id}", file=sys.stderr)
            finally:
                for fut in pending.values():
                    fut.cancel()
                if client is not None:
                    client.close()
                if model is not None:
                    model.close()
        print(f"answered in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return [make_row(it, cache[it.id]["device"], cache[it.id]["cloud"]) for it in items]


def curve_part(args, cloud: Cloud) -> dict:
    from ondevice.cascade.confidence import FEATURES, TOKEN_FEATURES, GeometricMean, labels_for, roc_auc
    from ondevice.errors import InvalidArgument
    from ondevice.eval.cascade_curve import at_share, confidences, deferral_curve, fit_combiner

    rows = answers(args, load_items(args.limit), cloud)
    dev = [r for r in rows if r["split"] == "dev" and r["cloud_score"] is not None]
    test = [r for r in rows if r["split"] == "test" and r["cloud_score"] is not None]
    meta = {"suite": "rewrite+assistant-en(rewrite,summary)", "split": "dev", "max_tokens": args.max_tokens}
    try:
        comb = fit_combiner(dev, meta=meta)
    except InvalidArgument as e:  # too few dev items (a small --limit): said, not a traceback
        sys.exit(f"cascade_bench: {e}; give a larger --limit, or none")
    if args.save_combiner:
        print(f"combiner saved to {comb.save(args.save_combiner)}", file=sys.stderr)
    # the same dev rows, other feature sets: tokens and text together, and tokens only, unweighted (the
    # combiner before the text features)
    combiners = {"combiner": comb, "tokens + text": fit_combiner(dev, features=FEATURES),
                 "old (tokens only)": fit_combiner(dev, features=TOKEN_FEATURES, weighted=False),
                 "exp(mean logprob)": GeometricMean()}
    confs = {name: confidences(test, c) for name, c in combiners.items()}
    curves = {name: deferral_curve(test, conf) for name, conf in confs.items()}
    labels = labels_for([r["device_score"] for r in test], [r["cloud_score"] for r in test])
    main = curves["combiner"]
    a40 = at_share(main, 0.4)
    print(f"\n== deferral curve on the test split: {len(test)} items (cloud latencies with {args.cloud_slots} "
          f"requests sharing it) ({len(dev)} dev items fitted the combiner, l2 {comb.meta['l2']}, "
          f"dev ROC AUC {comb.meta['dev_auc']:.3f}); {sum(r['cloud_score'] is None for r in rows)} cloud errors")
    print(f"device-only {main['device_score']:.4f}   cloud-only {main['cloud_score']:.4f}   "
          f"(device {main['device_latency_s'] * 1e3:.0f} ms/request, cloud {main['cloud_latency_s'] * 1e3:.0f} ms)")
    r40, o40 = at_share(main, 0.4, "random"), at_share(main, 0.4, "oracle")
    print(f"{'random':20s} at 40% deferred: {r40['quality']:.4f} = {r40['of_cloud']:6.1%} of cloud-only; "
          f"curve area {main['auc']['random']:.4f}")
    print(f"{'oracle':20s} at 40% deferred: {o40['quality']:.4f} = {o40['of_cloud']:6.1%} of cloud-only; "
          f"curve area {main['auc']['oracle']:.4f}")
    for name, c in curves.items():
        a = at_share(c, 0.4)
        gain = "-" if c["auc_gain"] is None else f"{c['auc_gain']:.3f}"
        print(f"{name:20s} at 40% deferred: {a['quality']:.4f} = {a['of_cloud']:6.1%} of cloud-only; "
              f"curve area {c['auc']['confidence']:.4f} (gain over random, of the oracle's: {gain}); "
              f"ROC AUC {roc_auc(confs[name], labels):.3f}")
    def reach(c: dict, name: str = "confidence") -> str:
        best = min((s for s, q in zip(c["shares"], c[name]["quality"]) if q >= 0.95 * c["cloud_score"]), default=None)
        return "never" if best is None else f"{best:.0%}"

    print("smallest share deferred reaching 95% of cloud-only: "
          + ", ".join(f"{name} {reach(c)}" for name, c in curves.items()) + f", random {reach(main, 'random')}, "
          f"oracle {reach(main, 'oracle')}")
    print(f"at 40%: {a40['latency_s'] * 1e3:.0f} ms/request mean, {a40['cloud_tokens']} cloud tokens "
          f"(100%: {main['confidence']['cloud_tokens'][-1]})")
    share, of_cloud = served(test, confs["combiner"], comb.threshold_for(0.4))
    print(f"served with --cascade-defer-share 0.4 (threshold {comb.threshold_for(0.4):.4g}, from dev): deferred "
          f"{share:.1%} of the test items, {of_cloud:.1%} of cloud-only")
    print("  deferred  combiner  old (tokens)  random  oracle   (% of cloud-only)  ms/request")
    old = curves["old (tokens only)"]
    def pct(q: float) -> float:
        return q / main["cloud_score"]

    for i in range(0, len(main["shares"]), 2):
        print(f"  {main['shares'][i]:7.0%}  {pct(main['confidence']['quality'][i]):8.1%}  "
              f"{pct(old['confidence']['quality'][i]):12.1%}  {pct(main['random']['quality'][i]):6.1%}  "
              f"{pct(main['oracle']['quality'][i]):6.1%}  {main['confidence']['latency_s'][i] * 1e3:28.0f}")
    print("combiner weights (standardised features): "
          + ", ".join(f"{f} {w:+.3g}" for f, w in zip(comb.features, comb.weights)))
    if args.resplits:
        resplits(args.resplits, [r for r in rows if r["cloud_score"] is not None], len(dev))
    tok_s = statistics.median(r["device_s"] / max(1, r["device_tokens"]) for r in rows)
    print("\n== streaming: decide on the first N tokens (combiner refitted on dev prefixes)")
    print(f"   N   AUC gain  at 40% of cloud   first-token delay (N x {tok_s * 1e3:.1f} ms/token, device)")
    for n in (4, 8, 16, 32):
        cp = fit_combiner(dev, prefix=n)
        c = deferral_curve(test, confidences(test, cp, prefix=n))
        gain = "-" if c["auc_gain"] is None else f"{c['auc_gain']:.3f}"
        print(f"  {n:3d}  {gain:>8s}  {at_share(c, 0.4)['of_cloud']:14.1%}   {n * tok_s * 1e3:8.0f} ms")
    print(f"  all  {main['auc_gain'] if main['auc_gain'] is None else round(main['auc_gain'], 3):>8}  "
          f"{a40['of_cloud']:14.1%}   whole answer buffered")
    return {"curve": main, "combiner": comb}


def served(rows: list[dict], conf: list[float], threshold: float) -> tuple[float, float]:
    """What a server with this threshold does on ``rows``: (share deferred, score as a share of cloud-only)."""
    defer = [c < threshold for c in conf]
    score = sum(r["cloud_score"] if d else r["device_score"] for r, d in zip(rows, defer))
    return sum(defer) / len(rows), score / sum(r["cloud_score"] for r in rows)


def resplits(n: int, rows: list[dict], n_dev: int) -> None:
    """How much the figures depend on the one fixed split: refit and redraw on ``n`` random splits of the same
    items (``n_dev`` fitted, the rest drawn), same procedure each time."""
    import random

    from ondevice.cascade.confidence import FEATURES, TOKEN_FEATURES
    from ondevice.eval.cascade_curve import at_share, confidences, deferral_curve, fit_combiner

    fits = {"combiner": {}, "tokens + text": {"features": FEATURES},
            "old (tokens only)": {"features": TOKEN_FEATURES, "weighted": False}}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in fits}
    by_share = []  # the default combiner served with --cascade-defer-share 0.4: (share deferred, of cloud)
    rng = random.Random(0)
    for _ in range(n):
        order = rng.sample(rows, len(rows))
        dev, test = order[:n_dev], order[n_dev:]
        for name, kw in fits.items():
            comb = fit_combiner(dev, **kw)
            conf = confidences(test, comb)
            c = deferral_curve(test, conf)
            got[name].append((at_share(c, 0.4)["of_cloud"], c["auc_gain"]))
            if name == "combiner":
                by_share.append(served(test, conf, comb.threshold_for(0.4)))
    print(f"\n== {n} random splits ({n_dev} fitted, {len(rows) - n_dev} drawn): mean ± std")
    for name, v in got.items():
        a40, gain = [x for x, _ in v], [g for _, g in v]
        print(f"{name:20s} at 40% deferred {statistics.mean(a40):6.1%} ± {statistics.stdev(a40):.1%} of cloud-only; "
              f"AUC gain {statistics.mean(gain):.3f} ± {statistics.stdev(gain):.3f}")
    sh, q = [a for a, _ in by_share], [b for _, b in by_share]
    print(f"combiner served with --cascade-defer-share 0.4: deferred {statistics.mean(sh):.1%} ± "
          f"{statistics.stdev(sh):.1%} of the drawn items, {statistics.mean(q):.1%} ± {statistics.stdev(q):.1%} "
          f"of cloud-only")


def _timed(url: str, msgs: list, max_tokens: int, stream: bool) -> tuple[float, dict | None, float | None]:
    """(seconds to the whole reply, or to the first content token when streaming; the cascade info; the
    server's own seconds from arrival to the last token, non-streaming)."""
    body = json.dumps({"messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        if not stream:
            d = json.loads(r.read())
            tm = d.get("timings") or {}
            return time.perf_counter() - t0, d.get("cascade"), (tm.get("ttft_ms", 0) + tm.get("predicted_ms", 0)) / 1e3
        first, info = None, None
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            if first is None and d.get("choices") and d["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            info = d.get("cascade") or info
        return first or (time.perf_counter() - t0), info, None


def stats_part(args) -> None:
    """In-process: the device's decode with and without per-token statistics (the confidence's only per-token
    cost), same prompt, alternating order; then the time to compute an answer's features (once per answer)."""
    import ondevice
    from ondevice.cascade.confidence import TokenStats
    from ondevice.engine.records import Sampling

    m = ondevice.load(None, n_threads=args.threads)
    msgs = load_items(None)[0].messages()
    per = {False: [], True: []}
    try:
        for rep in range(2 * args.rounds):
            for ts in ((False, True) if rep % 2 == 0 else (True, False)):
                m.reset()
                t0 = time.perf_counter()
                gen = list(m.stream(msgs, sampling=Sampling(temp=0, max_tokens=args.overhead_tokens,
                                                            ignore_eos=True, token_stats=ts)))
                per[ts].append((time.perf_counter() - t0) / len(gen))
                answer_s = gen[-1].t
    finally:
        m.close()
    ratios = [a / b for a, b in zip(per[True], per[False])]
    print(f"\n== per-token statistics in the decode loop (library, {args.overhead_tokens} tokens x {len(ratios)}): "
          f"{statistics.median(per[False]) * 1e3:.2f} -> {statistics.median(per[True]) * 1e3:.2f} ms/token, "
          f"median ratio {statistics.median(ratios):.3f}")
    stats = TokenStats(msgs)
    for g in gen:
        stats.add(g)
    t0 = time.perf_counter()
    for _ in range(200):
        stats.features()
    feat_s = (time.perf_counter() - t0) / 200
    print(f"features of one {len(gen)}-token answer (tokens and text): {feat_s * 1e6:.0f} us = "
          f"{feat_s / answer_s:.3%} of the answer's {answer_s * 1e3:.0f} ms")


def overhead_part(args, cloud_url: str) -> None:
    items = load_items(None)[: args.requests]
    plain, plain_url = start_server(threads=args.threads)
    casc, casc_url = start_server("--cascade", cloud_url, "--cascade-threshold", "0", threads=args.threads)
    try:
        for url in (plain_url, casc_url):  # warm both (first request pages weights in)
            _timed(url, items[0].messages(), 8, False)
        for stream in (False, True):
            ratios, pairs, server, deferred = [], [], [], 0
            for rnd in range(args.rounds):
                tot = {plain_url: 0.0, casc_url: 0.0}
                for i, it in enumerate(items):
                    order = (plain_url, casc_url) if (rnd + i) % 2 == 0 else (casc_url, plain_url)
                    got, srv = {}, {}
                    for url in order:
                        got[url], info, srv[url] = _timed(url, it.messages(), args.overhead_tokens, stream)
                        if url == casc_url:
                            deferred += bool(not info or info.get("tier") != "device" or info.get("deferred"))
                    tot[plain_url] += got[plain_url]
                    tot[casc_url] += got[casc_url]
                    pairs.append(got[casc_url] / got[plain_url])
                    if srv[plain_url]:
                        server.append(srv[casc_url] / srv[plain_url])
                ratios.append(tot[casc_url] / tot[plain_url])
            what = "TTFT (streaming, prefix buffered)" if stream else "latency (non-streaming)"
            print(f"\n== overhead when nothing is deferred: {what}, {len(items)} requests x {args.rounds} rounds, "
                  f"max_tokens {args.overhead_tokens}")
            print(f"cascade / plain per round: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}"
                  f"; median of per-request ratios {statistics.median(pairs):.3f}; deferred {deferred}"
                  + (f"; server-side generation time ratio (median) {statistics.median(server):.3f}" if server else ""))
    finally:
        stop(plain)
        stop(casc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cloud-model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--limit", type=int, default=None, help="a stratified subset of the items (default: all)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cloud-slots", type=int, default=3, help="cloud requests in flight while the device answers "
                                                               "(the cloud's latencies then include sharing it)")
    ap.add_argument("--rounds", type=int, default=3, help="overhead rounds")
    ap.add_argument("--requests", type=int, default=8, help="requests per overhead round")
    ap.add_argument("--overhead-tokens", type=int, default=48)
    ap.add_argument("--rows", default="/tmp/ondevice-cascade-bench-answers.jsonl",
                    help="answers cache (JSONL; an answer is reused when its model file and max_tokens match)")
    ap.add_argument("--device-adapter", default=None, metavar="FILE.gguf",
                    help="answer on the device with this LoRA adapter (benchmarks/cascade_adapt.py trains one on "
                         "the cloud's answers to other messages); its answers are cached under its own key")
    ap.add_argument("--fresh", action="store_true", help="ignore the answers cache (answer everything again)")
    ap.add_argument("--save-combiner", default=None, metavar="FILE", help="write the combiner fitted on dev here "
                                                                          "(`ondevice serve --cascade-combiner FILE`)")
    ap.add_argument("--resplits", type=int, default=0, metavar="N",
                    help="also refit and redraw on N random dev/test splits of the same items (the spread)")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--cloud-url", default=None, help="use this cloud endpoint instead of starting one (its "
                    "answers are cached under its address, apart from --cloud-model's; part 2 never defers)")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    cloud = Cloud(args)
    try:
        if not args.skip_curve:
            curve_part(args, cloud)
        if not args.skip_overhead:
            stats_part(args)
            overhead_part(args, cloud.url())
    finally:
        cloud.close()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
