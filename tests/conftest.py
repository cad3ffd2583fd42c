"""Shared fixtures: the real embedded SmolLM2 model, loaded once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _kernels_cache(tmp_path_factory):
    """One kernel self-test cache for the session: it is per machine, and tests give each CLI run its own store."""
    os.environ.setdefault("ONDEVICE_KERNELS_CACHE", str(tmp_path_factory.mktemp("kernels") / "kernels.json"))


@pytest.fixture()
def kcache(tmp_path, monkeypatch):
    """A kernels self-test cache of the test's own (empty), with the kernel knobs at their defaults."""
    from ondevice.device import kernels_cache

    path = tmp_path / "kernels.json"
    monkeypatch.setenv("ONDEVICE_KERNELS_CACHE", str(path))
    monkeypatch.delenv("ONDEVICE_AMX", raising=False)
    monkeypatch.delenv("ONDEVICE_REPACK", raising=False)
    monkeypatch.setattr(kernels_cache, "_warned", set())  # an unusable cache is said once per process
    return path


@contextlib.contextmanager
def ondevice_home(home):
    """``ONDEVICE_HOME`` set to ``home`` (restored after), for fixtures wider than a test (monkeypatch is not)."""
    old = os.environ.get("ONDEVICE_HOME")
    os.environ["ONDEVICE_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("ONDEVICE_HOME", None)
        else:
            os.environ["ONDEVICE_HOME"] = old


@contextlib.contextmanager
def home_with_f16(home):
    """``ONDEVICE_HOME`` set to ``home`` (restored after) holding the default model's F16 reference, dequantized
    from the shipped file as ``ondevice fit`` makes it; yields the F16's path."""
    with ondevice_home(home):
        from ondevice.quant import quantize

        yield quantize(None, "F16", "smollm2-135m-instruct-f16", allow_requantize=True).path


@pytest.fixture(scope="session")
def smol_path():
    from ondevice.models import resolve

    return resolve(None).path


@pytest.fixture(scope="session")
def smol(smol_path):
    import ondevice

    model = ondevice.load(str(smol_path), n_ctx=1024, n_threads=2)
    yield model
    model.close()


class Recording:
    """A real model, with the messages of each request it is asked to answer kept (what a test reads back)."""

    def __init__(self, model):
        self.model, self.asked = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream(self, messages, **kw):
        self.asked.append(messages)
        return self.model.stream(messages, **kw)


def as_a_shell_starts_it() -> None:
    """``preexec_fn`` for a command under test: Ctrl-C's, Ctrl-\\'s and hang-up's default actions, as a shell with
    job control starts a command, even where this test run inherited them ignored (``nohup``; a background job
    of a non-interactive shell ignores SIGINT and SIGQUIT: exec keeps "ignored", and the signal a test sends
    would never land)."""
    import signal

    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_DFL)


@pytest.fixture()
def server():
    """A local HTTP server that serves files as a model hub would (tests/test_pull.py's ``Server``)."""
    from test_pull import Server

    s = Server()
    yield s
    s.close()


@pytest.fixture()
def cli(tmp_path):
    """Run the ``ondevice`` CLI in a subprocess with an isolated store; returns CompletedProcess."""

    def run(*args: str, input: str | None = None, timeout: float = 300, env: dict | None = None):
        e = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
        e.update(env or {})
        # no input: stdin is empty, not this process's (`run "words"` reads piped stdin, as ollama run does, and
        # would wait on a runner's open pipe)
        std = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run([sys.executable, "-m", "ondevice.cli", *args], capture_output=True, **std,
                              text=True, timeout=timeout, env=e, preexec_fn=as_a_shell_starts_it, check=False)

    return run


@contextlib.contextmanager
def serve_process(tmp_path, *flags: str, group: bool = False):
    """``ondevice serve`` (under its supervisor, as a user starts it) listening: (its Popen, the base URL, the
    stderr file). ``group``: in a process group of its own, as a shell starts a job (with Ctrl-C's default
    action). Killed if still running at the end."""
    import signal
    import time

    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w+")  # noqa: SIM115 — closed below
    proc = subprocess.Popen([sys.executable, "-m", "ondevice.cli", "serve", "--port", "0", "--no-embeddings",
                             "--ctx", "4096", *flags], stderr=log, stdin=subprocess.DEVNULL, env=env,  # --ctx: ours
                            start_new_session=group, preexec_fn=as_a_shell_starts_it)  # noqa: PLW1509 — no thread yet
    try:
        deadline = time.monotonic() + 120
        while "on http://" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        line = next(x for x in log_path.read_text().splitlines() if "on http://" in x)
        yield proc, line.split(" on ")[1].split()[0], log_path
    finally:
        if proc.poll() is None:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def tmpfs(where, options: str):
    """A tmpfs mounted at ``where`` (made here) with mount ``options`` (``size=1M``, ``ro``), unmounted after: a
    small or read-only disk for real; the test is skipped where none can be mounted (not root)."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                      check=False).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
