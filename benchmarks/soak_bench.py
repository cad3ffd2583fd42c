"""Soak test of `ondevice serve` (and, with --peer, llama.cpp's llama-server): leaks, stuck state, probe drift.

Starts the server itself on a free loopback port (4 slots), then several concurrent clients send many short mixed
requests: chat and completions, streamed or not; streams the client drops mid-way or before the first byte; bursts of
8 streams of which 4 are dropped while queued; requests that fail (bad parameters, a prompt over the context, a broken
grammar: 400s); tool calls, json_schema, n=2 with logprobs, embeddings; Ollama /api/chat and /api/generate (streams
dropped too); /metrics and /slots polling. ``--mix2`` swaps in a second mix: n>1 streams (dropped, or with logprobs),
long prompts dropped while they are prefilled, json_schema and tool streams, /v1/responses, /v1/messages, native
/completion. Every --every requests the clients pause; once nothing is in flight (and the slots are idle) the
sampler reads the serving process's VmRSS, VmHWM, open fds and threads (/proc/PID; for `ondevice serve`, the
supervised child that owns the port) and the busy-slot / queue gauges of /metrics, then sends a fixed greedy probe
whose text must stay byte-identical and whose latency should stay flat.

Prints a table of the samples and a summary per server: RSS growth per 1000 requests after the warm-up (the first 20%
of the requests), fds and threads idle at the end vs at the start, whether the probe stayed identical, its latency at
the first and the last sample; with --peer, the same for llama-server (run after ondevice, alone, with the same CPU
kernels: ``peers.kernel_match``; no Ollama routes and no embeddings) and the ratio of the two growths.

Usage: python benchmarks/soak_bench.py [--requests 1500] [--clients 6] [--every 100] [--threads 1] [--seed 125]
                                       [--model smollm2-135m-instruct] [--mix2] [--peer] [--out samples.jsonl]
A request of the queued-cancel kind counts once but sends 8. Other load on the host moves the latencies, not RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SLOTS = 4
CTX_PER_SLOT = 2048
PROMPTS = ["Say hello.", "Name a color.", "Count to three.", "What is 2+2?", "Write a word.", "Tell me a fruit.",
           "Describe the sky.", "Give me a number."]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}
PROBE = {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
         "max_tokens": 16, "temperature": 0, "seed": 1}
MIX1 = [("chat", 14), ("chat_stream", 14), ("comp", 8), ("comp_stream", 8), ("abort_mid", 6), ("abort_before", 6),
        ("queued_cancel", 2), ("bad_param", 3), ("bad_param2", 2), ("overflow", 2), ("bad_grammar", 2), ("tools", 3),
        ("json_schema", 3), ("n_logprobs", 4), ("embed", 3), ("ollama_chat", 5), ("ollama_gen", 5),
        ("ollama_abort", 2), ("poll", 6)]
MIX2 = [("chat", 10), ("chat_stream", 10), ("n2_stream_abort", 8), ("n2_stream", 6), ("long_abort", 6), ("long", 4),
        ("schema_stream_abort", 6), ("tools_stream", 5), ("responses", 6), ("messages", 6), ("native", 6),
        ("abort_mid", 5), ("queued_cancel", 2), ("poll", 4), ("embed", 3)]
CHAT = "/v1/chat/completions"


def listening_pid(port: int, root: int) -> int:
    """The process, among ``root`` and its descendants, that holds the listening socket of 127.0.0.1:``port``
    (`ondevice serve` is a supervisor whose child owns the port; llama-server owns it itself)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in process_tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    raise RuntimeError(f"no process under PID {root} listens on port {port}")


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, parents first."""
    parent = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the command may hold spaces and ')'
    tree = [root]
    for pid in tree:
        tree.extend(child for child, ppid in parent.items() if ppid == pid)
    return tree


def proc_stats(pid: int) -> dict:
    """VmRSS, VmHWM (kB), Threads and the number of open fds of ``pid``."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM", "Threads")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Soak:
    """One soak run against one server: the clients, the sampler and what they saw."""

    def __init__(self, url: str, pid: int, args: argparse.Namespace, llama: bool, name: str):
        self.url, self.pid, self.args, self.llama, self.name = url, pid, args, llama, name
        self.port = int(url.rsplit(":", 1)[1])
        self.rng = random.Random(args.seed)
        self.counts: collections.Counter = collections.Counter()  # kind -> requests
        self.status: collections.Counter = collections.Counter()  # (route, code) as the client saw it
        self.problems: list = []
        self.samples: list[dict] = []
        self.done = 0
        self.inflight = 0
        self.gate = asyncio.Event()
        kinds = MIX2 if args.mix2 else MIX1
        if llama:
            kinds = [k for k in kinds if not k[0].startswith(("ollama", "embed"))]
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]

    # -- request helpers ------------------------------------------------------------------------------------------

    def max_tokens(self) -> int:
        return self.rng.randint(4, 16)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"{self.rng.choice(PROMPTS)} #{self.rng.randint(0, 99999)}"}]

    async def post(self, c: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
        return await c.post(self.url + path, json=body)

    async def stream(self, c: httpx.AsyncClient, path: str, body: dict) -> tuple[int, bytes]:
        async with c.stream("POST", self.url + path, json=body) as r:
            data = b"".join([x async for x in r.aiter_bytes()])
            return r.status_code, data

    async def stream_abort(self, c: httpx.AsyncClient, path: str, body: dict, after_lines: int) -> str:
        """Read ``after_lines`` lines of a stream, then drop the connection."""
        async with c.stream("POST", self.url + path, json=body) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n >= after_lines:
                    break
        return "abort"

    async def raw_abort(self, path: str, body: dict, wait: float) -> str:
        """POST over a raw socket and close it ``wait`` seconds later, before reading anything."""
        data = json.dumps(body).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()
        await asyncio.sleep(wait)
        writer.transport.abort()
        return "abort"

    # -- the kinds of request: each returns (route, code) ----------------------------------------------------------

    async def k_chat(self, c):
        r = await self.post(c, CHAT, {"messages": self.messages(), "max_tokens": self.max_tokens()})
        return CHAT, r.status_code

    async def k_chat_stream(self, c):
        code, body = await self.stream(c, CHAT, {"messages": self.messages(), "max_tokens": self.max_tokens(),
                                                 "stream": True})
        if code == 200 and b"[DONE]" not in body:
            self.problems.append(("chat_stream: no [DONE]", body[-200:].decode(errors="replace")))
        return CHAT, code

    async def k_comp(self, c):
        r = await self.post(c, "/v1/completions", {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.max_tokens(),
                                                   "temperature": 0.8})
        return "/v1/completions", r.status_code

    async def k_comp_stream(self, c):
        code, _ = await self.stream(c, "/v1/completions", {"prompt": self.rng.choice(PROMPTS),
                                                           "max_tokens": self.max_tokens(), "stream": True})
        return "/v1/completions", code

    async def k_abort_mid(self, c):
        body = {"messages": self.messages(), "max_tokens": 64, "stream": True}
        return CHAT, await self.stream_abort(c, CHAT, body, 3)

    async def k_abort_before(self, c):
        body = {"messages": self.messages(), "max_tokens": 64, "stream": self.rng.random() < 0.5}
        return CHAT, await self.raw_abort(CHAT, body, self.rng.choice([0, 0.01, 0.05]))

    async def k_queued_cancel(self, c):
        """A burst of 8 streams (more than the slots); 4 are dropped after 150 ms, most while still queued."""
        bodies = [{"messages": self.messages(), "max_tokens": 16, "stream": True} for _ in range(8)]
        kept = [asyncio.create_task(self.post(c, CHAT, b)) for b in bodies[:4]]
        dropped = [asyncio.create_task(self.raw_abort(CHAT, b, 0.15)) for b in bodies[4:]]
        results = await asyncio.gather(*kept, *dropped, return_exceptions=True)
        for res in results[:4]:
            if isinstance(res, Exception):
                self.problems.append(("queued_cancel", repr(res)[:200]))
            else:
                self.status[(CHAT, res.status_code)] += 1
        return CHAT, "abort"

    async def k_bad_param(self, c):
        r = await self.post(c, CHAT, {"messages": self.messages(), "max_tokens": 4, "temperature": "hot"})
        return CHAT, r.status_code

    async def k_bad_param2(self, c):
        r = await self.post(c, CHAT, {"messages": "notalist", "max_tokens": 4})
        return CHAT, r.status_code

    async def k_overflow(self, c):
        r = await self.post(c, CHAT, {"messages": [{"role": "user", "content": "word " * 2600}], "max_tokens": 8})
        return CHAT, r.status_code

    async def k_bad_grammar(self, c):
        r = await self.post(c, "/v1/completions", {"prompt": "x", "max_tokens": 4, "grammar": 'root ::= ( "a" '})
        return "/v1/completions", r.status_code

    async def k_tools(self, c):
        r = await self.post(c, CHAT, {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
                                      "tool_choice": "required", "max_tokens": 32})
        if r.status_code == 200 and not r.json()["choices"][0]["message"].get("tool_calls"):
            self.problems.append(("tools: no tool_calls", r.text[:200]))
        return CHAT, r.status_code

    async def k_json_schema(self, c):
        r = await self.post(c, CHAT, {"messages": [{"role": "user", "content": "A person as JSON"}],
                                      "response_format": SCHEMA, "max_tokens": 40})
        return CHAT, r.status_code

    async def k_n_logprobs(self, c):
        r = await self.post(c, CHAT, {"messages": self.messages(), "max_tokens": 6, "n": 2, "logprobs": True,
                                      "top_logprobs": 3})
        if r.status_code == 200 and len(r.json()["choices"]) != 2:
            self.problems.append(("n=2: not 2 choices", r.text[:200]))
        return CHAT, r.status_code

    async def k_embed(self, c):
        r = await self.post(c, "/v1/embeddings", {"input": [self.rng.choice(PROMPTS), "second"]})
        return "/v1/embeddings", r.status_code

    async def k_ollama_chat(self, c):
        body = {"model": self.args.model, "messages": self.messages(), "options": {"num_predict": self.max_tokens()}}
        code, data = await self.stream(c, "/api/chat", body)
        if code == 200 and b'"done":true' not in data.replace(b" ", b""):
            self.problems.append(("ollama chat: no done", data[-200:].decode(errors="replace")))
        return "/api/chat", code

    async def k_ollama_gen(self, c):
        body = {"model": self.args.model, "prompt": self.rng.choice(PROMPTS),
                "options": {"num_predict": self.max_tokens()}}
        code, _ = await self.stream(c, "/api/generate", body)
        return "/api/generate", code

    async def k_ollama_abort(self, c):
        body = {"model": self.args.model, "messages": self.messages(), "options": {"num_predict": 64}}
        return "/api/chat", await self.stream_abort(c, "/api/chat", body, 2)

    async def k_n2_stream_abort(self, c):
        body = {"messages": self.messages(), "max_tokens": 64, "n": 2, "stream": True}
        return CHAT, await self.stream_abort(c, CHAT, body, 3)

    async def k_n2_stream(self, c):
        code, _ = await self.stream(c, CHAT, {"messages": self.messages(), "max_tokens": self.max_tokens(), "n": 3,
                                              "stream": True, "logprobs": True})
        return CHAT, code

    async def k_long_abort(self, c):
        """A ~1500-token prompt, dropped while it is prefilled."""
        text = f"lorem ipsum {self.rng.randint(0, 10**6)} " * 150
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": True}
        return CHAT, await self.raw_abort(CHAT, body, self.rng.choice([0.2, 0.6, 1.2]))

    async def k_long(self, c):
        text = f"dolor sit {self.rng.randint(0, 10**6)} " * 300
        r = await self.post(c, CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 4})
        return CHAT, r.status_code

    async def k_schema_stream_abort(self, c):
        body = {"messages": [{"role": "user", "content": "A person as JSON"}], "response_format": SCHEMA,
                "max_tokens": 60, "stream": True}
        return CHAT, await self.stream_abort(c, CHAT, body, 4)

    async def k_tools_stream(self, c):
        code, data = await self.stream(c, CHAT, {"messages": [{"role": "user", "content": "Weather in Rome?"}],
                                                 "tools": TOOLS, "tool_choice": "required", "max_tokens": 32,
                                                 "stream": True})
        if code == 200 and b"tool_calls" not in data:
            self.problems.append(("tools_stream: no tool_calls", data[-200:].decode(errors="replace")))
        return CHAT, code

    async def k_responses(self, c):
        body = {"model": "x", "input": self.rng.choice(PROMPTS), "max_output_tokens": self.max_tokens(),
                "stream": self.rng.random() < 0.5}
        code, _ = await self.stream(c, "/v1/responses", body)
        return "/v1/responses", code

    async def k_messages(self, c):
        r = await self.post(c, "/v1/messages", {"model": "x", "messages": self.messages(),
                                                "max_tokens": self.max_tokens()})
        return "/v1/messages", r.status_code

    async def k_native(self, c):
        r = await self.post(c, "/completion", {"prompt": self.rng.choice(PROMPTS), "n_predict": self.max_tokens(),
                                               "cache_prompt": True})
        return "/completion", r.status_code

    async def k_poll(self, c):
        path = "/slots" if self.rng.random() < 0.5 else "/metrics"
        r = await c.get(self.url + path)
        return path, r.status_code

    # -- clients and sampler ---------------------------------------------------------------------------------------

    async def worker(self) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            while True:
                await self.gate.wait()
                if self.done >= self.args.requests:
                    return
                self.done += 1
                kind = self.rng.choices(self.kinds, self.weights)[0]
                self.counts[kind] += 1
                self.inflight += 1
                try:
                    route, code = await getattr(self, "k_" + kind)(c)
                    self.status[(route, code)] += 1
                except Exception as e:  # noqa: BLE001 — a failed request is a finding, not the end of the soak
                    self.problems.append((kind, repr(e)[:200]))
                finally:
                    self.inflight -= 1

    async def metrics(self, c: httpx.AsyncClient) -> dict[str, float]:
        r = await c.get(self.url + "/metrics")
        out = {}
        for line in r.text.splitlines():
            if line.startswith("#") or not line.strip() or "bucket" in line:
                continue
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
        return out

    async def sample(self, c: httpx.AsyncClient, label: str, t0: float) -> dict:
        """Wait until no request is in flight and (up to 5 s) no slot is busy, read /proc and /metrics, probe."""
        while self.inflight:
            await asyncio.sleep(0.05)
        m: dict[str, float] = {}
        for _ in range(100):
            m = await self.metrics(c)
            if m.get("ondevice_slots_busy", m.get("llamacpp:requests_processing", 0)) == 0:
                break
            await asyncio.sleep(0.05)
        p = proc_stats(self.pid)
        t = time.perf_counter()
        r = await c.post(self.url + CHAT, json=PROBE)
        latency = time.perf_counter() - t
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else f"HTTP {r.status_code}"
        s = {"server": self.name, "label": label, "done": self.done, "t": round(time.time() - t0, 1),
             "rss_kb": p["VmRSS"], "hwm_kb": p["VmHWM"], "fds": p["fds"], "threads": p["Threads"],
             "busy": m.get("ondevice_slots_busy", m.get("llamacpp:requests_processing")),
             "queue": m.get("ondevice_queue_depth", m.get("llamacpp:requests_deferred")),
             "cancelled": m.get("ondevice_requests_cancelled_total"), "probe_ms": round(latency * 1000),
             "probe": text}
        if self.samples and text != self.samples[0]["probe"]:
            self.problems.append(("probe changed", self.done, text))
        self.samples.append(s)
        print(f"  {self.name} {label:6s} done {self.done:5d}  RSS {p['VmRSS'] / 1024:7.1f} MiB  fds {p['fds']:3d}  "
              f"threads {p['Threads']:3d}  probe {s['probe_ms']:5d} ms", file=sys.stderr, flush=True)
        return s

    async def run(self) -> dict:
        t0 = time.time()
        self.gate.set()
        async with httpx.AsyncClient(timeout=120) as c:
            await self.sample(c, "start", t0)
            workers = [asyncio.create_task(self.worker()) for _ in range(self.args.clients)]
            nxt = self.args.every
            while not all(w.done() for w in workers):
                await asyncio.sleep(0.1)
                if self.done >= nxt:
                    self.gate.clear()
                    await self.sample(c, "sample", t0)
                    nxt += self.args.every
                    self.gate.set()
            await asyncio.gather(*workers)
            if self.samples[-1]["done"] != self.done:  # the tail after the last multiple of --every
                await self.sample(c, "sample", t0)
            await asyncio.sleep(1)
            await self.sample(c, "end", t0)
            m = await self.metrics(c)
        return {"server": self.name, "counts": dict(self.counts),
                "client_status": {f"{k[0]} {k[1]}": v for k, v in sorted(self.status.items(), key=str)},
                "server_counters": {k: v for k, v in m.items() if "_total" in k or "requests" in k},
                "problems": [list(map(str, p)) for p in self.problems[:50]], "n_problems": len(self.problems),
                "seconds": round(time.time() - t0)}


