"""The planner: per-group types that meet a budget with the least predicted quality loss (OHQ's search).

Predictions are additive over groups, each term measured on this device (``measure``):

- size: exact bytes per group and type (``groups``);
- time per token (decode and prompt): ``t(plan) = t(base) + sum_g P_g * d(type_g)``, where ``P_g`` are the
  weights of group g that are multiplied at every token (in a prompt, the output head only at its last
  token: not counted) and ``d(T)`` the measured extra seconds per weight
  of type T over the base type: ``d(T) = (t(v_T) - t(base)) / P_T`` from a variant ``v_T`` with every
  group that T fits at T (OHQ's on-chip latency table, per type rather than per layer);
  validation benches the base variant again and puts the predictions at its speed of that moment
  (``Table.predict_at``): the table only knows times relative to the base, the load changes the rest;
  with it a standard deviation (``Spread``): what the table's own measurement noise, and the base's now,
  leave in the prediction (the runs' spread once each round's level is out, ``paired.paired_rse``);
- KLD: ``kld(base) + sum_g d(g, T)``, ``d(g, T) = max(0, kld({g: T}) - kld(base))``: each group lowered alone,
  measured against the reference on the calibration text (sensitivity), optionally corrected per (group,
  type) by what earlier fits' validated plans measured (``interact``: the sum alone is ``kld_additive``).

The search keeps the Pareto set of partial plans group by group (a multi-objective knapsack): exact for
these additive objectives, and small for the few groups a fit uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgument
from .budget import Budget
from .groups import BASE, Layout


@dataclass
class Option:
    type: str
    bytes: int
    d_dec: float  # extra seconds per decoded token over the base
    d_pp: float  # extra seconds per prompt token
    d_kld: float  # extra KLD over the base (as the KLD model predicts it)
    d_kld_sum: float = 0.0  # the single's own extra KLD (the additive model)
    d_mem: float = 0.0  # extra runtime bytes over the base's (peak RSS beyond the file: ``memory``)


@dataclass
class Spread:
    """The noise in one kind of time prediction (decode or prompt): per type T, the weights its variant
    lowered, its seconds per token over the base's (``q``) and the relative standard errors of the figures.

    A plan's time over the base's is ``1 + sum_T a_T (q_T - 1)``, ``a_T`` the share of T's weights the plan
    lowers; with ``q_T`` measured as ``t_T / t_base``, its error is ``sum_T a_T q_T (e_T - e_base)``."""

    base_rse: float | None
    types: dict[str, tuple[int, float, float | None]]  # type -> (weights, q, rse)

    def rel(self, lowered: dict[str, int]) -> float | None:
        """Relative standard deviation of the plan's time over the base's (``lowered``: type -> the plan's
        weights at it); None when a figure it needs has no error (fewer than 3 rounds)."""
        terms = [(w / self.types[t][0], *self.types[t][1:]) for t, w in lowered.items() if w]
        if not terms:
            return 0.0
        if self.base_rse is None or any(rse is None for *_, rse in terms):
            return None
        ratio = 1 + sum(a * (q - 1) for a, q, _ in terms)
        var = sum((a * q * rse) ** 2 for a, q, rse in terms) + (self.base_rse * sum(a * q for a, q, _ in terms)) ** 2
        return var ** 0.5 / ratio


@dataclass
class Table:
    """Everything the planner knows: per group, its options; the base variant's figures."""

    layout: Layout
    options: dict[str, list[Option]]
    base_dec: float  # seconds per decoded token of the all-base variant
    base_pp: float
    base_kld: float
    spread: dict[str, Spread] = field(default_factory=dict)  # "tg"/"pp": the speed table's noise
    base_mem: int | None = None  # the all-base variant's peak RSS beyond its file (None: memory not measured)

    def predict(self, plan: dict[str, str]) -> dict:
        dec, pp, kld, add, mem = self.base_dec, self.base_pp, self.base_kld, self.base_kld, self.base_mem or 0
        for g, t in plan.items():
            o = next(o for o in self.options[g] if o.type == t)
            dec, pp, kld, add, mem = dec + o.d_dec, pp + o.d_pp, kld + o.d_kld, add + o.d_kld_sum, mem + o.d_mem
        size = self.layout.size(plan)
        return {"size": size, "tg": 1.0 / dec if dec > 0 else float("inf"),
                "pp": 1.0 / pp if pp > 0 else float("inf"), "kld": max(0.0, kld), "kld_additive": add,
                **({"mem": size + mem} if self.base_mem is not None else {})}

    def predict_at(self, plan: dict[str, str], base_now: dict) -> dict:
        """tok/s of ``plan`` at the speed the base variant has *now* (``{"tg", "pp"}`` measured just before).

        The table's seconds per token were measured minutes earlier, under another load; a busy core
        stretches every kernel alike, so the plan's time relative to the base is what the table knows.
        Returns ``tg``/``pp`` (scaled), ``tg_sd``/``pp_sd`` (their standard deviation from the table's noise
        and the base's now, ``tg_rse``/``pp_rse`` of ``base_now``; None where a figure has none) and
        ``tg_table``/``pp_table`` (as the table had them)."""
        p = self.predict(plan)
        out = {"tg": p["tg"] * base_now["tg"] * self.base_dec, "pp": p["pp"] * base_now["pp"] * self.base_pp,
               "tg_table": p["tg"], "pp_table": p["pp"]}
        for kind in ("tg", "pp"):
            lowered: dict[str, int] = {}
            for g in self.layout.groups:
                t = plan.get(g.name, BASE)
                if t != BASE:
                    lowered[t] = lowered.get(t, 0) + _weights(g, kind == "pp")
            rel = self.spread[kind].rel(lowered) if kind in self.spread else None
            now = base_now.get(f"{kind}_rse")
            out[f"{kind}_sd"] = None if rel is None or now is None else out[kind] * (rel ** 2 + now ** 2) ** 0.5
        return out


