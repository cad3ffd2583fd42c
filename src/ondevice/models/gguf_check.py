"""Validate a GGUF file and summarise it (architecture, size, quantization mix, tensors).

Our own header walk comes first and is defensive: every read is bounds-checked against the file size,
counts are checked against what the file could possibly hold, every metadata type id is checked, and
every tensor's data range must lie inside the file. A truncated or corrupt file therefore raises
:class:`InvalidModelFile` (never a crash, a hang or a huge allocation) before anything else touches it.
Type ids, block sizes and type names come from the ``gguf`` package (gguf-py, the reference reader
maintained with llama.cpp), so new quantization types are picked up by upgrading it.

``gguf.GGUFReader`` itself is only run with ``deep=True``: it materialises every vocabulary string as a
numpy array (about 2.6 s for SmolLM2's 49k tokens on this machine), too slow for ``ondevice models``.
The tests cross-check this walk against ``GGUFReader`` on the real model.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import gguf

from ..errors import NOT_THERE, InvalidModelFile, path_problem
from .gguf_split import Shard, split_shards

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 256  # llama.cpp caps tensor names at 64; be lenient but bounded
MAX_NESTING = 3  # arrays of arrays are legal in the spec but never that deep in practice
KEEP_ARRAY = 1024  # arrays up to this length keep their values in GGUFInfo.metadata
VOCAB_KEY = "tokenizer.ggml.tokens"
MIN_ALIGNMENT = 32  # ggml's CPU buffers are 32-byte aligned: a smaller GGUF alignment trips an assert

# GGUF value type id -> (struct format, size); 8 = string and 9 = array are handled separately.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_VALID_VALUE_TYPES = {int(t) for t in gguf.GGUFValueType}
T = TypeVar("T")


class TensorInfo(NamedTuple):
    """One tensor: unpacks as ``(name, type_name, n_elements, n_bytes)``."""

    name: str
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """What a validated GGUF file holds. ``tensors`` lists ``(name, type_name, n_elements, n_bytes)``."""

    path: Path
    file_size: int
    version: int
    architecture: str
    name: str | None
    parameters: int
    quant_mix: dict[str, float]  # ggml type name -> share of tensor bytes, largest first
    quant_summary: str  # e.g. "Q4_1 69%, Q8_0 31%"
    context_length: int | None
    chat_template: str | None
    license: str | None
    n_layers: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None
    n_vocab: int | None
    file_type: int | None
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    tensor_bytes: int  # sum of tensor sizes
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False)  # ggml order: ne[0] is the row length
    tensor_offsets: dict[str, int] = field(repr=False)  # absolute byte offset of each tensor's data (in path)
    metadata: dict[str, Any] = field(repr=False)  # scalars, strings and arrays up to KEEP_ARRAY items
    array_lengths: dict[str, int] = field(repr=False)  # every array key -> its length
    split_paths: tuple[Path, ...] = ()  # a split model's other shards (path is its first); sizes count them all

    @property
    def size_mb(self) -> float:
        return self.file_size / 1e6

    @property
    def params_label(self) -> str:
        """Human-readable parameter count, e.g. ``134.5M``."""
        return format_count(self.parameters)


def format_count(n: int) -> str:
    """134515008 -> '134.5M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


_FIX_TRUNCATED = "the file is incomplete: re-download it (run the same `ondevice pull` again) or copy it again"
_FIX_CORRUPT = "the file is damaged: re-download it (`ondevice pull` again) or re-create it"
_FIX_NOT_GGUF = ("this is not a GGUF model: pass a .gguf file (convert other formats with llama.cpp's "
                 "convert_hf_to_gguf.py)")
# ondevice protect's container (protect/container.py MAGIC): no conversion makes it a GGUF, the key opens it
_FIX_ENCRYPTED = ("this is an encrypted model (`ondevice protect encrypt`): run and serve open it in memory with its "
                  "key, but this command needs the plaintext .gguf it was encrypted from")
_FIX_ENC_TRUNCATED = ("an encrypted container (`ondevice protect encrypt`) that is empty or cut short: copy it again, "
                      "or encrypt the model again")


