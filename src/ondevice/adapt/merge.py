"""``ondevice adapt merge NAME``: the base with an adapter folded into its weights, as one GGUF (what llama.cpp's
``llama-export-lora`` does), so serving it costs nothing per token beyond the base.

Each adapted tensor W (out, in) becomes ``dequant(W) + alpha/r * B @ A`` in fp32, written as Q8_0 by default
(``f16``, what llama-export-lora writes, is twice the bytes and decoded slower here: adapt_bench measured an
all-module merge at 21.2 tok/s in F16, 36.6 in Q8_0, base 36.8, with 20/20 identical greedy answers either way), and
every other tensor and metadata key is copied byte for byte. Requantizing to the base's own Q4_1 is not offered: a
trained delta is mostly smaller than half a Q4_1 step, so requantizing adds a rounding error as large as the whole
change (``merge`` reports the ratio: 1.2x for the budgeted ISO-date adapter). numpy and gguf-py only (gguf-py's
dequantizers are the reference llama.cpp's are tested against): no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, OndeviceError
from ..models.gguf_check import validate_gguf
from ..models.gguf_copy import writer_like
from ..models.gguf_split import refuse_split
from ..models.store import temp_file
from . import store

TYPES = ("q8_0", "f16", "f32")
MERGED_KEY = "ondevice.merged."


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """``w + scale * b @ a`` in fp32 with llama.cpp's scale (alpha / rank; 1 when alpha is 0). w: (out, in)."""
    rank = a.shape[0]
    scale = alpha / rank if alpha else 1.0
    return w + scale * (b @ a)


def _base_path(apath: Path, meta: dict, base_name: str, model: str | None) -> Path:
    """The base model's file: ``-m``, else the recorded name, else the recorded path (a base given by path is
    recorded by its file's stem, which names no model here)."""
    from ..errors import ModelNotFound
    from ..models import resolve
    from .adapter_file import KEY

    try:
        return Path(resolve(base_name).path)
    except ModelNotFound:
        recorded = meta.get(KEY + "base_path")
        if model is None and recorded and Path(recorded).is_file():
            return Path(recorded)
        sha = str(meta.get(KEY + "base_sha256") or "?")[:12]
        raise InvalidArgument(f"{apath.name} was trained on {base_name} (sha256 {sha}...), which is not here"
                              f"{f' (recorded at {recorded})' if recorded else ''}; give the base with -m PATH") \
            from None


