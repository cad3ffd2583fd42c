"""An integer schema's minimum/maximum bound what the model may write, as llama-server's grammar bounds it.

llama-cpp-python's converter drops ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``: with
``{"n": {"type": "integer", "maximum": 5}}`` a model wrote ``{"n": 2023}``. ondevice writes those ranges as
llama.cpp's converter does (common/json-schema-to-grammar.cpp's ``build_min_max_int``, ported in
:mod:`ondevice.engine.int_range`): checked against llama.cpp's own expected GBNF (no model), with llama.cpp's
grammar sampler on the real SmolLM2 vocabulary (which integers each range takes, and which it refuses), and
end to end with the model asked for a value out of range. ``number`` bounds stay unenforced, as in llama.cpp.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grammar_whitespace import _verdict

from ondevice.engine.grammar import schema_grammar
from ondevice.engine.int_range import int_bounds, min_max_int
from ondevice.engine.records import Sampling
from ondevice.engine.sampler import Sampler
from ondevice.engine.toolcalls import call_grammar
from ondevice.errors import InvalidArgument

# llama.cpp's tests/test-json-schema-to-grammar.cpp: (minimum, maximum) -> the integer rule it expects
LLAMA_CPP_EXPECTS = {
    (0, None): '([0] | [1-9] [0-9]{0,15})',
    (1, None): '([1-9] [0-9]{0,15})',
    (3, None): '([1-2] [0-9]{1,15} | [3-9] [0-9]{0,15})',
    (9, None): '([1-8] [0-9]{1,15} | [9] [0-9]{0,15})',
    (10, None): '([1] ([0-9]{1,15}) | [2-9] [0-9]{1,15})',
    (25, None): '([1] [0-9]{2,15} | [2] ([0-4] [0-9]{1,14} | [5-9] [0-9]{0,14}) | [3-9] [0-9]{1,15})',
    (None, 30): '("-" [1-9] [0-9]{0,15} | [0-9] | ([1-2] [0-9] | [3] "0"))',
    (-5, None): '("-" ([0-5]) | [0] | [1-9] [0-9]{0,15})',
    (-123, None): '("-" ([0-9] | ([1-8] [0-9] | [9] [0-9]) | "1" ([0-1] [0-9] | [2] [0-3])) | [0] | '
                  '[1-9] [0-9]{0,15})',
    (None, -5): '("-" ([1-4] [0-9]{1,15} | [5-9] [0-9]{0,15}))',  # llama.cpp's [0-4] took "-05": not JSON
    (None, 1): '("-" [1-9] [0-9]{0,15} | [0-1])',
    (None, 100): '("-" [1-9] [0-9]{0,15} | [0-9] | ([1-8] [0-9] | [9] [0-9]) | "100")',
    (0, 23): '([0-9] | ([1] [0-9] | [2] [0-3]))',
    (15, 300): '(([1] ([5-9]) | [2-9] [0-9]) | ([1-2] [0-9]{2} | [3] "00"))',
    (5, 30): '([5-9] | ([1-2] [0-9] | [3] "0"))',
    (-123, 42): '("-" ([0-9] | ([1-8] [0-9] | [9] [0-9]) | "1" ([0-1] [0-9] | [2] [0-3])) | [0-9] | '
                '([1-3] [0-9] | [4] [0-2]))',
    (-10, 10): '("-" ([0-9] | "10") | [0-9] | "10")',
    (-12, 207): '("-" ([0-9] | "1" [0-2]) | [0-9] | ([1-8] [0-9] | [9] [0-9]) | ([1] [0-9]{2} | [2] "0" [0-7]))',
    (12, 207): '(([1] ([2-9]) | [2-9] [0-9]) | ([1] [0-9]{2} | [2] "0" [0-7]))',
}
RANGES = [(None, 5), (5, None), (None, 0), (0, None), (0, 0), (7, 7), (-7, -7), (-5, 5), (10, 20), (1, 1000),
          (-20, -10), (None, -5), (-123, None), (-123, 42), (25, None), (15, 300), (99, 101), (100, 999),
          (0, 2 ** 31), (-2 ** 31, 2 ** 31 - 1), (123_456, 7_654_321), (None, 10 ** 15), (-10 ** 15, None)]


def _schema(lo, hi, **more) -> dict:
    return {"type": "integer", **({"minimum": lo} if lo is not None else {}),
            **({"maximum": hi} if hi is not None else {}), **more}


def _in_range(v: int, lo, hi) -> bool:
    """What llama.cpp's rule takes: ``lo <= v <= hi``, and where a side is open, at most 16 digits (as its
    unbounded integer)."""
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        return False
    return (lo is not None and hi is not None) or len(str(abs(v))) <= 16


def _probes(lo, hi, rng: random.Random) -> set[int]:
    """Integers to try on a range: its ends and their neighbours, digit-count edges, and random ones in and
    around it."""
    out = {0, 1, -1, 9, -9, 10, -10, 99, 100, -100, 2023, -2023, 10 ** 16 - 1, 10 ** 16, -10 ** 16 + 1, -10 ** 16}
    ends = [b for b in (lo, hi) if b is not None]
    for b in ends:
        out |= {b + d for d in range(-3, 4)}
        out |= {s * (10 ** k + d) for k in range(len(str(abs(b))) + 2) for d in (-1, 0, 1) for s in (1, -1)}
    a = lo if lo is not None else (hi - 10 ** 6 if hi is not None else -10 ** 6)
    b = hi if hi is not None else a + 10 ** 6
    span = max(b - a, 10)
    out |= {rng.randint(a, b) for _ in range(40)}
    out |= {rng.randint(a - span, b + span) for _ in range(40)}
    return out


@pytest.fixture(scope="module")
def digits(smol):
    """The SmolLM2 token of each character an integer is written with."""
    out = {}
    for ch in "-0123456789":
        (out[ch],) = smol.engine.tokenize(ch, add_special=False, parse_special=False)
    return out


class Recognizer:
    """llama.cpp's grammar sampler on ``grammar``, asked about texts one character token at a time."""

    def __init__(self, eng, grammar: str, digits: dict[str, int]):
        self.eng, self.digits, self.s = eng, digits, Sampler(eng, Sampling(temp=0, grammar=grammar))

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a whole reply the grammar takes (then only the end of generation may follow)."""
        ll, g = self.eng.ll, self.s.grammar
        ll.llama_sampler_reset(g)
        for ch in text:
            if not self.s.allows(self.digits[ch]):
                return False
            ll.llama_sampler_accept(g, self.digits[ch])
        return any(self.s.allows(t) for t in self.eng.eos_tokens)

    def close(self):
        self.s.close()


# -- the GBNF, without a model ------------------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), LLAMA_CPP_EXPECTS)
def test_ranges_are_written_as_llama_cpp_writes_them(lo, hi):
    assert f"({min_max_int(lo, hi)})" == LLAMA_CPP_EXPECTS[lo, hi]
    assert f"root ::= {LLAMA_CPP_EXPECTS[lo, hi]}\n" in schema_grammar(_schema(lo, hi))


def test_exclusive_and_fractional_bounds_are_read_as_llama_cpp_reads_them():
    assert int_bounds({"exclusiveMinimum": 4, "exclusiveMaximum": 10}) == (5, 9)
    assert int_bounds({"minimum": 4.5, "maximum": 9.5}) == (5, 9)
    assert int_bounds({"exclusiveMinimum": 4.5, "exclusiveMaximum": 9.5}) == (5, 9)
    assert int_bounds({"minimum": 5, "exclusiveMinimum": 100, "maximum": 9, "exclusiveMaximum": 0}) == (5, 9)
    assert int_bounds({"exclusiveMaximum": 0}) == (None, -1)
    inclusive = schema_grammar(_schema(5, 9))
    assert schema_grammar({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 10}) == inclusive
    assert schema_grammar({"type": "integer", "minimum": 4.5, "exclusiveMaximum": 9.5}) == inclusive
    assert schema_grammar({"type": "integer"}) != inclusive


def test_bounds_reach_every_place_an_integer_schema_sits():
    bounded = "(\"-\" [1-9] [0-9]{0,15} | [0-5])"
    for schema in [{"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]},
                   {"type": "array", "items": {"type": "integer", "maximum": 5}},
                   {"anyOf": [{"type": "integer", "maximum": 5}, {"type": "null"}]},
                   {"type": ["integer", "null"], "maximum": 5},
                   {"$defs": {"N": {"type": "integer", "maximum": 5}}, "type": "object",
                    "properties": {"n": {"$ref": "#/$defs/N"}}}]:
        assert bounded in schema_grammar(schema), schema
    assert bounded in call_grammar([("f", {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}})],
                                   parallel=True, allow_text=False, wrapped=True)


def test_number_bounds_are_left_as_llama_cpp_leaves_them():
    # llama.cpp's converter enforces bounds on integers only (common/json-schema.cpp: a number has none)
    plain = schema_grammar({"type": "number"})
    for bounds in ({"minimum": 1}, {"maximum": 5}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1.5}):
        assert schema_grammar({"type": "number", **bounds}) == plain
    assert schema_grammar({"type": "integer", "minimum": 1, "const": 0}) == schema_grammar({"const": 0})


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 6, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6},
    {"type": "integer", "minimum": "1"},
    {"type": "integer", "maximum": True},
    {"type": "integer", "minimum": 10 ** 16},  # llama.cpp writes broken GBNF for these ([0-9]{17,15})
    {"type": "integer", "maximum": -10 ** 16},
])
def test_a_range_no_grammar_can_hold_is_refused(schema):
    with pytest.raises(InvalidArgument, match="cannot be turned into a grammar"):
        schema_grammar(schema, "x")


# -- llama.cpp's grammar sampler on the real vocabulary -----------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_a_range_takes_exactly_its_integers(smol, digits, lo, hi):
    r = Recognizer(smol.engine, schema_grammar(_schema(lo, hi)), digits)
    try:
        for v in sorted(_probes(lo, hi, random.Random(f"{lo},{hi}"))):
            assert r.accepts(str(v)) == _in_range(v, lo, hi), (lo, hi, v)
            zero = f"-0{-v}" if v < 0 else f"0{v}"  # a leading zero: not JSON
            assert not r.accepts(zero), (lo, hi, zero)
    finally:
        r.close()


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.none() | st.integers(-10 ** 7, 10 ** 7) | st.integers(-10 ** 14, 10 ** 14),
       b=st.none() | st.integers(-10 ** 7, 10 ** 7) | st.integers(-10 ** 14, 10 ** 14),
       exclusive=st.booleans(), seed=st.integers(0, 1000))
def test_any_range_takes_exactly_its_integers(smol, digits, a, b, exclusive, seed):
    if a is None and b is None:
        return
    lo, hi = (a, b) if a is None or b is None else (min(a, b), max(a, b))
    if exclusive and lo is not None and hi is not None and hi - lo < 2:
        return
    schema = ({"type": "integer", **({} if lo is None else {"exclusiveMinimum": lo - 1}),
               **({} if hi is None else {"exclusiveMaximum": hi + 1})} if exclusive else _schema(lo, hi))
    r = Recognizer(smol.engine, schema_grammar(schema), digits)
    try:
        for v in sorted(_probes(lo, hi, random.Random(seed))):
            assert r.accepts(str(v)) == _in_range(v, lo, hi), (schema, v)
    finally:
        r.close()


def test_the_reported_schema_refuses_2023(smol):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]}
    grammar = schema_grammar(schema)
    for n, verdict in [(2023, "refused"), (6, "refused"), (50, "refused"), (5, "complete"), (0, "complete"),
                       (-3, "complete")]:
        assert _verdict(smol.engine, grammar, f'{{"n": {n}}}') == verdict, n
    tools = call_grammar([("f", schema)], parallel=False, allow_text=False, wrapped=True)
    assert _verdict(smol.engine, tools, '<tool_call>\n{"name": "f", "arguments": {"n": 2023}}\n</tool_call>') \
        == "refused"
    assert _verdict(smol.engine, tools, '<tool_call>\n{"name": "f", "arguments": {"n": 3}}\n</tool_call>') \
        == "complete"


# -- end to end: the model asked for a value out of range ---------------------------------------------------


@pytest.mark.parametrize(("bounds", "ask"), [
    ({"maximum": 5}, 'In what year did the year 2023 begin? Reply as JSON: {"n": 2023}'),
    ({"minimum": 10, "maximum": 20}, 'Reply with the JSON object {"n": 2023} and nothing else.'),
])
def test_the_model_writes_a_value_in_range(smol, bounds, ask):
    schema = {"type": "object", "properties": {"n": {"type": "integer", **bounds}}, "required": ["n"]}
    r = smol.generate([{"role": "user", "content": ask}], grammar=schema_grammar(schema, "x"), temp=0,
                      max_tokens=40)
    n = json.loads(r.text)["n"]
    assert isinstance(n, int) and bounds.get("minimum", n) <= n <= bounds["maximum"], r.text
