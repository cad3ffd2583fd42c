"""How far apart two measurements of the same A/B comparison land: a process per model vs ``--interleave``.

A user comparing two variants of a model benches each and divides. On a machine whose speed drifts over
seconds (VMs, laptops on battery, shared CI), the ratio depends on when each ran. ``ondevice bench
--interleave`` loads both models in one process and runs the repetitions round the models in turn.

Each trial measures the decode (and prompt) tok/s ratio B/A both ways, back to back:

- separate: ``ondevice.bench([A])`` then ``ondevice.bench([B])``, ``-r`` repetitions each (what users do today);
- interleaved: ``ondevice.bench([A, B], interleave=True)``, ``-r`` repetitions (each model once per round);
  the ratio of the means, and the ratio ``fit.measure.paired`` gives (each round's level divided out; for two
  models and an odd ``-r``, the median of the per-round ratios).

Printed: every trial's ratios, then per way the mean, the spread (min-max) and the standard deviation of the
ratio over the trials. The smaller the spread, the more one comparison can be trusted. A is the embedded
SmolLM2 (Q4_1 69%, Q8_0 31%), B the same model requantized to Q8_0 (made once, kept in the bench folder).

    python benchmarks/interleave_bench.py [--trials 6] [-r 5] [--tests pp128,tg64] [-t 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--tests", default="pp128,tg64")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import ondevice
    from ondevice.fit.measure import paired
    from ondevice.models import resolve
    from ondevice.quant import quantize

    a = resolve(None)
    try:
        b = resolve("smollm2-135m-instruct-q8-0")
    except ondevice.OndeviceError:
        b = quantize(None, "Q8_0", "smollm2-135m-instruct-q8-0", allow_requantize=True)
    paths = [str(a.path), str(b.path)]
    kinds = [t[:2] for t in args.tests.split(",")]
    common = {"threads": args.threads, "repetitions": args.repetitions, "store": False, "roofline": False}
    print(f"# A = {a.name}, B = {b.name}; {args.trials} trials, -r {args.repetitions}, {args.tests}, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.1f}", flush=True)

    def by(recs) -> dict:
        return {(r.model_path, r.test[:2]): r.tps_samples for r in recs}

    rows: dict[str, dict[str, list[float]]] = {w: {k: [] for k in kinds} for w in ("separate", "interleaved",
                                                                                    "paired")}
    t0 = time.perf_counter()
    for trial in range(args.trials):
        # the two ways alternate which goes first, so neither always meets the same moment
        ways = ["separate", "interleaved"] if trial % 2 == 0 else ["interleaved", "separate"]
        for way in ways:
            if way == "separate":
                s = by(ondevice.bench([paths[0]], args.tests, **common))
                s.update(by(ondevice.bench([paths[1]], args.tests, **common)))
            else:
                s = by(ondevice.bench(paths, args.tests, interleave=True, **common))
            for k in kinds:
                sa, sb = s[(paths[0], k)], s[(paths[1], k)]
                rows[way][k].append(statistics.fmean(sb) / statistics.fmean(sa))
                if way == "interleaved":  # the fit's estimator: each round's level divided out
                    fa, fb = paired([sa, sb])
                    rows["paired"][k].append(fb / fa)
        print(f"trial {trial + 1}: " + "; ".join(
            f"{k} B/A separate {rows['separate'][k][-1]:.3f}, interleaved {rows['interleaved'][k][-1]:.3f} "
            f"(paired {rows['paired'][k][-1]:.3f})" for k in kinds), flush=True)
    print(f"\n## ratio B/A over {args.trials} trials ({time.perf_counter() - t0:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f})\n| test | way | mean | min-max | std |\n|---|---|---:|---:|---:|")
    for k in kinds:
        for way, vals in rows.items():
            print(f"| {k} | {way} | {statistics.fmean(vals[k]):.3f} | {min(vals[k]):.3f}-{max(vals[k]):.3f} | "
                  f"{statistics.stdev(vals[k]) if len(vals[k]) > 1 else 0:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
