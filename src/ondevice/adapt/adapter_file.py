"""The LoRA adapter file: a GGUF that llama.cpp's ``llama_adapter_lora_init`` reads, plus our provenance.

llama.cpp wants ``general.type = adapter``, ``general.architecture`` = the base's, ``adapter.type = lora``,
``adapter.lora.alpha`` (scale = alpha / rank, rank read per tensor from lora_b), and tensor pairs
``<base tensor>.lora_a`` (numpy (r, in), ggml ne [in, r]) and ``.lora_b`` (numpy (out, r), ggml ne [r, out]),
the layout of llama.cpp's convert_lora_to_gguf.py. Provenance sits under ``ondevice.adapter.*``: the base
file's sha256 (an adapter for another base is refused by it), the data's sha256, the settings and figures.
No torch here: the engine imports this to check an adapter before llama.cpp sees it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, OndeviceError, path_problem
from ..models.store import cached_sha256, temp_file
from ..stop_signals import commit

KEY = "ondevice.adapter."


def write(path: str | Path, arch: str, alpha: float, tensors: dict[str, tuple[np.ndarray, np.ndarray]],
          provenance: dict) -> Path:
    """Write ``{base tensor name: (A (r, in), B (out, r))}`` as a llama.cpp LoRA GGUF (temp file, then rename)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, f".{path.name}.", ".part")
    try:
        w = gguf.GGUFWriter(tmp, arch=arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for k, v in provenance.items():
            w.add_string(KEY + k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for name, (a, b) in tensors.items():
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with commit(path):
            os.replace(tmp, path)
    except OSError as e:  # a full disk: numpy's "4608 requested and 2320 written", no errno, no file name
        Path(tmp).unlink(missing_ok=True)
        need = sum(a.size + b.size for a, b in tensors.values()) * 4
        raise write_failed(path, e, need, "the adapter") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_failed(path: str | Path, e: BaseException, need: int, what: str, kept: bool = True) -> OndeviceError:
    """The one line for a failed write of ``path`` (``need`` bytes, about): the cause (a full disk told apart by
    the free space where numpy and torch give none), the size needed and free, and that the old file is kept."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < need + (1 << 20))
    why = "No space left on device" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0])
    room = f" ({what} needs {need / 1e6:.1f} MB" + (f", {free / 1e6:.1f} MB free there)" if free is not None else ")")
    kept = " (the file there before is kept as it was)" if kept and Path(path).exists() else ""
    return OndeviceError(f"cannot write {path}: {why}{room}{kept}")


def read_meta(path: str | Path, flag: str = "--adapter") -> dict:
    """An adapter's header: ``general.*``/``adapter.*`` values and our provenance (JSON decoded); errors name
    ``flag`` (the flag or verb that was given the file)."""
    import gguf

    from ..models.gguf_check import InvalidModelFile, validate_gguf

    p = Path(path)
    if problem := path_problem(p):
        raise InvalidArgument(f"{flag} {p}: {problem}; give the .gguf that `ondevice adapt` wrote")
    try:  # a file cut short or damaged is named as for a model (gguf-py's own errors are numpy's internals)
        validate_gguf(p, alone=True)
    except InvalidModelFile as e:
        raise InvalidArgument(f"{flag} {getattr(e, 'problem', e)}; the adapter file is damaged or cut short: "
                              f"copy it again or train it again with `ondevice adapt`") from None
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 — not a GGUF at all, truncated, ...: one line for the user
        raise InvalidArgument(f"{flag} {p}: not a readable GGUF file ({e}); give a LoRA adapter .gguf") from None
    out = {}
    for k, f in r.fields.items():
        if k.startswith(("general.", "adapter.", KEY)):
            try:
                v = f.contents()
            except (ValueError, TypeError, IndexError):  # a value gguf-py cannot decode: not ours to show
                continue
            if k.startswith(KEY) and isinstance(v, str) and v[:1] in "{[":
                v = json.loads(v)
            out[k] = v
    out["tensors"] = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    return out


def read_lora(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """``({base tensor: (A (r, in), B (out, r)) fp32}, alpha)`` of a LoRA GGUF (alpha 0: none recorded)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    alpha = float(r.fields["adapter.lora.alpha"].contents()) if "adapter.lora.alpha" in r.fields else 0.0
    t = {x.name: _float(gguf, x) for x in r.tensors}  # numpy (reversed ggml) order
    pairs = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in t}):
        if f"{name}.lora_a" not in t or f"{name}.lora_b" not in t:
            raise InvalidArgument(f"{Path(path).name}: {name} has only one of lora_a/lora_b; not a complete adapter")
        pairs[name] = (t[f"{name}.lora_a"], t[f"{name}.lora_b"])
    return pairs, alpha


