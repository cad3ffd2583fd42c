"""Choose where LoRA goes under a memory budget, as "On-device training under 256KB memory" does its sparse
update: each choice (a module of a layer at a rank) has a measured contribution and a measured memory cost,
and the plan takes the most contribution per byte that fits.

- Contribution: on a probe batch, the gradient of the loss w.r.t. each frozen weight, G = sum_t g_t x_t^T
  (out, in). A rank-r update can follow only the best rank-r part of G, so a (module, rank r) choice is worth
  sum of its top-r squared singular values: the first-order loss drop of a steepest step restricted to rank r.
- Cost: (1) the fixed part, measured: this process's RSS with the base loaded, after a no-grad forward;
  (2) per layer of depth, measured: the peak RSS of real training steps on the worst-case batch (the
  longest examples) with the top 1, 2 and (when it fits the budget) 6 layers trainable, sampled every 2 ms;
  the difference per layer is what each layer from the lowest trained one to the top keeps (layers below run
  without autograd, the sparse-update paper's point: depth costs memory, width barely does), the rest of the
  1-layer step is the head's; (3) per LoRA parameter 16 bytes (fp32 weight, gradient and AdamW's two moments).
- Gradient checkpointing where it pays: (2) is measured again with each trained layer checkpointed (its input
  kept, its activations recomputed in backward), and a plan is made both ways; checkpointing is used only
  when it lets a plan score > 2% more fit (it costs a forward of the trained layers again each step).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgument
from .model import LlamaLoRA

RANKS = (2, 4, 8, 16)
# plan to 92% of the budget: the estimate came out 2% (at 100%) and 5% (at 96%: 575 vs 603 MiB, 4 layers, 20
# steps) under the run's real peak; later steps fragment the heap beyond what two probe steps show
MARGIN = 0.92
PARAM_BYTES = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
_SMALLEST_PLAN = (f"the smallest plan's {{mib}} MiB (torch, the packed base and a training step with a "
                  f"rank-{min(RANKS)} LoRA on one module of the top layer, measured here)")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRSS:
    """The process's peak RSS while inside, sampled every 2 ms from a thread (ru_maxrss only ever grows, so it
    cannot tell a later, smaller peak)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def step_peak(model: LlamaLoRA, examples, lo: int, checkpoint: bool = False) -> int:
    """Peak RSS of one real training step (forward, backward, AdamW) with every module of layers >= lo
    trainable at rank 1: the fixed part, the head and ``L - lo`` layers of activations and transients (with
    ``checkpoint``: each layer's input kept, its activations recomputed one layer at a time in backward)."""
    import torch.nn.functional as F

    from .train import batch_tensors

    toks, want, targets = batch_tensors(examples)
    lins = [lin for n, lin in model.linears().items() if int(n.split(".")[1]) >= lo]
    for lin in lins:
        lin.add_lora(1, 1.0)
    model.grad_from, model.checkpoint = lo, checkpoint
    params = [p for lin in lins for p in (lin.lora_a, lin.lora_b)]
    opt = torch.optim.AdamW(params, lr=0.0)
    try:
        with _PeakRSS() as pk:
            F.cross_entropy(model(toks, want), targets).backward()
            opt.step()
        return pk.peak
    finally:
        del opt, params
        for lin in lins:
            lin.rank = 0
            del lin.lora_a, lin.lora_b
        model.grad_from, model.checkpoint = 0, False


def gradient_scores(model: LlamaLoRA, examples) -> dict[str, list[float]]:
    """{base tensor name: cumulative sum of squared singular values of its loss gradient, ranks 1..max}.

    Backward goes one layer at a time (each layer's input kept from a no-grad forward, the layer recomputed with
    autograd, its output's gradient pushed through it), so the probe holds one layer's activations, not the whole
    model's: the planner must not need more memory than the budget it plans for."""
    import torch.nn.functional as F

    from .train import batch_tensors

    toks, want, targets = batch_tensors(examples)
    cos, sin = model.rope_tables(toks.shape[1])
    with torch.no_grad():
        hs = [model.embed(toks)]
        for blk in model.blocks:
            hs.append(blk(hs[-1], cos, sin))
    h = hs.pop().requires_grad_(True)
    F.cross_entropy(model.logits(h, want), targets).backward()
    g = h.grad
    scores = {}
    for blk in reversed(model.blocks):
        x = hs.pop().requires_grad_(True)
        for lin in blk.lin.values():
            lin.probe = []
        blk(x, cos, sin).backward(g)
        g = x.grad
        for lin in blk.lin.values():
            (xi, gi), = lin.probe
            lin.probe = None
            scores[lin.name] = _rank_scores(xi, gi)
    return scores


