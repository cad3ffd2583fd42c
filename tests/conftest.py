"""Shared fixtures: the real embedded SmolLM2 model, loaded once per session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _kernels_cache(tmp_path_factory):
    """One kernel self-test cache for the session: it is per machine, and tests give each CLI run its own store."""
    os.environ.setdefault("ONDEVICE_KERNELS_CACHE", str(tmp_path_factory.mktemp("kernels") / "kernels.json"))


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


@pytest.fixture()
def cli(tmp_path):
    """Run the ``ondevice`` CLI in a subprocess with an isolated store; returns CompletedProcess."""

    def run(*args: str, input: str | None = None, timeout: float = 300, env: dict | None = None):
        e = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"))
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "ondevice.cli", *args], input=input, capture_output=True,
                              text=True, timeout=timeout, env=e)

    return run
