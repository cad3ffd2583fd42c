"""What the JSON grammars allow between tokens and inside strings: llama.cpp's own rules (llama-server's).

The white space between JSON tokens is nothing, a space, or one or two newlines and up to 20 spaces or tabs of
indentation (common/json-schema-to-grammar.cpp): what models trained on pretty-printed JSON write, and bounded,
so a model cannot run on in white space. Strings take no raw control characters (a raw newline is not JSON).
Checked with llama.cpp's grammar sampler on the real SmolLM2 vocabulary, and end to end: the official openai
client against `ondevice serve` on loopback, where a grammar must not change a reply that already fits it.
"""

from __future__ import annotations

import json

import openai
import pytest
from test_serve_tools import QWEN, needs_qwen

from ondevice.engine.base import EngineConfig
from ondevice.engine.grammar import json_object_grammar, schema_grammar
from ondevice.engine.llama import LlamaEngine
from ondevice.engine.records import Sampling
from ondevice.engine.sampler import Sampler
from ondevice.engine.toolcalls import call_grammar
from ondevice.serve import BackgroundServer, ServeSettings

JOKE = {"type": "object", "properties": {  # LangChain's with_structured_output(TypedDict), as it sends it
    "setup": {"description": "The setup of the joke", "type": "string"},
    "punchline": {"description": "The punchline of the joke", "type": "string"},
    "rating": {"description": "How funny the joke is, from 1 to 10", "type": "integer"}},
    "required": ["setup", "punchline"]}
GRAMMARS = {
    "json_object": (json_object_grammar, "{}"),
    "json_schema": (lambda: schema_grammar(JOKE), "{}"),
    "tool": (lambda: call_grammar([("Joke", JOKE)], parallel=False, allow_text=False, wrapped=True),
             '<tool_call>\n{{"name": "Joke", "arguments": {}}}\n</tool_call>'),
}
# between "{" and the first key: llama.cpp's `space ::= | " " | "\n"{1,2} [ \t]{0,20}`
ALLOWED = ["", " ", "\n", "\n\n", "\n  ", "\n\t\t", "\n\n" + " " * 20]
REFUSED = ["  ", "\n\n\n", "\n" + " " * 21, "\r\n", " \n"]


@pytest.fixture(scope="module")
def eng(smol_path):
    e = LlamaEngine(smol_path, EngineConfig(n_ctx=256, n_seq_max=1, n_threads=2))
    yield e
    e.close()


def _verdict(eng, grammar: str, text: str) -> str:
    """What llama.cpp's grammar sampler makes of ``text``, token by token: complete, incomplete or refused."""
    s = Sampler(eng, Sampling(temp=0, grammar=grammar))
    try:
        for tok in eng.tokenize(text, add_special=False, parse_special=False):
            if not s.allows(tok):
                return "refused"
            eng.ll.llama_sampler_accept(s.grammar, tok)
        return "complete" if any(s.allows(t) for t in eng.eos_tokens) else "incomplete"
    finally:
        s.close()


def _joke(gap: str, setup: str = "a cat", nl: str = "\n") -> str:
    """The joke object, after its "{" the white space ``gap``; pretty-printed, or on one line when not ``nl``."""
    sep = f"{nl}  " if nl else " "
    return f'{{{gap}"setup": {json.dumps(setup)},{sep}"punchline": "it purrs",{sep}"rating": 7{nl}}}'


@pytest.mark.parametrize("kind", GRAMMARS)
def test_white_space_between_tokens_is_llama_cpps_bounded_rule(eng, kind):
    make, wrap = GRAMMARS[kind]
    grammar = make()
    for gap in ALLOWED:
        assert _verdict(eng, grammar, wrap.format(_joke(gap))) == "complete", (kind, gap)
    for gap in REFUSED:
        assert _verdict(eng, grammar, wrap.format(_joke(gap))) == "refused", (kind, gap)


