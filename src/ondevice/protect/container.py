"""The encrypted model container: a plaintext header, then the GGUF in authenticated chunks.

Layout (all integers little-endian)::

    header   96 bytes   magic "ONDVENC\\0", version, algorithm, header length, chunk size, plaintext size,
                        chunk count, metadata size, 32-byte salt, 16-byte key check
    chunk i  ciphertext (chunk_size bytes, the last one shorter) + 16-byte GCM tag

Each chunk is AES-256-GCM under a per-file key ``HKDF-SHA256(master key, salt)`` with the nonce ``i``
(a fresh salt per file, so two files under one master key never share a key/nonce pair). The
associated data of chunk ``i`` is ``header || i || is_last``: a chunk cannot be moved, dropped, swapped
with one from another file, and the file cannot be cut short at a chunk boundary, without a tag failing.
The key check (another HKDF output) tells a wrong key apart from a damaged file before any chunk is
touched. ``meta_size`` is where the GGUF's tensor data starts: the loader restores those bytes first,
because llama.cpp parses them before it needs any weight (TZ-LLM's "pipelined restoration").

Only sizes and the format version are readable without the key (:func:`read_header`).
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidModelFile, OndeviceError, path_problem

MAGIC = b"ONDVENC\0"
VERSION = 1
ALG_AES256_GCM = 1
TAG = 16
DEFAULT_CHUNK = 1 << 20
_HEADER = struct.Struct("<8sHHIIIQQQ32s16s")
HEADER_SIZE = _HEADER.size  # 96
_FIX_DAMAGED = "the file was modified or damaged after encryption; copy it again from its source"


class ProtectError(OndeviceError):
    """A container that cannot be opened: wrong key, damaged, truncated or from a newer format."""


def require_crypto():
    """The ``cryptography`` package, or an error naming the extra that installs it."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: F401
    except ImportError:
        raise OndeviceError("encrypted models need the 'cryptography' package: "
                            "pip install 'ondevice[protect]'") from None
    from cryptography.hazmat.primitives.ciphers import aead

    return aead


