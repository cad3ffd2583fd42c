"""How a command ends when its terminal goes away, when ``adapt merge`` is told to stop, and Ctrl-C at chat's prompt.

The commands run as the supervised child runs them (``ONDEVICE_SUPERVISED=1``) on a real pseudo-terminal. Its
session's leader is a small program that ignores the hang-up and passes nothing on: closing the pty's master is
then a hang-up that only the terminal's EIO tells the command about (as for a child of a supervisor that did not
forward it).
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ptys and signals as Linux has them")

# the session's leader: ignores the hang-up (and Ctrl-C, Ctrl-\\: they are the command's), runs the command (stderr
# to a file, or the terminal with "-") and records its exit status in a file
LEADER = """
import signal, subprocess, sys
SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
for s in SIGNALS:
    signal.signal(s, signal.SIG_IGN)
err = None if sys.argv[2] == "-" else open(sys.argv[2], "w")
p = subprocess.Popen(sys.argv[3:], stderr=err, preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in SIGNALS])
open(sys.argv[1], "w").write(str(p.wait()))
"""

STORY = b"Write a 500-word story about a lighthouse keeper.\r"


class Terminal:
    """``ondevice ARGS`` on a new pty, read and typed to through its master."""

    def __init__(self, tmp_path: Path, *args: str, stderr: Path | None = None) -> None:
        import pty

        self.rc_file = tmp_path / "rc"
        env = dict(os.environ, ONDEVICE_SUPERVISED="1", ONDEVICE_HOME=str(tmp_path / "home"), TERM="xterm",
                   LANG="C.UTF-8")
        argv = [sys.executable, "-c", LEADER, str(self.rc_file), str(stderr or "-"),
                sys.executable, "-P", "-m", "ondevice.cli", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.out = bytearray()
        self.mark = 0

    def expect(self, pattern: bytes, timeout: float = 120) -> bytes:
        """Waits for ``pattern`` in what was written after the last match; returns what came before it."""
        rx, deadline = re.compile(pattern, re.S), time.monotonic() + timeout
        while (m := rx.search(bytes(self.out), self.mark)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {bytes(self.out[self.mark:])[-400:]!r}"
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                assert data, f"the terminal ended before {pattern!r}: {bytes(self.out[self.mark:])[-400:]!r}"
                self.out += data
        before, self.mark = bytes(self.out[self.mark:m.start()]), m.end()
        return before

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def ctrl_c(self, then: bytes) -> bytes:
        """Ctrl-C, until ``then`` comes: one that lands as readline starts to wait for keys is lost (CPython's
        readline looks for signals only when its wait is interrupted), so it is sent again after 10 s."""
        for _ in range(5):
            self.send(b"\x03")
            try:
                return self.expect(then, timeout=10)
            except AssertionError:
                continue
        pytest.fail(f"no {then!r} after Ctrl-C: {bytes(self.out[self.mark:])[-400:]!r}")

    def hang_up(self) -> None:
        os.close(self.fd)
        self.fd = None

    def exit_code(self, timeout: float = 60) -> int:
        """The command's exit status (its leader's record of it)."""
        deadline = time.monotonic() + timeout
        while not os.waitpid(self.pid, os.WNOHANG)[0]:
            if self.fd is not None:  # keep reading: a full pty would stop the command
                r, _, _ = select.select([self.fd], [], [], 0.05)
                if r:
                    try:
                        self.out += os.read(self.fd, 65536)
                    except OSError:
                        pass
            else:
                time.sleep(0.05)
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                pytest.fail(f"still running {timeout} s on: {bytes(self.out)[-400:]!r}")
        return int(self.rc_file.read_text())


@pytest.fixture()
def smol_file(smol_path) -> str:
    return str(smol_path)


def test_run_whose_terminal_goes_away_mid_answer_ends_as_a_hang_up(tmp_path, smol_file):
    """The write to a closed terminal failed with EIO, said as a file's error: "Input/output error; check the path,
    its permissions and the free space", exit 2."""
    err = tmp_path / "err"
    t = Terminal(tmp_path, "run", "-m", smol_file, "-t", "1", "-n", "1000", "--ignore-eos", "Tell me a long story.",
                 stderr=err)
    t.expect(rb"\S.{100}")  # the answer streams
    t.hang_up()
    assert t.exit_code() == 129, err.read_text()
    said = err.read_text()
    assert "ondevice run: stopped: its terminal went away (hang-up)" in said, said
    assert "check the path" not in said and "Traceback" not in said, said


def test_chat_whose_terminal_goes_away_mid_reply_ends_as_a_hang_up(tmp_path, smol_file):
    """A traceback: OSError EIO in sys.stdout.write, then termios.error from quiet_keys' tcflush; exit 1."""
    err = tmp_path / "err"
    t = Terminal(tmp_path, "chat", "-m", smol_file, "-t", "1", "-n", "1000", stderr=err)
    t.expect(rb">>> ")
    t.send(STORY)
    t.expect(rb"keeper\.\r\n.{100}")  # the reply streams
    t.hang_up()
    assert t.exit_code() == 129, err.read_text()
    said = err.read_text()
    assert "Traceback" not in said and "termios.error" not in said and "check the path" not in said, said
    assert said.rstrip().endswith("ondevice chat: stopped: its terminal went away (hang-up)"), said


