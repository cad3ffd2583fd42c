"""The Python API's kernel knob: ``ondevice.evaluate(..., amx=, repack=)`` and ``ondevice.bench(...)``, as the
CLI's ``--amx``/``--repack``; eval records name the kernels the model really used (they move the figures)."""

from __future__ import annotations

import os

import pytest

from ondevice.engine.bufts import offered
from ondevice.errors import InvalidArgument


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory):
    """A Q4_0 variant of the default model: a weight type CPU_REPACK takes where the build offers it."""
    from ondevice.quant import quantize

    out = tmp_path_factory.mktemp("q40") / "smol-q4_0.gguf"
    return quantize(None, "Q4_0", output=out, allow_requantize=True, threads=2).path


def _ppl(path, **knobs):
    import ondevice

    (rec,) = ondevice.evaluate(str(path), ppl=True, ctx=128, chunks=1, threads=2, store=False, **knobs)
    return rec


def test_evaluate_takes_the_kernel_knob_and_its_records_name_the_kernels(q4_0, monkeypatch):
    monkeypatch.delenv("ONDEVICE_REPACK", raising=False)
    off = _ppl(q4_0, repack="off", amx="off")
    assert off.kernels == "none" and off.ppl > 1
    assert "ONDEVICE_REPACK" not in os.environ and "ONDEVICE_AMX" not in os.environ  # as before the call
    monkeypatch.setenv("ONDEVICE_REPACK", "off")
    on = _ppl(q4_0, repack="on", amx="off")
    assert os.environ["ONDEVICE_REPACK"] == "off"  # restored, not dropped
    if "CPU_REPACK" in offered():  # x86 with AVX2, ARM: the interleaved Q4_0 kernels
        assert on.kernels == "CPU_REPACK"
        assert on.to_dict()["kernels"] == "CPU_REPACK"  # stored with the record
    else:
        assert on.kernels == "none"


def test_a_bad_kernel_word_is_refused_before_any_work():
    import ondevice

    with pytest.raises(InvalidArgument, match="not one of auto, on, off"):
        ondevice.evaluate(None, ppl=True, store=False, repack="fast")
    with pytest.raises(InvalidArgument, match="not one of auto, on, off"):
        ondevice.bench(None, "tg4", store=False, amx="yes please")
