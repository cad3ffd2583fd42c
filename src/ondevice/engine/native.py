"""llama.cpp's log and the Python it calls back into: the log shown only when asked (errors always), its lines
captured during a load (which buffer types took the weights), and a Ctrl-C that lands inside a callback (ctypes
cannot raise it through C) kept and raised once the native call returns."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_log_capture: list[str] | None = None  # llama.cpp's log lines during a model load (which buffer types it used)


pending_interrupt = False  # a Ctrl-C that landed in a ctypes callback, where it cannot raise through C


def keep_interrupts(previous):
    """An unraisable-exception hook that keeps a KeyboardInterrupt ctypes had to swallow (Python delivers
    Ctrl-C in whatever Python code runs next: during a load, llama.cpp's log callback) for
    :func:`raise_pending_interrupt`; other exceptions go to ``previous``."""
    def hook(unraisable):
        global pending_interrupt
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            pending_interrupt = True
        else:
            previous(unraisable)
    return hook


def raise_pending_interrupt() -> None:
    """Raise, now that the native call returned, a Ctrl-C that landed in one of its callbacks."""
    global pending_interrupt
    if pending_interrupt:
        pending_interrupt = False
        raise KeyboardInterrupt


_log_quiet = False  # errors too are only captured (the caller turns them into its own message)


@contextmanager
def load_log(quiet: bool = False) -> Iterator[list[str]]:
    """llama.cpp's log text while inside: a model load's ``model buffer size`` lines say which buffer types
    got weights (engine/bufts.py parses them). Use under ``bufts.offering``'s lock (loads are serialised).
    ``quiet``: errors are not printed either (a grammar's parse error becomes part of our message)."""
    global _log_capture, _log_quiet
    lines: list[str] = []
    before = _log_capture, _log_quiet
    _log_capture, _log_quiet = lines, quiet
    try:
        yield lines
    finally:
        _log_capture, _log_quiet = before


# what llama.cpp logs as errors for a decode its abort callback stopped (GGML_STATUS_ABORTED is 1, llama_decode's
# 2 is "aborted"): the server stops a prefill whose client left that way, which is no error
_ABORTED = (b"failed with error 1\n", b"compute status: 1\n", b"failed to decode, ret = 2\n")


def make_log_callback():
    """llama.cpp's log, shown only with ONDEVICE_VERBOSE=1 (errors always).

    Our own callback because llama-cpp-python's maps an older ggml level enum (its filter lets
    warnings through). ggml today: 1 debug, 2 info, 3 warn, 4 error, 5 continuation.
    """
    import llama_cpp

    state = {"last": 0}

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        level = state["last"] if level == 5 else level
        state["last"] = level
        if _log_capture is not None:
            _log_capture.append(text.decode("utf-8", errors="replace"))
        aborted = level == 4 and any(m in text for m in _ABORTED)  # our own stop (engine/abort.py), not an error
        if (level >= 4 and not _log_quiet and not aborted) or os.environ.get("ONDEVICE_VERBOSE", "") not in ("", "0"):
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

    return callback


@contextmanager
def stderr_text() -> Iterator[list[str]]:
    """What native code writes to fd 2 (C's ``stderr``, which the log callback never sees: llama.cpp's GBNF
    parser ``fprintf``s its errors) while inside, collected into the list instead of shown. Keep the inside
    short: another thread writing meanwhile is collected too (the caller passes on what is not its own)."""
    import tempfile

    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode("utf-8", errors="replace").splitlines())
