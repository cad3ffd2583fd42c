"""``ondevice.fit(model, budget)``: the best variant of a model for this device under a budget.

OHQ (on-chip hardware-aware quantization) in llama.cpp terms: measure what each weight type costs on this
CPU (``measure``: whole-model variants timed by the real bench), measure how much each tensor group hurts
quality when lowered (real KLD against the reference on calibration text), optionally weight the rounding
error by an importance matrix collected on that text (``imatrix``; kept only where it measurably lowers
KLD), plan per-group types on the predicted Pareto front (``plan``), then build the best few plans and
measure them for real (bench + KLD on held-out text). The winner goes into the model store with its plan,
predictions and measurements as provenance, and the front into the SQLite store for ``ondevice report``.

The reference ("the family's F16") is the F16 variant in the store; when there is none it is made by
dequantizing the shipped file (``quantize F16 --allow-requantize``), so it is a reference *for the shipped
file*, not the original weights. Every fitted variant is quantized from that F16 file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import fields
from ..errors import InvalidArgument
from ..models.gguf_split import total_size
from .budget import Budget, parse_budget, say_if_shipped_is_better, shipped_meets
from .groups import BASE, CANDIDATES, layout, quant_size
from .imatrix import choose_imatrix
from .inputs import check_settings, reference_for, texts
from .interact import KldModel, choose_model, measured_plans
from .knobs import knobs_note, runtime_record, tune
from .measure import (
    NOISY_NOTE,
    REPETITIONS,
    Cache,
    Item,
    Meter,
    device_section,
    fit_dir,
    noisy_mark,
    plan_key,
    quality_section,
)
from .memory import mib, runtime_model
from .plan import (
    Candidate,
    Table,
    at_speed,
    choose,
    front_table,
    impossible,
    make_table,
    objective,
    pareto_front,
    safe_first,
)
from .profile import fit_profile
from .quality import Quality, parse_quality
from .register import keep_shipped_knobs, log_fit, say_knobs, store_fit


@dataclass
class FitResult:
    model: str
    ref: str
    budget: Budget
    chosen: Candidate
    name: str | None  # the stored variant (None when not stored)
    path: Path | None
    candidates: list[Candidate]
    front: list[Candidate]
    table: Table
    shipped: dict  # the shipped file's measured size, tg, pp, kld
    imatrix: dict  # whether an importance matrix was used and why
    seconds: float
    built: int
    reused: int
    lines: list[str] = field(default_factory=list)  # the printed report
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase, in order
    kld_model: KldModel | None = None  # how plan KLDs were predicted from the singles
    transform: dict = field(default_factory=dict)  # whether the equivalent transform was used and why
    profile: dict | None = None  # the device profile the speeds were measured under (None: the host)
    quality: dict = field(default_factory=dict)  # --quality: what was measured, and the reference's figure


@fields.keywords("ondevice.fit()")
def fit(model: str | os.PathLike[str] | None = None, budget: str | Budget | None = None, *,
        ref: str | os.PathLike[str] | None = None, name: str | None = None,
        types: tuple[str, ...] | list[str] = CANDIDATES, bands: int = 1,
        groups: tuple[str, ...] | list[str] | None = None, threads: int | None = None,
        text: str | os.PathLike[str] | None = None, calib_ctx: int = 128, calib_chunks: int = 4,
        eval_ctx: int = 256, eval_chunks: int = 8, validate: int = 3, imatrix: str = "auto", transform: str = "off",
        speed_tests: tuple[str, ...] = ("pp128", "tg64"), repetitions: int = REPETITIONS, resume: bool = False,
        reprobe: bool = False, store: bool = True, force: bool = False, knobs: bool = False,
        knobs_depth: int = 1024, profile: str | object | None = None, quality: str | None = None,
        quality_limit: int | None = 10,
        progress: Callable[[str], None] | bool | None = None) -> FitResult:
    """Fit ``model`` to this device under ``budget`` (``"size<=110MB,tg>=100,kld<=0.02"``; see ``budget``).

    Args:
        ref: the reference variant (default: the family's F16, made from the shipped file when missing).
        name: the stored variant's name (default ``<model>-fit-<plan hash>``).
        types: candidate ggml types; each group gets those its row size allows. ``Q8_0`` is the base.
        bands: split each kind of matrix into this many bands of consecutive layers (more groups: finer
            plans, a slower fit).
        groups: fit only these kinds (``attn_qk``, ``attn_v``, ``attn_output``, ``ffn_gate_up``, ``ffn_down``,
            ``token_embd``, ``output``; ``attn_qkv``: both attn kinds); the other matrices stay at the base
            type. None: all.
        threads: threads for the speed measurements (default: the profile's, else 2; quantizing uses every
            core, and so many one-thread KLD runs go at once).
        text: calibration text file (default: Python's pydoc topics); its first third calibrates, its last
            third is held out for validation.
        calib_ctx, calib_chunks / eval_ctx, eval_chunks: KLD chunking on each part.
        validate: how many of the best predicted plans are built and measured.
        imatrix: ``auto`` (collect one, keep it where it lowers KLD), ``on`` or ``off``.
        transform: ``off`` (the default), ``auto`` (try the equivalent per-channel scaling of ``transform`` at
            the lowest plan; where it lowers that plan's held-out KLD, plan with it and keep it for each
            validated candidate whose held-out KLD it lowers, the others built without it) or ``on``. Off by
            default: on SmolLM2 it gave no measurable gain in a whole fit, cost KLD at Q4_1/Q4_K, and its phase
            took ~7 minutes.
        resume: reuse quality measurements of an earlier (killed) fit; device speeds are always reused
            (per machine and build) unless ``reprobe``.
        store: write the chosen variant into the model store and the fit into the SQLite store.
        knobs: also time the chosen file's runtime knobs (threads, flash attention, ubatch, KV type; ``knobs``)
            and keep the measured best in its ``measured["runtime"]``; ``knobs_depth``: the KV depth they are also
            decoded at (flash attention's cost grows with it; 0: only the fit's tests).
        profile: a device profile (``phone-4g``, ``edge-1g``, ``threads=1,mem=2G,cpus=0`` or a
            ``DeviceProfile``): every bench runs under it, its threads are the default, its memory cap bounds
            the file (``fit.profile``).
        quality: also measure the validated candidates by ``ppl`` (held-out perplexity) or an eval suite
            (name or JSONL path) on ``quality_limit`` items (``fit.quality``); ``score>=X`` budgets it.
    """
    from ..eval.api import model_sha256
    from ..models.catalog import resolve, store_variants

    t0 = time.perf_counter()
    lines: list[str] = []
    phases: dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    sink = fields.progress_sink(progress)

    def say(msg: str) -> None:
        lines.append(msg)
        sink(msg)

    bud = parse_budget(budget)
    prof = fit_profile(profile)
    threads = prof.threads(threads)
    qual = parse_quality(quality, quality_limit, bud)
    types = tuple(t.strip().upper() for t in types)
    for t in types:
        quant_size(t)
    if BASE not in types:
        types = (BASE, *types)
    check_settings(imatrix=imatrix, transform=transform, speed_tests=speed_tests, calib_ctx=calib_ctx,
                   eval_ctx=eval_ctx, calib_chunks=calib_chunks, eval_chunks=eval_chunks, threads=threads,
                   name=name, validate=validate, repetitions=repetitions, knobs_depth=knobs_depth)
    if name is not None and name in store_variants() and not force:
        raise InvalidArgument(f"a variant named {name!r} already exists; pass --name NEW (name=) or --force "
                              f"(force=True)")
    src = resolve(model)
    from ..quant.quantize import refuse_container

    refuse_container(src.path)  # before its info, which would ask for a key fit has no flag for
    trained = src.info.context_length
    for flag, n in (("--calib-ctx", calib_ctx), ("--eval-ctx", eval_ctx)):
        if trained and n > trained:  # refused now, not after the reference and the speed table
            raise InvalidArgument(f"{flag} {n} is above {src.name}'s trained context ({trained}); use {trained} "
                                  f"or less")
    if transform == "on":  # refused now, not after the reference, the speed table and the imatrix
        from .transform import check_arch

        check_arch(src.path)

    def check_smallest(lay, slack: int = 0) -> None:  # sizes are exact: no need to measure
        if bud.size is not None and lay.smallest(types) - slack > bud.size:
            size = total_size(src.path)
            raise InvalidArgument(f"budget {bud.describe()!r}: size<={bud.size / 1e6:.3g}MB cannot be met by a "
                                  f"fitted variant: the smallest with types {','.join(types)} is "
                                  f"{lay.smallest(types) / 1e6:.1f}MB (every group at its smallest type, the tensors "
                                  f"outside --groups at the reference's type); "
                                  f"{shipped_meets(size, bud.size, f'{size / 1e6:.1f} MB')}loosen the size, add "
                                  f"lower --types or quantize more --groups")
        prof.check_smallest(lay.smallest(types) - slack, types)

    # the same tensors in the shipped file: an unreachable size is refused before a reference is made for it
    # (their files differ only in padding, which the slack covers; the exact check follows)
    check_smallest(layout(src.path, bands, groups), slack=1 << 16)
    with phase("reference"):
        reference, ref_note, dequantized = reference_for(src, ref, say)
    ref_sha = model_sha256(reference)
    lay = layout(reference.path, bands, groups)
    check_smallest(lay)
    calib, heldout, text_desc = texts(text)
    csha = hashlib.sha256(calib.read_bytes()).hexdigest()
    hsha = hashlib.sha256(heldout.read_bytes()).hexdigest()
    q_cache = fit_dir() / "kld.json"
    calib_q = (Cache(q_cache, quality_section(ref_sha, csha, calib_ctx, calib_chunks)), calib, calib_ctx,
               calib_chunks)
    held_q = (Cache(q_cache, quality_section(ref_sha, hsha, eval_ctx, eval_chunks)), heldout, eval_ctx,
              eval_chunks)
    section = device_section(ref_sha, threads, tuple(speed_tests), repetitions, prof.cache_id())
    workdir = fit_dir() / f"work-{ref_sha[:12]}"
    workdir.mkdir(exist_ok=True)
    from ..engine.resources import physical_cores

    seen: set = set()  # measurements of this run, reused by both meters
    jobs = max(1, physical_cores())  # one-thread KLD runs at once, as quantizing uses all cores (never during a bench)
    meter = Meter(reference.path, lay, reference.path, threads, Cache(fit_dir() / "speed.json", section),
                  workdir, say, tuple(speed_tests), repetitions, reprobe, resume, jobs=jobs, seen=seen,
                  profile=prof.spec)
    say(f"fit {src.name} under budget {bud.describe()}; reference {ref_note}")
    say(f"device: {'profile ' + prof.describe() if prof.spec else 'this host'}, {threads} thread(s) for the "
        f"benches" + (f"; quality: {qual.describe()}" if qual.kind else ""))
    say(f"groups: {', '.join(f'{g.name} ({g.n / 1e6:.1f}M)' for g in lay.groups)}")
    for ln in lay.refused(types):
        say(f"  rows refuse some types (llama.cpp's fallback instead): {ln}")

    # 1. the device: the shipped file and one variant per type, timed by the bench
    opts = lay.options(types)
    low = {g.name: opts[g.name][-1] for g in lay.groups}  # every group at its lowest candidate
    asked = bud  # relative speed bounds are resolved against the shipped file benched with the variants
    shipped_item = Item({}, path=src.path, name=f"shipped:{model_sha256(src)}")
    if prof.profile.mem_limit_bytes is not None:  # one bench of the smallest variant says what fits, before the rest
        probe = replace(meter, speed_cache=Cache(meter.speed_cache.path, section + "-memory"), repetitions=1)
        say("memory cap: the smallest variant first (what the runtime needs besides the weights under it)")
        smallest = probe.measure([Item(low)], speed=True)[0]["speed"]
        meter.built, meter.reused = meter.built + probe.built, meter.reused + probe.reused
        prof.fits(smallest, lay.smallest(types))
    with phase("device"):
        items = [Item({}, [calib_q], memory=bud.mem is not None)]  # peak RSS alone in a process: for mem<=
        for t in dict.fromkeys(t for ts in opts.values() for t in ts):  # the types offered (fallbacks too)
            if t == BASE or not any(g.compute and t in opts[g.name] for g in lay.groups):
                continue
            plan = {g.name: t for g in lay.groups if t in opts[g.name]}
            # the variant of the lowest type is usually the imatrix check's plan: score it while it is built
            items.append(Item(plan, [held_q] if plan == low and "auto" in (imatrix, transform) else [],
                              memory=bud.mem is not None))
        res = meter.measure([*items, replace(shipped_item, memory=bud.mem is not None)], speed=True)
        r = res.pop()
        shipped = {**r["speed"], "size": total_size(src.path), "mem": (r["mem"] or {}).get("peak_rss")}
        bud = asked.resolved(shipped.get("tg"), shipped.get("pp"))
    base = res[0]
    type_speed = {next(iter(it.plan.values())): r["speed"] for it, r in zip(items[1:], res[1:])}
    say("device speed table (tok/s, every group the type fits at that type, the rest " + BASE + "):")
    say(f"  shipped {src.info.quant_summary}: tg {shipped['tg']:.1f}, pp {shipped['pp']:.1f}{noisy_mark(shipped)}")
    say(f"  {BASE:7s} tg {base['speed']['tg']:6.1f}  pp {base['speed']['pp']:7.1f}{noisy_mark(base['speed'])}")
    type_mem = {next(iter(it.plan.values())): r["mem"] for it, r in zip(items[1:], res[1:])}
    for t, s in type_speed.items():
        say(f"  {t:7s} tg {s['tg']:6.1f}  pp {s['pp']:7.1f}{noisy_mark(s)}"
            + (f"  peak RSS {mib(type_mem[t]['peak_rss'])} MiB" if type_mem[t] else ""))
    mem_model = None if bud.mem is None else runtime_model(lay, opts, base["mem"], type_mem, shipped, say, bud.mem)
    fits, note = prof.fits(base["speed"], lay.smallest(types))
    if fits is not None:
        say(f"profile {prof.name}: {note}")
        bud = replace(bud, fits=fits)

    # 2. importance matrix: kept only when it lowers the held-out KLD of the lowest-type variant
    with phase("imatrix"):
        im_path, im_sha, im_info = choose_imatrix(imatrix, meter, reference, low, calib, calib_ctx,
                                                   calib_chunks, held_q, workdir, say, transform != "off")
    with phase("transform") if transform != "off" else nullcontext():  # kept where it lowers KLD (``transform``)
        from .transform import choose as choose_transform

        tf = choose_transform(transform, meter, reference, low, im_info.get("file"), calib_q, held_q, im_path,
                              im_sha, workdir, say)
        plain = (reference.path, im_path, im_sha, calib_q, held_q)  # what ``auto`` compares each candidate with
        if tf.used:  # every later variant is quantized from the transformed reference, scored against the F16
            meter.source, im_path, im_sha = tf.source, tf.imatrix, tf.imatrix_sha
            calib_q, held_q = tf.quality(calib_q), tf.quality(held_q)
            base = {**base, "kld": meter.measure([Item({}, [calib_q])])[0]["kld"]}

    # 3. sensitivity: each group lowered alone, KLD on the calibration text
    pairs = [(g.name, t) for g in lay.groups for t in opts[g.name] if t != BASE]
    # with a KLD bound, the lowest plan on both texts too: the bound is checked on held-out text
    spread = [Item(low, [calib_q, held_q], im_path, im_sha)] if bud.kld is not None else []
    with phase("sensitivity"), meter.splicing(opts, im_path):  # one build per type; the plans spliced from them
        res = meter.measure([Item({g: t}, [calib_q], im_path, im_sha) for g, t in pairs] + spread)
    held_over_calib = 1.0
    if spread:
        calib_k, held_k = (x["kld"] for x in res.pop()["kld"])
        held_over_calib = max(1.0, held_k / calib_k) if calib_k > 0 else 1.0
    group_kld = {p: r["kld"][0]["kld"] for p, r in zip(pairs, res)}
    base_kld = base["kld"][0]["kld"]
    say(f"sensitivity (KLD on the calibration text, each group lowered alone; all {BASE}: {base_kld:.5f}):")
    for g in lay.groups:
        say(f"  {g.name:14s} " + "  ".join(f"{t} {group_kld[(g.name, t)]:.4f}" for t in opts[g.name] if t != BASE))

    # 4. plan; the KLD model learns from the plans earlier fits validated on this text (``interact``)
    t_plan = time.perf_counter()
    singles = {p: max(0.0, k - base_kld) for p, k in group_kld.items()}
    kmodel = choose_model(singles, measured_plans(calib_q[0].entries(), base_kld, im_sha,
                                                  {g.name for g in lay.groups}))
    say(f"KLD model: {kmodel.describe()}")
    table = make_table(lay, base["speed"], type_speed, base_kld, group_kld, kmodel.terms, opts, mem_model)
    front = pareto_front(table, with_pp=bud.pp is not None, with_mem=bud.mem is not None)
    say(f"predicted Pareto front ({len(front)} plans; KLD on the calibration text):")
    lines_front = front_table(front)
    for ln in lines_front:
        say(ln)
    front_rows = [{"plan": c.plan, **c.predicted} for c in front]  # as printed: validation re-predicts its picks
    picks = choose(front, bud, validate)
    strict = bud  # the budget on calibration text: plans just under a KLD bound there miss it on held-out text
    if held_over_calib > 1:
        strict = replace(bud, kld=bud.kld / held_over_calib)
        say(f"KLD bound: on the lowest plan the held-out KLD is {held_over_calib:.2f}x the calibration KLD, so the "
            f"plans validated first are those predicted at kld<={strict.kld:.4f} on calibration text")
        picks = safe_first(front, strict, picks, validate)
    phases["plan"] = time.perf_counter() - t_plan

    # 5. validate: build, bench and score the best plans for real; the all-base variant is benched with them,
    # so the predictions can be put at this moment's speed (the table may be from another load). Benched
    # now, not read from an earlier fit's cache (only --resume reuses them: the same fit, killed)
    vcache = Cache(fit_dir() / "speed.json", section + "-validate")
    vmeter = Meter(meter.source, lay, reference.path, threads, vcache, workdir, say, tuple(speed_tests),
                   repetitions, reprobe or not resume, resume, jobs=jobs, seen=seen, profile=prof.spec,
                   sources=meter.sources, noted=meter.noted)
    relative = asked.tg_rel is not None or asked.pp_rel is not None
    results: list[dict] = []  # each validated pick's measurements, in the order of ``validated``
    validated: list[Candidate] = []

    def validate_round(cands: list[Candidate]) -> dict:
        """Build, bench and score ``cands`` with the all-base variant and the shipped file (its tok/s of this
        moment: a relative bound's, the report's and the shipped-is-better check's); returns the base variant's
        speed of this moment."""
        nonlocal bud
        items = [Item({})]
        for c in cands:
            keep = workdir / f"candidate-{len(validated) + len(items) - 1}.gguf"
            keep.unlink(missing_ok=True)
            items.append(Item(c.plan, [calib_q, held_q], im_path, im_sha, keep, memory=True))
        if resume and any(vmeter._speed_hit(it.key) is None for it in items[1:]):
            # a candidate is benched now, so the all-Q8_0 variant (and the shipped file) are benched with it: speeds
            # cached minutes before would put the predictions at another moment's speed
            vmeter.reprobe = True
        with phase("validation"):
            res = vmeter.measure(items + [shipped_item], speed=True)
        now, now_shipped = res[0]["speed"], res.pop()["speed"]
        shipped["validation"] = {k: now_shipped[k] for k in ("tg", "pp")}
        if relative:
            now_bud = asked.resolved(shipped["validation"]["tg"], shipped["validation"]["pp"])
            say(f"budget {asked.describe()}: the shipped file benched with the candidates made tg "
                f"{shipped['validation']['tg']:.1f}, pp {shipped['validation']['pp']:.1f} tok/s, so "
                + ", ".join(f"{k}>={getattr(now_bud, k):.1f}" for k in ("tg", "pp") if getattr(asked, k + "_rel")))
            bud = replace(bud, tg=now_bud.tg, pp=now_bud.pp)
        for c, it, r in zip(cands, items[1:], res[1:]):
            c.predicted.update(table.predict_at(c.plan, now))
            c.measured = {"size": it.keep.stat().st_size, "tg": r["speed"]["tg"], "pp": r["speed"]["pp"],
                          **{f"{k}_sd": r["speed"][k] * r["speed"][f"{k}_rse"] if r["speed"].get(f"{k}_rse") else None
                             for k in ("tg", "pp")},
                          "kld": r["kld"][1]["kld"], "kld_calib": r["kld"][0]["kld"],
                          "kld_err": r["kld"][1]["kld_err"], "noisy": r["speed"].get("noisy"),
                          "mem": (r["mem"] or {}).get("peak_rss"), "mem_anon": (r["mem"] or {}).get("rss_anon"),
                          "file": str(it.keep)}
        if tf.used and transform == "auto":  # kept per candidate where it lowers the held-out KLD
            from .transform import keep_where_it_helps

            with phase("validation"):
                keep_where_it_helps(vmeter, cands, items[1:], res[1:], plain, say)
        validated.extend(cands)
        results.extend(res[1:])
        return now

    now = validate_round(picks)
    if not any(not bud.violations(c.measured) for c in picks) and any(
            bud.speed_violations(c.measured) for c in picks):
        # the table's tok/s are of another moment: re-predicted at this one's, the next plans may meet the bound
        again = at_speed(front, replace(strict, tg=bud.tg, pp=bud.pp), table, now, validate, exclude=picks)
        if again:
            say(f"no validated plan met the speed bound as measured ({BASE} variant now {now['tg']:.1f} tg / "
                f"{now['pp']:.1f} pp tok/s, {base['speed']['tg']:.1f} / {base['speed']['pp']:.1f} in the table): "
                f"validating {len(again)} more plan(s) predicted to meet it at this moment's speed")
            now = validate_round(again)
    picks = validated

    def transformed(c: Candidate) -> bool:
        """Whether ``c``'s file was quantized from the transformed reference (``auto`` decides per candidate)."""
        return tf.used and c.measured.get("transform", {}).get("used", True)

    if qual.kind:
        from .quality import measure as measure_quality

        with phase("quality"):
            q_ref = measure_quality(qual, vmeter, picks, results, [Path(c.measured["file"]) for c in picks],
                                    reference, ref_sha, held_q)
        bud = bud.scored(q_ref.get("score"))
    else:
        q_ref = {}
    say(f"validation (measured: real bench, KLD on held-out text; predicted KLD is on the calibration text; "
        f"tg pred: from the speed table, then at the {BASE} variant's speed now, {now['tg']:.1f} vs "
        f"{base['speed']['tg']:.1f} tok/s in the table; +- one standard deviation from the runs' spread, not the host's slower shifts):")
    w = max([len(c.summary()) for c in picks] + [len("reference") if q_ref else 0])
    rss = any(c.predicted.get("mem") is not None for c in picks)  # a mem bound predicted them: both columns
    say(f"  {'plan':{w}s} {'size MB':>8} " + f"{'RSS pred':>8} " * rss + f"{'RSS MiB':>8} {'tg table':>8} "
        f"{'tg pred':>11} {'tg meas':>11} {'KLD sum':>8} {'KLD pred':>9} {'KLD calib':>9} {'KLD held':>9}"
        + qual.header())
    for c in picks:
        p, m = c.predicted, c.measured
        say(f"  {c.summary():{w}s} {m['size'] / 1e6:8.1f} " + f"{mib(p.get('mem')):>8} " * rss
            + f"{mib(m.get('mem')):>8} {p['tg_table']:8.1f} {_pm(p['tg'], p.get('tg_sd')):>11} "
            f"{_pm(m['tg'], m.get('tg_sd')) + noisy_mark(m):>11} {p['kld_additive']:8.4f} {p['kld']:9.4f} {m['kld_calib']:9.4f} "
            f"{m['kld']:9.4f}" + qual.cell(m))
    if q_ref:
        pad = 8 * 3 + 11 * 2 + 4 + 9 * 3 + 3 + 9 * rss  # the columns between size and the quality's
        say(f"  {'reference':{w}s} {reference.path.stat().st_size / 1e6:8.1f} {'':>{pad}}"
            + qual.cell(q_ref) + f"  ({reference.name}; {qual.describe()})")
    ok = [c for c in picks if not bud.violations(c.measured)]
    for c in (c for c in picks if c not in ok):  # said, so a miss of a bound is never silent
        say(f"  over the budget as measured, not chosen: {c.summary()} ({', '.join(bud.violations(c.measured))})")
    if not ok:
        _cleanup(workdir)
        raise InvalidArgument(impossible(picks, bud, measured=True))
    chosen = min(ok, key=lambda c: objective(bud)(c.measured))
    shipped_wins = dequantized and say_if_shipped_is_better(shipped, chosen.measured, bud, say)
    extra = {"profile": prof.to_dict() if prof.spec else None, "quality": {**qual.to_dict(), "reference": q_ref}}
    in_hand = shipped_wins and store and name is None  # the file the user has is the answer: no copy is stored
    if in_hand:  # a variant no better than the file in hand is not worth a copy
        say("no variant stored: the shipped file is the answer (name the variant with --name to store it anyway); "
            "the fit is logged for `ondevice report --fit`")
        log_fit(src.name, model_sha256(src), chosen, src, bud, picks, front_rows, shipped, threads, extra,
                shipped_chosen=True)
        store = False
    if knobs:  # timed on the file that will be used: the stored variant's, or the one in hand
        with phase("knobs"):
            rt = tune(src.path if in_hand else chosen.measured["file"], threads, tuple(speed_tests), repetitions,
                      "pp" if bud.pp is not None and bud.tg is None else "tg", say, profile=prof, depth=knobs_depth,
                      what=f"the file in hand, {src.name}" if in_hand else "the chosen file",
                      floors={m: v for m in ("tg", "pp") if (v := getattr(bud, m)) is not None})
        if in_hand:
            keep_shipped_knobs(src, runtime_record(rt), extra["profile"], say)
        else:
            chosen.measured["runtime"] = runtime_record(rt)
    vname = stored = None
    if store:
        c_im_sha = im_sha if transformed(chosen) else plain[2]  # the importance matrix its file was made with
        key = plan_key(chosen.plan, c_im_sha) + (tf.tag if transformed(chosen) else "")
        vname = name or f"{Path(src.name).stem.lower()}-fit-{hashlib.sha256(key.encode()).hexdigest()[:6]}"
        with phase("store"):
            stored = store_fit(vname, chosen, src, reference, ref_note, lay, bud, picks, front_rows, shipped, im_info,
                            c_im_sha, text_desc, threads, force, {**tf.info, "chosen": transformed(chosen)},
                            extra).path
        say_knobs(vname, chosen.measured.get("runtime"), prof.spec, say)
    _cleanup(workdir)
    for c in picks:  # their files are gone (the chosen one moved into the store: ``path``)
        c.measured.pop("file", None)
    secs = time.perf_counter() - t0
    say(f"chosen: {chosen.summary()}" + (f" (transformed, alpha {tf.info['alpha']:g})" if transformed(chosen) else "")
        + f" -> {vname or '(not stored)'}: {chosen.measured['size'] / 1e6:.1f} MB, "
        + (f"peak RSS {mib(chosen.measured['mem'])} MiB, " if chosen.measured.get("mem") else "")
        + f"tg {chosen.measured['tg']:.1f} tok/s{noisy_mark(chosen.measured)}"
        + (f" under profile {prof.name}" if prof.spec else "")
        + knobs_note(chosen.measured.get("runtime"))
        + f", KLD {chosen.measured['kld']:.4f} (held-out)" + _quality_note(qual, chosen.measured, q_ref)
        + f", {secs:.0f} s, {meter.built + vmeter.built} builds, {meter.spliced + vmeter.spliced} spliced, "
        f"{meter.reused + vmeter.reused} measurements reused (cached, or already made in this fit)")
    say("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    if any(noisy_mark(m) for m in (shipped, base["speed"], *type_speed.values(), *(c.measured for c in picks))):
        say(NOISY_NOTE)
    return FitResult(src.name, reference.name, bud, chosen, vname, stored, picks, front, table, shipped, im_info,
                     secs, meter.built + vmeter.built, meter.reused + vmeter.reused, lines, phases, kmodel, tf.info,
                     profile=prof.to_dict() if prof.spec else None, quality={**qual.to_dict(), "reference": q_ref})


def _pm(value: float, sd: float | None) -> str:
    """``69.6+-2.9`` (tok/s and its standard deviation; the value alone when there is none)."""
    return f"{value:.1f}" + (f"+-{sd:.1f}" if sd is not None else "")


def _quality_note(qual: Quality, m: dict, ref: dict) -> str:
    if qual.kind == "ppl":
        return f", ppl {m['ppl']:.3f} (reference {ref['ppl']:.3f})"
    if qual.kind == "suite":
        return f", {qual.suite} score {qual.cell(m).strip()} (reference {qual.cell(ref).strip()})"
    return ""


def _cleanup(workdir: Path) -> None:
    for f in [*workdir.glob("candidate-*.gguf"), *workdir.glob("transform-*.gguf"), *workdir.glob("type-*.gguf")]:
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the folder too, where nothing else (an importance matrix) is kept there
        workdir.rmdir()
