"""SIGTERM, SIGHUP and SIGQUIT as an exception while a model file is written, so its temp file is removed.

Python's default for all three is to die at once, without running a single ``finally``: a ``kill PID`` (what a
process manager or a closed terminal sends) or Ctrl-\\ mid-``quantize`` or mid-``protect encrypt`` left the hidden
``.NAME.xxxx.tmp`` behind, up to the model's full size. Ctrl-C needs nothing: Python already raises
``KeyboardInterrupt`` for it. Used by ``quant.api.quantize`` and ``protect.container.encrypt_file``;
:func:`interrupt_on_signals` by ``adapt``, ``fit``, ``bench`` sweeps and ``pull`` (a kill keeps a checkpoint or a
partial download as Ctrl-C does), :class:`StopOnce` by ``agent`` (the first of Ctrl-C, SIGTERM, SIGHUP, SIGQUIT
stops it, the next ones wait while it ends its MCP servers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Self

from .errors import OndeviceError

_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # SIGQUIT: what Ctrl-\ at a terminal sends


class Stopped(OndeviceError):
    """The process was told to stop (``signal``) before the file was complete; nothing was kept."""

    def __init__(self, sig: int, what: str, written: str | None = None) -> None:
        self.signal = sig
        if written:  # the signal landed just after the rename that put the finished file in place (commit)
            super().__init__(f"stopped by {signal.Signals(sig).name} after {what} was complete: {written} is in "
                             f"place, whole")
            return
        super().__init__(f"stopped by {signal.Signals(sig).name} before {what} was complete; nothing was written "
                         f"(a file it would have replaced is unchanged); run the command again to make it")

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process this signal ended (128 + its number)."""
        return 128 + self.signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGQUIT taken as an interrupt (:func:`interrupt_on_signals`): code that keeps what is
    complete on Ctrl-C keeps it for a ``kill`` too."""

    def __init__(self, sig: int) -> None:
        super().__init__()
        self.signal = sig

    @property
    def exit_code(self) -> int:
        return 128 + self.signal


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While active, SIGTERM, SIGHUP and SIGQUIT raise :class:`Terminated` (a KeyboardInterrupt) in the main thread,
    where they still have their default action (an application's own handler is left alone). Only the first one
    raises: the ones after it are ignored while the block unwinds (``timeout`` and ``kill -- -PGID`` signal the
    whole group and the supervisor forwards what it gets, so one ``kill`` often arrives twice, and the second cut
    the checkpoint the first one was writing)."""
    raised: list[int] = []

    def raise_terminated(sig: int, frame) -> None:
        if raised:
            return  # stopping already
        if _in_finalizer(frame):  # raised there it would be printed and dropped, and the work would go on
            _send_again_soon(sig)
            return
        raised.append(sig)
        if _held:  # inside commit(): raised as it ends, the file in place and noted
            _held[-1].append(sig)
            return
        raise Terminated(sig)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            if signal.getsignal(s) is signal.SIG_DFL:
                old[s] = signal.signal(s, raise_terminated)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_committed: list[list[str]] = []  # per said_as_stopped block (innermost last): the files commit() put in place


@contextlib.contextmanager
def said_as_stopped(what: str) -> Iterator[None]:
    """A kill taken as an interrupt in the block (:class:`Terminated`, under :func:`interrupt_on_signals`) while
    ``what`` is written is said as :class:`Stopped` says it (quantize's and protect's line; exit 128 + signal): as
    a stop before it was complete, or after, where the block's :func:`commit` had put it in place."""
    _committed.append([])
    try:
        yield
    except Terminated as e:
        raise Stopped(e.signal, what, (_committed[-1] or [None])[-1]) from None
    finally:
        _committed.pop()


_held: list[list[int]] = []  # per commit() block in progress: the signals interrupt_on_signals put off until its end