@pytest.mark.parametrize("stderr", ["terminal", "file"])
def test_chat_whose_terminal_goes_away_at_the_prompt_ends_as_a_hang_up(tmp_path, smol_file, stderr):
    """With stderr on the terminal too: its newline after the end of input failed, then the error line did: exit
    1. With stderr in a file, the end of input was taken for Ctrl-D: exit 0."""
    err = tmp_path / "err" if stderr == "file" else None
    t = Terminal(tmp_path, "chat", "-m", smol_file, "-t", "1", stderr=err)
    t.expect(rb">>> ")
    t.hang_up()
    assert t.exit_code() == 129
    if err is not None:
        said = err.read_text()
        assert "Traceback" not in said and said.rstrip().endswith("its terminal went away (hang-up)"), said


def test_ctrl_c_at_an_empty_prompt_says_how_to_quit(tmp_path, smol_file):
    """Ctrl-C at an empty >>> only gave the prompt again, with no word on how to leave (ollama: "Use Ctrl + d or
    /bye to exit."). A line typed is dropped without it; Ctrl-C mid-reply still stops the reply."""
    t = Terminal(tmp_path, "chat", "-m", smol_file, "-t", "1", "-n", "1000")
    t.expect(rb">>> ")
    assert t.ctrl_c(rb"\r\nUse Ctrl \+ d or /bye to exit\.\r\n>>> ") == b""
    t.send(b"half a line")
    t.expect(rb"half a line")  # read by readline before Ctrl-C (which flushes what it has not read)
    assert t.ctrl_c(rb">>> ") == b"\r\n"  # dropped, no hint
    t.send(STORY)
    t.expect(rb"keeper\.\r\n.{50}")
    t.send(b"\x03")
    t.expect(rb" \[stopped\]\r\n>>> ")
    t.send(b"/bye\r")
    assert t.exit_code() == 0


def test_an_input_output_error_of_a_file_keeps_its_advice_but_a_gone_terminal_is_a_hang_up(monkeypatch, capsys):
    """EIO from a file (a failing disk) is still said with its path and advice, exit 2; the same error while stdout
    is a terminal that hung up ends as a hang-up (129), with no advice."""
    from ondevice import cli
    from ondevice.engine import cli_run

    def broken_disk(args):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/mnt/broken/out.txt")

    monkeypatch.setattr(cli_run, "run", broken_disk)
    assert cli.main(["run", "hi"]) == 2
    assert "ondevice run: error: Input/output error: /mnt/broken/out.txt; check the path" in capsys.readouterr().err

    master, slave = os.openpty()
    os.close(master)  # the terminal hangs up: its writes and termios calls fail with EIO
    saved = os.dup(1)
    try:
        os.dup2(slave, 1)
        assert cli.main(["run", "hi"]) == 129
        assert os.readlink("/proc/self/fd/1") == os.devnull  # what stdout still holds goes nowhere, not an error
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(slave)
    said = capsys.readouterr().err
    assert "check the path" not in said and "its terminal went away" in said, said


@pytest.fixture()
def adapter(tmp_path, smol_path) -> Path:
    from test_adapt_average import _pairs

    from ondevice.adapt import adapter_file
    from ondevice.models.store import cached_sha256

    prov = {"base_sha256": cached_sha256(smol_path), "base_name": "smollm2-135m-instruct"}
    return adapter_file.write(tmp_path / "a.gguf", "llama", 8.0, _pairs(0, 4), prov)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP], ids=lambda s: s.name)
def test_adapt_merge_stopped_by_a_signal_says_so(tmp_path, adapter, sig):
    """quantize and protect encrypt said "stopped by SIGTERM before FILE was complete; nothing was written ...";
    adapt merge, stopped the same way, said nothing at all."""
    from conftest import as_a_shell_starts_it

    out = tmp_path / "out" / "merged.gguf"
    out.parent.mkdir()
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), ONDEVICE_SUPERVISED="1")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "ondevice.cli", "adapt", "merge", str(adapter), "-o",
                             str(out), "--type", "f32"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509 — no threads yet
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".part") for p in out.parent.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "merge ended before its file was written"
            time.sleep(0.01)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert (f"ondevice adapt: error: stopped by {signal.Signals(sig).name} before {out} was complete; nothing was "
            f"written (a file it would have replaced is unchanged)") in err, err
    assert not list(out.parent.iterdir()) and "Traceback" not in err


def test_an_error_line_for_a_terminal_that_hung_up_ends_the_command_as_a_hang_up(tmp_path):
    """An error's own line (here: no such model) written to a stderr whose terminal hung up raised EIO out of the
    error handler: a traceback to that same gone terminal, and exit 1."""
    master, slave = os.openpty()
    os.close(master)  # hung up: the kernel answers writes on the slave with EIO
    env = dict(os.environ, ONDEVICE_SUPERVISED="1", ONDEVICE_HOME=str(tmp_path / "home"))
    try:
        r = subprocess.run([sys.executable, "-P", "-m", "ondevice.cli", "run", "-m", str(tmp_path / "none.gguf"),
                            "hi"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env,
                           timeout=120)
    finally:
        os.close(slave)
    assert r.returncode == 128 + signal.SIGHUP, r
