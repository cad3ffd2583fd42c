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

    python benchmarks/cascade_bench.py                       # all items, 3 overhead rounds
    python benchmarks/cascade_bench.py --limit 60 --rounds 2 # bounded (a shared CPU)
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


def curve_part(args, cloud_url: str) -> dict:
    import ondevice
    from ondevice.cascade.cloud import CloudClient
    from ondevice.cascade.confidence import GeometricMean
    from ondevice.eval.cascade_curve import at_share, collect, confidences, deferral_curve, fit_combiner

    rows_file = Path(args.rows)
    items = load_items(args.limit)
    cached = {}
    if args.reuse_rows and rows_file.is_file():  # answers already collected (a resumed or re-analysed run)
        cached = {r["id"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    missing = [it for it in items if it.id not in cached]
    print(f"{len(items) - len(missing)} of {len(items)} items already answered in {rows_file}", file=sys.stderr)
    if missing:
        model = ondevice.load(None, n_threads=args.threads)
        cloud = CloudClient(cloud_url, timeout=600)
        print(f"answering {len(missing)} items: device {model.name}, cloud {cloud.model_id()}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            new = collect(model, cloud, missing, max_tokens=args.max_tokens, cloud_workers=args.cloud_slots,
                          progress=lambda m: print(m, file=sys.stderr))
        finally:
            cloud.close()
            model.close()
        print(f"answered in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cached.update((r["id"], r) for r in new)
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in cached.values()))
    rows = [cached[it.id] for it in items]
    dev = [r for r in rows if r["split"] == "dev" and r["cloud_score"] is not None]
    test = [r for r in rows if r["split"] == "test" and r["cloud_score"] is not None]
    comb = fit_combiner(dev, meta={"suite": "rewrite+assistant-en(rewrite,summary)", "split": "dev"})
    main = deferral_curve(test, confidences(test, comb))
    geo = deferral_curve(test, confidences(test, GeometricMean()))
    a40 = at_share(main, 0.4)
    print(f"\n== deferral curve on the test split: {len(test)} items (cloud latencies with {args.cloud_slots} "
          f"requests sharing it) ({len(dev)} dev items fitted the combiner, "
          f"dev ROC AUC {comb.meta['dev_auc']:.3f}); {sum(r['cloud_score'] is None for r in rows)} cloud errors")
    print(f"device-only {main['device_score']:.4f}   cloud-only {main['cloud_score']:.4f}   "
          f"(device {main['device_latency_s'] * 1e3:.0f} ms/request, cloud {main['cloud_latency_s'] * 1e3:.0f} ms)")
    for name, c in (("combiner", main), ("exp(mean logprob)", geo)):
        a = at_share(c, 0.4)
        r40 = at_share(c, 0.4, "random")
        o40 = at_share(c, 0.4, "oracle")
        print(f"{name:18s} at 40% deferred: {a['quality']:.4f} = {a['of_cloud']:.1%} of cloud-only "
              f"(random {r40['quality']:.4f} = {r40['of_cloud']:.1%}, oracle {o40['quality']:.4f}); "
              f"AUC {c['auc']['confidence']:.4f} vs random {c['auc']['random']:.4f} vs oracle "
              f"{c['auc']['oracle']:.4f} (gain {c['auc_gain'] if c['auc_gain'] is None else round(c['auc_gain'], 3)})")
    best = min((s for s, q in zip(main["shares"], main["confidence"]["quality"]) if q >= 0.95 * main["cloud_score"]),
               default=None)
    print(f"smallest share deferred reaching 95% of cloud-only (combiner): "
          f"{'never' if best is None else f'{best:.0%}'}")
    print(f"at 40%: {a40['latency_s'] * 1e3:.0f} ms/request mean, {a40['cloud_tokens']} cloud tokens "
          f"(100%: {main['confidence']['cloud_tokens'][-1]})")
    print("  deferred  combiner  random  oracle  ms/request")
    for i in range(0, len(main["shares"]), 2):
        print(f"  {main['shares'][i]:7.0%}  {main['confidence']['quality'][i]:8.4f}  {main['random']['quality'][i]:6.4f}"
              f"  {main['oracle']['quality'][i]:6.4f}  {main['confidence']['latency_s'][i] * 1e3:10.0f}")
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
    cost), same prompt, alternating order."""
    import ondevice
    from ondevice.engine.records import Sampling

    m = ondevice.load(None, n_threads=args.threads)
    msgs = load_items(None)[0].messages()
    per = {False: [], True: []}
    try:
        for rep in range(2 * args.rounds):
            for ts in ((False, True) if rep % 2 == 0 else (True, False)):
                m.reset()
                t0 = time.perf_counter()
                n = sum(1 for _ in m.stream(msgs, sampling=Sampling(temp=0, max_tokens=args.overhead_tokens,
                                                                    ignore_eos=True, token_stats=ts)))
                per[ts].append((time.perf_counter() - t0) / n)
    finally:
        m.close()
    ratios = [a / b for a, b in zip(per[True], per[False])]
    print(f"\n== per-token statistics in the decode loop (library, {args.overhead_tokens} tokens x {len(ratios)}): "
          f"{statistics.median(per[False]) * 1e3:.2f} -> {statistics.median(per[True]) * 1e3:.2f} ms/token, "
          f"median ratio {statistics.median(ratios):.3f}")


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
    ap.add_argument("--rows", default="/tmp/ondevice-cascade-bench-rows.jsonl", help="answers cache")
    ap.add_argument("--reuse-rows", action="store_true", help="reuse the answers cache instead of asking again")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--cloud-url", default=None, help="use this cloud endpoint instead of starting one (part 2 "
                                                      "never defers, so any URL serves there)")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    cloud, cloud_url = (None, args.cloud_url) if args.cloud_url else start_server(
        "-m", args.cloud_model, threads=args.threads, slots=args.cloud_slots)
    try:
        if not args.skip_curve:
            curve_part(args, cloud_url)
        if not args.skip_overhead:
            stats_part(args)
            overhead_part(args, cloud_url)
    finally:
        if cloud is not None:
            stop(cloud)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
