"""Importance matrix from calibration text, as llama-imatrix computes it, through ggml's eval callback.

For every matrix multiplication ``W @ x`` whose weight ``W`` is a model tensor (``blk.N.ffn_down.weight``
...), the importance of input column ``j`` is the mean of ``x_j^2`` over the calibration tokens: the
quantizer then weights each column's rounding error by how large the activations it multiplies are
(llama-imatrix's ``sum(x^2) / count``). The callback is llama.cpp's ``cb_eval`` (``llama_context_params``):
asked once per graph node whether it wants the node's data, then handed the computed node; we ask for
``MUL_MAT`` nodes and read their second source (the activations, float32, ``(n_embd, n_tokens)``).

The ``ggml_tensor`` layout below mirrors ``ggml/include/ggml.h`` of the vendored llama.cpp
(GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64); the op id of MUL_MAT is
looked up by name through ``ggml_op_name`` rather than hard-coded. The result is an ``.npz`` of tensor
name -> float32 vector, which ``quant`` passes to ``llama_model_quantize_params.imatrix``.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
from pathlib import Path

import numpy as np

from ..errors import OndeviceError


class GgmlTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml():
    """libggml-base from llama-cpp-python's lib folder, with the two functions used here bound."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib_dir.glob("libggml-base*")) + sorted(lib_dir.glob("libggml.*"))
    if not cands:
        raise OndeviceError(f"libggml-base not found in {lib_dir}; the importance matrix needs it")
    lib = ctypes.CDLL(str(cands[0]))
    lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def _op_id(lib, name: str) -> int:
    for i in range(256):
        n = lib.ggml_op_name(i)
        if n is None:
            break
        if n.decode() == name:
            return i
    raise OndeviceError(f"ggml has no op named {name}; this llama.cpp build is not supported by imatrix")


def collect(model_path: str | Path, text: str | Path, out: str | Path, *, n_ctx: int = 128, n_chunks: int = 6,
            threads: int = 1) -> int:
    """Run the model over ``n_chunks`` chunks of ``n_ctx`` tokens of ``text`` and write the importance
    matrix to ``out`` (``.npz``); returns the number of matrices seen."""
    from ..engine.base import EngineConfig
    from ..engine.llama import LlamaEngine, set_fields
    from ..eval.corpora import from_file
    from ..eval.ppl import corpus_tokens, make_chunks
    from ..models.store import atomic_write

    lib = _ggml()
    mul_mat = _op_id(lib, "MUL_MAT")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def weight_name(t: GgmlTensor) -> str | None:
        if t.op != mul_mat or not t.src[0] or not t.src[1]:
            return None
        name = GgmlTensor.from_address(t.src[0]).name.decode(errors="replace")
        return name if name.endswith(".weight") else None

    def callback(ptr, ask, _user):
        t = GgmlTensor.from_address(ptr)
        name = weight_name(t)
        if ask:
            return name is not None
        if name is None:
            return True
        x = GgmlTensor.from_address(t.src[1])
        if x.type != 0 or x.nb[0] != 4 or x.nb[1] != 4 * x.ne[0]:  # float32, rows contiguous
            return True
        cols, rows = int(x.ne[0]), int(x.ne[1] * x.ne[2] * x.ne[3])
        if x.nb[2] != x.nb[1] * x.ne[1] and x.ne[2] > 1:
            return True
        buf = np.empty((rows, cols), dtype=np.float32)
        lib.ggml_backend_tensor_get(t.src[1], buf.ctypes.data, 0, buf.nbytes)
        sq = (buf.astype(np.float64) ** 2).sum(axis=0)
        if name in sums:
            if sums[name].size == cols:
                sums[name] += sq
                counts[name] += rows
        else:
            sums[name], counts[name] = sq, rows
        return True

    eng = LlamaEngine(model_path, EngineConfig(n_ctx=n_ctx, n_threads=threads, warmup=False))
    ll = eng.ll
    cb = ll.ggml_backend_sched_eval_callback(callback)  # kept alive until the context is freed
    cparams = set_fields(ll.llama_context_default_params(), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         n_threads=threads, n_threads_batch=threads, no_perf=True)
    cparams.cb_eval = cb
    cparams.cb_eval_user_data = None
    ctx = ll.llama_init_from_model(eng.model, cparams)
    if not ctx:
        eng.close()
        raise OndeviceError("llama.cpp could not create a context for the importance matrix")
    try:
        tokens = corpus_tokens(eng, from_file(text))
        chunks = make_chunks(tokens, n_ctx, n_chunks, eng.bos_token if eng.add_bos else None)
        mem = ll.llama_get_memory(ctx)
        for chunk in chunks:
            ll.llama_memory_clear(mem, True)
            arr = (ll.llama_token * len(chunk))(*chunk)
            if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(chunk))) != 0:
                raise OndeviceError("llama_decode failed while collecting the importance matrix")
    finally:
        ll.llama_free(ctx)
        eng.close()
    if not sums:
        raise OndeviceError("no matrix multiplication was seen; the importance matrix is empty")
    buf = io.BytesIO()
    np.savez(buf, **{k: (v / counts[k]).astype(np.float32) for k, v in sums.items()})
    with atomic_write(out) as f:
        f.write(buf.getvalue())
    return len(sums)


def lowers_kld(without: dict, with_: dict) -> bool:
    """The rule for keeping an optional step (imatrix, transform): it lowers the KLD by more than twice the
    standard error, or by more than 5%."""
    gain = without["kld"] - with_["kld"]
    return gain > 2 * max(without["kld_err"], with_["kld_err"], 1e-9) or (gain > 0 and gain > 0.05 * without["kld"])


def choose_imatrix(mode, meter, reference, low: dict[str, str], calib: Path, ctx: int, chunks: int,
                    held_q, workdir: Path, say, stats: bool = False) -> tuple[Path | None, str | None, dict]:
    """Whether to quantize with an importance matrix; ``stats``: collect it anyway (``info["file"]``), the
    transform's scales need the activations."""
    from .measure import Item

    if mode == "off" and not stats:
        return None, None, {"used": False, "why": "off"}

    path = workdir / f"imatrix-{hashlib.sha256(f'{calib.name}|{ctx}|{chunks}'.encode()).hexdigest()[:12]}.npz"
    if not (meter.resume and path.is_file()):
        n = collect(reference.path, calib, path, n_ctx=ctx, n_chunks=chunks, threads=meter.eval_threads)
        say(f"importance matrix: {n} matrices, from {chunks} x {ctx} calibration tokens")
    if mode == "off":
        return None, None, {"used": False, "why": "off", "file": str(path)}
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    without, with_ = (r["kld"][0] for r in meter.measure([Item(low, [held_q]), Item(low, [held_q], path, sha)]))
    helps = lowers_kld(without, with_)
    info = {"kld_without": without["kld"], "kld_with": with_["kld"], "plan": low, "used": mode == "on" or helps,
            "sha256": sha, "file": str(path)}
    say(f"importance matrix on the lowest plan: held-out KLD {without['kld']:.4f} without, {with_['kld']:.4f} with "
        f"-> {'used' if info['used'] else 'not used'}" + (" (forced on)" if mode == "on" and not helps else ""))
    return (path, sha, info) if info["used"] else (None, None, info)
