"""Load an encrypted container into llama.cpp without its plaintext touching any filesystem.

The engine calls :func:`begin` and :func:`finish` instead of ``llama_model_load_from_file`` when its
file is a container. The restore runs in the background (see :mod:`.restore`); llama.cpp's progress callback,
which it calls before it reads or maps each tensor's data, waits for the restore to finish and aborts the
load if any chunk failed authentication. So nothing computed, and no model handed back, ever saw an
unauthenticated byte; on failure the memfd is wiped and closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import threading
import time
from pathlib import Path

from ..errors import OndeviceError
from .container import read_header
from .keys import load_key
from .restore import Restored, restore

# MODE_STRAWMAN (decrypt all on one thread, then load) is kept as the measured baseline of pipelining
MODE_PIPELINED, MODE_STRAWMAN = "pipelined", "strawman"


def _vm_locked_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def can_lock(n_bytes: int) -> bool:
    """Whether ``mlock`` of ``n_bytes`` more is likely allowed (the limit, or root's CAP_IPC_LOCK)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or soft >= _vm_locked_bytes() + n_bytes or os.geteuid() == 0


SWAPS = "/proc/swaps"  # the swap devices in use, one a line after a header


def _swap_on() -> bool:
    try:
        return len(Path(SWAPS).read_text().splitlines()) > 1
    except OSError:  # no /proc (not Linux): nothing to tell
        return False


def _warn_unlocked(r: Restored) -> None:
    """Say that the plaintext may reach the swap device, and how to lock it: for an ordinary user the default
    locked-memory limit (8 MiB on systemd distributions) is below any model, so it is skipped silently otherwise."""
    import warnings

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    warnings.warn(f"{r.source}: the decrypted weights ({r.size / 1e6:.1f} MB) are not locked in memory (the "
                  f"locked-memory limit is {soft / 2**20:.0f} MiB) and swap is on, so they may be written to the swap "
                  f"device; raise the limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity in a systemd unit) or give "
                  f"the program CAP_IPC_LOCK (setcap cap_ipc_lock+ep)", stacklevel=3)


def decrypt_threads() -> int:
    """Worker processes for a pipelined restore (protect/restore.py): one core is left to llama.cpp's
    loader, which runs on one thread (vocabulary, tensor layout, repacking) while the weights are decrypted.

    Measured on 2 cores (benchmarks/protect_bench.py --decrypt-threads, Qwen 0.5B): 2 workers took the
    loader's core and the cold start grew (1.33x plaintext against 1.13x with 1).
    """
    from ..device.cgroup import usable_cpus  # affinity, capped by a container's CPU quota

    return max(1, min(2, usable_cpus() - 1))


class Hold:
    """One engine's hold on the restore of a container. Engines that load the same container in one process
    (serve's chat and embeddings engines, a model and its ``embed`` context) share one restore: one decrypt and
    one plaintext copy in memory, where a restore each would double both (and the locked-memory budget).

    It reads as its :class:`Restored` (``path``, ``family``, ``wait()``, the restore's timings), except for the
    figures of its own load (``barrier_wait_s``, ``locked_bytes``); :meth:`close` lets go once, and the last
    hold's close wipes and releases the plaintext.
    """

    def __init__(self, r: Restored, ident: tuple) -> None:
        self._r, self._ident, self._held = r, ident, True
        self.barrier_wait_s = 0.0  # this load's wait at the barrier (finish)
        self.locked_bytes = 0

    def __getattr__(self, name: str):
        if name == "_r":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self._r, name)

    def close(self) -> None:
        if not self._held:
            return
        self._held = False
        with _shared_lock:
            self._r.holds -= 1
            last = self._r.holds == 0
            if last and _shared.get(self._ident) is self._r:
                del _shared[self._ident]
        if last:
            self._r.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_shared: dict[tuple, Restored] = {}  # (st_dev, st_ino, the container's header) -> its restore, while held
_shared_lock = threading.Lock()