def merge(adapter: str | Path, out: str | Path | None = None, model: str | None = None,
          out_type: str = "q8_0", *, force: bool = False) -> dict:
    """Write the base of ``adapter`` (its recorded base, or ``model``) with the adapter merged to ``out`` (temp file,
    then rename); ``out`` None: into the model store as ``<base>-<adapter>``. A model or file there already is
    replaced only with ``force``. Returns what was written."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ..models.store import cached_sha256
    from .adapter_file import KEY, check, lora_meta, read_lora

    if out_type not in TYPES:
        raise InvalidArgument(f"--type {out_type!r}: use one of {', '.join(TYPES)}")
    apath = store.resolve(adapter, "adapt merge")
    meta = lora_meta(apath, "adapt merge")
    base_name = model or meta.get(KEY + "base_name")
    if base_name is None:
        raise InvalidArgument(f"{apath.name} does not record its base model; give it with -m")
    base = _base_path(apath, meta, base_name, model)
    refuse_split(validate_gguf(base), "adapt merge")
    name = f"{Path(base).stem if model else base_name}-{apath.stem}"
    store.check_out_file(out, "merged model's", f"{name}.gguf")
    from ..models.catalog import store_variants

    there = Path(out) if out else store_variants().get(name)
    if there is not None:
        store.check_output(there, "model", "adapt merge", force, [("the base model", base), ("the adapter", apath)],
                           given=None if out is None else str(out))
    check(apath, base)  # refused here when the adapter was trained on another base
    pairs, alpha = read_lora(apath)
    reader = gguf.GGUFReader(str(base))
    by_name = {t.name: t for t in reader.tensors}
    missing = [n for n in pairs if n not in by_name]
    if missing:
        raise InvalidArgument(f"{apath.name} adapts {missing[0]}, which {base.name} does not have")
    target = {"f16": Q.F16, "q8_0": Q.Q8_0, "f32": Q.F32}[out_type]
    dest = Path(out) if out else None
    tmp_dir = dest.parent if dest else _store_dir()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(tmp_dir, f".{name}.", ".part")
    lost = []
    need = int(reader.data_offset)  # the file's size, about: the base's header, then each tensor as written below
    try:
        w = writer_like(reader, tmp)
        prov = {"adapter": apath.stem, "adapter_sha256": cached_sha256(apath), "base": base_name,
                "base_sha256": cached_sha256(base), "type": out_type, "tensors": str(len(pairs))}
        for k, v in prov.items():
            w.add_string(MERGED_KEY + k, v)
        for t in reader.tensors:
            if t.name in pairs:
                shape = (int(t.shape[1]), int(t.shape[0]))  # numpy (out, in)
                dtype = {Q.F16: np.float16, Q.F32: np.float32}.get(target, np.uint8)
                if dtype is np.uint8:  # a block type: gguf-py takes its (out, bytes per row) shape
                    shape = gguf.quants.quant_shape_to_byte_shape(shape, target)
                nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
                w.add_tensor_info(t.name, shape, dtype, nbytes, target)
            else:
                nbytes = t.data.nbytes
                w.add_tensor_info(t.name, t.data.shape, t.data.dtype, nbytes, t.tensor_type)
            need += nbytes + 32  # and its alignment
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name not in pairs:
                w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
                continue
            base_w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            base_w = base_w.reshape(int(t.shape[1]), int(t.shape[0]))  # (out, in)
            a, b = pairs[t.name]
            if a.shape[1] != base_w.shape[1] or b.shape[0] != base_w.shape[0] or a.shape[0] != b.shape[1]:
                raise InvalidArgument(f"{apath.name}: {t.name}'s LoRA is {b.shape[0]}x{a.shape[0]} @ "
                                      f"{a.shape[0]}x{a.shape[1]}, the base's weight is "
                                      f"{base_w.shape[0]}x{base_w.shape[1]}")
            new = merged_weight(base_w, a, b, alpha)
            if t.tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):  # how much a requantize would drop
                back = gguf.quants.dequantize(gguf.quants.quantize(new, t.tensor_type), t.tensor_type)
                delta = new - base_w
                lost.append((float(np.abs(back.reshape(new.shape) - base_w - delta).sum()),
                             float(np.abs(delta).sum())))
            data = (new.astype(np.float16) if target == Q.F16 else new if target == Q.F32
                    else gguf.quants.quantize(new, target))
            w.write_tensor_data(data)
        w.close()
        from ..stop_signals import commit

        if dest:
            with commit(dest):
                os.replace(tmp, dest)
            where = dest
        else:
            from ..models.catalog import register_variant

            with commit(_store_dir() / f"{name}.gguf"):
                where = register_variant(name, tmp, {"description": f"{base_name} with adapter {apath.stem} merged "
                                                                    f"({out_type})", **prov}).path
    except OSError as e:  # a full disk: numpy's "Not enough free space to write N bytes", no errno, no file name
        if not Path(tmp).exists():  # the merged model was in place already (the store's record of it failed)
            raise
        Path(tmp).unlink(missing_ok=True)
        raise _write_failed(dest or _store_dir() / f"{name}.gguf", e, need) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # a requantize to the base's own block types: its rounding error (L1) over the adapter's whole change
    requant_loss = sum(x for x, _ in lost) / max(1e-30, sum(y for _, y in lost)) if lost else None
    return {"path": str(where), "name": None if dest else name, "base": str(base), "adapter": str(apath),
            "tensors_merged": len(pairs), "type": out_type, "size_bytes": Path(where).stat().st_size,
            "base_size_bytes": Path(base).stat().st_size, "requantize_loss_share": requant_loss}


def _write_failed(path: Path, e: OSError, need: int) -> OndeviceError:
    """adapt's one line for a failed write (the cause, the room needed and free), and what merge leaves: its temp
    file is gone, and a file that was at ``path`` is as it was."""
    from .adapter_file import write_failed

    err = write_failed(path, e, need, "the merged model")
    left = "" if "is kept as it was" in str(err) else "; nothing was written there (no part file is left)"
    return OndeviceError(f"{err}{left}: free some space there, or give -o on another disk, and run it again")


def _store_dir() -> Path:
    from ..models.store import models_dir

    return models_dir()
