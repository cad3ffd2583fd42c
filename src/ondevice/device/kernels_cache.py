"""The kernels self-test's cache (device/kernels.py chooses from it): ``<data dir>/device/kernels.json``, or the file
``ONDEVICE_KERNELS_CACHE`` names; one entry per machine and llama.cpp build, one result set per set of weight types.

What it never does: give a traceback for a file another version or a hand edit left in a shape it does not know (a
malformed entry is untested: tested again and rewritten), or pay the self-test on every load in silence when the
file cannot be read or written (one warning per process names the path and the fix). An inconclusive test (the
child timed out or was killed from outside: a busy machine, not a broken kernel) is tried again on a later load,
at most :data:`MAX_TRIES` times in all and :data:`RETRY_AFTER_S` apart, so a machine where it never finishes does
not pay it on every load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..errors import OndeviceError

_ENV = "ONDEVICE_KERNELS_CACHE"
MAX_TRIES = 3  # an inconclusive quick test is run at most this many times in all (then only --probe redoes it)
RETRY_AFTER_S = 600.0  # ...and not again within this many seconds of the last try (a busy spell passes)
_warned: set[str] = set()  # the cache paths already warned about in this process


class KernelsNotice(UserWarning):
    """A kernels cache that cannot be kept (so each process self-tests again). The CLI shows it as one line on
    stderr; a library user can filter it (``warnings.simplefilter("ignore", KernelsNotice)``)."""


def cache_path() -> Path:
    if os.environ.get(_ENV):
        given = os.environ[_ENV]
        try:
            p = Path(given).expanduser().resolve()  # a link: the file it names is the cache
        except (RuntimeError, OSError) as e:
            raise OndeviceError(f"{_ENV}={given}: {e}; give a file path for the kernels cache") from None
        if p.exists() and not p.is_file():
            raise OndeviceError(f"{_ENV}={given} is not a regular file; give a file path for the kernels cache "
                                f"(it is created if missing), e.g. ~/.cache/ondevice-kernels.json")
        return p
    from ..models.store import home

    return home() / "data" / "device" / "kernels.json"  # made when first written (_store), not when read


def build_id() -> str:
    """This llama.cpp build: llama-cpp-python's version, its system info line and its library files."""
    from .info import llama_cpp_info

    info = llama_cpp_info()
    parts = [str(info.get("version")), str(info.get("system_info"))]
    try:
        import llama_cpp

        for f in sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    except (ImportError, OSError):
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _key() -> str:
    from .info import machine_key

    return f"{machine_key()}|{build_id()}"


def _warn_unusable(path: Path, e: OSError, doing: str) -> None:
    """Once per process and path: the cache cannot be kept, so each load self-tests again."""
    if str(path) in _warned:
        return
    _warned.add(str(path))
    fix = (f"remove it (`rm -r {path}`)" if path.is_dir() else "make it and its folder writable")
    warnings.warn(f"the kernels self-test cache {path} cannot be {doing} ({e.strerror or e}), so each new process "
                  f"self-tests the CPU kernels again for each model it loads; {fix}, or point {_ENV} at a "
                  f"writable file", KernelsNotice, stacklevel=2)


def _read(path: Path) -> dict:
    """The cache; empty when missing. A file of ours that is corrupt is empty too (rewritten), but a file
    named by ``ONDEVICE_KERNELS_CACHE`` that is not a kernels cache is the user's and is never replaced."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        data = None
    except OSError as e:  # a folder, no permission: said once, then as if empty (each load tests again)
        _warn_unusable(path, e, "read")
        return {}
    ours = isinstance(data, dict) and all(isinstance(v, dict) and "|" in k for k, v in data.items())
    if not ours and os.environ.get(_ENV):
        raise OndeviceError(f"{_ENV}={os.environ[_ENV]} names a file that is not a kernels cache; it was left "
                            f"as it is: point {_ENV} at a new file or at one ondevice wrote")
    return data if ours else {}


def cached() -> dict:
    """This machine and build's entry: ``{"offered", "build", "types": {types: {"tested_at", "results", ...}}}``,
    keyed by :func:`types_of` (entries of older versions, under "families", were keyed by a file's main type only
    and are not read: a file's other types may never have been tested). Entries may be malformed: see
    :func:`valid`."""
    mine = _read(cache_path()).get(_key(), {})
    return mine if isinstance(mine.get("types", {}), dict) else {**mine, "types": {}}


def valid(entry) -> bool:
    """Whether a cached entry has the shape this version reads: ``results`` a dict of dicts whose ``ok`` is
    True, False or None (inconclusive), ``tested_at`` a string. Anything else is untested here."""
    return (isinstance(entry, dict) and isinstance(entry.get("results"), dict)
            and isinstance(entry.get("tested_at", ""), str)
            and all(isinstance(k, str) and isinstance(r, dict) and r.get("ok") in (True, False, None)
                    for k, r in entry["results"].items()))


def stored(types: str | None) -> dict | None:
    """The cached, well-formed self-test of files holding exactly these weight types here, or None."""
    e = cached().get("types", {}).get(types) if types else None
    return e if valid(e) else None


def pending(entry: dict, amx: bool = False) -> list[str]:
    """The inconclusive results of an entry (ok None), AMX configurations only with ``amx``."""
    return [k for k, r in entry["results"].items() if r.get("ok") is None and (amx or "AMX" not in k)]


def retest_due(entry: dict, keys: list[str], now: datetime | None = None) -> bool:
    """Whether ``keys`` (inconclusive results of ``entry``) are to be tested again now: fewer than
    :data:`MAX_TRIES` tries so far and the last at least :data:`RETRY_AFTER_S` ago."""
    if not keys or int(entry.get("tries") or 1) >= MAX_TRIES:
        return False
    try:
        age = ((now or datetime.now(UTC)) - datetime.fromisoformat(entry["tested_at"])).total_seconds()
    except (KeyError, ValueError, TypeError):
        return True
    return age >= RETRY_AFTER_S


def tested(types: str | None) -> dict | None:
    """The cached self-test of files holding exactly these weight types here, or None: when there is none, when
    it is malformed, and when its inconclusive results are due to be tested again (:func:`retest_due`)."""
    e = stored(types)
    return None if e is None or retest_due(e, pending(e)) else e


@contextlib.contextmanager
def testing_lock() -> Iterator[None]:
    """Held while a new set of weight types is self-tested: two processes that load files of that set at once (a
    fit's parallel workers) test it once, the second reading the first's result. Without a writable cache folder
    there is nothing to share: no lock."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".testing.lock"), "a+")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _store(types: str, entry: dict, offered: tuple[str, ...]) -> None:
    from ..models.store import write_json
    from .info import llama_cpp_info

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(path)
            mine = data.setdefault(_key(), {})
            mine.update(offered=list(offered), build=(llama_cpp_info().get("system_info") or "")[:300])
            mine.pop("families", None)  # an older version's main-type entries (see cached)
            if not isinstance(mine.get("types"), dict):
                mine["types"] = {}  # a malformed one: rewritten
            mine["types"][types] = entry
            write_json(path, data)
    except OSError as e:  # a read-only home, a full disk: the result holds for this run; the next one tests again
        _warn_unusable(path, e, "written")


def _entry(model_path: str | Path, results: dict, **extra) -> dict:
    """A cache entry: when, on what, under what load (a busy machine measures low and may time out)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"tested_at": datetime.now(UTC).isoformat(timespec="seconds"), "model": str(model_path),
            "load_avg_1m": load, "results": results, **extra}