def summarize(samples: list[dict], requests: int) -> dict:
    """RSS growth per 1000 requests after warm-up, idle fds/threads end vs start, probe drift and latency."""
    start, end = samples[0], samples[-1]
    warm = next((s for s in samples[1:] if s["done"] >= 0.2 * requests), None)
    growth = None
    if warm is not None and end["done"] > warm["done"]:
        growth = (end["rss_kb"] - warm["rss_kb"]) / 1024 / (end["done"] - warm["done"]) * 1000
    mid = [s for s in samples if s["label"] == "sample"] or samples
    return {"rss_start_mib": start["rss_kb"] / 1024, "rss_warm_mib": warm["rss_kb"] / 1024 if warm else None,
            "warm_done": warm["done"] if warm else None, "rss_end_mib": end["rss_kb"] / 1024,
            "growth_mib_per_1000": growth, "fds": (start["fds"], end["fds"]),
            "threads": (start["threads"], end["threads"]),
            "probe_identical": all(s["probe"] == start["probe"] for s in samples), "probe": start["probe"],
            "probe_ms_first": mid[0]["probe_ms"], "probe_ms_last": mid[-1]["probe_ms"],
            "probe_ms_median": statistics.median(s["probe_ms"] for s in mid)}


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(samples: list[dict]) -> None:
    print("| server | sample | done | t s | RSS MiB | HWM MiB | fds | threads | busy | queue | cancelled | probe ms "
          "| probe same |")
    print("|---" * 13 + "|")
    first = samples[0]["probe"]
    for s in samples:
        print(f"| {s['server']} | {s['label']} | {s['done']} | {s['t']:.1f} | {s['rss_kb'] / 1024:.1f} "
              f"| {s['hwm_kb'] / 1024:.1f} | {s['fds']} | {s['threads']} | {fmt(s['busy'], '.0f')} "
              f"| {fmt(s['queue'], '.0f')} | {fmt(s['cancelled'], '.0f')} | {s['probe_ms']} "
              f"| {'yes' if s['probe'] == first else 'NO'} |")