@dataclass
class Candidate:
    plan: dict[str, str]
    predicted: dict
    measured: dict = field(default_factory=dict)

    def summary(self) -> str:
        low = [f"{g}={t}" for g, t in self.plan.items() if t != BASE]
        return ", ".join(low) or f"all {BASE}"


def _weights(g, prompt: bool) -> int:
    """Weights of ``g`` multiplied per token: the output head's only for a prompt's last token (~0 per token)."""
    return g.n if g.compute and not (prompt and g.head) else 0


def _type_weights(layout: Layout, opts: dict[str, list[str]], t: str, prompt: bool) -> int:
    """Weights per token that the variant of type ``t`` lowers: every group offered ``t``."""
    return sum(_weights(g, prompt) for g in layout.groups if t in opts[g.name])


def speed_deltas(layout: Layout, base: float, per_type: dict[str, float],
                 opts: dict[str, list[str]] | None = None, prompt: bool = False) -> dict[str, float]:
    """Seconds per weight of each type over the base, from whole-model seconds per token (see module doc);
    ``opts``: each group's types (``Layout.options``), the variant of type T lowers every group offered T."""
    opts = opts or layout.options()
    out = {BASE: 0.0}
    for t, secs in per_type.items():
        n = _type_weights(layout, opts, t, prompt)
        out[t] = (secs - base) / n if n else 0.0
    return out


def make_table(layout: Layout, base_speed: dict, type_speed: dict[str, dict], base_kld: float,
               group_kld: dict[tuple[str, str], float], terms: dict[tuple[str, str], float] | None = None,
               opts: dict[str, list[str]] | None = None, mem: tuple[int, dict[str, float]] | None = None) -> Table:
    """Per-group options from the measured speed table and sensitivities; ``terms``: the KLD model's extra
    KLD per (group, type) (default: the singles' own, additive); ``opts``: each group's types; ``mem``: the
    base's runtime bytes and each type's extra per weight (``memory.runtime_model``; None: no peak RSS)."""
    group_types = opts or layout.options()
    dec = speed_deltas(layout, 1 / base_speed["tg"], {t: 1 / s["tg"] for t, s in type_speed.items()}, group_types)
    pp = speed_deltas(layout, 1 / base_speed["pp"], {t: 1 / s["pp"] for t, s in type_speed.items()}, group_types,
                      prompt=True)
    options = {}
    for g in layout.groups:
        opts = []
        for t in group_types[g.name]:
            if t != BASE and (g.name, t) not in group_kld:
                continue
            single = 0.0 if t == BASE else max(0.0, group_kld[(g.name, t)] - base_kld)
            d_kld = single if terms is None or t == BASE else terms[(g.name, t)]
            opts.append(Option(t, g.bytes(t), _weights(g, False) * dec.get(t, 0.0), _weights(g, True) * pp.get(t, 0.0),
                               d_kld, single, g.n * mem[1].get(t, 0.0) if mem else 0.0))
        options[g.name] = opts
    spread = {kind: Spread(base_speed.get(f"{kind}_rse"),
                           {t: (_type_weights(layout, group_types, t, kind == "pp"), base_speed[kind] / s[kind],
                                s.get(f"{kind}_rse")) for t, s in type_speed.items()})
              for kind in ("tg", "pp")}
    return Table(layout, options, 1 / base_speed["tg"], 1 / base_speed["pp"], base_kld, spread,
                 mem[0] if mem else None)


