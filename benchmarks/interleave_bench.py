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

``--fit-types Q5_0,IQ4_NL,Q4_K``: instead, the speed table of ``ondevice fit`` measured ``--trials`` times
over: the all-Q8_0 variant of SmolLM2's F16 reference and, per type, the variant with every group that fits
it at it, benched together (``-r`` rounds, round levels out). Per type: its ratio to all-Q8_0 over the
trials (mean, min-max, sd), and the sd ``fit.measure.paired_rse`` states from inside each trial (the one
the fit prints), so the two can be compared.

    python benchmarks/interleave_bench.py [--trials 6] [-r 5] [--tests pp128,tg64] [-t 2]
    python benchmarks/interleave_bench.py --fit-types Q5_0,IQ4_NL,Q4_K --trials 10 -r 6 --tests tg128
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
    ap.add_argument("--fit-types", default=None, metavar="T1,T2", help="the fit's speed table instead (see above)")
    args = ap.parse_args(argv)
    if args.fit_types:
        return fit_types(args)

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


def fit_types(args) -> int:
    """The fit's speed table, ``--trials`` times: each type's ratio to all-Q8_0, and its stated error."""
    import math

    import ondevice
    from ondevice.fit.groups import BASE, layout
    from ondevice.fit.measure import Cache, Meter, fit_dir, paired, paired_rse
    from ondevice.models import resolve

    ref = resolve("smollm2-135m-instruct-f16").path  # made by the first `ondevice fit` (dequantized)
    lay, work = layout(ref), fit_dir() / "bench"
    work.mkdir(exist_ok=True)
    meter = Meter(ref, lay, ref, args.threads, Cache(work / "unused.json", "-"), work, print)
    opts, types = lay.options(), args.fit_types.split(",")
    files = {}
    for t in [BASE, *types]:
        plan = {g.name: t for g in lay.groups if t in opts[g.name]} if t != BASE else {}
        files[t] = work / f"all-{t}.gguf"
        if not files[t].is_file():
            meter.build(plan, files[t])
    paths = [str(files[t]) for t in files]
    kinds = [t[:2] for t in args.tests.split(",")]
    print(f"# fit types {', '.join(types)} against all-{BASE}; {args.trials} trials, -r {args.repetitions}, "
          f"{args.tests}, {args.threads} threads; load average {os.getloadavg()[0]:.1f}", flush=True)
    ratios = {(t, k): [] for t in types for k in kinds}
    stated = {(t, k): [] for t in types for k in kinds}
    for trial in range(args.trials):
        recs = ondevice.bench(paths, args.tests, repetitions=args.repetitions, interleave=True,
                              threads=args.threads, store=False, roofline=False)
        runs = {(r.model_path, r.test[:2]): r.tps_samples for r in recs}
        for k in kinds:
            per = [runs[(p, k)] for p in paths]
            figs, rses = paired(per), paired_rse(per)
            for i, t in enumerate(types, start=1):
                ratios[(t, k)].append(figs[i] / figs[0])
                stated[(t, k)].append(math.hypot(rses[i], rses[0]) if None not in (rses[i], rses[0]) else math.nan)
        print(f"trial {trial + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{t} {k} {ratios[(t, k)][-1]:.3f}" for t in types for k in kinds), flush=True)
    print(f"\n| type | test | ratio to all-{BASE}, mean | min-max | sd over the trials | sd stated, mean |\n"
          "|---|---|---:|---:|---:|---:|")
    for (t, k), v in ratios.items():
        m = statistics.fmean(v)
        print(f"| {t} | {k} | {m:.3f} | {min(v):.3f}-{max(v):.3f} | "
              f"{statistics.stdev(v) / m if len(v) > 1 else 0:.1%} | {statistics.fmean(stated[(t, k)]):.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
