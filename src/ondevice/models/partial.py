"""Unfinished downloads: the ``<name>.gguf.part`` an interrupted ``ondevice pull`` leaves (resumed by the same
pull), so that ``ondevice models`` shows it and ``ondevice rm`` frees it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidArgument
from .catalog import _NAME_RE
from .store import models_dir


def partial_download(name: str) -> Path | None:
    """The unfinished download ``ondevice pull`` left for ``name`` (``<name>.gguf.part``, resumed by the same pull),
    or None."""
    part = models_dir(create=False) / f"{name}.gguf.part"
    return part if _NAME_RE.match(name) and part.is_file() else None


def partial_status(name: str, part: Path, *, running: bool | None = None) -> str:
    """What a partial download is and the two ways out of it, for the listing (``running``: whether a pull is
    writing it now; None: its lock says)."""
    try:
        state = json.loads(part.with_name(part.name + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    state = state if isinstance(state, dict) else {}
    total = state.get("total")
    of = f" of {total / 1e6:.1f}" if isinstance(total, int) and total > 0 else ""
    url = state.get("given") or state.get("url")  # as the user wrote it (hf://...), else the one fetched
    again = f"`ondevice pull {url}{'' if _default_name(url) == name else ' --name ' + name}`" \
        if isinstance(url, str) else "the same `ondevice pull`"
    if pull_running(name) if running is None else running:
        return f"partial download ({part.stat().st_size / 1e6:.1f}{of} MB), downloading now by an `ondevice pull`"
    return (f"partial download ({part.stat().st_size / 1e6:.1f}{of} MB): {again} resumes it, `ondevice rm {name}` "
            f"deletes it")


def _default_name(url: str) -> str | None:
    from .sources import parse_source

    try:
        return parse_source(url)[1]
    except InvalidArgument:
        return None


def pull_running(name: str) -> bool:
    """Whether an ``ondevice pull`` holds the lock of ``name`` now (it writes ``<name>.gguf.part``)."""
    lock = models_dir(create=False) / f"{name}.gguf.lock"
    try:
        import fcntl

        with open(lock, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except (ImportError, OSError):  # no lock file: no pull; no fcntl (Windows): cannot tell
        return False
    return False


def partial_from(address: str) -> str | None:
    """The name of the unfinished download of ``address`` (as ``pulled`` matches a finished one), or None."""
    from .sources import same_source

    for meta in sorted(models_dir(create=False).glob("*.gguf.part.json")):
        try:
            state = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and same_source(address, state.get("given"), None, state.get("url")):
            return meta.name.removesuffix(".gguf.part.json")
    return None
