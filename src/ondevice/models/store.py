"""Where ondevice keeps things, and how it writes them (atomically).

Layout under :func:`home` (``$ONDEVICE_HOME``, else ``$XDG_CACHE_HOME/ondevice``, else ``~/.cache/ondevice``)::

    models/<name>.gguf        assembled, pulled, quantized... variants (resolve("<name>") finds them)
    models/<name>.json        provenance sidecar: where the file came from, its sha256, what made it
    data/                     the SQLite database and other records
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import OndeviceError, path_problem


def home() -> Path:
    """The ondevice home directory (not created)."""
    if env := os.environ.get("ONDEVICE_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ondevice"


def models_dir(create: bool = True) -> Path:
    """``home()/models``, created on first use (``create=False``: not made, for readers; a read-only home lists)."""
    d = home() / "models"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def data_dir() -> Path:
    """``home()/data`` (SQLite database etc.), created on first use."""
    d = home() / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _fsync_dir(d: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class UnwritablePath(OndeviceError, OSError):
    """A destination that cannot be written (a file where a folder should be, no permission...); still an
    ``OSError`` for callers that catch one."""


def unwritable(dest: Path, e: OSError, fix: str = "choose another path") -> UnwritablePath:
    """The error for ``e``, raised while making ``dest`` or its folder, naming ``dest`` and ``fix``."""
    blocker = next((p for p in reversed(dest.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else f"{e.strerror or e} ({e.filename or dest.parent})"
    return UnwritablePath(f"cannot write {dest}: {why}; {fix}")


def make_parent(dest: Path, fix: str = "choose another path") -> None:
    """``mkdir -p`` the folder of ``dest``, or an :class:`UnwritablePath` naming ``dest`` and ``fix``."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(dest, e, fix) from None


def temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file in ``folder`` to write a model into, then rename; readable by all as a model file is
    (mkstemp makes it 0600, and a model in a shared cache should stay readable). A prefix too long for a
    file name once mkstemp's 8 random characters and ``suffix`` are added is cut: any name that is valid
    for the file itself is valid for its temp file."""
    room = 255 - 8 - len(suffix.encode())  # NAME_MAX on Linux and macOS file systems
    if len(prefix.encode()) > room:
        prefix = prefix.encode()[:room - 1].decode("utf-8", "ignore") + "."
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.chmod(name, 0o644)
    return Path(name)


def _write_target(dest: Path) -> Path:
    """What writing ``dest`` should replace: a symbolic link's file (the link stays), or an error for a
    folder or a link loop."""
    if dest.is_symlink():
        problem = path_problem(dest)
        if problem == "a symbolic link loop":
            raise UnwritablePath(f"cannot write {dest}: {problem}; choose another path")
        dest = Path(os.path.realpath(dest))
    if dest.is_dir():
        raise UnwritablePath(f"cannot write {dest}: it is a folder; give a file path (e.g. {dest / 'out'})")
    return dest


def check_writable(dest: str | os.PathLike[str], fix: str = "choose another path") -> Path:
    """Raise :class:`UnwritablePath` now where :func:`atomic_write` of ``dest`` would fail on the path alone (a
    folder, a file where a folder should be, a folder that cannot be written), so a verb refuses it before its
    long work, not after; leaves nothing behind (a missing folder is made by the write). Returns the path written."""
    if str(dest).endswith(("/", os.sep)) and not Path(dest).is_dir():  # Path() drops the slash: "out/" -> file "out"
        raise UnwritablePath(f"cannot write {dest}: it names a folder (the last /); name a file in it, or drop the /")
    target = _write_target(Path(dest))
    if target.exists() and not target.is_file():  # /dev/stdout, a FIFO: written through
        return target
    folder = next(p for p in (target.parent, *target.parent.parents) if p.exists())  # "/" always exists
    if not folder.is_dir():
        raise UnwritablePath(f"cannot write {target}: {folder} is a file, not a folder; {fix}")
    try:  # the write's own first step; os.access would pass a root user in a read-only mount or /proc
        temp_file(folder, f".{target.name}.", ".tmp").unlink()
    except OSError as e:
        raise UnwritablePath(f"cannot write {target}: the folder {folder} is not writable "
                             f"({e.strerror or e}); {fix}") from None
    return target


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = ".tmp", fix: str = "choose another path",
                follow_links: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed onto ``dest``.

    For writers that want a path rather than a file object (e.g. llama.cpp's quantizer). If the body
    raises, the temporary file is removed and ``dest`` is untouched. A ``dest`` whose folder cannot be
    made or written, or that is a folder, raises :class:`UnwritablePath` before the body runs. A symbolic
    link is followed (its file is replaced, the link kept); a device or FIFO (``/dev/stdout``) is written
    through, not replaced. ``fix``: what the error tells to do instead.

    ``follow_links=False``, for a name a remote client chose in a folder others may write (slot files): ``dest``
    must be absent or a regular file and its folder must exist; a link, a FIFO or a device is refused, and a link
    put there after the check is replaced by the rename (which never follows it), not written through.
    """
    if not follow_links:
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            what = "a symbolic link" if dest.is_symlink() else "not a regular file"
            raise UnwritablePath(f"cannot write {dest}: it is {what}, which is not followed or replaced; {fix}")
        if not dest.parent.is_dir():
            raise UnwritablePath(f"cannot write {dest}: its folder {dest.parent} does not exist; {fix}")
    else:
        dest = _write_target(Path(dest))
        if dest.exists() and not dest.is_file():  # /dev/stdout, a FIFO: written through, never replaced by a file
            yield dest
            return
        make_parent(dest, fix)
    try:
        tmp = temp_file(dest.parent, f".{dest.name}.", suffix)
    except OSError as e:
        raise unwritable(dest, e, fix) from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``dest`` for writing; on success fsync it and ``os.replace`` it onto ``dest``.

    Readers never see a half-written ``dest``: they see the old file or the complete new one. If the
    body raises, the temporary file is removed and ``dest`` is untouched.

        with atomic_write(path, "w") as f:
            json.dump(obj, f)
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode ('w' or 'wb'), got {mode!r}")
    with atomic_path(dest) as tmp, open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
        yield f
        f.flush()


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_write(dest, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def sha256_file(*paths: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (of several, their bytes one after the other), read in 1 MiB chunks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _hash_cache_path() -> Path:
    return data_dir() / "sha256-cache.json"


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached per (real path, size, mtime) so a sweep does not re-read the model. For the first
    shard of a split model it is the sha256 of every shard's bytes in order (the model's identity in records)."""
    from .gguf_split import sibling_shards

    p = Path(path).resolve()
    parts = [p, *sibling_shards(p)]
    key = "|".join(f"{q}|{q.stat().st_size}|{q.stat().st_mtime_ns}" for q in parts)
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}  # missing or corrupt: rebuild
    if key in cache:
        return cache[key]
    digest = sha256_file(*parts)
    with open(cache_file.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sweeps hashing at once must not drop each other's entries
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}  # stale entries of this file
        cache[key] = digest
        write_json(cache_file, cache)
    return digest


def _sidecar(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".json")


def read_provenance(gguf_path: Path) -> dict[str, Any] | None:
    """The sidecar JSON next to a stored model, or None (none there, or one that is damaged: not UTF-8 JSON
    of an object, as a torn copy leaves it; the next write replaces it)."""
    try:
        prov = json.loads(_sidecar(gguf_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 (UnicodeDecodeError), not JSON
        return None
    return prov if isinstance(prov, dict) else None


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
