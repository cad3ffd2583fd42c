"""A fit's ``mem<=`` bound: peak resident memory (RSS) at the fit's bench shapes, measured and predicted.

Measured: each file runs the fit's bench tests once, alone in a bench process (under the profile), and its
peak RSS from the start of a test (after load and warm-up) is kept: the mapped weights llama.cpp touched, the
KV cache at the bench's context, the compute buffers, the repacked copies CPU_REPACK makes of the types it has
kernels for on this CPU (on x86: Q4_0, IQ4_NL, Q4_K, Q2_K; not Q5_0, Q5_K, Q6_K, Q8_0): anonymous memory beside
their mapped pages, which stay resident), the interpreter. Which types they are is measured, not assumed: each
type's variant is benched.

Predicted (a plan has no file before it is built): its exact file size plus the runtime's memory, ``R(v) =
peak_rss(v) - size(v)`` (what a variant holds beyond its file), interpolated linearly between the measured
variants: ``R(plan) = R(base) + sum_g n_g * (R(v_T) - R(base)) / W_T`` over the plan's groups g at a type T,
``n_g`` their weights and ``W_T`` the weights the variant ``v_T`` (every group offered T at T) lowers. A
repacked type's extra copy thus costs in proportion to the share of its weights a plan holds at that type;
the all-base and every per-type variant are predicted exactly as measured.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidArgument
from .budget import shipped_meets
from .groups import BASE, Layout
from .measure import Cache, speed_of


def _cache(meter) -> Cache:
    return Cache(meter.speed_cache.path, meter.speed_cache.section + "-memory")


def mem_hit(meter, key: str) -> dict | None:
    """The cached peak RSS of ``key`` (None: measure it; ``reprobe`` measures again once per fit)."""
    cache = _cache(meter)
    if meter.reprobe and (cache.section, key) not in meter.seen:
        return None
    return cache.get(key)


def memories(meter, files: list[tuple[str, Path]], speeds: list[dict | None]) -> list[dict]:
    """``{"peak_rss", "rss_anon", "rss_model"}`` (bytes; None where /proc does not say) of each ``(key, path)``
    running ``meter``'s tests alone in a process, one repetition; a speed measured in a process of its own
    (a memory-capped profile: ``speeds``) already holds them."""
    import ondevice

    cache = _cache(meter)
    out = []
    for (key, path), own in zip(files, speeds):
        hit = mem_hit(meter, key)
        if hit is None and own and own.get("peak_rss") and own.get("rss_anon"):
            hit = {k: own.get(k) for k in ("peak_rss", "rss_anon", "rss_model")}
        if hit is None:
            b = ondevice.bench([str(Path(path).resolve())], ",".join(meter.tests), repetitions=1, print_notes=False,
                               threads=meter.threads, store=False, roofline=False,
                               **({"profile": [meter.profile]} if meter.profile else {}))
            meter._notes(b.notes)
            if b.interrupted:  # Ctrl-C stopped the bench: nothing half-measured goes to the cache
                raise KeyboardInterrupt
            s = speed_of(list(b))
            hit = {k: s.get(k) for k in ("peak_rss", "rss_anon", "rss_model")}
        cache.put(key, hit)
        meter.seen.add((cache.section, key))
        out.append(hit)
    return out


def runtime_model(layout: Layout, opts: dict[str, list[str]], base: dict | None, per_type: dict[str, dict | None],
                  shipped: dict, say, bound: int) -> tuple[int, dict[str, float]]:
    """(``R(base)``, per type its extra runtime bytes per weight over the base; see the module doc) from the
    base variant's and each type variant's :func:`memories` record; refused where no peak RSS was measured, and
    where no plan is predicted under ``bound`` (before the sensitivity runs)."""
    say(f"  peak RSS at the bench shapes, alone in a process: {BASE} {mib((base or {}).get('peak_rss'))} MiB, "
        f"shipped {mib(shipped.get('mem'))} MiB; a plan's is predicted from them (fit.memory)")
    if not base or not base.get("peak_rss") or any(not m or not m.get("peak_rss") for m in per_type.values()):
        raise InvalidArgument("budget mem<=: this system does not report a process's peak RSS (/proc/self/status "
                              "VmHWM), so it cannot be measured; bound size<= instead")
    r_base = base["peak_rss"] - layout.size({})
    per_weight = {BASE: 0.0}
    for t, m in per_type.items():
        plan = {g.name: t for g in layout.groups if t in opts[g.name]}
        w = sum(g.n for g in layout.groups if t in opts[g.name])
        per_weight[t] = (m["peak_rss"] - layout.size(plan) - r_base) / w if w else 0.0
    # the objective is additive over groups: the least is each group at its own least
    least = {g.name: min(opts[g.name], key=lambda t, g=g: g.bytes(t) + g.n * per_weight.get(t, 0.0))
             for g in layout.groups}
    low = layout.size(least) + r_base + sum(g.n * per_weight.get(least[g.name], 0.0) for g in layout.groups)
    if low > bound:
        keep = shipped_meets(shipped.get("mem"), bound, f"peak RSS {mib(shipped.get('mem'))} MiB")
        raise InvalidArgument(f"budget mem<={bound / 2**20:.1f}MiB cannot be met by a fitted variant: the least "
                              f"peak RSS a plan is predicted at is {low / 2**20:.1f}MiB "
                              f"({', '.join(f'{g}={t}' for g, t in least.items())}; {BASE} variant "
                              f"{mib(base['peak_rss'])} MiB measured); {keep}loosen the budget, or add lower "
                              f"--types that llama.cpp does not repack (on x86: Q5_0, Q5_K, Q6_K; it repacks "
                              f"Q4_0, IQ4_NL, Q4_K, Q2_K), or quantize more --groups")
    return r_base, per_weight


def mib(b: float | None) -> str:
    """Bytes as whole MiB (``-`` when unknown)."""
    return "-" if b is None else f"{b / 2**20:.0f}"