@contextlib.contextmanager
def commit(path: str | os.PathLike[str]) -> Iterator[None]:
    """The rename (and its record) that puts the finished ``path`` in place: a kill waits until it is done and
    noted (:func:`interrupt_on_signals` puts it off: a process-directed signal may reach another thread, where
    blocking it in this one would not), so one landing just after it is said as a stop after the file was written,
    not before."""
    _held.append([])
    try:
        with signals_held():
            yield
        if _committed:
            _committed[-1].append(str(path))
    finally:
        put_off = _held.pop()
    if put_off:
        raise Terminated(put_off[0])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A block that Ctrl-C, SIGTERM, SIGHUP and SIGQUIT do not cut in two: they wait (blocked in the kernel) and
    land as the block ends. For a few steps that must happen together or not at all (an optimizer step and its
    count)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _send_again_soon(sig: int) -> None:
    """The signal again in 10 ms, from a helper thread: by then the finalizer it landed in has (most likely)
    returned; if not, it is put off again. Once the handler is gone, its default action ends the process."""
    t = threading.Timer(0.01, os.kill, (os.getpid(), sig))
    t.daemon = True
    t.start()


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__``: Python prints an exception raised there ("Exception ignored
    in ...") and drops it, so the work would go on as if no signal had come."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


class StopOnSignals:
    """While active, SIGTERM, SIGHUP and SIGQUIT raise :class:`Stopped` in the main thread (where Python runs
    handlers).

    Only signals that still have their default action are taken over: an application's own handler is left
    alone. Inside :meth:`finishing` (the rename into place and the records that go with it) a signal only
    waits; it is sent again, to its default action, as the ``with`` ends: the work is then done and the
    process ends as asked. So does a signal that lands in a finalizer (a ``subprocess.Popen`` collected mid-way
    took one there: a traceback, the work finished, exit 0).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._old: dict[int, object] = {}
        self._finishing = False
        self._pending: int | None = None

    def _handle(self, sig: int, frame) -> None:
        if self._finishing or _in_finalizer(frame):
            self._pending = self._pending or sig
            return
        raise Stopped(sig, self.what)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                if signal.getsignal(s) is signal.SIG_DFL:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if self._pending is not None and exc[0] is None:
            os.kill(os.getpid(), self._pending)  # the default action again: the process ends as it was told

    def finish(self) -> None:
        """From here to the ``with``'s end a signal does not interrupt (as :meth:`finishing`): for a commit that an
        inner ``with`` makes as it exits (``atomic_write``'s rename), which a signal landing just after it would
        otherwise say was never made."""
        self._finishing = True

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """A block a signal does not interrupt: what it commits is left whole, not half-done."""
        self._finishing = True
        try:
            yield
        finally:
            self._finishing = False


class StopOnce:
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT while an agent runs: the first stops it (raised in the main thread, Ctrl-C's
    KeyboardInterrupt, or :class:`Terminated` with exit code 128 + signal); the ones after it are ignored while
    the run ends its MCP servers. ``timeout`` signals its whole group and the supervisor
    forwards what it gets, so one ``kill`` often arrives twice, and the second cut that clean-up short. Only
    handlers still at their defaults are taken over (an application's own are left alone)."""

    signal: int | None = None

    def __init__(self) -> None:
        self._old: dict[int, object] = {}

    def said(self) -> str:
        return "interrupted (Ctrl-C)" if self.signal == signal.SIGINT else \
            f"stopped by {signal.Signals(self.signal).name}"

    def _handle(self, sig: int, frame) -> None:
        if self.signal is not None:
            return  # stopping already
        if _in_finalizer(frame):  # raised there it would be printed and dropped
            _send_again_soon(sig)
            return
        self.signal = sig
        raise KeyboardInterrupt if sig == signal.SIGINT else Terminated(sig)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGINT: signal.default_int_handler, **{s: signal.SIG_DFL for s in _SIGNALS}}
            for s, default in defaults.items():
                if signal.getsignal(s) is default:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if self.signal is not None and isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Terminated) \
                and self.signal != signal.SIGINT:  # a SIGTERM seen by native code comes back as a plain Ctrl-C
            raise Terminated(self.signal) from None
