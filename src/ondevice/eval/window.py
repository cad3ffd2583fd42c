"""The context window of a suite run: the model's trained context where memory allows, and what fits in it.

A suite item needs its prompt plus the reply budget (``max_tokens``) in the KV cache. The window is chosen
before the model loads, from the GGUF alone: the KV cache costs ``n_ctx * kv_bytes_per_token`` (every
layer keeps ``n_head_kv * (key_length + value_length)`` values per token, at the cache type's size), and
that is compared with the memory the kernel says is available. Sliding-window layers (Gemma 3) are counted
in full, so the estimate is an upper bound there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument
from ..models.gguf_check import GGUFInfo

# bytes per cached value: ggml's block sizes (q8_0: 32 values in 34 bytes; q4_0: 32 in 18)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
FALLBACK_CTX = 4096  # when the GGUF does not say its trained context (the engine's own default cap)
MEMORY_SHARE = 0.5  # the default window's KV cache may take at most this share of the available memory
MIN_CTX = 16  # llama.cpp's smallest useful context


def kv_bytes_per_token(info: GGUFInfo, type_k: str = "f16", type_v: str = "f16") -> int | None:
    """KV cache bytes one token costs across all layers, or None where the GGUF lacks the shapes."""
    md, arch = info.metadata, info.architecture
    if not (info.n_layers and info.n_head and info.n_embd):
        return None
    head_dim = info.n_embd // info.n_head
    k_len = md.get(f"{arch}.attention.key_length") or head_dim
    v_len = md.get(f"{arch}.attention.value_length") or head_dim
    heads = md.get(f"{arch}.attention.head_count_kv", info.n_head)
    if isinstance(heads, list) and len(heads) == info.n_layers:  # per-layer counts (e.g. OpenELM)
        per_layer = [int(h) for h in heads]
    else:
        per_layer = [int(info.n_head_kv or info.n_head)] * info.n_layers
    bk, bv = KV_TYPE_BYTES[type_k], KV_TYPE_BYTES[type_v]
    return round(sum(h * (k_len * bk + v_len * bv) for h in per_layer))


def available_memory_bytes() -> int | None:
    """What the kernel says can be allocated without swapping (MemAvailable), within this process's cgroup
    memory limit where one is set (a container's), or None where unknown."""
    from ..device.info import proc_kib_fields
    from ..device.limits import cgroup_memory

    avail = proc_kib_fields("/proc/meminfo").get("MemAvailable")
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            avail = None
    if (cg := cgroup_memory()) is not None:
        room = max(0, cg[0] - cg[1])
        avail = room if avail is None else min(avail, room)
    return avail


@dataclass(frozen=True)
class Window:
    """The chosen context window. ``note`` says why it differs from what was asked (None when it does not)."""

    n_ctx: int
    n_ctx_train: int | None
    requested: int  # 0: the default
    kv_bytes: int | None  # estimated KV cache size at n_ctx
    note: str | None = None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def suite_window(info: GGUFInfo, requested: int = 0, *, type_k: str = "f16", type_v: str = "f16",
                 available: int | None = None, flag: str = "--ctx-size") -> Window:
    """The window for a suite run on the model ``info`` describes.

    ``requested`` 0 picks the trained context when its KV cache takes at most half the available memory,
    else the largest multiple of 1024 that does. A request above the trained context is capped to it (the
    note says so); one whose KV cache would not fit in the available memory at all is an error.
    """
    if requested < 0:
        raise InvalidArgument(f"{flag} {requested} must be >= 0 (0: the model's trained context where memory "
                              f"allows)")
    if 0 < requested < MIN_CTX:
        raise InvalidArgument(f"{flag} {requested} is too small; use at least {MIN_CTX}")
    trained = info.context_length
    per_token = kv_bytes_per_token(info, type_k, type_v)
    avail = available_memory_bytes() if available is None else available
    top = trained or FALLBACK_CTX
    name = info.name or info.path.stem

    def kv(n: int) -> int | None:
        return None if per_token is None else n * per_token

    if requested:
        n, note = min(requested, top), None
        if trained and requested > trained:
            note = f"{flag} {requested} is above {name}'s trained context ({trained}); using {trained}"
        need = kv(n)
        if need is not None and avail is not None and need > avail:
            raise InvalidArgument(f"{flag} {requested} needs about {_gib(need)} of KV cache but {_gib(avail)} "
                                  f"of memory is available; lower {flag}")
        return Window(n, trained, requested, need, note)
    need = kv(top)
    if need is None or avail is None or need <= MEMORY_SHARE * avail:
        note = None if trained else f"{name} does not say its trained context; using {FALLBACK_CTX}"
        return Window(top, trained, 0, need, note)
    fit = int(MEMORY_SHARE * avail // per_token) // 1024 * 1024
    n = max(1024, min(fit, top))
    return Window(n, trained, 0, kv(n), f"the trained context ({top}) would need about {_gib(need)} of KV cache, "
                                         f"more than half of the {_gib(avail)} available; using {n} "
                                         f"(set {flag} to choose)")