def _pareto(points: np.ndarray) -> np.ndarray:
    """Indices of the rows no other row dominates (<= in every column, < in one); columns are minimised."""
    order = np.lexsort(points.T[::-1])
    pts = points[order]
    keep = np.ones(len(pts), dtype=bool)
    for i in range(len(pts)):
        if not keep[i]:
            continue
        later = pts[i + 1:]
        dominated = np.all(pts[i] <= later, axis=1) & np.any(pts[i] < later, axis=1)
        keep[i + 1:] &= ~dominated
    return order[keep]


def pareto_front(table: Table, with_pp: bool = False, cap: int = 4000, with_mem: bool = False) -> list[Candidate]:
    """The plans no other plan beats on size, decode time and KLD (and prompt time when ``with_pp``, peak RSS
    when ``with_mem``: a repacked type can be smaller yet take more memory)."""
    keep = [0, 1, 2] + [3] * with_pp + [4] * (with_mem and table.base_mem is not None)
    cols = len(keep)
    vals = np.zeros((1, cols))
    plans: list[tuple[str, ...]] = [()]
    names = list(table.options)
    for g in names:
        opts = table.options[g]
        add = np.array([[[o.bytes, o.d_dec, o.d_kld, o.d_pp, o.bytes + o.d_mem][k] for k in keep] for o in opts])
        vals = (vals[:, None, :] + add[None, :, :]).reshape(-1, cols)
        plans = [p + (o.type,) for p in plans for o in opts]
        idx = _pareto(vals)
        if len(idx) > cap:  # thin an overgrown front evenly along size (keeps its extremes)
            idx = idx[np.argsort(vals[idx, 0])][np.linspace(0, len(idx) - 1, cap).astype(int)]
        vals, plans = vals[idx], [plans[i] for i in idx]
    out = [Candidate(dict(zip(names, p)), table.predict(dict(zip(names, p)))) for p in plans]
    return sorted(out, key=lambda c: (c.predicted["size"], c.predicted["kld"]))


def safe_first(front: list[Candidate], strict: Budget, picks: list[Candidate], n: int) -> list[Candidate]:
    """``picks`` led by the best plans that also meet the ``strict`` budget (a margin on a bound)."""
    try:
        safe = choose(front, strict, n)
    except InvalidArgument:
        safe = []
    return (safe + [c for c in picks if c not in safe])[:n]


def at_speed(front: list[Candidate], budget: Budget, table: Table, base_now: dict, n: int,
             exclude: list[Candidate]) -> list[Candidate]:
    """The ``n`` best plans not in ``exclude`` that meet ``budget`` once predicted at the base variant's speed
    ``base_now`` (:meth:`Table.predict_at`), those that meet it by two standard deviations first; fresh
    candidates (their predictions are the table's, as every pick's before validation)."""
    seen = [c.plan for c in exclude]
    ok, sure = [], []
    for c in front:
        if c.plan in seen:
            continue
        at = table.predict_at(c.plan, base_now)
        m = {**c.predicted, "tg": at["tg"], "pp": at["pp"]}
        if budget.violations(m):
            continue
        ok.append(c)
        low = {**m, **{k: at[k] - 2 * (at.get(f"{k}_sd") or 0.0) for k in ("tg", "pp")}}
        if not budget.violations(low):
            sure.append(c)
    key = objective(budget)
    best = sorted(sure, key=lambda c: key(c.predicted)) + sorted(ok, key=lambda c: key(c.predicted))
    first = list({id(c): c for c in best}.values())[:n]  # each plan once, in that order
    return [Candidate(dict(c.plan), dict(c.predicted)) for c in first]


def objective(budget: Budget):
    """Sort key of the best plan: least KLD, or (when KLD is bounded) the smallest, then the fastest."""
    if budget.kld is None:
        return lambda m: (m["kld"], m["size"], -m["tg"])
    return lambda m: (m["size"], -m["tg"], m["kld"])


