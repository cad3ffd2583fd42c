"""The library door of ``ondevice protect``: keygen, encrypt, info, verify, and a container's GGUF summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import InvalidArgument
from .container import (
    DEFAULT_CHUNK,
    Header,
    decrypt_error,
    encrypt_file,
    is_container,
    read_header,
    require_crypto,
)
from .keys import load_key, new_key, store_in_keyring


def keygen(keyring_name: str | None = None, out: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
    """A new random key (64 hex digits); also stored in the OS keyring under ``keyring_name`` if given, and
    written to the file ``out`` (mode 0600: only its owner can read it) if given.

    ``out`` is written through a temp file renamed into place; an existing file or keyring entry is replaced only
    with ``force`` (it may be the only copy of the key that opens your containers).
    """
    from ..models.store import atomic_path

    key = new_key()
    dst = Path(out).expanduser() if out is not None else None
    if dst is not None and (dst.exists() or dst.is_symlink()) and not force:
        raise InvalidArgument(f"-o {dst} already exists (it may be the only copy of a key your containers need); "
                              f"pass --force to replace it, or write to another path")
    if keyring_name:
        store_in_keyring(keyring_name, key, force=force)
    if dst is not None:
        with atomic_path(dst) as tmp:
            if tmp.is_file():  # not a device written through (-o /dev/stdout): its mode is not ours to change
                os.chmod(tmp, 0o600)  # before the key is in it: never readable by others, not even for a moment
            tmp.write_text(key + "\n")
    return key


def encrypt(model: str | os.PathLike[str] | None, out: str | os.PathLike[str], key_source: str | None, *,
            chunk_size: int = DEFAULT_CHUNK, force: bool = False) -> Header:
    """Encrypt a model (any name :func:`ondevice.models.resolve` knows) into the container ``out``.

    The GGUF is validated first, so a container always holds a well-formed file (its tags then prove it
    is still that file). An existing ``out`` is replaced only with ``force`` (as ``ondevice quantize``).
    """
    from ..models import resolve, validate_gguf
    from ..models.gguf_split import refuse_split

    ref = resolve(model)
    if is_container(ref.path):
        raise InvalidArgument(f"{ref.path} is already an encrypted container; encrypt the .gguf it was made "
                              f"from (to change the key, encrypt that .gguf again with the new key)")
    info = validate_gguf(ref.path)
    refuse_split(info, "an encrypted container")
    dst = Path(out).expanduser()
    if dst.exists() and dst.resolve() == Path(ref.path).resolve():
        raise InvalidArgument(f"-o {dst} is the model itself; write the container to another path")
    if dst.is_dir() or str(out).endswith(("/", os.sep)) or not str(out):  # "new/" means a folder, not a file
        what = "is empty" if not str(out) else f"{out} names a folder"
        raise InvalidArgument(f"-o {what}; give the path of the container file to write, e.g. "
                              f"{dst / (Path(ref.path).stem + '.enc')}")
    if dst.exists() and not force:
        raise InvalidArgument(f"-o {dst} already exists; pass --force to replace it, or write to another path")
    key = load_key(key_source, "encrypting needs a key (make one with `ondevice protect keygen`)")
    return encrypt_file(ref.path, dst, key, meta_size=info.data_offset, chunk_size=chunk_size)


def info(path: str | os.PathLike[str]) -> dict:
    """What a container says without its key: format version, algorithm and sizes."""
    return {"path": str(path), **read_header(path).to_dict()}


def _decrypt_range(path, h: Header, key: bytes, chunks: range, sink) -> None:
    gcm = require_crypto().AESGCM(h.file_key(key))
    from cryptography.exceptions import InvalidTag
    with open(path, "rb") as f:
        for i in chunks:
            f.seek(h.chunk_offset(i))
            try:
                sink(gcm.decrypt(h.nonce(i), f.read(h.chunk_len(i) + 16), h.aad(i)))
            except InvalidTag:
                raise decrypt_error(path, i) from None


def verify(path: str | os.PathLike[str], key_source: str | None) -> dict:
    """Authenticate every chunk (nothing is kept); the header's summary and the time it took."""
    h = read_header(path)
    t0 = time.perf_counter()
    _decrypt_range(path, h, load_key(key_source), range(h.n_chunks), lambda _b: None)
    return {**info(path), "verified": True, "verify_s": time.perf_counter() - t0}


def model_info(path: str | os.PathLike[str], key_source: str | None):
    """The :class:`GGUFInfo` of the model inside a container, from its metadata chunks (decrypted in memory)."""
    from ..models.gguf_check import _walk

    h = read_header(path)
    parts: list[bytes] = []
    _decrypt_range(path, h, load_key(key_source), range(-(-h.meta_size // h.chunk_size)), parts.append)
    return _walk(Path(path), b"".join(parts)[:h.meta_size], h.plain_size)
