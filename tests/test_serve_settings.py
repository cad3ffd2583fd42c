"""``ondevice serve``'s flags as the command line gives them (no model loaded)."""

from __future__ import annotations

import pytest

from ondevice.cli import build_parser
from ondevice.errors import InvalidArgument
from ondevice.serve.settings import settings_from_args


def _settings(*flags: str):
    return settings_from_args(build_parser("serve").parse_args(["serve", *flags]))


def test_threads_batch_minus_one_is_the_default_as_llama_servers():
    """``-tb -1`` is llama.cpp's spelling of the default (as many threads as --threads), as ``-t -1`` is; other
    numbers below 1 are refused with the flag named and the way to ask for the default."""
    assert _settings("-tb", "-1").threads_batch is None
    assert _settings("--threads-batch", "-1", "-t", "2").threads_batch is None
    assert _settings("-tb", "3").threads_batch == 3
    for bad in ("-2", "0"):
        with pytest.raises(InvalidArgument, match=r"(-tb|--threads-batch) / ONDEVICE_THREADS_BATCH: must be >= 1, "
                                                  r"or -1 for the default \(as many as --threads\)"):
            _settings("-tb", bad)


def test_threads_batch_minus_one_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONDEVICE_THREADS_BATCH", "-1")
    assert _settings().threads_batch is None
    monkeypatch.setenv("ONDEVICE_THREADS_BATCH", "-4")
    with pytest.raises(InvalidArgument, match="ONDEVICE_THREADS_BATCH: must be >= 1, or -1"):
        _settings()