def print_summary(name: str, sm: dict, result: dict) -> None:
    growth = sm["growth_mib_per_1000"]
    if growth is None:
        grew = "n/a (no sample between the warm-up and the end; lower --every)"
    else:
        grew = (f"{growth:+.2f} MiB per 1000 requests ({sm['rss_warm_mib']:.1f} MiB at {sm['warm_done']} -> "
                f"{sm['rss_end_mib']:.1f} MiB at the end)")
    print(f"\n{name}: {result['seconds']} s, {sum(result['counts'].values())} requests, "
          f"{result['n_problems']} client-side problems")
    print(f"  RSS: {sm['rss_start_mib']:.1f} MiB at start; growth after warm-up: {grew}")
    print(f"  idle fds: {sm['fds'][0]} at start -> {sm['fds'][1]} at the end; threads {sm['threads'][0]} -> "
          f"{sm['threads'][1]}")
    print(f"  probe identical at every sample: {'yes' if sm['probe_identical'] else 'NO'} ({sm['probe']!r})")
    print(f"  probe latency: first sample {sm['probe_ms_first']} ms, last {sm['probe_ms_last']} ms "
          f"(median {sm['probe_ms_median']:.0f} ms)")
    print("  client saw: " + ", ".join(f"{k}: {v}" for k, v in result["client_status"].items()))
    for p in result["problems"][:5]:
        print(f"  problem: {p}")


