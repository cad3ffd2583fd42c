"""Is ``ondevice bench`` telling the truth? Compare it with llama.cpp's llama-bench and /usr/bin/time.

One run on the default model at 2 threads (``--threads`` to change):

1. speed: ``ondevice bench`` pp512/tg128 vs ``llama-bench -p 512 -n 128`` built from the same vendored
   llama.cpp (benchmarks/peers.py), interleaved over ``--rounds`` rounds; ratio ours / theirs (goal: within 5%).
   Same settings on both sides: n_batch 2048, n_ubatch 512, f16 KV, flash attention given as ``--fa`` (default
   auto, both tools' default, which llama.cpp turns on for CPU), and the same extra CPU kernels
   (``peers.kernel_match``: llama-bench ``--repack`` and ONDEVICE_AMX/ONDEVICE_REPACK).
2. memory: a bench worker run under ``/usr/bin/time -v`` on tg128; its own peak-RSS figures vs time's
   "Maximum resident set size" (goal: within 5%).
3. overhead: wall time of the ``ondevice.bench(...)`` call vs the time inside its timed repetitions
   (goal: <= 1.2x; the probe cache is warmed first so a first-ever probe does not count).
4. noise: coefficient of variation of the decode speed over the 5 repetitions.

Prints the figures; asserts nothing (speeds on a shared machine are not test material).

    python benchmarks/bench_truth.py [--threads 2] [--rounds 6] [-r 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def llama_bench(tool: Path, model: str, threads: int, reps: int, repack: int, fa: str) -> dict[str, dict]:
    out = subprocess.run([str(tool), "-m", model, "-p", "512", "-n", "128", "-t", str(threads), "-r", str(reps),
                          "-fa", fa, "--repack", str(repack), "-o", "json"],
                         check=True, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        res[name] = {"tps": r["avg_ts"], "std": r["stddev_ts"]}
    return res


def ours(model: str, threads: int, reps: int, db: Path, fa: str) -> tuple[dict[str, dict], float, list]:
    import ondevice

    t0 = time.perf_counter()
    recs = ondevice.bench([model], "pp512,tg128", threads=threads, repetitions=reps, store=db, progress=False,
                          flash_attn=fa)
    wall = time.perf_counter() - t0
    return {r.test: {"tps": r.tps_mean, "std": r.tps_std} for r in recs}, wall, list(recs)


def time_v_worker(model: str, threads: int, reps: int) -> tuple[int, dict]:
    """Run one bench worker (tg128) under /usr/bin/time -v; (time's max RSS in bytes, the worker's record)."""
    from ondevice.bench.api import make_config
    from ondevice.bench.sweep import expand, worker_config

    params = make_config(models=[model], tests="tg128", threads=threads, repetitions=reps)
    cfg = expand(params)[0]
    time_bin = shutil.which("time", path="/usr/bin") or "/usr/bin/time"
    if not Path(time_bin).exists():
        raise SystemExit("/usr/bin/time is missing; install it (Debian: apt-get install -y time)")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(worker_config([cfg], cfg.tests, params), f)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(threads), MALLOC_ARENA_MAX="2")
    proc = subprocess.Popen([time_bin, "-v", sys.executable, "-m", "ondevice.bench.worker", f.name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # time and the worker under it: leave no orphan spinning on a busy machine
        raise SystemExit("the worker under /usr/bin/time ran over 900 s (a very busy machine?)") from None
    finally:
        os.unlink(f.name)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    rec = next(json.loads(line) for line in res.stdout.splitlines() if '"type": "result"' in line)
    return int(m.group(1)) * 1024, rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of ours vs llama-bench")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-fa", "--fa", choices=("on", "off", "auto"), default="auto", help="flash attention, both sides")
    args = ap.parse_args(argv)

    from peers import ensure_tool, kernel_match

    from ondevice.device import probe
    from ondevice.models import resolve

    model = str(resolve(None).path)
    tool = ensure_tool("llama-bench")
    km = kernel_match(model)
    km.apply()  # the bench workers read ONDEVICE_AMX / ONDEVICE_REPACK: the same kernels as llama-bench
    print(f"model: {model}\nllama-bench: {tool}\nthreads: {args.threads}, repetitions: {args.repetitions}, "
          f"rounds: {args.rounds}, flash attention: {args.fa} on both sides")
    print(km.describe())
    print(f"load average before: {os.getloadavg()}")
    probe(args.threads)  # warm the per-machine cache so the overhead figure is the harness, not a first probe

    ratios: dict[str, list[float]] = {"pp512": [], "tg128": []}
    overheads, cvs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            mine, wall, recs = ours(model, args.threads, args.repetitions, Path(tmp) / "truth.sqlite", args.fa)
            theirs = llama_bench(tool, model, args.threads, args.repetitions, km.repack, args.fa)
            got = {r.test: r for r in recs if r.status == "ok"}
            if set(got) != {"pp512", "tg128"}:
                print(f"round {rnd + 1}: ondevice bench gave {[(r.test, r.status, r.error) for r in recs]}; "
                      f"the round is left out", flush=True)
                continue
            measured = sum(r.measured_wall_s for r in recs)
            overheads.append(wall / measured)
            tg = got["tg128"]
            cvs.append(tg.tps_std / tg.tps_mean)
            for test, rs in ratios.items():
                rs.append(mine[test]["tps"] / theirs[test]["tps"])
                print(f"round {rnd + 1} {test}: ondevice {mine[test]['tps']:8.2f} ± {mine[test]['std']:6.2f} t/s | "
                      f"llama-bench {theirs[test]['tps']:8.2f} ± {theirs[test]['std']:6.2f} t/s | ratio {rs[-1]:.3f}")
            print(f"round {rnd + 1} harness: wall {wall:.1f} s, measured {measured:.1f} s, "
                  f"ratio {overheads[-1]:.2f}x; decode CV {cvs[-1]:.1%}")

    time_rss, rec = time_v_worker(model, args.threads, args.repetitions)
    mem = rec["memory"]
    print("\n== figures ==")
    for test, rs in ratios.items():
        med = statistics.median(rs)
        print(f"{test} speed ratio ondevice/llama-bench: median {med:.3f} over {len(rs)} rounds "
              f"({', '.join(f'{x:.3f}' for x in rs)}) -> {'within' if abs(med - 1) <= 0.05 else 'OUTSIDE'} 5%")
    print(f"peak RSS, /usr/bin/time -v: {time_rss / 2**20:.1f} MiB")
    for key in ("process_max_rss_bytes", "peak_rss_bytes"):
        v = mem[key]
        print(f"peak RSS, worker {key}: {v / 2**20:.1f} MiB -> ratio {v / time_rss:.3f} "
              f"({'within' if abs(v / time_rss - 1) <= 0.05 else 'OUTSIDE'} 5%)")
    print(f"  (rss at peak: file-backed {mem['rss_file_at_peak_bytes'] / 2**20:.1f} MiB, "
          f"anonymous {mem['rss_anon_at_peak_bytes'] / 2**20:.1f} MiB)")
    print(f"harness wall / measured work: median {statistics.median(overheads):.2f}x "
          f"({', '.join(f'{x:.2f}' for x in overheads)}) -> goal <= 1.2x")
    print(f"decode (tg128) coefficient of variation over {args.repetitions} repetitions: "
          f"{', '.join(f'{x:.1%}' for x in cvs)}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
