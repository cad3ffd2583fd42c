"""How soon a server's only slot is free again after a client leaves during its prompt's prefill.

A streaming completion with a long prompt (~1,600 tokens of SmolLM2) is sent on a raw socket to a 1-slot,
1-thread server; once the prefill has run ``--after`` seconds the socket is closed, and a short request (1 token)
is sent at once. On one slot it waits for the slot: the time from the disconnect to its answer, less the short
request's own time measured alone, is how long the abandoned prefill kept the slot and the cores. ondevice stops
the decode in flight (llama.cpp's abort callback, engine/abort.py); with ``--peer`` llama-server (built by
``python benchmarks/peers.py build``, same model, threads and CPU kernels) runs the same trials after it, alone.

    python benchmarks/abort_bench.py [--trials 3] [--after 1.0] [--repeat 80] [--threads 1] [--peer]

Prints each trial, the medians and llama-server's / ondevice's ratio. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SENTENCE = "The history of the city is long and full of events that shaped its streets, markets and people. "


def send_and_drop(url: str, prompt: str, after: float) -> float:
    """POST a streaming completion of ``prompt`` on a raw socket, wait ``after`` seconds once the server holds it,
    close the socket; the time of the close (perf_counter)."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": 8, "stream": True, "temperature": 0}).encode()
    conn = socket.create_connection((host, int(port)))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(after)  # the request is in the server's only slot within milliseconds; then its prefill runs
    conn.close()
    return time.perf_counter()


def short(url: str) -> float:
    """Seconds for a 1-token completion of a 1-word prompt (it waits for the slot on a 1-slot server)."""
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def trials(srv, args: argparse.Namespace) -> list[float]:
    prompt = SENTENCE * args.repeat
    n = len(httpx.post(srv.url + "/tokenize", json={"content": prompt}, timeout=60).json()["tokens"])
    alone = min(short(srv.url) for _ in range(3))
    t_full = time.perf_counter()  # the whole prompt once, not dropped: what a drop saves at most
    httpx.post(srv.url + "/v1/completions", json={"prompt": prompt + " ", "max_tokens": 1, "temperature": 0},
               timeout=600).raise_for_status()
    full = time.perf_counter() - t_full
    print(f"{srv.name}: {n} prompt tokens, prefill + 1 token {full:.2f} s; a short request alone {alone:.3f} s",
          flush=True)
    held = []
    for i in range(args.trials):
        # a different prompt each trial (a number in front), so no server reuses the last one's cached prefix
        t_drop = send_and_drop(srv.url, f"{i} " + prompt, args.after)
        short(srv.url)
        held.append(max(0.0, time.perf_counter() - t_drop - alone))
        print(f"  trial {i + 1}: the slot was held {held[-1]:.2f} s after the client left", flush=True)
    return held


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--after", type=float, default=1.0, help="seconds of prefill before the client leaves")
    ap.add_argument("--repeat", type=int, default=80, help="the prompt: a sentence this many times (~20 tokens each)")
    ap.add_argument("--threads", "-t", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--peer", action="store_true", help="then llama-server (benchmarks/peers.py build) alike")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from serve_bench import Server, free_port

    from ondevice.models import resolve

    model_path, t, ctx = str(resolve(args.model).path), str(args.threads), "4096"
    servers = []
    km = None
    if args.peer:
        from peers import kernel_match, tool_path

        km = kernel_match(model_path)
        km.apply()  # ondevice serve reads ONDEVICE_AMX / ONDEVICE_REPACK: the kernels llama-server gets
        print(f"# {km.describe()}")
    port = free_port()
    servers.append(Server("ondevice", [sys.executable, "-m", "ondevice.cli", "serve", "-m", args.model, "-t", t,
                                       "-np", "1", "-c", ctx, "--port", str(port)], port, {}))
    if args.peer:
        exe = tool_path("llama-server")
        if exe.exists():
            port = free_port()
            servers.append(Server("llama-server", [str(exe), "-m", model_path, "-t", t, "-tb", t, "-np", "1",
                                                   "-c", ctx, "--port", str(port), km.server_flag], port, {}))
        else:
            print(f"# llama-server not built ({exe}); run python benchmarks/peers.py build to compare")
    print(f"# {Path(model_path).name}, 1 slot, {t} thread(s), client leaves after {args.after:g} s of prefill; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
    medians = {}
    for srv in servers:
        with srv:
            medians[srv.name] = statistics.median(trials(srv, args))
    for name, m in medians.items():
        print(f"{name}: median {m:.2f} s from the client leaving to the slot answering the next request")
    if len(medians) == 2:
        ours, theirs = medians["ondevice"], medians["llama-server"]
        print(f"llama-server / ondevice: {theirs / ours:.0f}x" if ours >= 0.01 else
              "llama-server / ondevice: n/a (ondevice's is under 0.01 s)")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