def _encrypted_magic(magic: bytes) -> bool:
    """Whether ``magic``, a file's first 4 bytes, begin protect's container (``protect.container.MAGIC``)."""
    from ..protect.container import MAGIC

    return magic == MAGIC[:4]


def _not_gguf(path: Path, magic: bytes) -> InvalidModelFile:
    fix = _FIX_ENCRYPTED if _encrypted_magic(magic) else _FIX_NOT_GGUF
    return _invalid(path, f"bad magic {magic!r} (a GGUF file starts with b'GGUF')", fix)


def _invalid(path: Path, what: str, fix: str = _FIX_CORRUPT) -> InvalidModelFile:
    e = InvalidModelFile(f"{path}: {what}; {fix}")
    e.problem = f"{path}: {what}"  # without the model's fix, for a file that is no model (an adapter)
    return e


class _NeedMore(Exception):
    """The header runs past the bytes read so far (but not past the file): read more and walk again."""


class _Cursor:
    """Bounds-checked little-endian reads from the first ``len(buf)`` bytes of a ``size``-byte file."""

    def __init__(self, buf: bytes, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.limit = len(buf)
        self.unspellable: list[int] = []  # bytes the vocabulary has no token for (neither <0xNN> nor the byte)

    def need(self, n: int, what: str) -> int:
        """Advance past ``n`` bytes that hold ``what``; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _invalid(self.path, f"truncated: {what} ends at byte {start + n} but the file has "
                                      f"{self.size} bytes", _FIX_TRUNCATED)
        if start + n > self.limit:
            raise _NeedMore
        self.pos = start + n
        return start

    def scalar(self, fmt: str, n: int, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.need(n, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            raise _invalid(self.path, f"truncated: {what} claims {n} bytes at byte {self.pos} but the file has "
                                      f"{self.size} bytes", _FIX_TRUNCATED)
        start = self.need(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace") if keep else None


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> tuple[Any, int | None]:
    """Read one metadata value of type ``vtype``; returns (value or None if not kept, array length)."""
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        return cur.scalar(fmt, n, f"the value of '{key}'"), None
    if vtype == _STRING:
        return cur.string(f"the value of '{key}'"), None
    if vtype != _ARRAY:
        raise _invalid(cur.path, f"corrupt metadata: key '{key}' has value type {vtype}, which is not a GGUF "
                                 f"type (valid: {sorted(_VALID_VALUE_TYPES)})")
    if depth >= MAX_NESTING:
        raise _invalid(cur.path, f"corrupt metadata: key '{key}' nests arrays deeper than {MAX_NESTING}")
    itype = cur.u32(f"the element type of '{key}'")
    count = cur.u64(f"the length of '{key}'")
    if itype not in _VALID_VALUE_TYPES:
        raise _invalid(cur.path, f"corrupt metadata: array '{key}' has element type {itype}, which is not a "
                                 f"GGUF type")
    keep = count <= KEEP_ARRAY
    if itype in _SCALARS:
        fmt, n = _SCALARS[itype]
        if count > (cur.size - cur.pos) // n:
            raise _invalid(cur.path, f"truncated: array '{key}' claims {count} items of {n} bytes at byte "
                                     f"{cur.pos} but the file has {cur.size} bytes", _FIX_TRUNCATED)
        start = cur.need(count * n, f"array '{key}'")
        if not keep:
            return None, count
        return list(struct.unpack_from(f"<{count}{fmt[1]}", cur.buf, start)), count
    # Strings (and nested arrays) are variable-size: every element is at least 8 bytes (its length), which
    # bounds the count before we loop over it.
    if count > (cur.size - cur.pos) // 8:
        raise _invalid(cur.path, f"truncated: array '{key}' claims {count} items at byte {cur.pos} but the "
                                 f"file has {cur.size} bytes", _FIX_TRUNCATED)
    start_items = cur.pos
    if itype == _STRING:
        vocab = key == VOCAB_KEY and depth == 0
        if keep and not vocab:
            return [cur.string(f"item {i} of '{key}'") for i in range(count)], count
        # The hot loop for vocabularies (50k-250k strings): skip without decoding, but find duplicates, which
        # llama.cpp asserts on. It reads each entry as a C string (cut at the first NUL byte) and maps an empty
        # one to "[EMPTY_<i>]", so that is what counts: "a\0b" duplicates "a"
        buf, pos, limit, unpack = cur.buf, cur.pos, cur.limit, struct.unpack_from
        seen: dict[bytes, int] | None = {} if vocab else None
        for i in range(count):
            if pos + 8 > limit:
                cur.pos = pos
                cur.need(8, f"item {i} of '{key}'")  # raises: truncated, or read more
            n = unpack("<Q", buf, pos)[0]
            if pos + 8 + n > limit:
                cur.pos = pos + 8
                cur.need(n, f"item {i} of '{key}'")
            if seen is not None:
                word = bytes(buf[pos + 8:pos + 8 + n]).partition(b"\0")[0] or f"[EMPTY_{i}]".encode()
                first = seen.setdefault(word, i)
                if first != i:
                    raise _invalid(cur.path, f"corrupt vocabulary: tokens {first} and {i} are both {word[:40]!r} "
                                             f"in '{key}'")
            pos += 8 + n
        cur.pos = pos
        if seen is not None:  # llama.cpp's SPM tokenizer spells an unknown character with these (or aborts)
            cur.unspellable = [b for b in range(256) if f"<0x{b:02X}>".encode() not in seen and bytes([b]) not in seen]
        if keep:
            cur.pos = start_items
            return [cur.string(f"item {i} of '{key}'") for i in range(count)], count
        return None, count
    values = [_read_value(cur, itype, f"{key}[{i}]", depth + 1)[0] for i in range(count)]
    return (values if keep else None), count


class _Header(NamedTuple):
    """One file's header, walked and bounds-checked."""

    version: int
    metadata: dict[str, Any]
    types: dict[str, int]
    array_lengths: dict[str, int]
    alignment: int
    data_offset: int
    tensors: list[TensorInfo]
    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, int]
    unspellable: list[int]