def _rank_scores(x: torch.Tensor, g: torch.Tensor) -> list[float]:
    """Cumulative squared singular values (ranks 1..max) of G = g^T x, x (..., in), g (..., out), from (N, N)
    matrices: eig(G^T G) = eig(Kx^1/2 Kg Kx^1/2)."""
    top = max(RANKS)
    x, g = x.reshape(-1, x.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()  # (N, in), (N, out)
    e, v = torch.linalg.eigh(x @ x.T)
    kx_half = (v * e.clamp(min=0).sqrt()) @ v.T
    sq2 = torch.linalg.eigvalsh(kx_half @ (g @ g.T) @ kx_half).flip(0).clamp(min=0)
    sq = sq2[:top].cumsum(0).tolist()
    return sq + [sq[-1]] * (top - len(sq))


def depth_cost(model: LlamaLoRA, probe, fixed: int, checkpoint: bool, cap: int, p1: int) -> tuple[int, int]:
    """``(head, per)``: a step's peak is ``fixed + head + per * (layers trained)``, from measured steps with the
    top 1 (``p1``, measured by the caller) and 2 layers trainable, and the top 6 as well when that step's estimate
    stays under ``cap`` (the budget: the probes must not go over it themselves) with a quarter to spare."""
    L = model.cfg.n_layer
    p2 = step_peak(model, probe, L - 2, checkpoint)
    per, far = max(0, p2 - p1), min(L, 6)  # bytes per layer of depth (activations kept, transients)
    if far > 2 and p2 + 1.25 * per * (far - 2) <= cap:
        per = max(0, (step_peak(model, probe, L - far, checkpoint) - p1) // (far - 1))
    return max(0, p1 - fixed - per), per  # the rest of the 1-layer step: the head, the loss, AdamW, allocator slack


def too_small(budget_bytes: int, need: int, what: str, more: str = "") -> InvalidArgument:
    """The refusal of a budget below ``need`` bytes (a plan's estimated peak, planned to ``MARGIN`` of the budget),
    naming the budget to give instead."""
    mib = math.ceil(need / MARGIN / 2**20)
    return InvalidArgument(f"--budget mem={budget_bytes / 2**20:g}M is below {what.format(mib=mib)}; give at least "
                           f"mem={mib}M{more}")


def plan_under_budget(model: LlamaLoRA, examples, cfg, say=lambda _msg: None) -> tuple[dict[str, int], dict]:
    """``({base tensor name: rank}, what was measured and chosen)`` for ``cfg.budget_bytes``.

    With ``cfg.checkpointing`` auto, both ways are measured and planned; checkpointing (a forward recomputed
    in backward: slower steps) is chosen only when its plan scores over 2% better than the best plan without."""
    from .train import batch_tensors, lean_malloc

    lean_malloc()  # the plan is measured in RSS: memory freed must leave it, here and in the training it plans
    budget = int(cfg.budget_bytes * MARGIN)
    L = model.cfg.n_layer
    dims = {n: (lin.w.inp, lin.w.out) for n, lin in model.linears().items()}
    smallest = PARAM_BYTES * min(RANKS) * min(a + b for a, b in dims.values())  # the smallest plan's LoRA
    # every plan holds what is resident now, so a budget below it is refused before minutes of probes
    if (held := _rss()) + smallest > budget:
        raise too_small(cfg.budget_bytes, held + smallest, f"the {held / 2**20:.0f} MiB that torch and the packed "
                        f"base take here before any training step", " plus a training step's memory (the planner "
                        "measures it once the budget covers this)")
    probe = sorted(examples, key=lambda e: -len(e.tokens))[:cfg.batch]  # the longest: the worst-case batch
    with torch.no_grad():
        model(*batch_tensors(probe)[:2])
    fixed = _rss()  # torch, the packed base, a no-grad forward's buffers
    modes = {"off": (False,), "on": (True,), "auto": (False, True)}[cfg.checkpointing]
    say("measuring a training step on the top layer ...")
    top = {ck: step_peak(model, probe, L - 1, ck) for ck in modes}
    # the smallest plan's peak is at least a top-layer step's (its head is never below 0): refuse before the
    # deeper steps and the gradient scores when even that does not fit
    if min(top.values()) + smallest > budget:
        raise too_small(cfg.budget_bytes, min(top.values()) + smallest, _SMALLEST_PLAN)
    costs = {}
    for ck in modes:
        say(f"measuring the training memory per layer, checkpointing {'on' if ck else 'off'} ...")
        costs[ck] = depth_cost(model, probe, fixed, ck, cfg.budget_bytes, top[ck])
    say("scoring each module's gradient ...")
    scores = gradient_scores(model, sorted(examples, key=lambda e: len(e.tokens))[:1])
    fits = plans_by_checkpointing(scores, dims, budget, fixed, costs, L)
    if not fits:
        raise too_small(cfg.budget_bytes, min(fixed + h + p + smallest for h, p in costs.values()), _SMALLEST_PLAN)
    ck = use_checkpointing(fits)
    score, plan = fits[ck]
    head, per = costs[ck]
    lo = min(int(n.split(".")[1]) for n in plan)
    used = fixed + head + per * (L - lo) + sum(PARAM_BYTES * r * sum(dims[n]) for n, r in plan.items())
    total = sum(s[-1] for s in scores.values())
    info = {"budget_bytes": cfg.budget_bytes, "fixed_rss_bytes": fixed, "activation_bytes_per_layer": per,
            "head_activation_bytes": head, "lowest_layer": lo, "checkpoint": ck,
            "estimated_peak_bytes": used, "score_share": score / total, "n_modules": len(plan),
            # what each way measured and could reach: why checkpointing is on or off
            "checkpointing": {("on" if c else "off"): {"activation_bytes_per_layer": costs[c][1],
                                                       "head_activation_bytes": costs[c][0],
                                                       "score_share": fits[c][0] / total if c in fits else None,
                                                       "lowest_layer": min(int(n.split(".")[1]) for n in fits[c][1])
                                                       if c in fits else None} for c in costs}}
    return plan, info


def plans_by_checkpointing(scores, dims, budget: int, fixed: int, costs: dict[bool, tuple[int, int]], L: int):
    """``{checkpointing: (score, plan)}`` for each way whose measured ``(head, per layer)`` costs let a plan fit."""
    best = {ck: _deepest_plan(scores, dims, budget, lambda lo, h=h, p=p: fixed + h + p * (L - lo), L)
            for ck, (h, p) in costs.items()}
    return {ck: b for ck, b in best.items() if b}


def use_checkpointing(fits: dict[bool, tuple]) -> bool:
    """Checkpoint only when that is the only way a plan fits, or its plan scores > 2% more (it slows steps)."""
    return True in fits and (False not in fits or fits[True][0] > fits[False][0] * 1.02)


def _deepest_plan(scores: dict[str, list[float]], dims: dict[str, tuple[int, int]], budget: int, cost, L: int):
    """``(score, plan)`` of the deepest start layer worth it (a layer deeper only when it buys > 2%) whose best
    rank allocation fits ``budget`` given ``cost(lowest layer)``; None when nothing fits."""
    best = None
    for lo in range(L - 1, -1, -1):
        room = budget - cost(lo)
        if room <= 0:
            break
        plan, score = _greedy({n: s for n, s in scores.items() if int(n.split(".")[1]) >= lo}, dims, room)
        if plan and (best is None or score > best[0] * 1.02):
            best = (score, plan)
    return best


def _greedy(scores: dict[str, list[float]], dims: dict[str, tuple[int, int]], room: int):
    """Raise ranks (0 -> 2 -> 4 -> 8 -> 16) by best score gained per byte until the room is spent."""
    rank = dict.fromkeys(scores, 0)
    spent, total = 0, 0.0
    while True:
        best = None
        for n, s in scores.items():
            r = rank[n]
            nxt = next((x for x in RANKS if x > r), None)
            if nxt is None:
                continue
            gain = s[nxt - 1] - (s[r - 1] if r else 0.0)
            nbytes = PARAM_BYTES * (nxt - r) * sum(dims[n])
            if spent + nbytes <= room and (best is None or gain / nbytes > best[0]):
                best = (gain / nbytes, n, nxt, gain, nbytes)
        if best is None:
            break
        _, n, nxt, gain, nbytes = best
        rank[n], spent, total = nxt, spent + nbytes, total + gain
    return {n: r for n, r in rank.items() if r}, total

