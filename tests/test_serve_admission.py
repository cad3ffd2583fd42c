"""What the server's admission (serve/batcher.py) asks the generator before it starts a queued request: how
many of its prompt tokens would be computed, given what the slots already hold (the real engine)."""

from __future__ import annotations

import pytest

from ondevice.engine.base import EngineConfig
from ondevice.engine.generator import BatchGenerator, Request
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Generation, Sampling


@pytest.fixture(scope="module")
def eng(smol_path):
    e = LlamaEngine(smol_path, EngineConfig(n_ctx=2 * 256, n_seq_max=2, n_threads=2))
    yield e
    e.close()


def _req(eng, prompt: str) -> Request:
    return Request(tokens=eng.tokenize(prompt), sampling=Sampling(temp=0, max_tokens=2))


def _finish(gen: BatchGenerator, req: Request) -> None:
    gen.insert(req)
    while not any(isinstance(ev, Generation) and ev.finish_reason for r, ev in gen.step() if r is req):
        pass


def test_to_compute_counts_only_what_no_slot_holds_as_insert_does(eng):
    gen = BatchGenerator(eng, seqs=range(2), slot_ctx=256)
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    first = _req(eng, story)
    assert gen.to_compute(first) == len(first.tokens)  # nothing held yet: the whole prompt
    _finish(gen, first)
    longer = _req(eng, story + " never told anyone where he went at night, until one winter")
    again = _req(eng, story)
    other = _req(eng, "def fibonacci(n):")
    for req in (longer, again, other):  # read-only: asking twice, and before insert, changes nothing
        assert gen.to_compute(req) == gen.to_compute(req)
    assert 0 < gen.to_compute(longer) < len(longer.tokens) - len(first.tokens) + 2  # the story is held
    assert gen.to_compute(again) == 0  # the same prompt: its logits are kept, nothing is computed
    assert gen.to_compute(other) == len(other.tokens)
    expected = gen.to_compute(longer)
    assert len(longer.tokens) - gen.insert(longer) == expected  # what insert then reuses, exactly
