"""The supervisor (``ondevice`` running a verb in a child) on a real terminal: a pseudo-terminal the command leads
as its session, as under ``ssh -t host ondevice ...``, ``xterm -e`` or ``tmux new``."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import termios
import time

import pytest
from conftest import as_a_shell_starts_it

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor runs on Linux")


def _start(argv: list[str], home, stdout: str | None = None) -> tuple[int, int]:
    """``python -m ondevice.cli ARGV`` as the leader of a new session on a new pty (``stdout``: a file instead of
    the terminal): (pid, the pty's master)."""
    env = {k: v for k, v in os.environ.items() if k != "ONDEVICE_SUPERVISED"}
    env.update(ONDEVICE_HOME=str(home), TERM="xterm", LANG="C.UTF-8")
    pid, master = pty.fork()
    if pid == 0:  # the child: pty.fork made it a session leader with the pty as its controlling terminal
        try:
            as_a_shell_starts_it()
            if stdout:
                fd = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
            os.execve(sys.executable, [sys.executable, "-m", "ondevice.cli", *argv], env)
        finally:
            os._exit(127)
    return pid, master


def _read_until(master: int, pred, timeout: float) -> bytes:
    """What the terminal showed until ``pred(all so far)`` holds (or the time is up)."""
    out = bytearray()
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred(bytes(out)):
        if select.select([master], [], [], 0.2)[0]:
            try:
                out += os.read(master, 65536)
            except OSError:
                break
    return bytes(out)


def _wait(pid: int, timeout: float) -> int | None:
    """The exit code, or None when it is still running after ``timeout`` seconds (then killed, with its session)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    for p in _session(pid):
        os.kill(p, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies left out)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
                found.append(int(d))
    return found


def test_a_closed_terminal_stops_a_verb_whose_session_ondevice_leads(smol_path, tmp_path):
    """The kernel sends a hang-up to the session's leader alone; the supervisor took every kernel-sent signal to
    have reached the child too, so `run > file` (and serve, agent, quantize) went on after the terminal was gone."""
    out = tmp_path / "story.txt"
    pid, master = _start(["run", "-m", str(smol_path), "-t", "1", "-n", "100000", "--ignore-eos",
                          "Write a long story about a lighthouse keeper."], tmp_path / "home", stdout=str(out))
    end = time.monotonic() + 120
    while time.monotonic() < end and not (out.exists() and out.stat().st_size > 200):  # generating
        _read_until(master, lambda b: False, 0.2)
    assert out.stat().st_size > 200
    os.close(master)  # the terminal window closed
    code = _wait(pid, 60)
    assert code == 128 + signal.SIGHUP, code
    time.sleep(1)
    assert _session(pid) == []  # the child is gone too


@pytest.mark.parametrize("how", ["ctrl-backslash", "sigterm to the child"])
def test_a_chat_killed_mid_reply_leaves_the_terminal_as_it_found_it(smol_path, tmp_path, how):
    """chat turns echo off while a reply streams (and readline takes the keys raw at its prompt); killed, it could
    not undo that, and the supervisor exited 128 + N, so the shell did not restore the terminal either: commands
    typed after it were not echoed."""
    pid, master = _start(["chat", "-m", str(smol_path), "-t", "1", "-n", "1000"], tmp_path / "home")
    try:
        assert b">>> " in _read_until(master, lambda b: b">>> " in b, 120)
        os.write(master, b"Write a 500-word story about a lighthouse keeper.\r")
        shown = _read_until(master, lambda b: len(b.split(b"keeper.", 1)[-1]) > 150, 60)  # the reply streams
        assert len(shown.split(b"keeper.", 1)[-1]) > 150, shown
        assert not termios.tcgetattr(master)[3] & termios.ECHO  # what the reply runs under
        if how == "ctrl-backslash":
            os.write(master, b"\x1c")
        else:
            (child,) = [p for p in _session(pid) if p != pid]
            os.kill(child, signal.SIGTERM)
        code = _wait(pid, 60)
        assert code == 128 + (signal.SIGQUIT if how == "ctrl-backslash" else signal.SIGTERM), code
        after = termios.tcgetattr(master)[3]  # as the pty started (a shell's line mode): echo, whole lines
        assert after & termios.ECHO and after & termios.ICANON, after
    finally:
        os.close(master)
        if _session(pid):
            _wait(pid, 5)


def test_a_module_in_the_current_folder_does_not_shadow_the_childs_standard_library(smol_path, tmp_path):
    """The child ran as `python -m ondevice.cli`, which puts the current folder first on the import path: in a
    folder holding an `enum.py` (or `json.py`, `grp.py`) every supervised verb ran that file instead."""
    import subprocess
    from pathlib import Path

    script = Path(sys.executable).with_name("ondevice")  # the console script, as a user runs it
    if not script.exists():
        pytest.skip("no ondevice console script beside this Python")
    (tmp_path / "enum.py").write_text('raise SystemExit("shadowed: the enum.py of the current folder ran")\n')
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    env.pop("ONDEVICE_SUPERVISED", None)
    r = subprocess.run([str(script), "run", "-m", str(smol_path), "-t", "1", "-n", "2", "--temp", "0", "Hi"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                       preexec_fn=as_a_shell_starts_it)
    assert r.returncode == 0 and "shadowed" not in r.stderr and r.stdout.strip(), r.stderr