def _hkdf(key: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(key)


@dataclass(frozen=True)
class Header:
    """The container's plaintext header (authenticated as part of every chunk)."""

    version: int
    alg: int
    header_len: int
    chunk_size: int
    plain_size: int
    n_chunks: int
    meta_size: int
    salt: bytes = field(repr=False)
    key_check: bytes = field(repr=False)
    raw: bytes = field(repr=False)  # the header bytes exactly as stored: every chunk's associated data starts with them

    @property
    def file_size(self) -> int:
        return self.header_len + self.plain_size + self.n_chunks * TAG

    def chunk_offset(self, i: int) -> int:
        """Where chunk ``i``'s ciphertext starts in the container."""
        return self.header_len + i * (self.chunk_size + TAG)

    def chunk_len(self, i: int) -> int:
        """Plaintext bytes in chunk ``i``."""
        return min(self.chunk_size, self.plain_size - i * self.chunk_size)

    def aad(self, i: int) -> bytes:
        return self.raw + struct.pack("<QB", i, i == self.n_chunks - 1)

    @staticmethod
    def nonce(i: int) -> bytes:
        return i.to_bytes(12, "big")

    def file_key(self, master: bytes) -> bytes:
        """The per-file AES key, after checking that ``master`` is this file's key."""
        if not secrets.compare_digest(_hkdf(master, self.salt, b"ondevice-protect/v1 key-check", 16),
                                      self.key_check):
            raise ProtectError("the key does not open this container (a different key, or a damaged header); "
                               "give the key it was encrypted with")
        return _hkdf(master, self.salt, b"ondevice-protect/v1 data", 32)

    def to_dict(self) -> dict:
        return {"format_version": self.version, "algorithm": "AES-256-GCM", "chunk_size": self.chunk_size,
                "plaintext_size": self.plain_size, "chunks": self.n_chunks, "metadata_size": self.meta_size,
                "container_size": self.file_size}


def is_container(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts with the container's magic (cheap: reads 8 bytes)."""
    try:
        if not os.path.isfile(path):  # a FIFO would block the open; a device or a folder is no container
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return False


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header against the file's size. Needs no key.

    Raises:
        ProtectError: no such file, not a container, a newer format, an inconsistent header, truncated or extended.
    """
    p = Path(path)
    problem = path_problem(p)
    if problem and problem.endswith(", not a file"):  # a FIFO would block the open forever; a folder, a device
        raise ProtectError(f"{p}: {problem}; give the path of a container (`ondevice protect encrypt MODEL "
                           f"-o FILE` writes one)")
    try:
        with open(p, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ProtectError(f"{p}: no such file; check the path (`ondevice protect encrypt MODEL -o FILE` "
                           f"writes a container)") from None
    except OSError as e:  # a folder, no permission...
        raise ProtectError(f"{p}: cannot read it ({e.strerror or e}); give the path of a container") from None
    if raw[:len(MAGIC)] != MAGIC:
        raise ProtectError(f"{p} is not an ondevice encrypted container (bad magic); encrypt a model with "
                           f"`ondevice protect encrypt MODEL -o FILE --key-env NAME`")
    if len(raw) >= 10 and struct.unpack_from("<H", raw, 8)[0] > VERSION:
        v = struct.unpack_from("<H", raw, 8)[0]
        raise ProtectError(f"{p} is format version {v}, newer than this ondevice reads ({VERSION}); "
                           f"upgrade ondevice (pip install -U 'ondevice[protect]'), or, if it was written as format "
                           f"{VERSION} (`ondevice protect info` where it was made), the file is damaged: copy it again")
    if len(raw) < HEADER_SIZE:
        raise ProtectError(f"{p} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header; "
                           f"{_FIX_DAMAGED}")
    _, version, alg, hlen, chunk, _reserved, plain, n_chunks, meta, salt, check = _HEADER.unpack(raw)
    h = Header(version, alg, hlen, chunk, plain, n_chunks, meta, salt, check, raw)
    if (version < 1 or alg != ALG_AES256_GCM or hlen != HEADER_SIZE or not 4096 <= chunk <= 1 << 30
            or plain < 1 or n_chunks != -(-plain // chunk) or not 0 < meta <= plain or _reserved):
        raise ProtectError(f"{p}: the container header is inconsistent; {_FIX_DAMAGED}")
    if size < h.file_size:
        raise ProtectError(f"{p} is truncated: {size} bytes of the {h.file_size} its header declares; "
                           f"{_FIX_DAMAGED}")
    if size > h.file_size:
        raise ProtectError(f"{p} has {size - h.file_size} bytes after its last chunk; {_FIX_DAMAGED}")
    return h


def decrypt_error(path: str | os.PathLike[str], i: int) -> ProtectError:
    return ProtectError(f"{path}: chunk {i} failed authentication (tampered, damaged or spliced); "
                        f"nothing was loaded; {_FIX_DAMAGED}")


def encrypt_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], master: bytes, *, meta_size: int,
                 chunk_size: int = DEFAULT_CHUNK) -> Header:
    """Write ``src`` (a GGUF) to ``dst`` as a container; through a temp file renamed into place."""
    aead = require_crypto()
    from ..models.store import atomic_write
    from ..stop_signals import StopOnSignals

    plain = os.path.getsize(src)
    if plain < 1:
        raise InvalidModelFile(f"{src} is empty; nothing to encrypt")
    if not 4096 <= chunk_size <= 1 << 30:
        raise ProtectError(f"chunk size {chunk_size} is out of range; use 4096 bytes to 1 GiB")
    salt = secrets.token_bytes(32)
    check = _hkdf(master, salt, b"ondevice-protect/v1 key-check", 16)
    n = -(-plain // chunk_size)
    raw = _HEADER.pack(MAGIC, VERSION, ALG_AES256_GCM, HEADER_SIZE, chunk_size, 0, plain, n, meta_size, salt, check)
    h = Header(VERSION, ALG_AES256_GCM, HEADER_SIZE, chunk_size, plain, n, meta_size, salt, check, raw)
    gcm = aead.AESGCM(h.file_key(master))
    try:
        with StopOnSignals(str(dst)) as stop, open(src, "rb") as f, atomic_write(dst) as out:  # a `kill`: no temp
            out.write(raw)
            for i in range(n):
                data = f.read(h.chunk_len(i))
                if len(data) != h.chunk_len(i):
                    raise InvalidModelFile(f"{src} changed while it was being encrypted; retry")
                out.write(gcm.encrypt(h.nonce(i), data, h.aad(i)))
            stop.finish()  # the rename as atomic_write exits: whole, and a signal then ends the process after it
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        try:
            st = os.statvfs(Path(dst).parent)
            free = f", {st.f_bavail * st.f_frsize / 1e6:.1f} MB free there"
        except OSError:
            free = ""
        fix = ("raise the file-size limit (ulimit -f) or give -o a path on another disk" if e.errno == errno.EFBIG
               else "free some space or give -o a path on another disk")
        raise ProtectError(f"cannot write {dst}: {e.strerror} (the container needs {h.file_size / 1e6:.1f} MB"
                           f"{free}); nothing was written; {fix}") from None
    return h