def _header(path: Path, buf: bytes, size: int) -> _Header:
    cur = _Cursor(buf, size, path)
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise _not_gguf(path, magic)
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise _invalid(path, "big-endian GGUF file, which this little-endian machine cannot run",
                       "download the little-endian build of the model")
    if version not in SUPPORTED_VERSIONS:
        raise _invalid(path, f"unsupported GGUF version {version} (supported: 2, 3)",
                       "re-download it or re-convert it with a current llama.cpp")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    # Each tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes and each
    # key/value at least 8 + 4 + 1, so larger counts cannot fit in this file.
    if n_tensors > (size - cur.pos) // 24:
        raise _invalid(path, f"corrupt header: it claims {n_tensors} tensors, more than a {size}-byte file "
                             f"can hold")
    if n_kv > (size - cur.pos) // 13:
        raise _invalid(path, f"corrupt header: it claims {n_kv} metadata entries, more than a {size}-byte "
                             f"file can hold")

    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}") or ""
        if key in types:
            raise _invalid(path, f"corrupt metadata: duplicate key '{key}'")
        vtype = cur.u32(f"the type of '{key}'")
        types[key] = vtype
        value, length = _read_value(cur, vtype, key)
        if length is not None:
            array_lengths[key] = length
        if value is not None:
            metadata[key] = value

    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if ("general.alignment" in types and types["general.alignment"] != 4) or not isinstance(alignment, int) \
            or alignment < MIN_ALIGNMENT or alignment & (alignment - 1):
        raise _invalid(path, f"corrupt metadata: general.alignment is {alignment!r}; llama.cpp needs a uint32 "
                             f"power of two of at least {MIN_ALIGNMENT}")

    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}") or ""
        if len(name) > MAX_NAME:
            raise _invalid(path, f"corrupt tensor info: tensor #{i} has a {len(name)}-character name")
        n_dims = cur.u32(f"the shape of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _invalid(path, f"corrupt tensor info: tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS})")
        shape = struct.unpack_from(f"<{n_dims}Q", buf, cur.need(8 * n_dims, f"the shape of tensor '{name}'"))
        ggml_type = cur.u32(f"the type of tensor '{name}'")
        offset = cur.u64(f"the offset of tensor '{name}'")
        raw.append((name, shape, ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    shapes: dict[str, tuple[int, ...]] = {}
    offsets: dict[str, int] = {}
    expected = 0  # llama.cpp reads the tensors' data one after another, each padded to the alignment
    for name, shape, ggml_type, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _invalid(path, f"tensor '{name}' has ggml type {ggml_type}, unknown to gguf "
                                 f"{getattr(gguf, '__version__', '')}".rstrip(),
                           "the file is corrupt, or newer than this software: upgrade gguf and "
                           "llama-cpp-python, or re-download it") from None
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements == 0 or shape[0] % block:
            raise _invalid(path, f"corrupt tensor info: tensor '{name}' has shape {list(shape)}, which "
                                 f"{qtype.name} (blocks of {block}) cannot hold")
        if len(shape) == 1 and qtype != gguf.GGMLQuantizationType.F32:
            # Norm weights and biases: llama.cpp's converter always writes them as F32, and ggml's CPU
            # element-wise ops (mul, add) abort on an F16 or quantized one at the first decode.
            raise _invalid(path, f"corrupt tensor info: tensor '{name}' is one-dimensional but stored as "
                                 f"{qtype.name}; llama.cpp needs norm weights and biases in F32")
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            raise _invalid(path, f"corrupt tensor info: tensor '{name}' starts at data offset {offset}, "
                                 f"not a multiple of the alignment {alignment}")
        start = data_offset + offset
        if start + n_bytes > size:
            raise _invalid(path, f"truncated: tensor '{name}' ends at byte {start + n_bytes} but the file "
                                 f"has {size} bytes", _FIX_TRUNCATED)
        if offset != expected:  # llama.cpp: "tensor 'X' has offset O, expected E", then "failed to load model"
            raise _invalid(path, f"corrupt tensor info: tensor '{name}' ({n_bytes} bytes as {qtype.name} "
                                 f"{list(shape)}) starts at data offset {offset}, but the tensors before it end at "
                                 f"{expected}: a shape or offset in the file is wrong")
        expected += -(-n_bytes // alignment) * alignment
        if name in shapes:
            raise _invalid(path, f"corrupt tensor info: duplicate tensor '{name}'")
        tensors.append(TensorInfo(name, qtype.name, n_elements, n_bytes))
        shapes[name] = shape
        offsets[name] = start
    return _Header(version, metadata, types, array_lengths, alignment, data_offset, tensors, shapes, offsets,
                   cur.unspellable)


def _walk(path: Path, buf: bytes, size: int, alone: bool = False) -> GGUFInfo:
    head = _header(path, buf, size)
    version, metadata, types, array_lengths, alignment, data_offset, tensors, shapes, offsets, _ = head
    later = alone and isinstance(metadata.get("split.no"), int) and metadata["split.no"] > 0  # tensors only
    shards = [] if alone else split_shards(path, metadata, _read_shard)  # the other files of a split model, walked
    arch = "" if later else metadata.get("general.architecture")
    from .gguf_hparams import check_hparams

    if not later and (not isinstance(arch, str) or not arch):
        raise _invalid(path, "missing general.architecture, so no runtime knows how to run it",
                       "re-convert it with a current llama.cpp")
    if not later:
        check_hparams(path, arch, metadata, types, array_lengths, head.unspellable)

    def num(key: str) -> int | None:
        v = metadata.get(f"{arch}.{key}")
        if isinstance(v, list):  # some archs (e.g. OpenELM) store per-layer head counts
            v = max(v) if v else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None  # a wrong type here is odd but harmless: report it as unknown
        return int(v)

    tensors = tensors + [t for shard in shards for t in shard.tensors]
    shapes = {**shapes, **{k: v for shard in shards for k, v in shard.shapes.items()}}
    total = sum(t.n_bytes for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
    mix = {k: v / total for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])} if total else {}
    summary = ", ".join(f"{k} {v:.0%}" for k, v in mix.items() if v >= 0.005) or "-"
    template = metadata.get("tokenizer.chat_template")
    licence = metadata.get("general.license")
    n_vocab = num("vocab_size") or array_lengths.get("tokenizer.ggml.tokens")
    name = metadata.get("general.name")
    return GGUFInfo(
        path=path, file_size=size + sum(sh.file_size for sh in shards), version=version, architecture=arch,
        name=name if isinstance(name, str) else None,
        parameters=sum(t.n_elements for t in tensors), quant_mix=mix, quant_summary=summary,
        context_length=num("context_length"),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        license=licence if isinstance(licence, str) else None,
        n_layers=num("block_count"), n_embd=num("embedding_length"), n_head=num("attention.head_count"),
        n_head_kv=num("attention.head_count_kv"), n_vocab=n_vocab,
        file_type=metadata.get("general.file_type") if isinstance(metadata.get("general.file_type"), int) else None,
        alignment=alignment, data_offset=data_offset, tensor_bytes=total, tensors=tuple(tensors),
        tensor_shapes=shapes, tensor_offsets=offsets, metadata=metadata, array_lengths=array_lengths,
        split_paths=tuple(sh.path for sh in shards),
    )


def _deep_check(info: GGUFInfo) -> None:
    """Parse with gguf's own GGUFReader and check it agrees with our walk."""
    try:
        reader = gguf.GGUFReader(info.path)
    except Exception as e:
        raise _invalid(info.path, f"gguf could not read it ({type(e).__name__}: {e})") from e
    theirs = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    ours = {t.name: (info.tensor_offsets[t.name], t.n_bytes) for t in info.tensors if t.name in info.tensor_offsets}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise _invalid(info.path, f"gguf and the header check disagree on tensor layout (e.g. {diff})")


_cache: dict[tuple[str, int, int], GGUFInfo] = {}
_cache_lock = threading.Lock()


def validate_gguf(path: str | os.PathLike[str], deep: bool = False, alone: bool = False) -> GGUFInfo:
    """Check that ``path`` is a complete, well-formed GGUF file and summarise it.

    Args:
        path: the .gguf file.
        deep: also parse it with ``gguf.GGUFReader`` and cross-check the tensor layout (slow: seconds).
        alone: check this file alone even if it is a shard of a split model (a download: the others may not be
            there yet); a shard after the first is summarised without an architecture (``""``).

    Raises:
        InvalidModelFile: truncated, corrupt or not a GGUF; the message names the problem and the fix.
        ModelNotFound: the file does not exist.
    """
    from ..errors import ModelNotFound

    p = Path(path).expanduser()
    problem = path_problem(p)
    if problem in NOT_THERE:
        raise ModelNotFound(f"{p}: {problem}; check the path, or list models with `ondevice models`")
    if problem is not None:
        raise InvalidModelFile(f"{p}: {problem}; pass the path of a .gguf file")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and not deep and not alone:
        return hit
    info = _read(p, st.st_size, functools.partial(_walk, alone=alone))
    if deep:
        _deep_check(info)
    if not info.split_paths and not alone:  # (the key does not see the other shards change)
        with _cache_lock:
            _cache[key] = info
    return info


def _read(p: Path, size: int, walk: Callable[[Path, bytes, int], T]) -> T:
    """``walk`` over the header of the ``size``-byte file ``p``, read in growing chunks."""
    if size < 24:
        if size >= 4 and p.read_bytes()[:4] != GGUF_MAGIC:
            raise _not_gguf(p, p.read_bytes()[:4])
        enc = p.suffix == ".enc" or _encrypted_magic(p.read_bytes()[:4])
        raise _invalid(p, f"truncated: the file has {size} bytes but a GGUF header needs at least 24",
                       _FIX_ENC_TRUNCATED if enc else _FIX_TRUNCATED)
    # Plain reads rather than mmap: a file that shrinks under a mapping kills the process with SIGBUS.
    # Headers are small (a 250k-token vocabulary is ~5 MB), so read 16 MiB and double while needed.
    chunk = 16 << 20
    with open(p, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(min(chunk, size))
            try:
                out = walk(p, buf, size)
                break
            except _NeedMore:
                if len(buf) < min(chunk, size):  # the file shrank under us
                    raise _invalid(p, "the file changed while it was being read",
                                   "wait for whatever writes it to finish and retry") from None
                chunk *= 4
    if p.stat().st_size != size:
        raise _invalid(p, "the file changed while it was being read", "wait for the writer to finish and retry")
    return out


def _read_shard(p: Path) -> Shard:
    size = p.stat().st_size
    head = _read(p, size, _header)
    return Shard(p, size, head.tensors, head.shapes, head.metadata)
