"""Goals of ``ondevice fit`` (issue 11): the fitted front against llama.cpp's stock presets, measured here.

    python benchmarks/fit_bench.py [--model smollm2-135m-instruct] [--threads 2] [--fit-only] [--profile edge-1g]

``--profile``: every bench (the fits' and the stock presets') runs under that device profile (``ondevice bench
--profile``), its thread count the default.

``--kld-models``: no measuring; each plan validated so far (cached) against every KLD model's leave-one-out
prediction (``ondevice.fit.interact``), and the model the next fit would use.

``--fit-only``: only section 1's whole fit (the stock Q4_K_M file is quantized for its size, not measured),
with its time per phase: the command that gives a whole fit's wall time.

Prints, all measured in this run on this machine (KLD: mean KL divergence from the family's F16 on the fit's
held-out text, the F16 being the shipped file dequantized; tok/s: ``ondevice bench`` tg128/pp128):

1. the wall time of a whole fit (device speed table re-measured, nothing reused) under the budget
   ``size <= stock Q4_K_M's size``, and its KLD against stock Q4_K_M's (goal: <= 0.8x);
2. stock ftypes (Q2_K ... Q8_0), each without and (K-quants, Q4_0) with the fit's importance matrix, quantized
   from the same F16: size, tg128, pp128, KLD;
3. the fitted front: one more fit per stock size and one per stock tg128 (``--resume``: the measurements
   are reused, only the validated candidates are built and measured), and whether any stock preset beats some fitted variant
   on both size and KLD, or on both tg128 and KLD (goal: none does). For that table every stock file and
   every fitted plan is benched again in one process, interleaved, each round's level taken out
   (``ondevice bench --interleave``, ``fit.measure.paired``): files benched minutes apart compare the
   moments, not the variants. A round of all of them still lasts over a minute, so the tg128+KLD verdict
   is also given per stock preset against its challenger alone (the fastest fitted variant at no more KLD),
   the two files interleaved for 4r rounds of a few seconds ("within noise" when the median ratio's 95%
   interval holds 1); the same weights count as a tie.

Other jobs share this machine: the load average is printed; speeds are comparable only within a run. OpenMP
keeps its default wait policy, as in a user's fit (``OMP_WAIT_POLICY=PASSIVE``, which this script set before,
cost a third of the decode speed on a quiet machine and widened the spread); set it yourself only where other
jobs keep the cores busy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

STOCK = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
IMATRIX_STOCK = ("Q3_K_M", "Q4_0", "Q4_K_M")  # with the fit's imatrix (fewer: time)
TESTS = ("pp128", "tg128")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None, help="bench threads (default: the profile's, else 2)")
    ap.add_argument("--profile", default=None, help="device profile every bench runs under (e.g. edge-1g)")
    ap.add_argument("--stock", default=",".join(STOCK))
    ap.add_argument("--repetitions", type=int, default=None, help="bench rounds (default: the fit's, 6)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse an earlier fit's measurements (its wall time is then not a whole fit's, and is "
                         "not reported)")
    ap.add_argument("--fit-only", action="store_true",
                    help="only the whole fit and its time per phase (no stock presets, no further fits)")
    ap.add_argument("--imatrix-stock", default=",".join(IMATRIX_STOCK),
                    help="stock types also measured with the fit's importance matrix")
    ap.add_argument("--kld-models", action="store_true",
                    help="only the KLD models' leave-one-out predictions over the plans cached for this model "
                         "(no measuring): which model the next fit would use, and why")
    args = ap.parse_args(argv)
    from ondevice.errors import InvalidArgument
    from ondevice.fit.measure import REPETITIONS

    args.repetitions = args.repetitions or REPETITIONS
    from ondevice.fit.profile import fit_profile

    try:
        prof = fit_profile(args.profile)
    except InvalidArgument as e:
        ap.error(str(e))
    args.threads = prof.threads(args.threads)
    on_profile = {"profile": [prof.spec]} if prof.spec else {}

    import ondevice
    from ondevice.eval.api import model_sha256
    from ondevice.fit.inputs import reference_for, texts
    from ondevice.fit.measure import fit_dir, kld_of, speed_of
    from ondevice.models.catalog import resolve
    from ondevice.quant.quantize import ftype_id, run_worker

    say = lambda m: print(m, flush=True)
    src = resolve(args.model)
    ref, note = reference_for(src, None, say)
    calib, heldout, _ = texts(None)
    if args.kld_models:
        return _kld_models(ref, calib)
    tmp = fit_dir() / "bench"
    tmp.mkdir(exist_ok=True)
    print(f"# fit_bench: {src.name}, threads {args.threads}, "
          f"{'profile ' + prof.describe() if prof.spec else 'no profile'}, load average {os.getloadavg()}")
    print(f"# KLD against {note}; held-out text {heldout.name} (ctx 256 x 8 chunks)")

    def measure(path: Path) -> dict:
        sp = speed_of(ondevice.bench([str(path)], ",".join(TESTS), threads=args.threads,
                                     repetitions=args.repetitions, store=False, roofline=False, **on_profile))
        q = kld_of(ondevice.evaluate(str(path), ref=str(ref.path), text=str(heldout), ctx=256, chunks=8,
                                     threads=1, store=False))
        return {"size": path.stat().st_size, **sp, **q}

    def stock(ftype: str, imatrix: Path | None = None, size_only: bool = False) -> dict:
        out = tmp / f"stock-{ftype}{'-im' if imatrix else ''}.gguf"
        run_worker(ref.path, out, ftype_id(ftype), [], False, args.threads, imatrix=imatrix)
        try:
            r = {"size": out.stat().st_size} if size_only else {**measure(out), "file": out}
        finally:
            if size_only:  # the measured files are benched again at the end, with the fitted ones
                out.unlink(missing_ok=True)
        if not size_only:  # as measured, so a long run stopped half-way still shows what it measured
            print(f"# stock {ftype}{'+imatrix' if imatrix else ''}: {r['size'] / 1e6:.1f} MB, tg {r['tg']:.1f}, "
                  f"pp {r['pp']:.1f}, KLD {r['kld']:.4f} (load {os.getloadavg()[0]:.1f})", flush=True)
        return r

    q4km = stock("Q4_K_M", size_only=args.fit_only)
    budget = f"size<={q4km['size']}B"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    first = ondevice.fit(src.name, budget, store=False, reprobe=not args.resume, resume=args.resume,
                         threads=args.threads, speed_tests=TESTS, repetitions=args.repetitions, progress=say,
                         profile=args.profile)
    fit_s = time.perf_counter() - t0
    print(f"\n## time per phase ({'--resume' if args.resume else 'whole fit'}; load average {load0:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end)\n| phase | s | share |\n|---|---:|---:|")
    for k, v in first.phases.items():
        print(f"| {k} | {v:.0f} | {v / fit_s:.0%} |")
    print(f"| **whole fit** | **{fit_s:.0f}** | {first.built} builds, {first.reused} reused |")
    _predicted_vs_measured(first)
    if args.fit_only:
        return 0
    im = first.imatrix
    im_path = next((p for p in (fit_dir() / f"work-{model_sha256(ref)[:12]}").glob("imatrix-*.npz")
                    if hashlib.sha256(p.read_bytes()).hexdigest() == im.get("sha256")), None)
    rows = {"Q4_K_M": q4km}
    for f in args.stock.split(","):
        if f != "Q4_K_M":
            rows[f] = stock(f)
    if im_path is not None:
        for f in args.imatrix_stock.split(","):
            if f:
                rows[f + "+imatrix"] = stock(f, im_path)
    fitted_cands = list(first.candidates)
    sizes = sorted({r["size"] for n, r in rows.items() if n != "Q4_K_M"})
    # the size side of the front: per stock size, the least-KLD variant no larger; the speed side: per stock
    # preset, the least-KLD variant at least as fast (its tg128 as the budget; measured at another moment than
    # the fit's validation, so a fit can miss it by the drift)
    budgets = [(f"size<={size}B", f"{next(n for n, r in rows.items() if r['size'] == size)}'s size", 1)
               for size in sizes]
    budgets += [(f"tg>={r['tg']:.1f}", f"{name}'s tg128 ({r['tg']:.1f})", 2) for name, r in rows.items()]
    for bud, what, validate in budgets:
        try:
            # its progress lines too, prefixed: what a failed fit validated (and retried) is in the log
            res = ondevice.fit(src.name, bud, store=False, resume=True, threads=args.threads, speed_tests=TESTS,
                               repetitions=args.repetitions, validate=validate, profile=args.profile,
                               progress=lambda m, w=what: say(f"  [fit at {w}] {m}"))
            fitted_cands += res.candidates
            m = res.chosen.measured
            print(f"# fitted at {what}: {m['size'] / 1e6:.1f} MB, tg {m['tg']:.1f}, KLD {m['kld']:.4f}; "
                  f"{res.chosen.summary()}", flush=True)
        except ondevice.OndeviceError as e:
            print(f"# no fitted variant at {what}: {str(e).splitlines()[0]}")

    # one row per plan: the per-size fits validate a plan again when it is the best at several sizes
    plans = {tuple(sorted(c.plan.items())): c for c in fitted_cands}
    fitted = [dict(c.measured) for c in plans.values()]  # copies: the fits' own figures stay as validated
    together, pairs = _bench_together(rows, list(plans.values()), fitted, ref, im_path if im.get("used") else None,
                               args, on_profile, tmp)
    took = "not measured (--resume)" if args.resume else f"{fit_s:.0f} s (goal <= 600 s)"
    print(f"\n## whole fit: {took}, load average now {os.getloadavg()[0]:.1f}; "
          f"imatrix {'used' if im.get('used') else 'not used'} (held-out KLD {im.get('kld_without', 0):.4f} "
          f"without, {im.get('kld_with', 0):.4f} with, on the lowest plan)")
    ch = first.chosen.measured
    print(f"## at size <= stock Q4_K_M ({q4km['size'] / 1e6:.1f} MB): fitted {ch['size'] / 1e6:.1f} MB KLD "
          f"{ch['kld']:.4f} vs Q4_K_M {q4km['kld']:.4f}: ratio {ch['kld'] / q4km['kld']:.2f} (goal <= 0.80)")
    print(f"\n(tg/pp: {together})")
    print("\n| variant | size MB | tg128 t/s | pp128 t/s | KLD | beaten by a fitted variant on size+KLD | on tg+KLD "
          "| on tg+KLD, against its challenger alone |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    beats_size = beats_tg = 0
    pair_counts = {"NO": 0, "within noise": 0}
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["size"]):
        s = any(f["size"] <= r["size"] and f["kld"] <= r["kld"] for f in fitted)
        t = any(f["tg"] >= r["tg"] and f["kld"] <= r["kld"] for f in fitted)
        # a stock preset "beats the front" when no fitted variant is at least as good on both axes
        better_size = not s and all(not (f["size"] < r["size"] and f["kld"] < r["kld"]) for f in fitted)
        beats_size += not s
        beats_tg += not t
        p_ok, p_what = pairs.get(name, ("", "not benched"))
        pair_counts[p_ok] = pair_counts.get(p_ok, 0) + 1
        print(f"| stock {name} | {r['size'] / 1e6:.1f} | {r['tg']:.1f} | {r['pp']:.1f} | {r['kld']:.4f} | "
              f"{'yes' if s else 'NO'} | {'yes' if t else 'NO'} | "
              f"{p_ok} {p_what} |"
              + (" (off the front)" if better_size else ""))
    for f in sorted(fitted, key=lambda f: f["size"]):
        print(f"| fitted | {f['size'] / 1e6:.1f} | {f['tg']:.1f} | {f['pp']:.1f} | {f['kld']:.4f} | | | |")
    print(f"\n## stock presets not matched by a fitted variant: {beats_size} on size+KLD, {beats_tg} on tg128+KLD "
          f"in the bench of all; against its challenger alone {pair_counts['NO']} on tg128+KLD (goal: 0), "
          f"{pair_counts['within noise']} within noise; "
          f"shipped file tg {first.shipped['tg']:.1f}, pp {first.shipped['pp']:.1f}")
    _store(src.name, first, rows, fitted_cands, args.threads)
    _predicted_vs_measured(first)
    return 0


def _bench_together(rows: dict, cands: list, fitted: list[dict], ref, imatrix: Path | None, args, on_profile: dict,
                    tmp: Path) -> tuple[str, dict]:
    """Bench every stock file and every fitted plan (rebuilt) again in one process, interleaved, each round's
    level taken out (``fit.measure.paired``): their tg/pp then come from the same moments, and replace the
    figures each got in a process of its own (``rows`` and ``fitted`` in place). Then each stock preset
    against its challenger alone (``_pairs``). Returns what the tg/pp columns are, and the pairs' verdicts.
    Under a memory-capped profile (one process cannot hold them all under its cap) nothing is re-benched."""
    import ondevice
    from ondevice.device import parse_profile
    from ondevice.fit.groups import layout
    from ondevice.fit.measure import Cache, Meter, paired

    stock_files = {n: r.pop("file") for n, r in rows.items() if "file" in r}
    files = list(stock_files.values())
    try:
        if args.profile and parse_profile(args.profile).mem_limit_bytes is not None:
            return "each variant benched in a process of its own, at its own moment (a memory-capped profile)", {}
        meter = Meter(ref.path, layout(ref.path), ref.path, args.threads, Cache(tmp / "unused.json", "x"), tmp,
                      lambda _m: None)
        for i, c in enumerate(cands):
            files.append(meter.build(c.plan, tmp / f"fitted-{i}.gguf", imatrix))
        t0 = time.perf_counter()
        recs = ondevice.bench([str(f) for f in files], ",".join(TESTS), threads=args.threads,
                              repetitions=args.repetitions, interleave=True, store=False, roofline=False, **on_profile)
        figs = {}
        for kind in ("tg", "pp"):
            runs = {str(Path(r.model_path)): r.tps_samples for r in recs if r.test.startswith(kind)}
            figs[kind] = paired([runs[str(f.resolve())] for f in files])
        for k, name in enumerate(stock_files):
            rows[name].update(tg=figs["tg"][k], pp=figs["pp"][k])
        for k, f in enumerate(fitted, start=len(stock_files)):
            f.update(tg=figs["tg"][k], pp=figs["pp"][k])
        what = (f"all {len(files)} variants benched again in one process, -r {args.repetitions} interleaved, "
                f"round levels out ({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})")
        return what, _pairs(rows, stock_files, fitted, files[len(stock_files):], args, on_profile)
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def _pairs(rows: dict, stock_files: dict, fitted: list[dict], fitted_files: list[Path], args,
           on_profile: dict) -> dict:
    """The tg128+KLD verdict, per stock preset, from a bench of two files only: the preset and its challenger
    (the fastest fitted variant, in the bench of all, at no more KLD), interleaved for ``4r`` rounds of a few
    seconds each (each file first in half of them), where a round of all the variants lasts over a minute
    and the machine drifts within it. ``{name: (verdict, what)}``: "yes" when the challenger's median
    per-round tg ratio is >= 1 or its weights are the preset's (the same variant: neither is better); "NO"
    when the whole ~95% interval of that median is below 1 (the preset is faster); else "within noise"."""
    import statistics

    import ondevice

    out = {}
    for name, r in rows.items():
        ok = [k for k, f in enumerate(fitted) if f["kld"] <= r["kld"]]
        if not ok:
            out[name] = ("NO", "no fitted variant at its KLD")
            continue
        k = max(ok, key=lambda k: fitted[k]["tg"])
        a, b = stock_files[name], fitted_files[k]
        if abs(a.stat().st_size - b.stat().st_size) < 1e6 and _weights_sha(a) == _weights_sha(b):
            out[name] = ("yes", f"the same weights ({fitted[k]['size'] / 1e6:.1f} MB fitted)")
            continue
        recs = ondevice.bench([str(a), str(b)], "tg128", threads=args.threads, repetitions=4 * args.repetitions,
                              interleave=True, store=False, roofline=False, **on_profile)
        runs = {str(Path(x.model_path)): x.tps_samples for x in recs}
        ratios = sorted(y / x for x, y in zip(runs[str(a.resolve())], runs[str(b.resolve())]))
        med = statistics.median(ratios)
        lo, hi = _median_interval(ratios)
        verdict = "yes" if med >= 1.0 else "NO" if hi < 1.0 else "within noise"
        what = (f"{fitted[k]['size'] / 1e6:.1f} MB fitted (KLD {fitted[k]['kld']:.4f}): tg x{med:.3f} "
                f"(95% {lo:.3f}-{hi:.3f}, {len(ratios)} rounds)")
        out[name] = (verdict, what)
        print(f"# pair {name} vs {out[name][1]} (load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def _median_interval(xs: list[float]) -> tuple[float, float]:
    """The distribution-free interval of a median from sorted samples: order statistics k and n+1-k, k the
    largest with P(Binomial(n, 1/2) < k) <= 2.5% (at least 95% coverage; the extremes when n < 6)."""
    from math import comb

    n = len(xs)
    k, tail = 0, 0.0
    while k < n and tail + comb(n, k) / 2**n <= 0.025:
        tail += comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def _weights_sha(path: Path) -> str:
    """A digest of a GGUF's tensors (names, types, shapes, data), not its metadata: two files with the same
    weights are the same variant whatever their key-values say."""
    from gguf import GGUFReader

    h = hashlib.sha256()
    for t in GGUFReader(path).tensors:
        h.update(f"{t.name}|{t.tensor_type}|{list(t.shape)}".encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


def _predicted_vs_measured(first) -> None:
    print("## predicted vs measured (validated candidates of the first fit; tg/pp predicted at the base "
          "variant's speed benched just before them, the speed table's own figure in brackets; sd: the standard "
          "deviation the difference has from the runs' spread, table, base now and candidate):")
    def order(vals: list[float]) -> list[int]:
        return sorted(range(len(vals)), key=vals.__getitem__)

    meas = order([c.measured["kld_calib"] for c in first.candidates])
    print(f"   KLD model: {first.kld_model.describe() if first.kld_model else 'additive'}")
    for what, key in (("the KLD model", "kld"), ("the additive sum", "kld_additive")):
        same = order([c.predicted[key] for c in first.candidates]) == meas
        print(f"   KLD rank order of the {len(meas)} candidates by {what}: {'right' if same else 'WRONG'}")
    for c in first.candidates:
        p, m = c.predicted, c.measured
        print(f"   tg {p['tg']:.1f} [{p['tg_table']:.1f}] -> {m['tg']:.1f} ({_off(p, m, 'tg')}); "
              f"pp {p['pp']:.1f} [{p['pp_table']:.1f}] -> {m['pp']:.1f} ({_off(p, m, 'pp')}); "
              f"KLD(calib) {p['kld']:.4f} [sum {p['kld_additive']:.4f}] -> {m['kld_calib']:.4f}; {c.summary()}")


def _off(p: dict, m: dict, kind: str) -> str:
    """How far the measurement is from the prediction, and the standard deviation that difference has."""
    off = f"{m[kind] / p[kind] - 1:+.0%}"
    if p.get(f"{kind}_sd") is None or m.get(f"{kind}_sd") is None:
        return off
    sd = (p[f"{kind}_sd"] ** 2 + m[f"{kind}_sd"] ** 2) ** 0.5 / p[kind]
    return f"{off}, sd {sd:.0%}"


def _kld_models(ref, calib: Path) -> int:
    """Each measured multi-group plan's calibration KLD against every model's leave-one-out prediction."""
    import hashlib as _h
    from collections import Counter

    from ondevice.eval.api import model_sha256
    from ondevice.fit.interact import MODELS, _fit, choose_model, measured_plans
    from ondevice.fit.measure import Cache, fit_dir, quality_section

    entries = Cache(fit_dir() / "kld.json", quality_section(model_sha256(ref), _h.sha256(calib.read_bytes())
                                                           .hexdigest(), 128, 4)).entries()
    if "base" not in entries:
        print("# no fit of this model measured on the default calibration text yet")
        return 1
    base = entries["base"]["kld"]
    ims = Counter(k.partition("|")[2] for k in entries if ";" in k.partition("|")[0])
    im = ims.most_common(1)[0][0].removeprefix("imatrix=") if ims else ""
    singles = {}
    for k, r in entries.items():
        low, _, i = k.partition("|")
        if i.removeprefix("imatrix=") == im and low != "base" and ";" not in low:
            g, t = low.split("=")
            singles[(g, t)] = max(0.0, r["kld"] - base)
    plans = measured_plans(entries, base, im or None, {g for g, _ in singles})
    m = choose_model(singles, plans)
    print(f"# KLD model over the cached plans (imatrix {im or 'none'}): {m.describe()}")
    print("| plan | measured | " + " | ".join(MODELS) + " |\n|---|---:|" + "---:|" * len(MODELS))
    for i, (ps, d) in enumerate(plans):
        rest = plans[:i] + plans[i + 1:]
        preds = [sum(_fit(n, singles, rest)[p] for p in ps) + base for n in MODELS]
        print(f"| {', '.join(f'{g}={t}' for g, t in ps)} | {d + base:.4f} | "
              + " | ".join(f"{v:.4f}" for v in preds) + " |")
    return 0


def _store(family: str, first, stock: dict, cands: list, threads: int) -> None:
    """One ``kind="fit"`` record with the stock presets, so ``ondevice report --fit`` shows them side by side."""
    from ondevice.store import Store
    from ondevice.store.record import created_now

    rec = {"model": f"{family} (fit_bench)", "model_sha256": "", "family": family, "test": "fit_bench",
           "budget": first.budget.describe(), "plan": first.chosen.plan, "threads": threads,
           "candidates": [{"plan": c.plan, "predicted": c.predicted,
                           "measured": {k: v for k, v in c.measured.items() if k != "file"}} for c in cands],
           "stock": stock, "front": [{"plan": c.plan, **c.predicted} for c in first.front],
           "shipped": {"model": family, **first.shipped}, "created": created_now()}
    with Store() as db:
        db.add("fit", rec, session=f"fit-bench-{time.strftime('%Y%m%d-%H%M%S')}", config_key="fit_bench",
               model=rec["model"], model_sha256="", test="fit_bench")


if __name__ == "__main__":
    sys.exit(main())
