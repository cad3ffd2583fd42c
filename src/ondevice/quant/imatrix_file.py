"""Importance matrices as files, read into what the quantizer takes: tensor name -> float32 per-column importance
(the mean squared activation of the tensor's input), one row per expert for a MoE tensor, flattened.

Three formats are read, as ``llama-quantize --imatrix`` reads the last two:

- ``.npz``: ondevice's own (``ondevice fit`` collects it), the importance itself;
- llama-imatrix's GGUF (``imatrix.gguf``, its default since 2025): per tensor ``NAME.in_sum2`` (sums of squares,
  one row per expert) and ``NAME.counts`` (tokens seen per expert); importance = sum / count, and 1 where an
  expert saw no token (llama-quantize's rule);
- llama-imatrix's legacy binary (``imatrix.dat``, ``--output-format dat``): int32 entry count, then per entry the
  name (int32 length + bytes), int32 ncall, int32 nval and nval float32 ``(sum / count) * ncall``; importance =
  value / ncall; then optionally the chunk count and the calibration file's name.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument

FIX = ("give an importance matrix from `ondevice fit` (.npz) or llama-imatrix (imatrix.gguf, or the legacy .dat "
       "of --output-format dat)")


def read(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The importance matrix in ``path`` (any of the three formats, told by content, not by name)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"--imatrix {str(path)!r} is not a file; {FIX}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        out = _npz(p)
    elif head == b"GGUF":
        out = _gguf(p)
    else:
        out = _dat(p)
    if not out:
        raise InvalidArgument(f"--imatrix {str(path)!r} holds no tensor's importance; {FIX}")
    bad = next((k for k, v in out.items() if v.ndim != 1 or not v.size or not np.all(np.isfinite(v))), None)
    if bad is not None:
        raise InvalidArgument(f"--imatrix {str(path)!r}: the importance of {bad} is not a row of finite numbers; "
                              f"{FIX}")
    return out


def _npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an archive of arrays")  # noqa: TRY004 — said as the file's problem below
            out = {}
            for k in z.files:
                if not np.issubdtype(z[k].dtype, np.number):
                    raise ValueError(f"{k} is not numbers")
                out[k] = np.ascontiguousarray(z[k], dtype=np.float32)
            return out
    except (OSError, ValueError, EOFError, KeyError, AttributeError) as e:
        raise InvalidArgument(f"--imatrix {str(p)!r} is not a readable .npz ({e}); {FIX}") from None


def _gguf(p: Path) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(p)
    except (OSError, ValueError, struct.error) as e:
        raise InvalidArgument(f"--imatrix {str(p)!r} is not a readable GGUF ({e}); {FIX}") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise InvalidArgument(f"--imatrix {str(p)!r}: {t.name} is {t.tensor_type.name}, not F32; {FIX}")
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, dtype=np.float32).ravel()
    if not parts and reader.tensors:  # a model file, not an importance matrix
        raise InvalidArgument(f"--imatrix {str(p)!r} is a GGUF without llama-imatrix's NAME.in_sum2 / NAME.counts "
                              f"tensors (a model file?); {FIX}")
    out = {}
    for name, sc in parts.items():
        if len(sc) != 2:
            raise InvalidArgument(f"--imatrix {str(p)!r}: {name} has {'sums' if '.in_sum2' in sc else 'counts'} "
                                  f"but no {'counts' if '.in_sum2' in sc else 'sums'}; {FIX}")
        sums, counts = sc[".in_sum2"], np.rint(sc[".counts"])  # llama.cpp rounds the counts to integers
        if not counts.size or sums.size % counts.size:
            raise InvalidArgument(f"--imatrix {str(p)!r}: {name} has {sums.size} sums for {counts.size} counts; {FIX}")
        rows, per = sums.reshape(counts.size, -1), counts[:, None]
        out[name] = np.where(per > 0, rows / np.where(per > 0, per, 1), 1).astype(np.float32).ravel()
    return out


def _dat(p: Path) -> dict[str, np.ndarray]:
    data = p.read_bytes()
    what = (f"--imatrix {str(p)!r} is neither an .npz, a GGUF nor llama-imatrix's legacy .dat")
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise InvalidArgument(f"{what} (it ends inside entry {len(out) + 1}); {FIX}")
        pos += n
        return data[pos - n:pos]

    out: dict[str, np.ndarray] = {}
    if len(data) < 4:
        raise InvalidArgument(f"{what} ({len(data)} bytes); {FIX}")
    (n_entries,) = struct.unpack("<i", take(4))
    if not 0 < n_entries <= len(data) // 16:  # each entry takes at least 16 bytes
        raise InvalidArgument(f"{what}; {FIX}")
    for _ in range(n_entries):
        (length,) = struct.unpack("<i", take(4))
        if not 0 < length <= 4096:
            raise InvalidArgument(f"{what} (entry {len(out) + 1} has a name of {length} bytes); {FIX}")
        try:
            name = take(length).decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"{what} (entry {len(out) + 1}'s name is not text); {FIX}") from None
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise InvalidArgument(f"{what} ({name} has {nval} values); {FIX}")
        values = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32)
        out[name] = values / ncall if ncall > 0 else values  # llama-quantize divides by ncall when it is > 0
    return out


def check_covers(imatrix: dict[str, np.ndarray], weights, path: str | os.PathLike[str]) -> None:
    """Refuse an importance matrix that names none of the model's ``weights`` (tensor names): it was collected on
    another model, and llama.cpp would quantize without it and say nothing. (One of the right names but the
    wrong size is llama.cpp's own error, which ``quantize`` explains.)"""
    if not any(k in weights for k in imatrix):
        some = ", ".join(sorted(imatrix)[:2])
        raise InvalidArgument(f"--imatrix {str(path)!r} names none of this model's weight tensors (it holds {some}, "
                              f"...): it was collected on another model; collect one on this model")
