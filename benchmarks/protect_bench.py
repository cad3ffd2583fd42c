"""Encrypted models (``ondevice protect``) against the plaintext file: cold start, decode speed, peak RSS.

Issue 15's goals: cold start to first token with the encrypted file <= 1.10x the plaintext file's (the
strawman "decrypt everything, then load" beside it), decode tok/s within 2%, peak RSS <= plaintext + 10%.

Each measurement is a fresh process (nothing of the model in it yet) that loads the model and produces
its first token from a short greedy prompt, then decodes ``-n`` more. Timed from just before the load to
the first token: Python's own start-up and imports are the same for every variant and are left out.
Variants, alternating order within each of ``--rounds`` rounds:

* ``plain``     the GGUF file, mmapped by llama.cpp (ondevice's default)
* ``pipelined`` the container: metadata chunks first, the rest decrypted by decrypt_threads() worker processes (1 on
                2 cores) while llama.cpp loads, barrier in llama.cpp's progress callback (the default for containers)
* ``pipelined-threads`` the same with the decryption on threads of this process instead of worker
                processes (what ondevice did before; kept to show why processes: the interpreter lock)
* ``strawman``  the container: everything decrypted on one thread, then the load

CPU time counts this process and its reaped children (the restore's worker processes), and "workers' RSS"
is the largest worker's own peak (its VmHWM): the memory a worker process takes beside the model's.

Page cache: dropping it needs root's /proc/sys/vm/drop_caches (refused here), so both files are read
once before the rounds and every variant starts with its file in the page cache: the same state for all.

    python benchmarks/protect_bench.py [-m MODEL ...] [--rounds 7] [-n 64] [-t 2]
    python benchmarks/protect_bench.py --decode 6         # also steady decode (ondevice bench tg128), paired
    python benchmarks/protect_bench.py --tamper 1000      # single-byte flips of the real container
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write one sentence about the sea."
VARIANTS = ("plain", "pipelined", "pipelined-threads", "strawman")
TWO = "pipelined-2t"  # --decrypt-threads: the pipelined restore with 2 worker processes instead of the default
KEY_ENV = "PROTECT_BENCH_KEY"


def child(variant: str, path: str, threads: int, n_gen: int) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    import resource

    t0 = time.perf_counter()
    import ondevice
    from ondevice.engine.model import peak_rss_bytes

    t_import = time.perf_counter() - t0
    if variant == "pipelined-threads":
        import ondevice.protect.restore

        ondevice.protect.restore._start_processes = lambda *a: False  # restore() then falls back to threads
    if variant == TWO:
        import ondevice.protect.load

        ondevice.protect.load.decrypt_threads = lambda: 2
    kw = {} if variant == "plain" else {"key_source": f"env:{KEY_ENV}", "restore": variant.split("-")[0]}
    def cpu() -> float:  # this process and its reaped children (the restore's workers are reaped at the barrier)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    t1, c1 = time.perf_counter(), cpu()
    model = ondevice.load(path, n_ctx=512, n_threads=threads, **kw)
    t_load = time.perf_counter() - t1
    first = None
    n = 0
    for g in model.stream(PROMPT, temp=0, max_tokens=n_gen, ignore_eos=True):
        if first is None:
            first, first_cpu = time.perf_counter() - t1, cpu() - c1
        n += 1
        last = g
    restored = getattr(model.engine, "_restored", None)
    print(json.dumps({"variant": variant, "import_s": t_import, "load_s": t_load, "cold_ttft_s": first, "cold_cpu_s": first_cpu,
                      "decode_tps": last.generation_tps, "tokens": n,
                      "peak_rss": peak_rss_bytes(),
                      "worker_rss": restored.worker_rss if restored is not None else 0,
                      "decrypt_s": restored.decrypt_s if restored is not None else None,
                      "meta_s": restored.meta_s if restored is not None else None,
                      "barrier_wait_s": restored.barrier_wait_s if restored is not None else None,
                      "locked_bytes": restored.locked_bytes if restored is not None else None}))
    model.close()


def measure(variant: str, path: Path, threads: int, n_gen: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(path), "-t", str(threads),
                          "-n", str(n_gen)], capture_output=True, text=True, env=env, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_model(name: str, rounds: int, threads: int, n_gen: int, tmp: Path, variants: tuple[str, ...],
                decode_rounds: int = 0) -> None:
    from ondevice.models import resolve
    from ondevice.protect import encrypt
    from ondevice.protect.keys import new_key

    plain = Path(resolve(name).path)
    env = dict(os.environ, **{KEY_ENV: new_key()})
    os.environ[KEY_ENV] = env[KEY_ENV]
    enc = tmp / f"{plain.stem}.enc"
    t = time.perf_counter()
    h = encrypt(str(plain), enc, f"env:{KEY_ENV}")
    print(f"\n## {name}: {h.plain_size / 1e6:.1f} MB, {h.n_chunks} chunks, metadata {h.meta_size / 1e6:.2f} MB "
          f"(encrypted in {time.perf_counter() - t:.2f} s)")
    read_through(plain)
    read_through(enc)
    for v in variants:  # one untimed run each: the same warm state (page cache, kernel choice cache) for all
        measure(v, plain if v == "plain" else enc, threads, 4, env)
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            rows[v].append(measure(v, plain if v == "plain" else enc, threads, n_gen, env))
    keys = ("cold_ttft_s", "cold_cpu_s", "load_s", "decode_tps", "peak_rss")
    base = {k: med([x[k] for x in rows["plain"]]) for k in keys}
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end; {rounds} rounds, {threads} threads, "
          f"medians; ratios are each variant's median over plain's. CPU time: this process's and its "
          f"workers' user+sys from the load to the first token (what contention on a busy machine does not inflate)")
    print("| variant | cold start to 1st token | ratio | its CPU time | ratio | load | decrypt | decode tok/s | ratio "
          "| peak RSS | ratio | workers' RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = {k: med([x[k] for x in rows[v]]) for k in keys}
        dec = [x["decrypt_s"] for x in rows[v] if x["decrypt_s"] is not None]
        print(f"| {v} | {m['cold_ttft_s'] * 1000:.0f} ms | {m['cold_ttft_s'] / base['cold_ttft_s']:.3f}x "
              f"| {m['cold_cpu_s'] * 1000:.0f} ms | {m['cold_cpu_s'] / base['cold_cpu_s']:.3f}x "
              f"| {m['load_s'] * 1000:.0f} ms | {f'{med(dec) * 1000:.0f} ms' if dec else '-'} "
              f"| {m['decode_tps']:.1f} | {m['decode_tps'] / base['decode_tps']:.3f}x "
              f"| {m['peak_rss'] / 1e6:.0f} MB | {m['peak_rss'] / base['peak_rss']:.3f}x "
              f"| {med([x['worker_rss'] for x in rows[v]]) / 1e6:.0f} MB |")
    paired = [p["cold_ttft_s"] for p in rows["plain"]]
    for v in variants[1:]:
        ratios = [x["cold_ttft_s"] / p for x, p in zip(rows[v], paired)]
        print(f"{v}: per-round cold-start ratios {', '.join(f'{x:.3f}' for x in ratios)}")
    for v in variants[1:]:
        print(f"{v}: metadata restored after {med([x['meta_s'] for x in rows[v]]) * 1000:.0f} ms, all chunks after "
              f"{med([x['decrypt_s'] for x in rows[v]]) * 1000:.0f} ms; llama.cpp's loader waited "
              f"{med([x['barrier_wait_s'] for x in rows[v]]) * 1000:.0f} ms at the barrier (the part not overlapped)")
    locked = rows["pipelined"][0]["locked_bytes"]
    print(f"plaintext locked against swap (VmLck after load): {locked / 1e6:.1f} MB of {h.plain_size / 1e6:.1f} MB")
    if decode_rounds:
        warm_decode(plain, enc, decode_rounds, threads)


def warm_decode(plain: Path, enc: Path, rounds: int, threads: int, test: str = "tg128", reps: int = 3) -> None:
    """Steady decode as ``ondevice bench`` measures it (model loaded and warmed up, ``reps`` timed runs of
    ``test``): the plaintext file and the container in alternating order, ``rounds`` times; paired ratios."""
    import ondevice
    from ondevice.protect.keys import SOURCE_ENV

    tps: dict[str, list[float]] = {"plain": [], "container": []}
    for r in range(rounds):
        for v in (("plain", "container") if r % 2 == 0 else ("container", "plain")):
            if v == "container":
                os.environ[SOURCE_ENV] = f"env:{KEY_ENV}"  # bench's worker finds the key as `--key-env` sets it
            try:
                rec = ondevice.bench([str(plain if v == "plain" else enc)], test, threads=threads, repetitions=reps,
                                     store=False, roofline=False)[0]
            finally:
                os.environ.pop(SOURCE_ENV, None)
            if rec.status != "ok":
                raise SystemExit(f"the {v} bench failed: {rec.error}")
            tps[v].append(rec.tps_mean)
    ratios = [c / p for c, p in zip(tps["container"], tps["plain"])]
    print(f"warm decode (ondevice bench {test} -r {reps}, {rounds} alternating rounds, load "
          f"{os.getloadavg()[0]:.2f}): plain {med(tps['plain']):.1f} tok/s, container {med(tps['container']):.1f} "
          f"tok/s; paired ratio median {med(ratios):.3f}x (rounds {', '.join(f'{x:.3f}' for x in ratios)})")


def tamper(name: str, n: int, tmp: Path) -> None:
    """Flip one byte at ``n`` random positions of the real container (one at a time, restored after) and load."""
    import ondevice
    from ondevice.protect import encrypt
    from ondevice.protect.container import ProtectError
    from ondevice.protect.keys import new_key

    os.environ[KEY_ENV] = new_key()
    enc = tmp / "tamper.enc"
    encrypt(name, enc, f"env:{KEY_ENV}")
    size = enc.stat().st_size
    rng = random.Random(15)
    positions = rng.sample(range(size), n)
    rejected, reasons, t0 = 0, {}, time.perf_counter()
    fd = os.open(enc, os.O_RDWR)
    try:
        for i, pos in enumerate(positions):
            old = os.pread(fd, 1, pos)
            os.pwrite(fd, bytes([old[0] ^ rng.randrange(1, 256)]), pos)
            try:
                model = ondevice.load(str(enc), n_ctx=64, n_threads=1, key_source=f"env:{KEY_ENV}", warmup=False)
            except ProtectError as e:
                rejected += 1
                why = str(e).split(";")[0].split(": ", 1)[-1]
                why = "chunk N failed authentication" if "failed authentication" in why else why
                reasons[why] = reasons.get(why, 0) + 1
            else:
                model.close()
                print(f"NOT rejected: a flip at byte {pos}")
            finally:
                os.pwrite(fd, old, pos)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{n} flips, {rejected} rejected ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        os.close(fd)
    print(f"\n## tamper: {rejected}/{n} single-byte flips of {name}'s container ({size / 1e6:.1f} MB) rejected "
          f"before any token")
    for why, k in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"  {k:5d}  {why}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("-m", "--model", action="append", help="models (default: smollm2, and the qwen 0.5B if installed)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="tokens decoded after the first")
    ap.add_argument("--decrypt-threads", action="store_true",
                    help=f"also measure {TWO}: the pipelined restore with 2 decrypt threads (the default leaves "
                         f"one core to llama.cpp's loader)")
    ap.add_argument("--decode", type=int, default=0, metavar="ROUNDS",
                    help="also: steady decode (ondevice bench tg128, warm) of plaintext and container, ROUNDS "
                         "alternating rounds")
    ap.add_argument("--tamper", type=int, default=0, metavar="N", help="instead: N single-byte flips of the container")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.threads, a.n_gen)
        return 0
    models = a.model
    if not models:
        from ondevice.models.catalog import CATALOG, is_installed

        models = ["smollm2-135m-instruct"]
        if is_installed(CATALOG["qwen2.5-coder-0.5b-instruct"]):
            models.append("qwen2.5-coder-0.5b-instruct")
    with tempfile.TemporaryDirectory(prefix="protect-bench-") as d:
        for m in models:
            if a.tamper:
                tamper(m, a.tamper, Path(d))
            else:
                bench_model(m, a.rounds, a.threads, a.n_gen, Path(d),
                            VARIANTS + ((TWO,) if a.decrypt_threads else ()), a.decode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
