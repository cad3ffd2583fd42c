"""Restore a container's plaintext into anonymous memory (a memfd) that llama.cpp opens by path.

The plaintext never has a name in any filesystem: ``memfd_create`` gives a file that lives in RAM only,
and llama.cpp opens it as ``/proc/self/fd/N`` (its ordinary path-based loader, mmap included), which only
this process can open. Chunks are written with ``pwrite`` rather than through a mapping of ours, so the
plaintext is resident once (in llama.cpp's mapping), not twice.

Pipelined restoration (TZ-LLM): the chunks holding the GGUF metadata are restored and verified first;
the rest are decrypted by ``threads`` worker threads, in file order, while llama.cpp parses the metadata,
builds the vocabulary and lays out its tensors. :meth:`Restored.wait` is the barrier: the engine calls it
from llama.cpp's progress callback, which llama.cpp calls before it touches any tensor's data, and again
before anything is computed. ``overlap=False, threads=1`` is the strawman: decrypt everything, then load.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .container import TAG, Header, ProtectError, decrypt_error, read_header, require_crypto


@dataclass
class Restored:
    """A decrypted model in a memfd. ``path`` is what llama.cpp opens; :meth:`close` wipes it."""

    header: Header
    fd: int
    source: str
    threads: int
    t_start: float = field(default_factory=time.perf_counter)
    decrypt_s: float | None = None  # wall time from start to the last chunk verified
    locked_bytes: int = 0  # VmLck after the load: the plaintext is out of swap when this covers it
    meta_s: float | None = None  # wall time until the metadata chunks were restored (llama.cpp may start then)
    barrier_wait_s: float = 0.0  # time llama.cpp's loader spent waiting for the weights: what did not overlap
    info: Any = None  # the restored GGUF's validate_gguf summary (protect/load.py's begin takes it once)
    _done: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    _workers: list[threading.Thread] = field(default_factory=list)
    _src: int = -1  # the container, open while chunks are being restored
    _left: int = -1  # chunks not yet restored

    def __post_init__(self) -> None:
        self._left = self.header.n_chunks

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    @property
    def shared_path(self) -> str:
        """The same memfd as this user's child processes can open it (while this process lives)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    @property
    def family(self) -> str:
        """The weight type that dominates the model (device/kernels.py's unit of kernel choice)."""
        return next(iter(self.info.quant_mix), "unknown") if self.info is not None else "unknown"

    @property
    def size(self) -> int:
        return self.header.plain_size

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait(self) -> None:
        """Block until every chunk is restored and authenticated; raise the first failure."""
        self._done.wait()
        self._join()
        if self._error is not None:
            raise self._error

    def _join(self) -> None:
        for t in self._workers:
            t.join()
        if self._src >= 0:
            os.close(self._src)
            self._src = -1

    def close(self) -> None:
        """Stop restoring, overwrite the plaintext with zeros and release the memory."""
        if self.fd < 0:
            return
        self._error = self._error or ProtectError("closed")  # workers stop at their next chunk
        self._join()
        zeros = bytes(1 << 20)
        with contextlib.suppress(OSError):
            for off in range(0, self.size, len(zeros)):
                os.pwrite(self.fd, zeros[:min(len(zeros), self.size - off)], off)
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def restore(path: str | os.PathLike[str], key: bytes, *, threads: int = 2, overlap: bool = True) -> Restored:
    """Start restoring ``path`` into a memfd and return once its metadata chunks are verified.

    With ``overlap`` the remaining chunks are restored in the background (call :meth:`Restored.wait`
    before touching weights); without it this returns only when everything is restored.

    Raises:
        ProtectError: wrong key (before any chunk is read), a damaged or truncated file, a newer format.
    """
    aead = require_crypto()
    h = read_header(path)
    gcm = aead.AESGCM(h.file_key(key))
    fd = os.memfd_create("ondevice-model", os.MFD_CLOEXEC)
    r = Restored(header=h, fd=fd, source=str(path), threads=max(1, threads))
    try:
        os.ftruncate(fd, h.plain_size)
        r._src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        n_meta = -(-h.meta_size // h.chunk_size)
        _restore_chunks(r, gcm, iter(range(n_meta)))  # the metadata first: llama.cpp reads it as we return
        if r._error is not None:
            raise r._error
        r.meta_s = time.perf_counter() - r.t_start
        rest = iter(range(n_meta, h.n_chunks))  # shared by the workers: together they go in file order
        r._workers = [threading.Thread(target=_restore_chunks, args=(r, gcm, rest), name="ondevice-restore",
                                       daemon=True) for _ in range(r.threads if overlap else r.threads - 1)]
        for t in r._workers:
            t.start()
        if not overlap:
            _restore_chunks(r, gcm, rest)
        if not overlap or not r._workers:
            r.wait()
    except BaseException:
        r.close()
        raise
    return r


_lock = threading.Lock()


def _restore_chunks(r: Restored, gcm, chunks) -> None:
    """Decrypt, authenticate and write chunks taken from the shared iterator until it is empty."""
    from cryptography.exceptions import InvalidTag

    h = r.header
    buf = bytearray(h.chunk_size + TAG)
    # decrypt_into (cryptography >= 45) writes into one reused buffer: half the time of decrypt(), which
    # allocates and faults in a fresh MiB for every chunk
    out = bytearray(h.chunk_size) if hasattr(gcm, "decrypt_into") else None
    try:
        while r._error is None:
            with _lock:
                i = next(chunks, None)
            if i is None:
                return
            n = h.chunk_len(i) + TAG
            view = memoryview(buf)[:n]
            if os.preadv(r._src, [view], h.chunk_offset(i)) != n:
                raise ProtectError(f"{r.source} changed while it was being read; retry")
            try:
                if out is None:
                    plain = gcm.decrypt(h.nonce(i), view, h.aad(i))
                else:
                    plain = memoryview(out)[:n - TAG]
                    gcm.decrypt_into(h.nonce(i), view, h.aad(i), plain)
            except InvalidTag:
                raise decrypt_error(r.source, i) from None
            os.pwrite(r.fd, plain, i * h.chunk_size)
            with _lock:
                r._left -= 1
                if r._left == 0:
                    r.decrypt_s = time.perf_counter() - r.t_start
                    r._done.set()
    except BaseException as e:  # noqa: BLE001 — a worker thread: the first failure wins; the barrier re-raises it
        with _lock:
            if r._error is None:
                r._error = e
        r._done.set()
