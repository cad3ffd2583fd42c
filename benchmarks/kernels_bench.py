"""What the extra CPU kernels buy on this machine: pp512 and tg128 per weight type, per kernel configuration.

The weight types are Q4_0, Q4_1, Q8_0 and Q4_K_M variants of the default model (SmolLM2-135M; the shipped
Q4_1 requantized by ondevice's quantize worker, cached by ``ondevice.device.kernels.variants``). Each
configuration is a set of extra CPU buffer types: none (the safe minimum), CPU_REPACK, and, on a CPU and
build with AMX, AMX and AMX+CPU_REPACK when their self-test passes here (a configuration that crashes or
computes wrong logits in the self-test is reported and not timed). Every figure is an ``ondevice bench``
record (its own worker process, r repetitions after a warm-up); the kernels column is the buffer types the
worker's load really used. Configurations take turns over ``--rounds`` rounds, so machine drift hits each
alike; the table shows the mean of the per-round means. Last, per type: what ``--amx auto --repack auto``
picks here and its speed over the safe minimum (no extra kernels).

    python benchmarks/kernels_bench.py [-t THREADS] [-r 3] [--rounds 2] [--types Q4_0,Q4_1,Q8_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K_M")
    a = ap.parse_args(argv)

    import ondevice
    from ondevice.device import device_info
    from ondevice.device import kernels as K
    from ondevice.engine.bufts import offered, wanted
    from ondevice.engine.resources import physical_cores

    threads = a.threads or physical_cores()
    info = device_info()
    names = offered()
    models = K.variants(threads, tuple(a.types.split(",")))
    print(f"cpu: {info['cpu_model']} ({info['arch']}), {threads} threads; flags: {' '.join(info['cpu_flags'])}")
    print(f"llama.cpp: {info['llama_cpp']['version']}; extra CPU buffer types offered: {', '.join(names) or 'none'}")
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    cands = K.configs(names, info["cpu_flags"])
    safe: dict[str, list[tuple[bool, bool]]] = {}
    for fam, path in models.items():  # AMX (or anything) is timed only where its self-test passed here
        res = K.selftest(path, cands, threads=threads)
        # AMX only where it passed; the others also where the test ran out of time (a busy machine proves nothing)
        safe[fam] = [c for c in cands if res[K.label(wanted(names, *c))]["ok"] or
                     (not c[0] and res[K.label(wanted(names, *c))]["ok"] is None)]
        for c in cands:
            r = res[K.label(wanted(names, *c))]
            if r["ok"] is False:
                print(f"{fam} {K.label(wanted(names, *c))}: failed its self-test ({r['error']}); not timed", flush=True)

    # (type, config) -> {"pp512": [round means], "tg128": [...], "kernels": what the load used}
    rows: dict[tuple[str, tuple[bool, bool]], dict] = {}
    for rnd in range(a.rounds):
        for fam in models:  # per type, its configurations back to back: drift hits them alike
            for c in (c for c in cands if c in safe[fam]):
                os.environ["ONDEVICE_AMX"] = "on" if c[0] else "off"
                os.environ["ONDEVICE_REPACK"] = "on" if c[1] else "off"
                recs = ondevice.bench([str(models[fam])], "pp512,tg128", threads=threads,
                                      repetitions=a.repetitions, store=False)
                row = rows.setdefault((fam, c), {"pp512": [], "tg128": [], "kernels": set()})
                for r in recs:
                    if r.status != "ok":
                        print(f"{fam} {K.label(wanted(names, *c))} {r.test}: {r.error}", flush=True)
                        continue
                    row[r.test].append(r.tps_mean)
                    row["kernels"].add(r.kernels)
                    print(f"round {rnd + 1}: {fam} {K.label(wanted(names, *c))} {r.test} {r.tps_mean:.1f} t/s "
                          f"(kernels used: {r.kernels}, load {os.getloadavg()[0]:.1f})", flush=True)
    for k in ("ONDEVICE_AMX", "ONDEVICE_REPACK"):
        os.environ.pop(k, None)

    mean = lambda xs: statistics.mean(xs) if xs else float("nan")
    print(f"\n| type   | configuration    | kernels used     | pp512 t/s | tg128 t/s | pp vs none | tg vs none |")
    print("|--------|------------------|------------------|----------:|----------:|-----------:|-----------:|")
    for fam in models:
        base = rows.get((fam, (False, False)))
        for c in cands:
            row = rows.get((fam, c))
            if not row:
                continue
            pp, tg = mean(row["pp512"]), mean(row["tg128"])
            rel = (f"{pp / mean(base['pp512']):9.2f}x | {tg / mean(base['tg128']):9.2f}x" if base
                   else f"{'-':>10} | {'-':>10}")
            print(f"| {fam:6} | {K.label(wanted(names, *c)):16} | {'/'.join(sorted(row['kernels'])):16} | "
                  f"{pp:9.1f} | {tg:9.1f} | {rel} |")
    print("\nauto (--amx auto --repack auto) over the safe minimum (no extra kernels):")
    for fam, path in models.items():
        choice = K.resolve("auto", "auto", path)
        c = (choice.amx, choice.repack)
        row, base = rows.get((fam, c)), rows.get((fam, (False, False)))
        if not row or not base:
            print(f"  {fam}: auto picks {K.label(choice.bufts)} ({choice.reason}); not timed")
            continue
        print(f"  {fam}: auto picks {K.label(choice.bufts)} ({choice.reason}): pp512 "
              f"{mean(row['pp512']) / mean(base['pp512']):.2f}x, tg128 {mean(row['tg128']) / mean(base['tg128']):.2f}x")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