@pytest.mark.parametrize("kind", GRAMMARS)
def test_strings_take_escapes_but_no_raw_control_characters(eng, kind):
    make, wrap = GRAMMARS[kind]
    grammar = make()
    ok = _joke("", 'a "cat"\n\t\\ /\u00e9', nl="")  # json.dumps escapes the quotes, newline, tab, backslash
    assert _verdict(eng, grammar, wrap.format(ok)) == "complete"
    for raw in ("\n", "\t", "\x7f"):
        bad = _joke("", f"a{raw}cat", nl="").replace(json.dumps(f"a{raw}cat"), f'"a{raw}cat"')
        assert _verdict(eng, grammar, wrap.format(bad)) == "refused", (kind, raw)


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_nothing_may_follow_the_whole_reply_as_in_llama_server(eng, kind):
    """llama.cpp's converter puts white space only between tokens, so its grammar ends with the value; the
    converter ondevice uses ended every value with white space (SmolLM2 then wrote ``}\\n\\n``)."""
    grammar = GRAMMARS[kind][0]()
    assert _verdict(eng, grammar, _joke("")) == "complete"
    for tail in (" ", "\n", "\n\n", "\n  "):
        assert _verdict(eng, grammar, _joke("") + tail) == "refused", (kind, tail)


@pytest.mark.parametrize("schema, value", [
    ({"type": "integer"}, "12"), ({"type": "array", "items": {"type": "string"}}, '["a", "b"]'),
    ({"anyOf": [{"type": "number"}, {"type": "boolean"}]}, "true"), ({"enum": ["x", 3]}, "3"),
    ({"$ref": "#/$defs/N", "$defs": {"N": {"type": "object", "properties": {  # recursive, and a property "end"
        "end": {"$ref": "#/$defs/N"}, "v": {"type": "string"}}}}}, '{"end": {"v": "a"}}')])
def test_any_root_ends_with_its_value_while_inner_white_space_stays(eng, schema, value):
    grammar = schema_grammar(schema)
    assert _verdict(eng, grammar, value) == "complete", grammar
    assert _verdict(eng, grammar, value + " ") == "refused", grammar
    if " " in value:
        assert _verdict(eng, grammar, value.replace(" ", "\n  ")) == "complete", grammar


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "hobbies": {"type": "array"}}, "required": ["name", "age", "hobbies"]}
# The free reply is the model's greedy decode, which differs from CPU to CPU: on some the first prompt's JSON
# loops (nested "hobbies" until max_tokens). The test takes the first prompt whose free reply holds a whole
# pretty-printed JSON value, and fails if none does.
PROMPTS = ("Bob is 41 and likes chess and hiking. Reply with a JSON object with keys name (a string), age (a number) "
           "and hobbies (a list of strings).",
           "Bob is 41 and likes chess and hiking. Reply with a JSON object with keys name, age and hobbies.")


def _ask(client, prompt: str, **kw) -> tuple[str, str]:
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=120, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def _own_json(free: str):
    """The first whole JSON value in ``free`` (SmolLM2 goes on after it) and its text, or None."""
    if "{" not in free:
        return None
    start = free.index("{")
    try:
        value, end = json.JSONDecoder().raw_decode(free, start)
    except json.JSONDecodeError:
        return None
    return value, free[start:end]


@pytest.mark.parametrize("model", [pytest.param(None, id="smollm2"), pytest.param(QWEN, id="qwen", marks=needs_qwen)])
def test_a_reply_that_fits_the_format_is_not_changed_by_its_grammar(model):
    """Both models write this JSON pretty-printed; under the old one-space rule json_schema forced it onto one
    line (Qwen2.5's LangChain jokes then looped inside a string until max_tokens)."""
    from ondevice.models import resolve

    settings = ServeSettings(model=str(resolve(model).path), port=0, parallel=1, ctx=1024, threads=2)
    with BackgroundServer(settings) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        replies = []
        for prompt in PROMPTS:
            free, _ = _ask(client, prompt)
            replies.append(free)
            found = _own_json(free)
            if found and "\n" in found[1]:  # pretty-printed: what the old rule refused
                break
        else:
            pytest.fail(f"no prompt gave a whole pretty-printed JSON value: {replies}")
        value, own = found
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}):
            text, finish = _ask(client, prompt, response_format=fmt)
            assert finish == "stop" and json.loads(text) == value, (fmt["type"], text)
            assert text == own, (fmt["type"], text)  # as llama-server's: nothing after the value


def test_grammar_the_reader_does_not_know_is_left_as_written():
    from ondevice.engine.grammar import _no_trailing_space

    for odd in ('root ::= "a" ~ space\nspace ::= " "\n', 'root ::= "a" x\nx ::= "b" {2\nspace ::= " "\n',
                'root ::= "{" space root "}" space\nspace ::= " "\n'):  # unknown syntax; a recursive root
        assert _no_trailing_space(odd) == odd