def _float(gguf, x) -> np.ndarray:
    """A reader tensor as fp32 in numpy order: F32/F16 as they are; BF16 or a block type (convert_lora_to_gguf.py
    --outtype bf16 / q8_0 / auto) dequantized, as llama.cpp reads them (gguf-py hands those over as raw bytes)."""
    T = gguf.GGMLQuantizationType
    if x.tensor_type in (T.F32, T.F16):
        return np.asarray(x.data, dtype=np.float32)
    shape = tuple(int(n) for n in reversed(x.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float32).reshape(shape)


def lora_meta(adapter: str | Path, flag: str = "--adapter") -> dict:
    """The header of ``adapter`` (:func:`read_meta`), refused unless it is a LoRA adapter (a whole model, say)."""
    meta = read_meta(adapter, flag)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise InvalidArgument(f"{flag} {adapter}: not a LoRA adapter (general.type={meta.get('general.type')!r},"
                              f" adapter.type={meta.get('adapter.type')!r}); give the .gguf that `ondevice adapt` "
                              f"wrote")
    return meta


def check(adapter: str | Path, base: str | Path, base_sha256: str | None = None) -> dict:
    """Refuse an adapter that is not a LoRA GGUF, or whose recorded base is not ``base`` (by sha256; given as
    ``base_sha256`` where ``base`` is an encrypted container: its plaintext's).

    An adapter without our provenance (converted elsewhere) is let through: llama.cpp still checks its
    architecture and every tensor's shape against the base.
    """
    meta = lora_meta(adapter)
    if base_sha256 is None:
        _not_merged_already(adapter, base)
    want = meta.get(KEY + "base_sha256")
    if want:
        have = base_sha256 or cached_sha256(base)
        if have != want:
            trained = meta.get(KEY + "base_name", "?")
            same = base_sha256 is None and _same_model(trained, want, base)
            if not same:
                raise InvalidArgument(
                    f"--adapter {Path(adapter).name} was trained on another base model ({trained}, sha256 "
                    f"{want[:12]}...) but this model is {Path(base).name} (sha256 {have[:12]}...), which differs in "
                    f"its name, architecture or tensor shapes; load it with its own base (-m){_train_advice(base)}")
            import warnings

            warnings.warn(f"--adapter {Path(adapter).name} was trained on {trained} (sha256 {want[:12]}...); "
                          f"{Path(base).name} is the same model ({same}) in another file, another quantization "
                          f"most likely: the adapter is applied, as llama.cpp applies it, and may act a little "
                          f"differently than on the file it was trained on", stacklevel=2)
    return meta


def _not_merged_already(adapter: str | Path, base: str | Path) -> None:
    """Refuse ``adapter`` on a model ``ondevice adapt merge`` made with it (its ``ondevice.merged.*`` keys): its
    change would count twice (it was let through as "the same model in another quantization")."""
    from ..models.gguf_check import validate_gguf
    from .merge import MERGED_KEY

    merged = validate_gguf(base).metadata
    if merged.get(MERGED_KEY + "adapter_sha256") == cached_sha256(adapter):
        raise InvalidArgument(f"--adapter {Path(adapter).name} is already merged into {Path(base).name} (`ondevice "
                              f"adapt merge`): applied again, its change would count twice; run "
                              f"{Path(base).name} without --adapter, or apply the adapter to its base "
                              f"({merged.get(MERGED_KEY + 'base', 'the model it was trained on')})")


def _same_model(trained: str, trained_sha: str, base: str | Path) -> str | None:
    """'Smollm2 135M ..., llama, 272 tensors of the same shapes' when ``base`` is the model the adapter was trained
    on in another file (a quantization of it: the same ``general.name``, architecture, vocabulary and tensor
    shapes; the types may differ), read from the trained file where ``trained`` still names it here; else None."""
    from ..models import resolve
    from ..models.gguf_check import validate_gguf

    try:
        ref = resolve(trained)
        if cached_sha256(ref.path) != trained_sha:
            return None
        a, b = validate_gguf(ref.path), validate_gguf(base)
    except Exception:  # noqa: BLE001 — the trained base is gone, or this one cannot be read: not provably the same
        return None
    if not a.name or (a.name, a.architecture, a.n_vocab, a.tensor_shapes) != (b.name, b.architecture, b.n_vocab,
                                                                               b.tensor_shapes):
        return None
    return f"{a.name}, {a.architecture}, {len(a.tensor_shapes)} tensors of the same shapes"


def _train_advice(base: str | Path) -> str:
    """', or train an adapter for this model with `ondevice adapt -m NAME`', where adapt can train it."""
    from ..models.gguf_check import validate_gguf
    from ..models.store import models_dir

    try:
        if validate_gguf(base).architecture != "llama":  # adapt trains llama-architecture models only
            return ""
    except Exception:  # noqa: BLE001 — an encrypted container: no advice rather than a wrong one
        return ""
    p = Path(base)
    name = p.stem if p.parent == models_dir(create=False) else str(p)  # as -m takes it
    return f" or train an adapter for this model with `ondevice adapt -m {name}`"
