"""A slot file whose KV is damaged in a way its format checks cannot see (NaN in the tensor data) is refused at
restore, naming the file, and the slot is emptied (serve/slots.py ``restore_checked``); NaN logits name what may
hold the NaN (errors.NonFiniteLogits). Found by an audit (helper-118): such a file restored with a 200, then the
next request sharing its prompt failed with "download or convert the model again". Real SmolLM2, the generator
without HTTP (tests/test_slots.py runs the routes)."""

from __future__ import annotations

import pytest
from test_slots import DOC, _engine, _greedy

from ondevice.engine import slotfile
from ondevice.engine.generator import BatchGenerator
from ondevice.errors import NonFiniteLogits
from ondevice.serve.slots import restore_checked


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a good slot file of DOC, a copy whose last 4 KiB of KV data are NaN, DOC's tokens)."""
    eng = _engine()
    try:
        gen = BatchGenerator(eng)
        toks = eng.tokenize(DOC)
        _greedy(gen, toks, 2)
        folder = tmp_path_factory.mktemp("nan-slots")
        good = folder / "good.bin"
        slotfile.save(gen, next(s.seq for s in gen.slots if s.cached), good)
    finally:
        eng.close()
    blob = bytearray(good.read_bytes())
    blob[-4160:-64] = b"\xff" * 4096  # f32 0xffffffff: NaN, in the last layer's V (the end: empty streams)
    bad = folder / "nan.bin"
    bad.write_bytes(bytes(blob))
    return good, bad, toks


def test_a_restored_file_whose_kv_gives_nan_is_refused_and_the_slot_emptied(files):
    good, bad, toks = files
    eng = _engine()
    try:
        gen = BatchGenerator(eng)
        with pytest.raises(slotfile.SlotFileError, match="nan.bin: its saved KV makes the model compute NaN or "
                                                         "infinite logits, so the file is damaged.*slot 1 was emptied"):
            restore_checked(gen, 1, bad, (), "nan.bin")
        assert gen.slots[1].cached == [] and eng.n_past(1) == 0
        assert len(_greedy(gen, toks, 3)) == 3  # the next request is clean
        n, _ = restore_checked(gen, 0, good, (), "good.bin")  # a sound file: restored as ever
        assert n == len(gen.slots[0].cached) and gen.slots[0].cached[:len(toks)] == toks and eng.n_past(0) == n
    finally:
        eng.close()


def test_nan_logits_name_the_likely_causes_given_what_is_in_use():
    plain = str(NonFiniteLogits())
    assert "NaN or infinite logits" in plain and "download or convert the model again" in plain
    assert "LoRA adapter" in plain and "restored slot" in plain  # may be the cause where one is in use
    named = str(NonFiniteLogits(adapters=("style",), restored="doc.bin"))
    assert named.index("doc.bin") < named.index("adapter style") < named.index("the model's weights")