def soak_server(srv, name: str, args: argparse.Namespace, llama: bool) -> tuple[list[dict], dict]:
    """Start ``srv`` (a serve_bench.Server), soak it, stop it."""
    with srv:
        pid = listening_pid(srv.port, srv.proc.pid)
        print(f"# {name}: serving PID {pid} (started PID {srv.proc.pid}), port {srv.port}, log {srv.log_path}",
              file=sys.stderr)
        soak = Soak(srv.url, pid, args, llama, name)
        result = asyncio.run(soak.run())
    return soak.samples, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500, help="requests in all, over all clients")
    ap.add_argument("--clients", type=int, default=6, help="concurrent clients")
    ap.add_argument("--every", type=int, default=100, help="sample every this many requests")
    ap.add_argument("--threads", "-t", type=int, default=1, help="server threads (-t)")
    ap.add_argument("--seed", type=int, default=125, help="seed of the request mix")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name or .gguf path")
    ap.add_argument("--mix2", action="store_true",
                    help="the second mix: n>1 streams, long prompts dropped in prefill, grammar and tool streams, "
                         "/v1/responses, /v1/messages, native /completion")
    ap.add_argument("--peer", action="store_true", help="then soak llama-server (benchmarks/peers.py build) alike")
    ap.add_argument("--out", default=None, help="write the samples and a summary per server to this JSONL file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from serve_bench import Server, free_port

    from ondevice.models import resolve

    model_path = str(resolve(args.model).path)
    t = str(args.threads)
    km = None
    if args.peer:
        from peers import kernel_match

        km = kernel_match(model_path)
        km.apply()  # ondevice serve (a child) reads ONDEVICE_AMX / ONDEVICE_REPACK: the kernels llama-server gets
        print(f"# {km.describe()}", file=sys.stderr)
    port = free_port()
    runs = [("ondevice", Server("ondevice", [sys.executable, "-m", "ondevice.cli", "serve", "-m", args.model, "-t", t,
                                             "-np", str(SLOTS), "--port", str(port)], port, {}), False)]
    if args.peer:
        from peers import tool_path

        exe = tool_path("llama-server")
        if exe.exists():
            port = free_port()
            cmd = [str(exe), "-m", model_path, "-t", t, "-tb", t, "-np", str(SLOTS), "-c", str(SLOTS * CTX_PER_SLOT),
                   "--port", str(port), "--metrics", "--slots", "--jinja", km.server_flag]
            runs.append(("llama-server", Server("llama-server", cmd, port, {}), True))
        else:
            print(f"# llama-server not built ({exe}); run python benchmarks/peers.py build to compare",
                  file=sys.stderr)
    print(f"# {Path(model_path).name}, {SLOTS} slots, {args.threads} thread(s), {args.requests} requests from "
          f"{args.clients} clients, {'mix2' if args.mix2 else 'mix1'}, seed {args.seed}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
    samples: list[dict] = []
    summaries: dict[str, tuple[dict, dict]] = {}
    for name, srv, llama in runs:
        try:
            got, result = soak_server(srv, name, args, llama)
        except Exception as e:  # noqa: BLE001 — a server that cannot start is reported, not faked
            print(f"{name}: {e}", file=sys.stderr)
            continue
        samples.extend(got)
        summaries[name] = (summarize(got, args.requests), result)
    if args.out:
        with open(args.out, "w") as fh:
            for s in samples:
                fh.write(json.dumps(s) + "\n")
            for name, (sm, result) in summaries.items():
                fh.write(json.dumps({"server": name, "summary": sm, **result}) + "\n")
    print()
    print_table(samples)
    for name, (sm, result) in summaries.items():
        print_summary(name, sm, result)
    if "ondevice" in summaries and "llama-server" in summaries:
        ours = summaries["ondevice"][0]["growth_mib_per_1000"]
        theirs = summaries["llama-server"][0]["growth_mib_per_1000"]
        if ours is not None and theirs is not None:
            ratio = f"{theirs / ours:.1f}x" if abs(ours) >= 0.05 else "n/a (ondevice's growth is under 0.05 MiB)"
            print(f"\nRSS growth per 1000 requests: ondevice {ours:+.2f} MiB, llama-server {theirs:+.2f} MiB; "
                  f"llama-server / ondevice: {ratio}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if summaries.get("ondevice") and not summaries["ondevice"][1]["n_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
