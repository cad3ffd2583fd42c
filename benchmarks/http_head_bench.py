"""What serve's head guard costs (serve/server.py ``_protocol``: a 64 KiB limit and a timeout on a request's
line and headers, on uvicorn's httptools protocol), against uvicorn's own httptools and h11 protocols measured in
the same run: N small GET requests over loopback to a trivial ASGI app, on one kept-alive connection and on a new
connection each, rounds interleaved so that drift of the host hits every protocol alike; medians of the rounds.

    python benchmarks/http_head_bench.py [--requests 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ondevice.serve.server import HEAD_LIMIT, _protocol

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def start(protocol) -> int:
    """A uvicorn server with ``protocol`` on a loopback port (a daemon thread); its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=protocol,
                                           h11_max_incomplete_event_size=HEAD_LIMIT))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1]


def _answer(c: socket.socket) -> None:
    c.sendall(REQUEST)
    buf = b""
    while not buf.endswith(b"ok"):
        buf += c.recv(4096)


def kept_alive(port: int, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            _answer(c)
        return time.perf_counter() - t0


def new_connections(port: int, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as c:
            _answer(c)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per round and way (default 1000)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    a = ap.parse_args()
    ports = {"httptools (uvicorn's)": start(HttpToolsProtocol),
             "httptools + head guard (serve's)": start(_protocol(10.0)),
             "h11 (uvicorn's)": start(H11Protocol)}
    times: dict[str, dict[str, list[float]]] = {k: {"kept": [], "new": []} for k in ports}
    for _ in range(a.rounds):
        for name, port in ports.items():
            times[name]["kept"].append(kept_alive(port, a.requests))
            times[name]["new"].append(new_connections(port, a.requests))
    us = {k: {way: statistics.median(v) / a.requests * 1e6 for way, v in d.items()} for k, d in times.items()}
    base = us["httptools (uvicorn's)"]
    print(f"{a.requests} requests x {a.rounds} rounds, medians; ratio against uvicorn's httptools in this run")
    print(f"{'protocol':34s} {'kept-alive us/req':>18s} {'ratio':>6s} {'new conn. us/req':>17s} {'ratio':>6s}")
    for name, d in us.items():
        print(f"{name:34s} {d['kept']:18.1f} {d['kept'] / base['kept']:6.2f} {d['new']:17.1f} "
              f"{d['new'] / base['new']:6.2f}")


if __name__ == "__main__":
    main()
