"""/v1/embeddings throughput: `ondevice serve` vs llama.cpp's llama-server, inputs/s at 1, 10 and 50 inputs.

One run, over loopback, same model file, same threads, same CPU kernels (``peers.kernel_match``):
  * ondevice: ``ondevice serve --embeddings-ctx N`` (packs a request's inputs many to a decode, engine/embed.py);
  * llama-server: ``--embeddings --pooling mean -c N -b N -ub N`` as it starts by default (4 slots, unified KV:
    up to 4 inputs a decode), and with ``-np 64 --kv-unified`` (up to 64 a decode), the peer at its best.
Both servers run at once and take turns request by request (the order flips each round), so host drift hits
each alike; each figure is the median over rounds, the ratio is ondevice / peer of paired rounds (median).
The vectors of the two are compared too (cosine).

Usage: python benchmarks/embed_bench.py [--model PATH] [--threads 2] [--sizes 1,10,50] [--rounds 5] [--ctx 512]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import Server, default_model, free_port

# texts of 4 to ~70 tokens, as a retrieval index or a batch of chat messages holds them
WORDS = ["the", "quarterly", "report", "shows", "that", "revenue", "grew", "while", "costs", "fell", "across",
         "every", "region", "we", "serve", "and", "the", "board", "expects", "the", "trend", "to", "continue",
         "into", "next", "year", "despite", "rising", "interest", "rates"]


def texts(n: int, round_: int) -> list[str]:
    """``n`` distinct inputs of varied length (a different set each round: nothing can be served from a cache)."""
    return [f"[{round_}.{i}] " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 11) % 50))
            for i in range(n)]


def embed(srv: Server, inputs: list[str]) -> tuple[float, np.ndarray, int]:
    """(seconds, unit vectors (n, n_embd), usage.prompt_tokens) of one request."""
    t0 = time.perf_counter()
    r = httpx.post(srv.url + "/v1/embeddings", json={"input": inputs, "model": "m"}, timeout=600)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{srv.name}: HTTP {r.status_code} {r.text[:300]}")
    body = r.json()
    vecs = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], np.float32)
    return dt, vecs / np.linalg.norm(vecs, axis=1, keepdims=True), body["usage"]["prompt_tokens"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the catalog's default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1,10,50", help="inputs per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=512, help="N: ondevice --embeddings-ctx; llama-server -c/-b/-ub")
    args = ap.parse_args(argv)
    model, t, n = args.model or default_model(), str(args.threads), str(args.ctx)
    sizes = [int(s) for s in args.sizes.split(",")]
    from peers import ensure_tool, kernel_match

    km = kernel_match(model)
    km.apply()  # ondevice serve (a child) reads ONDEVICE_AMX / ONDEVICE_REPACK
    print(f"# {km.describe()}; model {Path(model).name}, {t} threads, N={n}")
    port = free_port()
    servers = [Server("ondevice", [sys.executable, "-m", "ondevice.cli", "serve", "-m", model, "--port", str(port),
                                   "-np", "1", "-c", "256", "-t", t, "--embeddings-ctx", n], port, {})]
    exe = ensure_tool("llama-server")
    peer = [str(exe), "-m", model, "--embeddings", "--pooling", "mean", "-c", n, "-b", n, "-ub", n, "-t", t, "-tb", t,
            *km.server_flag.split()]
    for name, extra in (("llama-server", []), ("llama-server -np 64", ["-np", "64", "--kv-unified"])):
        port = free_port()
        servers.append(Server(name, [*peer, "--port", str(port), *extra], port, {}))
    times: dict[tuple[str, int], list[float]] = {(s.name, k): [] for s in servers for k in sizes}
    with contextlib.ExitStack() as stack:
        for srv in servers:
            stack.enter_context(srv)
        for srv in servers:  # warm-up: first decodes size buffers and page weights in
            embed(srv, texts(max(sizes), -1))
        last: dict[str, tuple[np.ndarray, int]] = {}
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for k in sizes:
                inputs = texts(k, rnd)
                for srv in order:
                    dt, vecs, n_tok = embed(srv, inputs)
                    times[srv.name, k].append(dt)
                    last[srv.name] = vecs, n_tok
                    print(f"# round {rnd} {srv.name}: {k} inputs ({n_tok} tokens) in {dt:.3f} s", flush=True)
    ours = servers[0].name
    print(f"{'server':<22}" + "".join(f"{f'{k} in/s':>16}" for k in sizes))
    for srv in servers:
        row = "".join(f"{statistics.median(k / x for x in times[srv.name, k]):>10.1f} ± "
                      f"{statistics.stdev(k / x for x in times[srv.name, k]):<3.1f}" for k in sizes)
        print(f"{srv.name:<22}{row}")
    for srv in servers[1:]:
        ratios = [statistics.median(p / o for o, p in zip(times[ours, k], times[srv.name, k])) for k in sizes]
        print(f"{'ratio ondevice/' + srv.name:<36}" + "".join(f"{f'{k}: {r:.2f}x':>12}" for k, r in zip(sizes, ratios)))
    (mine, tok_mine), (theirs, tok_theirs) = last[ours], last[servers[1].name]
    cos = (mine * theirs).sum(1)
    print(f"# last {len(cos)} vectors, ondevice vs llama-server: cosine min {cos.min():.5f} median "
          f"{np.median(cos):.5f}; prompt_tokens {tok_mine} vs {tok_theirs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
