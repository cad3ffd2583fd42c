"""A token the chain picks but the grammar rejects is re-sampled among the tokens that may pass, not all 49k.

llama.cpp's grammar check costs ~0.1 us per candidate (~5 ms for SmolLM2's whole vocabulary, half a decode
step of the 135M model); tool calls are rejected often (the model wants another function name or key), which
made ``tools`` decode at 0.77x plain. ``PrefixIndex`` narrows the re-sample to tokens whose first one or two
characters pass the grammar. Checked on the real SmolLM2 vocabulary and llama.cpp's grammar sampler: the
tokens it leaves hold every token the grammar allows, a seeded reply is token for token what the whole-
vocabulary check gives, and the grammar is asked about far fewer candidates per rejection.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ondevice.engine import sampler as sampler_mod
from ondevice.engine.grammar import json_object_grammar, schema_grammar
from ondevice.engine.records import Sampling
from ondevice.engine.sampler import Sampler
from ondevice.engine.toolcalls import call_grammar, tools_note

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "facts": {"type": "array",
                                                                             "items": {"type": "string"}}},
        "required": ["city"]}
TOOL = {"name": "get_city_facts", "description": "Look up facts about a city", "parameters": CITY}
ASK = "Describe the city of Paris as a JSON object: its name, country, population and three famous landmarks."
CALL = ('{\n    "name": "get_city_facts",\n    "arguments": {\n        "city": "Paris",\n'
        '        "facts": ["a", "b"]\n    }\n}')
GRAMMARS = {  # (grammar, a text it accepts, walked token by token)
    "tools_auto": (call_grammar([(TOOL["name"], CITY)], parallel=True, allow_text=True), CALL),
    "tools_wrapped": (call_grammar([(TOOL["name"], CITY)], parallel=True, allow_text=False, wrapped=True),
                      f"<tool_call>\n{CALL}\n</tool_call>"),
    "json_schema": (schema_grammar(CITY), '{"city": "Paris", "facts": ["Eiffel Tower"]}'),
    "json_object": (json_object_grammar(), '{\n  "a": [1, 2.5, {"b": null}], "c": "d\\n"\n}'),
}


def _prompt(model) -> list[int]:
    note = tools_note([TOOL], parallel=True, allow_text=False)
    return model.tokenize_prompt([{"role": "user", "content": ASK}], system_note=note)


@pytest.mark.parametrize("kind", GRAMMARS)
def test_candidates_hold_every_token_the_grammar_allows(smol, kind):
    eng = smol.engine
    grammar, text = GRAMMARS[kind]
    s = Sampler(eng, Sampling(temp=0, grammar=grammar))
    everything = np.arange(eng.n_vocab, dtype=np.int32)
    narrowed = 0
    try:
        assert s.index is not None
        for tok in eng.tokenize(text, add_special=False, parse_special=False):
            allowed = set(np.flatnonzero(s._passes(everything)).tolist())
            ids = s.index.candidates(s._passes)
            if ids is not None:
                assert set(ids[s._passes(ids)].tolist()) == allowed, (kind, eng.token_bytes(tok))
                narrowed += len(ids) < eng.n_vocab // 10
            assert tok in allowed
            eng.ll.llama_sampler_accept(s.grammar, tok)
    finally:
        s.close()
    assert narrowed >= 3  # between keys and values only a few tokens can follow: the index sees that


def test_grammar_naming_tokens_checks_the_whole_vocabulary(smol):
    # a token reference matches by id, not by text, so a prefix of its text says nothing about it
    s = Sampler(smol.engine, Sampling(temp=0, grammar='root ::= "a" <|im_end|> | "b" # not <this>'))
    try:
        assert s.index is None
    finally:
        s.close()
    s = Sampler(smol.engine, Sampling(temp=0, grammar='root ::= "<tool_call>" [!<]'))
    try:
        assert s.index is not None
    finally:
        s.close()


def _address(ptr) -> int | None:
    return ctypes.cast(ptr, ctypes.c_void_p).value


def _reply(model, sampling: Sampling) -> list[int]:
    return [g.token for g in model.stream_tokens(_prompt(model), sampling) if g.token >= 0]


@pytest.mark.parametrize("temp", [0.7, 0.0])
def test_reply_is_the_whole_vocabulary_checks_reply(smol, monkeypatch, temp):
    grammar = GRAMMARS["tools_auto"][0]
    sampling = Sampling(temp=temp, seed=3, max_tokens=40, grammar=grammar)
    narrowed = _reply(smol, sampling)
    monkeypatch.setattr(sampler_mod.PrefixIndex, "of", classmethod(lambda cls, engine: None))
    assert _reply(smol, sampling) == narrowed


def test_a_rejected_token_is_resampled_among_few_candidates(smol, monkeypatch):
    """Counted, not timed: the candidates llama.cpp's grammar is asked about, per token it rejected."""
    ll = smol.engine.ll
    grammars: set[int] = set()
    sizes: list[tuple[int, bool]] = []  # (candidates, all rejected) of each grammar check
    init, apply = ll.llama_sampler_init_grammar, ll.llama_sampler_apply

    def init_grammar(*a):
        g = init(*a)
        grammars.add(_address(g))
        return g

    def sampler_apply(smpl, arr):
        apply(smpl, arr)
        if _address(smpl) in grammars:
            a = arr._obj
            data = ctypes.cast(a.data, ctypes.POINTER(ll.llama_token_data))
            sizes.append((a.size, a.size == 1 and data[0].logit == float("-inf")))

    monkeypatch.setattr(ll, "llama_sampler_init_grammar", init_grammar)
    monkeypatch.setattr(ll, "llama_sampler_apply", sampler_apply)
    call = call_grammar([(TOOL["name"], CITY)], parallel=True, allow_text=False)  # tool_choice "required"
    for seed in range(3):
        _reply(smol, Sampling(temp=0.7, seed=seed, max_tokens=48, grammar=call))
    rejected = sum(r for _, r in sizes)
    checked = sum(n for n, _ in sizes if n > 1)  # the re-samples (and their probes), not the one-token checks
    assert rejected >= 5  # the model wants other names and keys than the schema's: SmolLM2 always does
    assert checked < rejected * smol.engine.n_vocab / 10, (checked, rejected)  # before: n_vocab each