def choose(front: list[Candidate], budget: Budget, n: int) -> list[Candidate]:
    """The ``n`` best predicted-feasible plans, or an error naming what cannot be met and the closest plan."""
    feasible = [c for c in front if not budget.violations(c.predicted)]
    if feasible:
        return sorted(feasible, key=lambda c: objective(budget)(c.predicted))[:n]
    raise InvalidArgument(impossible(front, budget))


def _excess(budget: Budget, m: dict) -> float:
    """How far ``m`` is from meeting ``budget``: the sum of relative shortfalls."""
    e = 0.0
    for lim in (budget.size, budget.fits):
        if lim is not None:
            e += max(0.0, m["size"] / lim - 1)
    if budget.mem is not None and m.get("mem"):
        e += max(0.0, m["mem"] / budget.mem - 1)
    for k in ("tg", "pp", "score"):
        lim = getattr(budget, k)
        if lim is not None and m.get(k):
            e += max(0.0, lim / m[k] - 1)
    if budget.kld is not None:
        e += max(0.0, m["kld"] / budget.kld - 1)
    return e


def impossible(front: list[Candidate], budget: Budget, measured: bool = False) -> str:
    """One line: which bound no variant meets (alone, or together with another), and the closest variant."""
    get = (lambda c: c.measured) if measured else (lambda c: c.predicted)
    best = {"size": min(get(c)["size"] for c in front), "kld": min(get(c)["kld"] for c in front),
            "tg": max(get(c)["tg"] for c in front), "pp": max(get(c)["pp"] for c in front),
            "score": max((get(c).get("score", -1.0) for c in front), default=-1.0),
            "mem": min((get(c)["mem"] for c in front if get(c).get("mem") is not None), default=None)}
    alone = []
    if budget.size is not None and best["size"] > budget.size:
        alone.append(f"size<={budget.size / 1e6:.3g}MB (the smallest variant is {best['size'] / 1e6:.1f}MB)")
    if budget.mem is not None and best["mem"] is not None and best["mem"] > budget.mem:
        alone.append(f"mem<={budget.mem / 2**20:.1f}MiB (the least {'measured' if measured else 'predicted'} peak "
                     f"RSS is {best['mem'] / 2**20:.1f}MiB)")
    if budget.fits is not None and best["size"] > budget.fits:
        alone.append(f"the device profile's memory (files up to {budget.fits / 1e6:.1f}MB fit; the smallest "
                     f"variant is {best['size'] / 1e6:.1f}MB)")
    for k in ("tg", "pp"):
        lim = getattr(budget, k)
        if lim is not None and best[k] < lim:
            alone.append(f"{k}>={lim:.1f} (the fastest variant makes {best[k]:.1f} tok/s)")
    if budget.kld is not None and best["kld"] > budget.kld:
        alone.append(f"kld<={budget.kld:g} (the least KLD is {best['kld']:.4f})")
    if budget.score is not None and 0 <= best["score"] < budget.score:
        alone.append(f"score>={budget.score:.3f} (the best score is {best['score']:.3f})")
    closest = min(front, key=lambda c: _excess(budget, get(c)))
    m = get(closest)
    why = ("; ".join(alone) + " cannot be met") if alone else "its bounds cannot be met together"
    word = "measured" if measured else "predicted"
    return (f"budget {budget.describe()!r}: {why}; the closest variant ({closest.summary()}) has {word} "
            f"size {m['size'] / 1e6:.1f}MB, tg {m['tg']:.1f} tok/s, kld {m['kld']:.4f}"
            + (f", peak RSS {m['mem'] / 2**20:.1f}MiB" if m.get("mem") is not None else "") + " "
            f"({', '.join(budget.violations(m))}); loosen the budget")


def front_table(front: list[Candidate], limit: int = 12) -> list[str]:
    """Printable lines of a front: size, tok/s, KLD and the plan; thinned to ``limit`` rows along size."""
    rows = front if len(front) <= limit else [front[i] for i in np.linspace(0, len(front) - 1, limit).astype(int)]
    mem = any("mem" in c.predicted for c in rows)  # peak RSS, predicted (MiB), when a mem bound asked for it
    lines = [f"  {'size MB':>8}" + f" {'RSS MiB':>7}" * mem + f" {'tg t/s':>7} {'pp t/s':>7} {'KLD':>8}  plan"]
    for c in rows:
        m = c.predicted
        lines.append(f"  {m['size'] / 1e6:8.1f}" + (f" {m.get('mem', 0) / 2**20:7.0f}" if mem else "")
                     + f" {m['tg']:7.1f} {m['pp']:7.1f} {m['kld']:8.4f}  {c.summary()}")
    return lines
