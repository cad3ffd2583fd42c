"""Run a verb in a child process, so a native crash in llama.cpp reaches the user as one clear line.

A SIGSEGV or SIGABRT inside llama.cpp cannot be caught in the process it kills. The ``ondevice`` command
therefore runs the verbs that load llama.cpp (:data:`VERBS`) as ``python -P -m ondevice.cli ...`` in a child
with the same stdin, stdout, stderr and process group (so the terminal, pipes and Ctrl-C behave as
before). The child gets SIGTERM if the parent is killed outright. The parent only waits: it forwards SIGTERM,
SIGINT, SIGHUP and SIGQUIT sent to it alone (what a terminal sends, Ctrl-C included, reaches the child directly;
a terminal's hang-up reaches only the session's leader, so where that is this parent, as under ``ssh -t host
ondevice ...``, it is forwarded), passes the child's exit status through, and when the child dies of a signal
sets the terminal's settings back (a chat killed mid-reply had turned echo off), prints what died, the likely
cause and the flag that avoids it, then exits 128 + the signal (a ``serve`` stopped by a SIGTERM, to either
process, exits 0, as llama-server: systemd counts 143 as a failure; a stop signal, SIGQUIT's Ctrl-\\ included,
is never reported as a crash).

The child leaves the kernels it loaded in an anonymous in-memory file the parent made and passed down
(``ONDEVICE_CRASH_STATE`` names its descriptor; written by :func:`note_loaded`) so the message can name AMX
or CPU_REPACK. Nothing is left on disk, even when the parent is killed outright. ``ONDEVICE_SUPERVISED=1``
in the environment runs a verb in-process (what the child sees; also a way to opt out).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

VERBS = frozenset({"run", "chat", "serve", "eval", "quantize", "agent", "adapt"})
MARK_ENV = "ONDEVICE_SUPERVISED"
STATE_ENV = "ONDEVICE_CRASH_STATE"
CRASH_TEST_ENV = "ONDEVICE_TEST_CRASH"  # test hook: the child raises this signal at itself before its verb
_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent (a terminal's Ctrl-C), as opposed to kill()
_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def wanted(verb: str | None) -> bool:
    return verb in VERBS and not os.environ.get(MARK_ENV) and sys.platform.startswith("linux")


def crash_message(verb: str, sig: int, state: dict | None) -> str:
    """The one line for a child that died of signal ``sig`` (``state``: the kernels it had loaded)."""
    name = signal.Signals(sig).name
    state = state or {}
    # the extra kernels that really held weights (the load log), else those the load was offered
    extras = [b for b in state.get("bufts") or [] if "buffers" not in state or b in state["buffers"]]
    head = f"ondevice {verb}: error: llama.cpp crashed ({name})"
    if sig == signal.SIGKILL:  # the fix in the verb's own flags (adapt has no --ctx)
        knobs = ("a smaller --rank, --max-len or --batch, --budget mem=SIZE" if verb == "adapt"
                 else "a smaller --ctx")
        return (f"ondevice {verb}: error: killed (SIGKILL), most likely by the out-of-memory killer; try a smaller "
                f"model, {knobs}, or free some memory")
    if sig == signal.SIGILL:
        return (f"{head}: this llama.cpp build uses instructions this CPU lacks (built on another machine?); rebuild "
                f"it here: pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python "
                f"'llama-cpp-python==0.3.36'")
    if sig == signal.SIGBUS:
        return f"{head} reading the model file: was it changed, truncated or on a vanished disk while in use?"
    if "AMX" in extras:
        return (f"{head} while using its AMX kernels, a known llama.cpp bug on some Xeons (llama.cpp issue "
                f"20824); run again with --amx off (or set ONDEVICE_AMX=off)")
    if extras:
        return (f"{head} with the repacked CPU kernels ({', '.join(extras)}); run again with --repack off (or set "
                f"ONDEVICE_REPACK=off), and see its log with ONDEVICE_VERBOSE=1")
    if state:  # the model was loaded with none of the extra kernels: turning them off changes nothing
        return f"{head} with no extra CPU kernels, a bug in native code; see its log with ONDEVICE_VERBOSE=1"
    return (f"{head} before loading a model, a bug in native code; see its log with ONDEVICE_VERBOSE=1"
            + ("" if verb == "quantize" else ", and try --repack off and --amx off"))


def _term_with_parent() -> None:  # in the child, between fork and exec
    """A parent killed outright (SIGKILL cannot be forwarded) still stops its child: SIGTERM on its death."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_supervised(verb: str, argv: list[str]) -> int:
    """Run ``ondevice argv`` in a child; its exit code, or 128 + signal with a clear line when it crashed."""
    fd = os.memfd_create("ondevice-crash-state")  # gone with the last process that holds it: no file left
    env = dict(os.environ, **{MARK_ENV: "1", STATE_ENV: _state_id(fd)})
    if os.environ.get("ONDEVICE_VERBOSE", "") in ("", "0"):  # the crash gets our line, not ggml's gdb dump
        env.setdefault("GGML_NO_BACKTRACE", "1")
    forwarded = None
    leader = os.getsid(0) == os.getpid()  # `ssh -t host ondevice chat`, `xterm -e`, `tmux new ondevice ...`
    tty = _Terminal()
    try:
        proc = subprocess.Popen(python("-m", "ondevice.cli", *argv), env=env, pass_fds=(fd,),
                                preexec_fn=_term_with_parent)  # noqa: PLW1509 — the parent is single-threaded here
        # wait with our signals blocked and read them synchronously: no handler runs in the parent
        mask = {*_FORWARD, signal.SIGCHLD}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        try:
            while proc.poll() is None:
                info = signal.sigtimedwait(mask, 1.0)
                # CPython returns an unset siginfo (a garbage si_signo) when the wait was interrupted past its
                # timeout, as a stop and continue does (Ctrl-Z then fg, SIGSTOP, a profiler attaching): only a
                # signal to forward counts; SIGCHLD just wakes the loop
                if info is None or info.si_signo not in _FORWARD:
                    continue
                if info.si_code == _SI_KERNEL and not (info.si_signo == signal.SIGHUP and leader):
                    continue  # from the terminal (Ctrl-C, Ctrl-\, hang-up) to our whole group: the child has it
                    # (a hang-up goes to the session's leader alone: where that is us, the child has nothing)
                forwarded = info.si_signo
                proc.send_signal(forwarded)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        rc = proc.returncode
        if rc >= 0:
            return rc
        tty.restore()  # killed, it could not undo what it set (chat's no-echo, readline's raw keys)
        sig = -rc
        if sig == signal.SIGINT:
            return 130
        if sig == signal.SIGPIPE:
            return 0  # the reader went away (`ondevice run | head`), as in-process
        if verb == "serve" and sig == signal.SIGTERM:
            return 0  # a stop asked of the server (systemctl stop, docker stop, a kill of either process), done
            # gracefully: llama-server's 0
        if sig == forwarded or sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            return 128 + sig  # it was told to stop (SIGQUIT: Ctrl-\ at the terminal), not a crash
        try:
            state = json.loads(os.pread(fd, os.fstat(fd).st_size, 0) or b"{}")
        except (OSError, ValueError):
            state = {}
        print(crash_message(verb, sig, state), file=sys.stderr)
        return 128 + sig
    finally:
        os.close(fd)


