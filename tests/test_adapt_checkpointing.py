"""Gradient checkpointing in ondevice adapt: the same gradients with and without it, and the budget planner
turning it on only when it lets a better plan fit."""

from __future__ import annotations

import pytest

from ondevice.adapt import tasks
from ondevice.adapt.budget import PARAM_BYTES, plans_by_checkpointing, use_checkpointing

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def test_checkpointing_is_chosen_only_when_it_lets_a_better_plan_fit():
    L, MiB = 4, 2**20
    dims = {f"blk.{i}.attn_q.weight": (64, 64) for i in range(L)}
    scores = {n: [1.0 * (r + 1) for r in range(16)] for n in dims}  # every layer worth the same
    fixed = 100 * MiB
    costs = {False: (10 * MiB, 20 * MiB), True: (12 * MiB, 2 * MiB)}  # (head, per layer of depth)
    lora = PARAM_BYTES * 16 * 128  # one module at rank 16
    # room for one layer's activations only without checkpointing, all four with it: checkpointing wins
    fits = plans_by_checkpointing(scores, dims, fixed + 10 * MiB + 20 * MiB + 4 * lora, fixed, costs, L)
    assert len(fits[False][1]) == 1 and len(fits[True][1]) == 4 and use_checkpointing(fits)
    # room for every layer either way: the same plan, so no recomputation
    fits = plans_by_checkpointing(scores, dims, fixed + 10 * MiB + 80 * MiB + 4 * lora, fixed, costs, L)
    assert fits[False][1] == fits[True][1] and not use_checkpointing(fits)
    # only the checkpointed plan fits at all
    fits = plans_by_checkpointing(scores, dims, fixed + 15 * MiB + lora, fixed, costs, L)
    assert False not in fits and use_checkpointing(fits)
    assert plans_by_checkpointing(scores, dims, fixed, fixed, costs, L) == {}


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")
def test_checkpointed_layers_give_the_same_loss_and_gradients(smol, smol_path):
    import torch
    import torch.nn.functional as F

    from ondevice.adapt import data
    from ondevice.adapt.model import LlamaLoRA
    from ondevice.adapt.train import batch_tensors

    torch.set_num_threads(2)
    rows = tasks.iso_dates(2, seed=9)
    ex = data.tokenize(smol, [[{"role": "user", "content": r["input"]}, {"role": "assistant",
                                                                            "content": r["target"]}] for r in rows], 64)
    model = LlamaLoRA(smol_path)
    g = torch.Generator().manual_seed(0)
    lins = [lin for n, lin in model.linears().items() if int(n.split(".")[1]) >= 28]
    for lin in lins:
        lin.add_lora(4, 8.0, g)
        torch.nn.init.normal_(lin.lora_b, std=0.01, generator=g)  # B = 0 would leave A without a gradient
    model.grad_from = 28
    toks, want, targets = batch_tensors(ex)
    out = {}
    for ck in (False, True):
        model.checkpoint = ck
        for lin in lins:
            lin.lora_a.grad = lin.lora_b.grad = None
        loss = F.cross_entropy(model(toks, want), targets)
        loss.backward()
        out[ck] = (loss.item(), [p.grad.clone() for lin in lins for p in (lin.lora_a, lin.lora_b)])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7) and a.abs().sum() > 0


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: pip install 'ondevice[adapt]'")
def test_the_planners_layer_by_layer_probe_gives_one_full_backwards_scores(smol, smol_path):
    """budget.gradient_scores pushes the gradient back one layer at a time (so the probe holds one layer's
    activations); its scores must be those of the gradients of one backward through the whole model."""
    import torch
    import torch.nn.functional as F

    from ondevice.adapt import data
    from ondevice.adapt.budget import _rank_scores, gradient_scores
    from ondevice.adapt.model import LlamaLoRA
    from ondevice.adapt.train import batch_tensors

    torch.set_num_threads(2)
    rows = tasks.iso_dates(1, seed=11, context_words=30)
    ex = data.tokenize(smol, [[{"role": "user", "content": r["input"]}, {"role": "assistant",
                                                                            "content": r["target"]}] for r in rows], 96)
    model = LlamaLoRA(smol_path)
    lins = model.linears()
    for lin in lins.values():
        lin.probe = []
    toks, want, targets = batch_tensors(ex)
    embed = model.embed
    model.embed = lambda t: embed(t).requires_grad_(True)  # a leaf that wants a gradient: backward reaches layer 0
    F.cross_entropy(model(toks, want), targets).backward()
    del model.embed
    whole = {}
    for name, lin in lins.items():
        (x, g), = lin.probe
        lin.probe = None
        whole[name] = _rank_scores(x, g)
    by_layer = gradient_scores(model, ex)
    assert by_layer.keys() == whole.keys() and len(whole) == 7 * model.cfg.n_layer
    for name, s in whole.items():
        assert by_layer[name] == pytest.approx(s, rel=1e-6) and s[0] > 0
