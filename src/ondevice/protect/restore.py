"""Restore a container's plaintext into anonymous memory (a memfd) that llama.cpp opens by path.

The plaintext never has a name in any filesystem: ``memfd_create`` gives a file that lives in RAM only,
and llama.cpp opens it as ``/proc/self/fd/N`` (its ordinary path-based loader, mmap included), which only
this process (and its children) can open. Chunks are written with ``pwrite`` rather than through a mapping
of ours, so the plaintext is resident once (in llama.cpp's mapping), not twice.

Pipelined restoration (TZ-LLM): the chunks holding the GGUF metadata are restored and verified first;
the rest are decrypted in file order while llama.cpp parses the metadata, builds the vocabulary and lays
out its tensors. :meth:`Restored.wait` is the barrier: the engine calls it from llama.cpp's progress
callback, which llama.cpp calls before it touches any tensor's data, and again before anything is computed.

The background work runs in ``threads`` worker *processes* (this module's :func:`_child`), each handed
the memfd, the container and the per-file key through a pipe, never argv. Threads would share the
interpreter lock with the loader: ``cryptography``'s AES-GCM holds it for each chunk, and while the main
thread ran Python (the GGUF check, ~160 ms for Qwen's vocabulary) a decrypt thread got it once per 5 ms
switch interval, ~190 MiB/s instead of ~3,700 (measured, benchmarks/protect_bench.py). Where a worker
cannot be started, threads do the same work. ``overlap=False, threads=1`` is the strawman: decrypt
everything in this process, then load.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..errors import OndeviceError
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
    worker_rss: int = 0  # the largest worker process's own peak RSS (VmHWM), beside the model's memory
    types: str = "unknown"  # its weight types, device/kernels.py's unit (types_of; protect/load.py's _start sets it)
    holds: int = 0  # the engines using it (protect/load.py's Hold: they share one restore of a container)
    _done: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    _workers: list[threading.Thread] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)  # worker processes (see the module's doc)
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
        if self._error is not None:  # a failure or close(): no worker may write into the memfd any more
            for p in self._procs:
                with contextlib.suppress(OSError):
                    p.kill()
        for t in self._workers:
            t.join()
        with _lock:  # the loads that share this restore (protect/load.py's Hold) may wait on it at once
            src, self._src = self._src, -1
        if src >= 0:
            os.close(src)

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


def restore(path: str | os.PathLike[str], key: bytes, *, threads: int = 2, overlap: bool = True,
            processes: bool = True) -> Restored:
    """Start restoring ``path`` into a memfd and return once its metadata chunks are verified.

    With ``overlap`` the remaining chunks are restored in the background, by ``threads`` worker processes
    (``processes``, falling back to threads where none can start) or threads (call :meth:`Restored.wait`
    before touching weights); without it this returns only when everything is restored, in this process.

    Raises:
        ProtectError: wrong key (before any chunk is read), a damaged or truncated file, a newer format.
    """
    aead = require_crypto()
    h = read_header(path)
    file_key = h.file_key(key)
    gcm = aead.AESGCM(file_key)
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
        if overlap and processes and _start_processes(r, file_key, range(n_meta, h.n_chunks)):
            return r
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
_CHILD = "import sys; sys.path[:] = {path!r}; from ondevice.protect.restore import _child; _child()"


def _start_processes(r: Restored, file_key: bytes, rest: range) -> bool:
    """Start ``r.threads`` worker processes on interleaved slices of ``rest`` (so together they go in file
    order; none when it is empty) and a thread that waits for them; False (nothing started) if no process
    could be started."""
    if getattr(sys, "frozen", False) or not sys.executable:  # a bundled app: sys.executable is not a Python
        return False
    n = min(r.threads, len(rest))
    try:
        for k in range(n):
            part = rest[k::n]
            p = subprocess.Popen([sys.executable, "-I", "-c", _CHILD.format(path=sys.path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(r._src, r.fd),
                                 close_fds=True)
            r._procs.append(p)
            request = {"src": r._src, "fd": r.fd, "key": file_key.hex(), "source": r.source,
                       "chunks": [part.start, part.stop, part.step], "parent": os.getpid()}
            p.stdin.write(json.dumps(request).encode() + b"\n")  # a few hundred bytes: never blocks on the pipe
            p.stdin.close()
            p.stdin = None  # communicate() in _watch must not flush it again
    except OSError:
        for p in r._procs:
            p.kill()
            p.wait()
        r._procs = []
        return False
    r._workers = [threading.Thread(target=_watch, args=(r,), name="ondevice-restore", daemon=True)]
    r._workers[0].start()
    return True


def _watch(r: Restored) -> None:
    """Wait for every worker process; the first failure becomes the barrier's error, success sets it free."""
    try:
        _collect(r)
    except BaseException as e:  # noqa: BLE001 — a thread: the barrier must open and re-raise it, never hang
        r._error = r._error or e
    if r._error is None:
        r.decrypt_s = time.perf_counter() - r.t_start
    r._done.set()


def _collect(r: Restored) -> None:
    for p in r._procs:
        out, err = p.communicate()
        if r._error is not None:
            continue
        try:
            reply = json.loads(out.decode().strip().splitlines()[-1])
            r.worker_rss = max(r.worker_rss, int(reply.get("peak_rss", 0)))
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
            reply = {"error": f"the restore worker process failed ({tail[0]}); run again, and report it if it "
                              f"persists", "kind": "OndeviceError"}
        if "error" in reply:
            r._error = (ProtectError if reply.get("kind") == "ProtectError" else OndeviceError)(reply["error"])
            for q in r._procs:
                with contextlib.suppress(OSError):
                    q.kill()


def _child() -> None:
    """A worker process: restore the chunks the parent names into its memfd; one JSON line on stdout."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills us if it stops
    _die_with_parent()
    req = json.loads(sys.stdin.readline())
    if os.getppid() != req["parent"]:  # it died before _die_with_parent could ask: no one wants these chunks
        os._exit(1)
    try:
        aead = require_crypto()
        h = read_header(f"/proc/self/fd/{req['src']}")
        r = Restored(header=h, fd=req["fd"], source=req["source"], threads=1)
        r._src = req["src"]
        _restore_chunks(r, aead.AESGCM(bytes.fromhex(req["key"])), iter(range(*req["chunks"])))
        e = r._error
        reply = {"ok": True} if e is None else {"error": str(e), "kind": type(e).__name__}
        with open("/proc/self/status") as f:  # VmHWM: this image's own peak (ru_maxrss keeps the forked parent's)
            reply["peak_rss"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    except BaseException as e:  # noqa: BLE001 — whatever it is, the parent must hear of it
        reply = {"error": f"{type(e).__name__}: {e}", "kind": type(e).__name__}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    os._exit(0)  # not Restored.__del__: the memfd is the parent's to wipe


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies: a parent killed outright (SIGTERM, SIGHUP, SIGKILL:
    no handler of its runs to kill us) must not leave an orphan decrypting the model into the memfd it holds.

    Linux sends it when the parent *thread* that started us ends; that thread waits for us (the load's barrier,
    protect/load.py's finish) or kills us (Restored.close), so in practice it is the parent process's death."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    with contextlib.suppress(OSError, AttributeError):  # no libc symbol: the parent's close still kills us
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


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
