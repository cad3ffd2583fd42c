"""What a load may ask of this machine: threads (llama.cpp starts every one it is given) and the memory of
the KV cache (llama.cpp allocates what it is asked for, then the OOM killer ends the process)."""

from __future__ import annotations

import os
import warnings

from ..errors import InvalidArgument, KVCacheTooLarge


def check_threads(n: int, flag: str = "--threads / n_threads") -> int:
    """``n`` threads, or an error: llama.cpp starts every one (ggml allows 512), and past a few per CPU
    they only take turns."""
    if n == -1:  # llama.cpp's "default", as 0 and None are here
        return physical_cores()
    most = min(512, 4 * (os.cpu_count() or 1))
    if not 1 <= n <= most:
        raise InvalidArgument(f"{flag}={n} must be 1 to {most} (at most 4 per CPU of this machine's "
                              f"{os.cpu_count()}; 0, -1 or none: the physical performance cores, {physical_cores()})")
    return n


def physical_cores() -> int:
    """The default thread count (llama.cpp's ``common_cpu_get_num_math``): one per physical performance core
    this process may run on (Intel E-cores and ARM little cores left out), capped by a container's CPU quota
    (more threads than the quota spin while the kernel throttles them); see ``device.cores``."""
    from ..device.cores import default_threads

    return default_threads()


def check_kv_memory(info, n_ctx: int, n_ctx_train: int, type_k: str, type_v: str, name: str,
                    n_ctx_seq: int | None = None) -> None:
    """A context whose KV cache cannot fit in the memory available is refused before llama.cpp allocates
    it (``-c 999999`` on a 135M model: 22 GiB and a minute of loading); one whose sequences reach past the
    trained context is warned about (``n_ctx_seq``: one sequence's share, a server slot's, as llama.cpp
    checks it). ``info``: the GGUF's summary (None: not known, e.g. an encrypted model)."""
    from ..eval.window import available_memory_bytes, kv_bytes_per_token

    per_token = kv_bytes_per_token(info, type_k, type_v) if info else None
    avail = available_memory_bytes()
    if per_token and avail and per_token * n_ctx > avail:  # refused: the warning below would be moot
        raise KVCacheTooLarge(
            f"--ctx / n_ctx={n_ctx} needs {_size(per_token * n_ctx)} for the KV cache and this machine has "
            f"{_size(avail)} available; use a smaller context (the model was trained with {n_ctx_train}) or a "
            f"smaller KV cache type (q8_0: -ctk/-ctv in run, chat and bench; serve's --kv-type)")
    seq = n_ctx_seq or n_ctx
    if n_ctx_train and seq > n_ctx_train:  # llama.cpp allows it (and warns in its log)
        each = "" if seq == n_ctx else f" ({seq} per sequence)"
        warnings.warn(f"--ctx / n_ctx={n_ctx}{each} is more than the {n_ctx_train} tokens {name} was trained "
                      f"with; replies that reach past it usually degrade", stacklevel=5)


def _size(n: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB (a cgroup-capped process may have a few MiB: not "0.0 GiB")."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
