"""A plan's KLD from its parts: the sum of per-group sensitivities, corrected by plans measured before.

Sensitivity measures each group lowered *alone*; a plan lowers several at once, and their effects do not
add exactly (SmolLM2-135M: a plan with ffn_down=Q6_K measured 0.86x the sum of its parts, which put the
validated candidates in the wrong order). Every validated candidate's calibration KLD is cached with the
singles, so a fit can learn from the plans earlier fits measured on the same reference, text and imatrix.
Four models, each additive over groups (so the planner's Pareto search stays exact):

- ``additive``: ``d(plan) = sum_g d(g, T_g)``, the singles as measured;
- ``monotone``: per group, a type's single capped at the least single of the types of its family (K-quants,
  block types) with fewer bits per weight (a type with more bits measured worse than one with fewer is
  taken as noise of the single run);
- ``... + correction``: plus a per-(group, type) term fitted by ridge regression to the residuals
  ``measured - predicted`` of the multi-group plans (a validate-then-correct step: what the singles miss
  about each choice once others are lowered too).

The model used is the one with the least leave-one-out error over those plans (nested: the ridge strength is
chosen inside each fold), so nothing is assumed: with fewer than :data:`MIN_PLANS` measured plans, or when
no model beats the sum out of sample, the sum is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .groups import BASE, quant_size

MIN_PLANS = 4  # fewer measured multi-group plans than this: no correction is learned
LAMBDAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0)  # ridge strengths tried (residuals are ~1e-3, features 0/1)
Pair = tuple[str, str]  # (group, type)


@dataclass
class KldModel:
    """Per-(group, type) KLD terms of the chosen model, and how every model did out of sample."""

    name: str
    terms: dict[Pair, float]  # what each choice adds to the base KLD
    n_plans: int  # measured multi-group plans it was chosen on
    loo_rms: dict[str, float] = field(default_factory=dict)  # model -> leave-one-out rms error of the KLD
    loo_order: dict[str, float] = field(default_factory=dict)  # model -> share of plan pairs ordered right

    def describe(self) -> str:
        if not self.loo_rms:
            n = self.n_plans
            return (f"{self.name} ({n} multi-group plan{'' if n == 1 else 's'} measured on this text so far, by "
                    f"earlier fits or this one; {MIN_PLANS} needed to learn a correction)")
        errs = ", ".join(f"{k} {v:.5f} ({self.loo_order[k]:.0%} of pairs in order)"
                         for k, v in sorted(self.loo_rms.items(), key=lambda kv: kv[1]))
        return f"{self.name}, chosen by leave-one-out over {self.n_plans} measured plans (rms error: {errs})"


def bits(type_name: str) -> float:
    block, size = quant_size(type_name)
    return 8.0 * size / block


def family(type_name: str) -> str:
    """K-quants (256-weight super-blocks) or the 32-weight block types: bits compare only within one."""
    return "k" if type_name.upper().endswith("_K") else "block"


def monotone(singles: dict[Pair, float]) -> dict[Pair, float]:
    """Per group, each type's delta capped at the least delta of any type of its family with fewer bits per
    weight (across families bits do not order quality: with an imatrix, SmolLM2's ffn_down at Q4_K, 4.5
    bits, added less KLD than at Q5_0, 5.5 bits, in plans too)."""
    out = {}
    for (g, t), d in singles.items():
        fewer = [v for (gg, u), v in singles.items()
                 if gg == g and family(u) == family(t) and bits(u) < bits(t)]
        out[(g, t)] = min([d, *fewer])
    return out


def _ridge(X: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ r)


def _loo_lambda(X: np.ndarray, r: np.ndarray) -> float:
    """The ridge strength with the least leave-one-out error on these rows."""
    def err(lam: float) -> float:
        e = [r[i] - X[i] @ _ridge(np.delete(X, i, 0), np.delete(r, i), lam) for i in range(len(r))]
        return float(np.mean(np.square(e)))
    return min(LAMBDAS, key=err)


def _fit(name: str, singles: dict[Pair, float], plans: list[tuple[list[Pair], float]]) -> dict[Pair, float]:
    """Terms of model ``name`` fitted on ``plans`` (``([(group, type)...], measured delta)``)."""
    pairs = sorted({p for ps, _ in plans for p in ps})
    terms = dict(singles)
    if name.startswith("monotone"):  # only where measured plans hold the choice: no untested extrapolation
        terms.update({p: v for p, v in monotone(singles).items() if p in pairs})
    if name.endswith("correction") and len(plans) >= 2:
        X = np.array([[1.0 if p in ps else 0.0 for p in pairs] for ps, _ in plans])
        r = np.array([d - sum(terms[p] for p in ps) for ps, d in plans])
        c = _ridge(X, r, _loo_lambda(X, r) if len(plans) > 2 else LAMBDAS[-1])
        terms = {p: v + (c[pairs.index(p)] if p in pairs else 0.0) for p, v in terms.items()}
    return terms


MODELS = ("additive", "monotone", "additive + correction", "monotone + correction")


def choose_model(singles: dict[Pair, float], plans: list[tuple[list[Pair], float]]) -> KldModel:
    """The model (of :data:`MODELS`) with the least leave-one-out error on the measured ``plans``.

    ``singles``: (group, type) -> KLD added when that group alone is lowered (base type: absent);
    ``plans``: multi-group plans measured on the same text, as their (group, type) choices and the KLD
    they added. Plans naming a choice with no single are ignored.
    """
    plans = [(ps, d) for ps, d in plans if len(ps) > 1 and all(p in singles for p in ps)]
    if len(plans) < MIN_PLANS:
        return KldModel("additive", dict(singles), len(plans))
    loo, order = {}, {}
    meas = np.array([d for _, d in plans])
    for name in MODELS:
        pred = np.array([sum(_fit(name, singles, plans[:i] + plans[i + 1:])[p] for p in ps)
                         for i, (ps, _) in enumerate(plans)])
        loo[name] = float(np.sqrt(np.mean(np.square(meas - pred))))
        i, j = np.triu_indices(len(plans), 1)
        order[name] = float(np.mean(np.sign(pred[i] - pred[j]) == np.sign(meas[i] - meas[j])))
    best = min(MODELS, key=lambda m: (loo[m], MODELS.index(m)))
    return KldModel(best, _fit(best, singles, plans), len(plans), loo, order)


def measured_plans(entries: dict[str, dict], base_kld: float, imatrix: str | None,
                   groups: set[str]) -> list[tuple[list[Pair], float]]:
    """Multi-group plans in a KLD cache section (keys are ``plan_key``s) built with the same imatrix,
    over these groups: ``([(group, type)...], kld - base_kld)``."""
    suffix = f"|imatrix={imatrix[:12]}" if imatrix else ""
    out = []
    for key, rec in entries.items():
        low, sep, im = key.partition("|")
        if (sep + im) != suffix or low == "base":
            continue
        ps = [tuple(x.split("=", 1)) for x in low.split(";")]
        if len(ps) > 1 and all(g in groups and t != BASE for g, t in ps):
            out.append(([(g, t) for g, t in ps], rec["kld"] - base_kld))
    return out
