"""Does llama.cpp with the exported adapter compute what torch trained? Greedy tokens and logits, compared.

llama.cpp generates greedily with the adapter; torch (the same GGUF base, dequantized, plus the adapter read
back from the file) scores that same sequence in one forward. Where torch's argmax equals llama.cpp's token at
every generated position, torch's own greedy decoding would have produced the identical sequence. The base
weights are the same values on both sides; llama.cpp quantizes activations to 8 bits inside its Q4_1/Q8_0 dot
products, torch multiplies in fp32, hence small logit differences. The same figures compare a merged GGUF
(merge.py) with base + adapter, both in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_into(model, adapter: str | Path) -> None:
    """Put an adapter GGUF's tensors on the torch model's Linear layers."""
    import torch

    from .adapter_file import read_lora

    pairs, alpha = read_lora(adapter)
    lins = model.linears()
    for name, (a, b) in pairs.items():
        lin = lins[name]
        lin.add_lora(a.shape[0], alpha)
        lin.lora_a.data, lin.lora_b.data = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
    model.requires_grad_(False)


GENERIC_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
                   "Give three tips for sleeping well.", "Translate 'good morning' into Spanish.",
                   "What is 12 times 7?", "Name a famous painter and one of their works.",
                   "Explain what a CPU does in one sentence.", "Write a haiku about autumn."]


def llama_runs(model: str | Path, adapter: str | Path | None, prompts: list, n_tokens: int = 16,
               threads: int = 2, score: list[list[int]] | None = None) -> list[tuple[list[int], list[int], np.ndarray]]:
    """Per prompt: its tokens, llama.cpp's greedy tokens and the ``(len(seq), n_vocab)`` logits of ``seq`` =
    prompt + greedy tokens (or ``score[i]``: another model's sequence, teacher-forced)."""
    import ondevice
    from ondevice.engine.records import Sampling

    m = ondevice.load(str(model), n_ctx=512, n_threads=threads,
                      **({"adapters": (str(adapter),)} if adapter else {}))
    runs = []
    try:
        for i, p in enumerate(prompts):
            toks = m.tokenize_prompt(p)
            gen = m.generate(p, sampling=Sampling(temp=0.0, max_tokens=n_tokens)).tokens
            m.reset()
            m.engine.prefill(toks + gen if score is None else score[i], logits_all=True)
            runs.append((toks, gen, m.engine.all_logits()))
            m.reset()
    finally:
        m.close()
    return runs


def _figures(runs, other_logits: list[np.ndarray]) -> dict:
    """How ``other_logits`` (each over a run's prompt + greedy tokens) agree with the runs' greedy tokens: where
    their argmax is the run's token at every generated position, their own greedy decoding gives that sequence."""
    same_seq, pos_same, pos_n, max_diff, mean_diff, first_diverge, margins = 0, 0, 0, 0.0, [], [], []
    for (toks, gen, ll), tl in zip(runs, other_logits):
        rows = slice(len(toks) - 1, len(toks) + len(gen) - 1)  # positions that predicted the generated tokens
        ok = tl[rows].argmax(-1) == np.array(gen)
        pos_same += int(ok.sum())
        pos_n += len(gen)
        same_seq += bool(ok.all())
        first_diverge.append(int(np.argmin(ok)) if not ok.all() else None)
        top2 = np.sort(ll[rows][~ok], axis=-1)[:, -2:]  # the runs' own top-2 logits where the other disagrees
        margins += [float(m) for m in top2[:, 1] - top2[:, 0]]
        d = np.abs(tl - ll)
        max_diff = max(max_diff, float(d.max()))
        mean_diff.append(float(d.mean()))
    return {"prompts": len(runs), "identical_sequences": same_seq, "identical_share": same_seq / max(1, len(runs)),
            "token_agreement": pos_same / max(1, pos_n), "logit_max_abs_diff": max_diff,
            "logit_mean_abs_diff": float(np.mean(mean_diff)) if mean_diff else None,
            "first_divergence": first_diverge, "divergence_margins": margins}


def agreement(base: str | Path, adapter: str | Path | None, prompts: list[str], n_tokens: int = 16,
              threads: int = 2) -> dict:
    """llama.cpp (base + adapter) vs torch over ``prompts`` (chat messages rendered by the base's template)."""
    import torch

    from .model import LlamaLoRA

    torch.set_num_threads(threads)
    runs = llama_runs(base, adapter, prompts, n_tokens, threads)
    tm = LlamaLoRA(base)
    if adapter:
        load_into(tm, adapter)
    with torch.no_grad():
        return _figures(runs, [tm(torch.tensor([t + g])).numpy() for t, g, _ in runs])


def merged_agreement(merged: str | Path, base: str | Path, adapter: str | Path, prompts: list, n_tokens: int = 16,
                     threads: int = 2) -> dict:
    """The merged GGUF vs base + adapter, both in llama.cpp: the merged model's logits over base + adapter's greedy
    sequences, and whether its own greedy tokens are the same ones."""
    runs = llama_runs(base, adapter, prompts, n_tokens, threads)
    mine = llama_runs(merged, None, prompts, n_tokens, threads, score=[t + g for t, g, _ in runs])
    out = _figures(runs, [ll for _, _, ll in mine])
    out["identical_generations"] = sum(g == mg for (_, g, _), (_, mg, _) in zip(runs, mine))
    return out
