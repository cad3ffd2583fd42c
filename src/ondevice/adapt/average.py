"""``ondevice adapt average A B [C ...] [--weights ...]``: adapters of one base combined into one adapter file whose
change to each weight is exactly the weighted sum of theirs (PEFT's ``add_weighted_adapter(combination_type=
"cat")``; what llama.cpp does at run time with several ``--lora-scaled FILE SCALE``, in one file).

Adapter s changes a weight W by ``k_s * B_s @ A_s`` (k_s = alpha_s / rank_s, llama.cpp's scale; 1 when no alpha is
recorded). Stacking the A's (ranks add up) and placing ``w_s * k_s * B_s`` side by side gives ``B @ A = sum_s w_s
k_s B_s A_s``; the file records alpha = 1 and each B is multiplied by its tensor's total rank, so llama.cpp's
``alpha / rank`` brings it back to exactly that sum. A tensor only some adapters change takes only their parts.
With equal weights summing to one this is a uniform "model soup" of the adapters (Wortsman et al. 2022): training
runs that differ only by seed average out part of one run's luck. numpy and gguf-py only: no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidArgument
from ..models.store import cached_sha256
from ..store.record import created_now
from . import store
from .adapter_file import KEY, lora_meta, read_lora, write

ALPHA = 1.0  # the combined file's alpha; each B carries its rank so that llama.cpp's alpha / rank undoes it


def combine(adapters: list[tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]],
            weights: list[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tensor: (A, B)}`` (to be written with alpha :data:`ALPHA`) whose ``alpha/rank * B @ A`` is
    ``sum_s weights[s] * k_s * B_s @ A_s`` over the adapters ``[(pairs, alpha), ...]`` that change that tensor."""
    out = {}
    for name in sorted({n for pairs, _ in adapters for n in pairs}):
        parts = [(pairs[name], alpha, w) for (pairs, alpha), w in zip(adapters, weights, strict=True)
                 if name in pairs and w != 0]
        if not parts:
            continue
        rank = sum(a.shape[0] for (a, _), _, _ in parts)
        a = np.concatenate([a for (a, _), _, _ in parts], axis=0)
        b = np.concatenate([b * (w * (alpha / a_.shape[0] if alpha else 1.0) * rank / ALPHA)
                            for (a_, b), alpha, w in parts], axis=1)
        out[name] = (a.astype(np.float32), b.astype(np.float32))
    return out


def average(specs: list[str], out: str | Path | None = None, name: str | None = None,
            weights: list[float] | None = None, *, force: bool = False) -> dict:
    """Write the weighted combination of the adapters ``specs`` (files or stored names) to ``out``, else into the
    store as ``name`` (one there already only with ``force``); weights default to 1/n each (a uniform soup).
    Returns what was written."""
    if len(specs) < 2:
        raise InvalidArgument("adapt average needs two or more adapters: ondevice adapt average A B [C ...] "
                              "-o OUT.gguf (or --name NAME)")
    if weights is None:
        weights = [1.0 / len(specs)] * len(specs)
    if len(weights) != len(specs):
        raise InvalidArgument(f"--weights has {len(weights)} values for {len(specs)} adapters; give one per adapter, "
                              f"in order, e.g. --weights {','.join(['0.5'] * len(specs))}")
    if not all(np.isfinite(weights)):
        raise InvalidArgument(f"--weights {','.join(map(str, weights))}: every weight must be a finite number")
    if not any(weights):
        raise InvalidArgument("--weights are all 0: the adapter would change nothing; give at least one other weight")
    if out is None and name is None:
        raise InvalidArgument("adapt average writes one new adapter: give -o OUT.gguf or --name NAME")
    target = store.target(out, name, "")  # both given: refused before reading any adapter
    paths = [store.resolve(s, "adapt average") for s in specs]
    metas = [lora_meta(p, "adapt average") for p in paths]
    archs = {m.get("general.architecture") for m in metas}
    if len(archs) != 1:
        raise InvalidArgument(f"adapt average: the adapters are for different architectures "
                              f"({', '.join(map(str, archs))}); combine only adapters of one base model")
    bases = {m.get(KEY + "base_sha256") for m in metas} - {None}
    if len(bases) > 1:
        by = ", ".join(f"{p.name}: {m.get(KEY + 'base_name', '?')} ({str(m.get(KEY + 'base_sha256'))[:12]}...)"
                       for p, m in zip(paths, metas, strict=True))
        raise InvalidArgument(f"adapt average: the adapters were trained on different base models ({by}); "
                              f"combine only adapters of one base")
    store.check_out_file(out, "combined adapter", "soup.gguf")
    store.check_output(target, "adapter", "adapt average", force,
                       [("one of the adapters it averages", p) for p in paths],
                       given=None if out is None else str(out))
    adapters = [read_lora(p) for p in paths]
    shapes: dict[str, dict[tuple[int, int], str]] = {}  # tensor -> {(out, in): the first file with that shape}
    for (pairs, _), p in zip(adapters, paths, strict=True):
        for t, (a, b) in pairs.items():
            shapes.setdefault(t, {}).setdefault((b.shape[0], a.shape[1]), p.name)
    for t, seen in shapes.items():
        if len(seen) > 1:
            raise InvalidArgument(f"adapt average: {t} has other shapes in different adapters ("
                                  + ", ".join(f"{o}x{i} in {f}" for (o, i), f in seen.items()) + ")")
    tensors = combine(adapters, weights)
    first = next((m for m in metas if KEY + "base_sha256" in m), metas[0])  # one converted elsewhere records none
    prov = {k: first[KEY + k] for k in ("base_sha256", "base_name") if KEY + k in first}
    prov["created"] = created_now()
    prov["averaged_from"] = [{"adapter": str(p), "sha256": cached_sha256(p), "weight": w}
                             for p, w in zip(paths, weights, strict=True)]
    write(target, next(iter(archs)), ALPHA, tensors, prov)
    return {"path": str(target), "name": None if out else target.stem, "adapters": [str(p) for p in paths],
            "weights": weights, "tensors": len(tensors),
            "ranks": sorted({a.shape[0] for a, _ in tensors.values()}), "size_bytes": target.stat().st_size}

