"""Child process for ``llama_model_quantize`` (llama.cpp may abort(); the parent survives and explains).

Usage: ``python -m ondevice.quant.worker JOB_JSON``. llama.cpp's log goes to stderr (the parent reads the
"failed to quantize: ..." line from it); the exit code is llama_model_quantize's return value.
The worker dies with its parent (:func:`_die_with_parent`): a quantization no one waits for stops at once
and leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import sys
import threading


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    if job.get("parent"):
        _die_with_parent(int(job["parent"]), job["dst"])
    import llama_cpp as ll
    from llama_cpp import _logger

    _logger.set_verbose(True)  # the parent needs llama.cpp's reason when it fails
    ll.llama_backend_init()
    from ..engine.llama import set_fields

    params = set_fields(ll.llama_model_quantize_default_params(), ftype=job["ftype"],
                     allow_requantize=bool(job["allow_requantize"]), nthread=int(job["nthread"]),
                     only_copy=bool(job.get("only_copy")))
    overrides = job["overrides"]
    keep = []  # the pattern bytes must outlive the call
    if overrides:
        arr = (ll.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, ggml_type) in enumerate(overrides):
            keep.append(pattern.encode())
            arr[i].pattern = keep[-1]
            arr[i].type = int(ggml_type)
        arr[len(overrides)].pattern = None  # the list ends at a NULL pattern (llama-quant.cpp)
        set_fields(params, tt_overrides=ctypes.cast(arr, ctypes.POINTER(ll.llama_model_tensor_override)))
    if job.get("imatrix"):
        set_fields(params, imatrix=_imatrix_array(ll, job["imatrix"], keep))
    rc = ll.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    sys.stderr.flush()
    return int(rc)


def _die_with_parent(parent: int, dst: str) -> None:
    """Remove ``dst`` and exit as soon as ``parent`` is gone, however it died (SIGKILL included).

    The parent gives us as stdin a pipe that only it holds open: its death is EOF there, seen at once by a
    thread (``llama_model_quantize`` is a ctypes call, which runs without the GIL). ``getppid`` is checked
    too, before the thread starts (a parent that died before we got here) and while it waits (a stdin that is
    not that pipe). Not ``PR_SET_PDEATHSIG``: its signal would kill us before we could remove the file.
    """

    def orphaned() -> None:
        with contextlib.suppress(OSError):
            os.unlink(dst)  # nobody will read or rename it: a partial file must not stay behind
        os._exit(1)  # at once: the main thread is inside llama.cpp

    def watch() -> None:
        fd = sys.stdin.fileno()
        while os.getppid() == parent:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready and not os.read(fd, 4096):
                break
        orphaned()

    if os.getppid() != parent:
        orphaned()
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _imatrix_array(ll, path: str, keep: list):
    """``llama_model_imatrix_data[]`` (name, data, size; NULL-name terminated) from an importance matrix file
    (:mod:`.imatrix_file`: tensor name -> float32 per-column importance); ``keep`` holds the buffers alive."""
    from .imatrix_file import read

    entries = list(read(path).items())
    arr = (ll.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, values) in enumerate(entries):
        keep += [name.encode(), values]
        arr[i].name = keep[-2]
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(entries)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(ll.llama_model_imatrix_data))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