def python(*args: str) -> list[str]:
    """The command line of a Python child of ours: this interpreter, with no folder put first on its import path
    (``-P``): ``python -m`` puts the current folder there, and an ``enum.py`` or ``json.py`` in it would be run in
    place of the standard library's."""
    return [sys.executable, "-P", *args]


class _Terminal:
    """The settings of the terminal on stdin when the child started, put back after a child killed by a signal
    (a shell does so for a job killed by a signal, not for one that exits 128 + N, as this parent does)."""

    def __init__(self) -> None:
        self.saved = None
        try:
            import termios
        except ImportError:
            return
        try:
            if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():  # in the foreground: ours to set back
                self.saved = termios.tcgetattr(0)
        except (OSError, termios.error):
            pass

    def restore(self) -> None:
        if self.saved is None:
            return
        import termios

        try:
            if os.tcgetpgrp(0) == os.getpgrp():  # still in the foreground (a background tcsetattr stops us)
                termios.tcsetattr(0, termios.TCSANOW, self.saved)
        except (OSError, termios.error):  # hung up: no terminal to set
            pass


def _state_id(fd: int) -> str:
    """``fd:device:inode``: the descriptor, and which file it must be (a process that inherited the variable
    but not the descriptor may have another file open under that number)."""
    st = os.fstat(fd)
    return f"{fd}:{st.st_dev}:{st.st_ino}"


def note_loaded(kernels: dict, buffers: dict[str, float]) -> None:
    """In a supervised child: leave which kernels a load used (the crash message names them)."""
    try:
        fd, dev, ino = (int(x) for x in os.environ.get(STATE_ENV, "").split(":"))
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (dev, ino):
            data = json.dumps({**kernels, "buffers": sorted(buffers)}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
    except (OSError, ValueError):
        pass  # not supervised, or not the state file: nothing to leave
    crash_test_hook("loaded")


def crash_test_hook(when: str = "start") -> None:
    """Test hook of the message path: in a supervised child, ``ONDEVICE_TEST_CRASH=SIGSEGV`` raises the
    signal before the verb runs, ``SIGSEGV:loaded`` right after a model load."""
    sig, _, at = os.environ.get(CRASH_TEST_ENV, "").partition(":")
    if sig and os.environ.get(MARK_ENV) and (at or "start") == when:
        os.kill(os.getpid(), signal.Signals[sig])