def begin(path: str | os.PathLike[str], key_source: str | None, *, mode: str = MODE_PIPELINED,
          threads: int | None = None) -> Hold:
    """Start restoring a container, or join the restore of it this process holds already (:class:`Hold`);
    returns once its GGUF metadata is restored and authenticated.

    ``Hold.path`` is then a readable GGUF header and ``Hold.types`` its weight types (kernels' unit). The
    header is not walked again by ondevice's own check (``validate_gguf``, what every plaintext load runs:
    ~0.2 s of Python for a 151k-token vocabulary): ``protect encrypt`` validated the file, and the chunks'
    tags prove these bytes are still that file. The weights follow in the background (``mode`` pipelined,
    on ``threads`` workers, default :func:`decrypt_threads`) or are all there (strawman).
    """
    if mode not in (MODE_PIPELINED, MODE_STRAWMAN):
        raise OndeviceError(f"restore mode {mode!r} is not {MODE_PIPELINED} or {MODE_STRAWMAN}")
    key = load_key(key_source)
    h = read_header(path)
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, h.raw)  # the header holds a random salt: another encryption is another file
    with _shared_lock:
        r = _shared.get(ident)
        if r is not None and r.fd >= 0 and r._error is None:
            h.file_key(key)  # this key must open the file too: a wrong one never reaches another load's plaintext
        else:
            r = _shared[ident] = _start(path, key, mode, threads)
        r.holds += 1
    return Hold(r, ident)


def _start(path: str | os.PathLike[str], key: bytes, mode: str, threads: int | None) -> Restored:
    workers = (threads or decrypt_threads()) if mode == MODE_PIPELINED else 1
    r = restore(path, key, threads=workers, overlap=mode == MODE_PIPELINED)
    try:
        from ..device.kernels import types_of

        r.types = types_of(r.path, trusted=True)
        if r.types is None:
            raise OndeviceError(f"llama.cpp cannot read the GGUF header inside {r.source}: it was not written by "
                                f"ondevice protect encrypt, which validates the model first; encrypt the model again")
    except BaseException:
        r.close()
        raise
    return r


def finish(ll, r: Hold, mparams) -> object:
    """Load the restored model into llama.cpp (``mparams``: its model params); the llama_model pointer.

    llama.cpp's progress callback waits for the last chunk before any tensor's data is read or mapped,
    and aborts the load on a failed chunk. On any failure the memfd is wiped and closed.

    Raises:
        OndeviceError: a chunk failed authentication, or llama.cpp could not load the model.
    """
    failure: list[BaseException] = []

    @ll.llama_progress_callback
    def barrier(progress: float, _user: ctypes.c_void_p) -> bool:
        try:
            t = time.perf_counter()
            r.wait()
            r.barrier_wait_s += time.perf_counter() - t
            return True
        except BaseException as e:  # noqa: BLE001 — never raise through C: abort the load, report it afterwards
            failure.append(e)
            return False

    want_lock = mparams.load_mode in (-1, 1) and can_lock(r.size)
    if mparams.load_mode in (-1, 1) and not want_lock and _swap_on():
        _warn_unlocked(r)
    mparams.progress_callback = barrier
    if want_lock:
        mparams.load_mode = 3  # mmap + mlock: the plaintext is kept out of swap (llama.cpp warns if refused)
    try:
        model = ll.llama_model_load_from_file(r.path.encode(), mparams)
        try:
            r.wait()  # the barrier again, should llama.cpp not have called its progress callback
        except BaseException:
            if model:
                ll.llama_model_free(model)
            raise
        if failure:
            raise failure[0]
        if not model:
            raise OndeviceError(f"llama.cpp could not load the model inside {r.source}; run with "
                                f"ONDEVICE_VERBOSE=1 to see why")
    except BaseException:
        r.close()
        raise
    r.locked_bytes = _vm_locked_bytes() if want_lock else 0
    if mparams.load_mode in (0, 2, 4):  # llama.cpp read the weights into buffers of its own: drop our copy now
        r.close()
    return model


def kernel_path(r: Hold) -> str:
    """The path to choose CPU kernels by (device/kernels.py): the memfd as other processes can open it.

    Choosing may self-test the model in a child process (once per set of weight types and machine); the child
    must then see every weight, so in that case this waits for the whole restore first.
    """
    try:
        from ..device import kernels

        if kernels.tested(r.types) is None:
            r.wait()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 — whatever kernels needs, a complete file is always safe to give it
        r.wait()
    return r.shared_path
