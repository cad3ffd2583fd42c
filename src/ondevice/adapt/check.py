"""Does llama.cpp with the exported adapter compute what torch trained? Greedy tokens and logits, compared.

llama.cpp generates greedily with the adapter; torch (the same GGUF base, dequantized, plus the adapter read
back from the file) scores that same sequence in one forward. Where torch's argmax equals llama.cpp's token at
every generated position, torch's own greedy decoding would have produced the identical sequence. The base
weights are the same values on both sides; llama.cpp quantizes activations to 8 bits inside its Q4_1/Q8_0 dot
products, torch multiplies in fp32, hence small logit differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_into(model, adapter: str | Path) -> None:
    """Put an adapter GGUF's tensors on the torch model's Linear layers."""
    import gguf
    import torch

    r = gguf.GGUFReader(str(adapter))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    t = {x.name: np.array(x.data) for x in r.tensors}
    lins = model.linears()
    for name in {k.rsplit(".", 1)[0] for k in t}:
        a, b = torch.from_numpy(t[f"{name}.lora_a"].copy()), torch.from_numpy(t[f"{name}.lora_b"].copy())
        lin = lins[name]
        lin.add_lora(a.shape[0], alpha)
        lin.lora_a.data, lin.lora_b.data = a.float(), b.float()
    model.requires_grad_(False)


def agreement(base: str | Path, adapter: str | Path | None, prompts: list[str], n_tokens: int = 16,
              threads: int = 2) -> dict:
    """Figures over ``prompts`` (chat messages rendered by the base's template)."""
    import torch

    import ondevice
    from ondevice.engine.records import Sampling

    from .model import LlamaLoRA

    torch.set_num_threads(threads)
    m = ondevice.load(str(base), n_ctx=512, n_threads=threads,
                      **({"adapters": (str(adapter),)} if adapter else {}))
    runs = []
    try:
        for p in prompts:
            toks = m.tokenize_prompt(p)
            gen = m.generate(p, sampling=Sampling(temp=0.0, max_tokens=n_tokens)).tokens
            m.reset()
            seq = toks + gen
            m.engine.prefill(seq, logits_all=True)
            ll_logits = m.engine.all_logits()  # (len(seq), n_vocab)
            m.reset()
            runs.append((toks, gen, ll_logits))
    finally:
        m.close()
    tm = LlamaLoRA(base)
    if adapter:
        load_into(tm, adapter)
    same_seq, pos_same, pos_n, max_diff, mean_diff, first_diverge = 0, 0, 0, 0.0, [], []
    with torch.no_grad():
        for toks, gen, ll in runs:
            seq = toks + gen
            tl = tm(torch.tensor([seq])).numpy()
            rows = slice(len(toks) - 1, len(seq) - 1)  # positions that predicted the generated tokens
            t_arg = tl[rows].argmax(-1)
            ok = t_arg == np.array(gen)
            pos_same += int(ok.sum())
            pos_n += len(gen)
            same_seq += bool(ok.all())
            first_diverge.append(int(np.argmin(ok)) if not ok.all() else None)
            d = np.abs(tl - ll)
            max_diff = max(max_diff, float(d.max()))
            mean_diff.append(float(d.mean()))
    return {"prompts": len(runs), "identical_sequences": same_seq, "identical_share": same_seq / max(1, len(runs)),
            "token_agreement": pos_same / max(1, pos_n), "logit_max_abs_diff": max_diff,
            "logit_mean_abs_diff": float(np.mean(mean_diff)) if mean_diff else None,
            "first_divergence": first_diverge}
