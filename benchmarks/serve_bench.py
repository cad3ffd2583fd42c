"""Serving throughput and latency: `ondevice serve` vs llama-cpp-python's server vs llama.cpp's llama-server.

In one run, over loopback, same model file and thread count:
  * N concurrent streaming /v1/completions requests (the same prompt, or with --distinct-prompts one per stream; 128 tokens each, EOS ignored) for N in
    --streams: aggregate decode tok/s (after each stream's first token), end-to-end tok/s (every token over
    the time from sending the burst to its last token), p50/p99 TTFT and inter-token latency (ITL) per server;
  * llama-batched-bench at the same batch sizes: the kernel limit (S_TG t/s);
  * TTFT with a repeated long system prompt (prefix cache) vs a cold one.

Usage: python benchmarks/serve_bench.py [--model PATH] [--threads 2] [--streams 1,2,4,8,16] [--tokens 128]
                                        [--rounds 3] [--skip llama-cpp-python] [--route native]
All servers run at once (idle ones cost nothing) and take turns, round by round, so host drift hits each alike.
Peers are optional: a peer that cannot start is reported as missing, not faked. ondevice, llama-server and
llama-batched-bench use the same extra CPU kernels (``peers.kernel_match``); llama-cpp-python's server has no
switch for them, so it is skipped where it would load unproven AMX kernels, and noted where its kernels differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from itertools import pairwise
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def default_model() -> str:
    from ondevice.models import resolve

    return str(resolve(None).path)  # the catalog's default model, as the other benchmarks take it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, extra: dict):
        self.name, self.cmd, self.port, self.extra = name, cmd, port, extra
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def __enter__(self):
        self.log_path = f"/tmp/serve_bench_{self.name.replace(' ', '_')}_{self.port}.log"  # one per server
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 180
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start within 180 s")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


NATIVE = False  # --route native: llama-server's own /completion (its stream: an object per token, no [DONE])


async def one_stream(client: httpx.AsyncClient, srv: Server, prompt: str, tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, **srv.extra}
    if NATIVE:
        body["n_predict"] = body.pop("max_tokens")
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", srv.url + ("/completion" if NATIVE else "/v1/completions"), json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{srv.name}: HTTP {r.status_code} {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if NATIVE:  # an object per token; the last (stop: true) carries no text
                text = d.get("content") if isinstance(d, dict) and not d.get("stop") else None
            else:
                ch = d.get("choices") or []
                text = ch[0].get("text") if ch else None
            if text:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "n": len(stamps),
            "itl": [b - a for a, b in pairwise(stamps)], "end": stamps[-1] if stamps else t0, "t0": t0}


async def load(srv: Server, n: int, tokens: int, distinct: bool = False) -> dict:
    """``n`` streams at once; all with the same prompt, or (``distinct``) each with its own first tokens, fresh
    every round, so that no server can share a prompt's prefill across streams or rounds."""
    limits = httpx.Limits(max_connections=64)
    prompts = [f"({uuid.uuid4().hex[:8]}) {PROMPT}" if distinct else PROMPT for _ in range(n)]
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(client, srv, PROMPT, 8)  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, srv, p, tokens) for p in prompts))
        wall = max(r["end"] for r in res) - t0
    gen = sum(r["n"] for r in res)
    itl = [x for r in res for x in r["itl"]]
    ttft = [r["ttft"] for r in res]
    # decode rate: tokens after each stream's first, over the time from the first first-token to the last token
    first = min(r["t0"] + r["ttft"] for r in res)
    # end to end: every token over the time from sending the requests to the last token (admission and prefill
    # included: how long a burst of n requests takes, whichever stream a server starts first)
    return {"streams": n, "tokens": gen, "wall": wall, "e2e_tok_s": gen / max(1e-9, wall),
            "tok_s": (gen - n) / max(1e-9, max(r["end"] for r in res) - first),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


# llama-server's default, given: knobs `ondevice fit --knobs` kept for the model file would otherwise apply to ondevice
NO_KNOBS = ("-fa", "auto")


def one_of_each(model: str, threads: int, skip: str = "", ctx: int = 2048, flags: tuple[str, ...] = ()) -> list[Server]:
    """`ondevice serve` and llama-server `--jinja` (when built) on ``model``, one slot each, with the same CPU
    kernels (``peers.kernel_match``): the pair the client-compatibility scripts send the same requests to.
    ``flags``: more flags both take (``--slot-save-path DIR``)."""
    from peers import kernel_match, tool_path

    km = kernel_match(model)
    km.apply()  # ondevice serve (a child) reads ONDEVICE_AMX / ONDEVICE_REPACK
    print(f"# {km.describe()}")
    common = ["-m", model, "-t", str(threads), "-np", "1", "-c", str(ctx), *flags]
    port = free_port()
    servers = [Server("ondevice", [sys.executable, "-m", "ondevice.cli", "serve", *common, "--port", str(port),
                                   "--no-embeddings", *NO_KNOBS], port, {})]
    if "llama-server" not in skip:
        exe = tool_path("llama-server")
        if exe.exists():
            port = free_port()
            servers.append(Server("llama-server", [str(exe), *common, "--port", str(port), "--jinja", km.server_flag],
                                  port, {}))
        else:
            print(f"# llama-server not built ({exe}); run python benchmarks/peers.py build to compare")
    return servers


def compare_table(argv, doc: str, default_model: str, columns: str, cases: list, row) -> int:
    """The main of a client-compatibility script: ``--model/--threads/--skip``, :func:`one_of_each`, then one
    table row per case, server and stream (non-streamed, streamed): ``row(client, case, stream)`` gives the
    cells after ``| request | stream | server |`` (``columns`` names them); an API error is a row too."""
    import openai

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default=default_model, help="catalog name or .gguf path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of servers to leave out (llama-server)")
    a = ap.parse_args(argv)
    from ondevice.models import resolve

    model = str(resolve(a.model).path)
    servers = one_of_each(model, a.threads, a.skip)
    print(f"# {Path(model).name}, {a.threads} thread(s), greedy; load average {os.getloadavg()[0]:.2f} at start")
    print(f"| request | stream | server | {columns} |")
    print("|---" * (3 + columns.count("|") + 1) + "|")
    for srv in servers:
        with srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
            for case in cases:
                for stream in (False, True):
                    try:
                        cells = row(client, case, stream)
                    except openai.OpenAIError as e:
                        cells = f"error | {type(e).__name__}: {str(e)[:110]}"
                    print(f"| {case[0]} | {stream} | {srv.name} | {cells} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def merge(runs: list[dict]) -> dict:
    """Several rounds of one load: the median round by aggregate tok/s (its latencies come with it)."""
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


async def prefix_ttft(srv: Server, reps: int = 3) -> tuple[float, float]:
    """Median TTFT with a fresh ~600-token system prompt (cold) vs the same one again (warm)."""
    system = " ".join(f"Rule {i}: answer politely and cite the store policy number {i}." for i in range(50))
    cold, warm = [], []
    # a new connection per request: llama-server sometimes closes a kept-alive one as the next request goes out
    # ("Server disconnected without sending a response"), which once cost a whole run its figures
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(reps):
            tag = uuid.uuid4().hex[:8]
            prompt = f"[{tag}] {system}\nQuestion {i}: what are your hours?\nAnswer:"
            cold.append((await one_stream(client, srv, prompt, 4))["ttft"])
            prompt2 = f"[{tag}] {system}\nQuestion {i}: do you sell gloves?\nAnswer:"
            warm.append((await one_stream(client, srv, prompt2, 4))["ttft"])
    return statistics.median(cold), statistics.median(warm)


def batched_bench(tool: Path, model: str, threads: int, npl: list[int], tokens: int,
                  repack_flag: str = "--repack") -> dict[int, float]:
    cmd = [str(tool), "-m", model, "-c", str(max(npl) * (tokens + 160)), "-b", "2048", "-ub", "512",
           "-npp", "128", "-ntg", str(tokens), "-npl", ",".join(map(str, npl)), "-t", str(threads), repack_flag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False).stdout
    res = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():  # PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG | T | S
            res[int(cells[2])] = float(cells[7])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per stream count (median is shown)")
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="each stream's prompt starts with its own random tag (no prefill shared across streams; "
                         "by default all streams send the same prompt, which ondevice prefills once for all)")
    ap.add_argument("--variant", action="append", default=[], metavar="ARGS",
                    help="also run an ondevice server with these extra serve flags (repeatable), e.g. "
                         "--variant '--prefill-batch 100000' to compare a setting with the default in one run")
    ap.add_argument("--skip", default="", help="comma list of servers to skip: ondevice,llama-cpp-python,llama-server")
    ap.add_argument("--route", choices=("openai", "native"), default="openai",
                    help="/v1/completions (default), or llama-server's own /completion on ondevice and llama-server "
                         "(llama-cpp-python's server has none: skipped)")
    args = ap.parse_args(argv)
    global NATIVE
    NATIVE = args.route == "native"
    if NATIVE:
        args.skip = ",".join(filter(None, [args.skip, "llama-cpp-python"]))
    model = args.model or default_model()
    streams = [int(x) for x in args.streams.split(",")]
    par, t = max(streams), str(args.threads)
    sys.path.insert(0, str(HERE))
    from peers import kernel_match

    from ondevice.engine.bufts import offered

    km = kernel_match(model)
    km.apply()  # ondevice serve (a child) reads ONDEVICE_AMX / ONDEVICE_REPACK
    print(km.describe(), file=sys.stderr)
    servers = []
    for extra in ["", *args.variant]:
        p = free_port()
        servers.append(Server(f"ondevice {extra}".strip(), [sys.executable, "-m", "ondevice.cli", "serve", "-m", model,
                                                            "--port", str(p), "-np", str(par), "-c", "1024", "-t", t,
                                                            "--no-embeddings", *NO_KNOBS, *extra.split()], p,
                              {"ignore_eos": True}))
    # llama-cpp-python's Llama has no switch for extra kernels: it loads all the build offers
    lcp_kernels = "+".join(offered()) or "none"
    if "AMX" in offered() and "AMX" not in km.kernels:
        print("llama-cpp-python: skipped; it would load the AMX kernels, which are not proven safe here", file=sys.stderr)
        skip_lcp = True
    else:
        skip_lcp = False
        if lcp_kernels != km.kernels:
            print(f"llama-cpp-python: note: it uses {lcp_kernels} (no switch), the others {km.kernels}", file=sys.stderr)
    p = free_port()
    servers.append(Server("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port",
                                               str(p), "--n_threads", t, "--n_threads_batch", t, "--n_ctx", "2048",
                                               "--interrupt_requests", "False"], p,
                          {"logit_bias": {"2": -100, "0": -100, "4": -100}}))  # SmolLM2's end-of-generation ids
    try:
        from peers import ensure_tool

        ls = ensure_tool("llama-server")
        bb = ensure_tool("llama-batched-bench")
    except Exception as e:  # noqa: BLE001 — peers are optional; say why one is missing
        print(f"llama.cpp tools unavailable: {e}", file=sys.stderr)
        ls = bb = None
    if ls:
        p = free_port()
        servers.append(Server("llama-server", [str(ls), "-m", model, "--port", str(p), "-np", str(par), "-c",
                                               str(par * 1024), "-cb", "-t", t, "-tb", t, km.server_flag], p,
                              {"ignore_eos": True}))
    skip = set(filter(None, args.skip.split(","))) | ({"llama-cpp-python"} if skip_lcp else set())
    results: dict[str, dict[int, dict]] = {}
    prefix: dict[str, tuple[float, float]] = {}
    with contextlib.ExitStack() as stack:
        running = []
        for srv in servers:  # all start first, then take turns: a host whose speed drifts hits each alike
            if srv.name in skip:
                continue
            try:
                running.append(stack.enter_context(srv))
            except Exception as e:  # noqa: BLE001 — a peer that cannot start is reported, not faked
                print(f"{srv.name}: {e}", file=sys.stderr)
        for n in streams:
            for rnd in range(args.rounds):
                for srv in running:
                    for attempt in (1, 2):  # a dropped connection gets one retry; then the round is missing
                        try:
                            r = asyncio.run(load(srv, n, args.tokens, args.distinct_prompts))
                            break
                        except Exception as e:  # noqa: BLE001 — one peer failing must not lose the others' figures
                            print(f"{srv.name}: n={n} round {rnd + 1} attempt {attempt}: {e}", file=sys.stderr)
                    else:
                        continue
                    r["round"] = rnd
                    results.setdefault(srv.name, {}).setdefault(n, []).append(r)
                    print(f"  {srv.name:17s} n={n:2d} round {rnd + 1}: {r['tok_s']:7.1f} tok/s", file=sys.stderr,
                          flush=True)
        for srv in running:
            try:
                prefix[srv.name] = asyncio.run(prefix_ttft(srv))
            except Exception as e:  # noqa: BLE001 — one peer failing must not lose the others' figures
                print(f"{srv.name}: prefix cache test: {e}", file=sys.stderr)
    rounds, results = results, {name: {n: merge(runs) for n, runs in rows.items()} for name, rows in results.items()}
    kernel = (batched_bench(bb, model, args.threads, sorted({1, 8, 16} | set(streams)), args.tokens, km.server_flag)
              if bb else {})

    print(f"\nmodel {Path(model).name}, {args.threads} threads, {args.tokens} tokens per stream, "
          f"{'distinct prompts' if args.distinct_prompts else 'the same prompt in every stream'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other load distorts these figures)\n")
    print(f"| {'server':17s} | streams | agg tok/s | end-to-end tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|" + "|".join("-" * w for w in (19, 9, 11, 18, 13, 13, 12, 12)) + "|")
    for name, rows in results.items():
        for n, r in rows.items():
            print(f"| {name:17s} | {n:7d} | {r['tok_s']:9.1f} | {r['e2e_tok_s']:16.1f} "
                  f"| {r['ttft_p50'] * 1e3:11.0f} | {r['ttft_p99'] * 1e3:11.0f} "
                  f"| {r['itl_p50'] * 1e3:10.1f} | {r['itl_p99'] * 1e3:10.1f} |")
    if kernel:
        print("\nllama-batched-bench S_TG (kernel limit): " + ", ".join(f"B={b}: {v:.1f} tok/s" for b, v in kernel.items()))
    print("\nratios (ondevice / peer, aggregate tok/s and TTFT p50; vs a server: median [min, max] of the per-round "
          "ratios; TTFT below 1 is faster):")
    for me in (name for name in results if name.startswith("ondevice")):
        ours = results[me]
        for n in streams:
            parts = []
            for peer in ("llama-server", "llama-cpp-python"):
                if n in ours and n in results.get(peer, {}):
                    for key, what in (("tok_s", ""), ("e2e_tok_s", " end to end"), ("ttft_p50", " TTFT p50")):
                        theirs = {r["round"]: r[key] for r in rounds[peer][n]}
                        pr = [a[key] / theirs[a["round"]] for a in rounds[me][n] if a["round"] in theirs]
                        parts.append(f"vs {peer}{what} {statistics.median(pr):.2f}x [{min(pr):.2f}, {max(pr):.2f}]")
            if n in ours and n in kernel:
                parts.append(f"vs batched-bench {ours[n]['tok_s'] / kernel[n]:.0%}")
            if parts:
                print(f"  {me}, {n:2d} streams: " + ", ".join(parts))
    print("\nTTFT p50 per round, ms (round 1 is the first burst of that size: with the same prompt, a server's "
          "slots that never held it prefill it then; llama-server's slots keep their own prompt, ondevice's share it; "
          "later, ondevice samples the first token from the logits it saved for that prompt, llama-server computes "
          "the prompt's last token again)")
    for n in streams:
        for name, rows in rounds.items():
            if n in rows:
                by_round = sorted(rows[n], key=lambda r: r["round"])
                print(f"  {n:2d} streams {name:17s} " + " ".join(f"{r['ttft_p50'] * 1e3:7.0f}" for r in by_round))
    print("\nprefix cache, median TTFT (cold system prompt -> same system prompt again):")
    for name, (cold, warm) in prefix.items():
        print(f"  {name:17s} {cold * 1e3:7.0f} ms -> {warm * 1e3:7.0f} ms ({warm / cold:.0%} of cold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
