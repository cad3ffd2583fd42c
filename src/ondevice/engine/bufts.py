"""The CPU's extra buffer types (AMX, CPU_REPACK, ...): which this llama.cpp build offers, which a load may use.

Why this mechanism (the README says it too). llama.cpp builds a model's CPU buffer-type list at load time
from ``ggml_backend_dev_get_extra_bufts(cpu_dev)``, a NULL-terminated array that ggml-cpu keeps as a
static *copy* of its own list (``ggml-cpu.cpp``). The other doors are coarser or blunter:

* ``llama_model_params.use_extra_bufts = false`` drops the whole array: AMX and CPU_REPACK go together.
* ``tensor_buft_overrides`` pins tensors by name to one buffer type; turning AMX off with it while keeping
  repack would mean re-implementing llama.cpp's per-tensor "which buffer type supports this op" choice
  (and a tensor pinned to CPU_REPACK that it cannot repack aborts).
* build flags (no AMX in the wheel) would forbid AMX even where a self-test proves it safe and fast;
  no GGML_* environment variable switches AMX or repack in this llama.cpp.

So for the duration of one model load (under a lock) the array holds exactly the buffer types chosen,
in the build's order, and is restored afterwards. The array is only what loads are *offered*: ggml-cpu's
dispatch (``ggml_backend_cpu_is_extra_buffer_type``) reads its own original list, so models loaded
earlier with another choice keep working. Which buffer types a load really used is read from llama.cpp's
own log (``load_tensors: CPU_REPACK model buffer size = ... MiB``).
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

AMX = "AMX"
_CPU_DEVICE = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU
_BUFFER_LINE = re.compile(r"^\S+:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_lock = threading.Lock()


def _fn(lib: ctypes.CDLL, name: str, restype, argtypes):
    f = lib[name]  # dlsym on libllama's handle also searches the ggml libraries it links
    f.restype, f.argtypes = restype, argtypes
    return f


@lru_cache(maxsize=1)
def _extra_list() -> tuple[int, tuple[int, ...], tuple[str, ...]] | None:
    """(address of the device's array, its original entries, their names), or None if the build has no such list."""
    from .llama import _lib, llama_cpp_lib

    _lib()  # backend initialised: the CPU device is registered
    lib = llama_cpp_lib()
    try:
        dev = _fn(lib, "ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])(_CPU_DEVICE)
        reg = _fn(lib, "ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p])(dev)
        addr = _fn(lib, "ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                   [ctypes.c_void_p, ctypes.c_char_p])(reg, b"ggml_backend_dev_get_extra_bufts")
        name = _fn(lib, "ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])
    except (AttributeError, OSError):  # a build without these symbols: use_extra_bufts is the only door
        return None
    if not dev or not addr:
        return None
    arr = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(addr)(dev)
    if not arr:
        return None
    entries = []
    view = ctypes.cast(arr, ctypes.POINTER(ctypes.c_void_p))
    while view[len(entries)]:
        entries.append(view[len(entries)])
    return arr, tuple(entries), tuple(name(e).decode() for e in entries)


def offered() -> tuple[str, ...]:
    """Names of the extra buffer types this build's CPU device offers, in its order (e.g. ``('CPU_REPACK',)``)."""
    lst = _extra_list()
    return lst[2] if lst else ()


def wanted(names: Sequence[str], amx: bool, repack: bool) -> tuple[str, ...]:
    """The subset of ``names`` a choice allows: AMX by ``amx``, every other (weight-layout) type by ``repack``."""
    return tuple(n for n in names if (amx if n == AMX else repack))


@contextmanager
def offering(names: Sequence[str]) -> Iterator[bool]:
    """While inside, a model load is offered only ``names`` (a subset of :func:`offered`).

    Yields the ``use_extra_bufts`` value to load with. Without the device list (another build) it yields
    whether any extra type is wanted at all, which is all ``use_extra_bufts`` can say.
    """
    lst = _extra_list()
    if lst is None:
        yield bool(names)
        return
    addr, original, all_names = lst
    keep = [e for e, n in zip(original, all_names) if n in set(names)]
    arr = (ctypes.c_void_p * (len(original) + 1)).from_address(addr)
    with _lock:
        try:
            for i, e in enumerate([*keep, None]):
                arr[i] = e
            yield bool(keep)
        finally:
            for i, e in enumerate([*original, None]):
                arr[i] = e


def would_use(model_path: str | Path, names: Sequence[str]) -> dict[str, float]:
    """The buffer types a load offered ``names`` would put weights in, from a dry run (llama.cpp's
    ``no_alloc``: metadata only, nothing read or allocated; the sizes it logs are 0). Cheap, in-process."""
    from .llama import _lib, set_fields
    from .native import load_log

    ll = _lib()
    with offering(names) as use_extra, load_log() as lines:
        mparams = set_fields(ll.llama_model_default_params(), n_gpu_layers=0, use_extra_bufts=use_extra,
                             no_alloc=True, load_mode=0)  # no_alloc asserts on the mmap path
        model = ll.llama_model_load_from_file(str(model_path).encode(), mparams)
        if model:
            ll.llama_model_free(model)
    return parse_buffers("".join(lines).splitlines())


def parse_buffers(log_lines: Sequence[str]) -> dict[str, float]:
    """``{buffer type: MiB}`` from llama.cpp's load log (its ``model buffer size`` lines)."""
    out: dict[str, float] = {}
    for line in log_lines:
        m = _BUFFER_LINE.match(line.strip())
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out
