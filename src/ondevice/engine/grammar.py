"""JSON schema and tool calls as GBNF grammars that llama.cpp's native sampler enforces.

One place for the server's ``response_format`` and the agent's plans; tool calls build on it in
:mod:`ondevice.engine.toolcalls`. JSON schema -> GBNF uses llama-cpp-python's converter
(``llama_cpp.llama_grammar``), the one its own server uses, after :func:`normalise` has rewritten what that
converter cannot read into what it can (the schemas pydantic, LangChain and the OpenAI SDK write: ``{}`` and
annotation-only schemas for "any value", a ``$ref`` at the root, ``$defs`` under a tool's parameters), with
the white space and string characters of llama.cpp's own converter (:data:`LLAMA_CPP_RULES`). A tool
call is the JSON object ``{"name": ..., "arguments": {...}}`` constrained to the tools' parameter schemas;
with ``parallel`` (OpenAI's ``parallel_tool_calls``) a JSON array of such objects is allowed too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ..errors import InvalidArgument

# what JSON Schema's ``{}`` means: any value (the converter reads ``{}`` as any object, and an annotation-only
# schema such as pydantic's ``{"title": "X"}`` for ``Any`` not at all)
ANY_VALUE = {"type": ["object", "array", "string", "number", "boolean", "null"]}
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
                "$schema", "$id"}
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "if", "then", "else")  # a schema each
_SUBSCHEMA_LISTS = ("items", "prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_DEFS = ("$defs", "definitions")


def normalise(schema, hoisted: dict | None = None, prefix: str = ""):
    """A copy of ``schema`` the converter reads as JSON Schema means it: ``{}`` and annotation-only schemas
    become :data:`ANY_VALUE`. With ``hoisted`` (a dict), the ``$defs``/``definitions`` of every level move
    into it, renamed ``prefix + name``, and every local ``$ref`` (``#`` included: the schema itself) points
    to ``#/$defs/<new name>``: for a schema that will sit inside another one (a tool's parameters)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if hoisted is not None:
        for key in _DEFS:
            for name, sub in (out.pop(key, None) or {}).items():
                hoisted[f"{prefix}{name}"] = normalise(sub, hoisted, prefix)
        ref = out.get("$ref")
        if ref == "#":
            hoisted.setdefault(f"{prefix}self", None)  # :func:`hoist` puts the whole schema there
            out["$ref"] = f"#/$defs/{prefix}self"
        elif isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            out["$ref"] = f"#/$defs/{prefix}{ref.rsplit('/', 1)[1]}"
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = normalise(out[key], hoisted, prefix)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [normalise(s, hoisted, prefix) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: normalise(s, hoisted, prefix) for k, s in out[key].items()}
    if not set(out) - _ANNOTATIONS:
        return dict(ANY_VALUE)
    return out


def hoist(schema: dict, defs: dict, prefix: str) -> dict:
    """:func:`normalise` ``schema`` to sit inside another schema, its definitions moved into ``defs``."""
    out = normalise(schema, defs, prefix)
    if f"{prefix}self" in defs and defs[f"{prefix}self"] is None:
        defs[f"{prefix}self"] = out
    return out


# Where the converter's rules differ from llama.cpp's (common/json-schema-to-grammar.cpp, llama-server's):
# - space: the converter allows one " " between tokens, so a model trained on pretty-printed JSON (Qwen2.5
#   writes `{\n  "key": ...`) is forced off its path at the first token, and its reply is not llama-server's
#   from there on. llama.cpp's rule allows what such models write and stays bounded: nothing, a space, or one
#   or two newlines and up to 20 spaces or tabs of indentation.
# - char: the converter lets raw control characters into strings (a raw newline: not JSON); llama.cpp's not.
LLAMA_CPP_RULES = {
    "space": r'| " " | "\n"{1,2} [ \t]{0,20}',
    "char": r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
}


def _llama_cpp_rules(gbnf: str) -> str:
    """The converter's GBNF with its :data:`LLAMA_CPP_RULES` rules replaced by llama.cpp's."""
    return re.sub(r"(?m)^(space|char) ::= .*$", lambda m: f"{m.group(1)} ::= {LLAMA_CPP_RULES[m.group(1)]}", gbnf)


MAX_REPEAT = 10_000  # minLength/maxLength/minItems/maxItems: the converter writes one rule per repetition
MAX_ENUM = 1_000  # enum and const values in one schema (OpenAI's structured outputs allow 1,000)
MAX_GRAMMAR = 1 << 20  # bytes of GBNF


def check_size(schema, what: str) -> None:
    """Refuse a schema whose grammar would not fit in memory or would stall the server (a ``minLength`` of
    a billion is a 150-byte request for gigabytes): bounds on repetitions and enum values."""
    n_enum = 0
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key in ("minLength", "maxLength", "minItems", "maxItems"):
            v = node.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_REPEAT:
                raise InvalidArgument(f"{what}: {key} {v} is more than ondevice turns into a grammar "
                                      f"({MAX_REPEAT}); lower it (a reply that long would not fit the context)")
        if isinstance(node.get("enum"), list):
            n_enum += len(node["enum"])
            if n_enum > MAX_ENUM:
                raise InvalidArgument(f"{what}: more than {MAX_ENUM} enum values in one schema; use fewer (as "
                                      f"OpenAI's structured outputs require) or a plain string")
        todo.extend(v for k, v in node.items() if k not in ("enum", "const", "default", "examples"))


_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def check_shape(schema, where: str) -> None:
    """Refuse, naming the JSON path under ``where`` and the fix, the schema parts a grammar cannot be made of
    (the converter's own errors name GBNF rules and ondevice's internal names): an empty ``enum``, a
    ``properties`` that is not an object, a ``$ref`` to a definition the schema does not have, ..."""
    defs: set[str] = set()
    todo = [schema]
    while todo:  # every level's definitions: :func:`normalise` hoists them all
        node = todo.pop()
        if isinstance(node, dict):
            for key in _DEFS:
                if isinstance(node.get(key), dict):
                    defs |= set(node[key])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    _check_node(schema, where, defs)


def _check_node(node, path: str, defs: set[str]) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise InvalidArgument(f"{path} is {json.dumps(node)[:40]}, not a schema; write a JSON schema object there")
    types = node.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _TYPES:
            raise InvalidArgument(f"{path}.type {json.dumps(t)[:40]} is not a JSON schema type; use one of "
                                  f"{', '.join(sorted(_TYPES))}")
    if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
        raise InvalidArgument(f"{path}.enum is {'empty' if node['enum'] == [] else 'not a list'}; list the "
                              f"allowed values, or drop enum")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        raise InvalidArgument(f"{path}.required is not a list of property names; write e.g. [\"city\"]")
    ref = node.get("$ref")
    if ref is not None:
        name = ref.rsplit("/", 1)[1] if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")) \
            else None
        if ref != "#" and name not in defs:
            raise InvalidArgument(
                f"{path}.$ref {json.dumps(ref)[:60]} " + ("names no definition in the schema; add it under $defs"
                                                           if name is not None else "is not supported; refer to "
                                                           "#/$defs/NAME (a definition in the schema) or #"))
    for key in _SUBSCHEMA:
        if key in node and not (key == "items" and isinstance(node[key], list)):
            if key == "additionalProperties" and isinstance(node[key], bool):
                continue
            _check_node(node[key], f"{path}.{key}", defs)
    for key in _SUBSCHEMA_LISTS:
        if key in node and (key != "items" or isinstance(node[key], list)):
            subs = node[key]
            if not isinstance(subs, list) or (key != "prefixItems" and not subs):
                raise InvalidArgument(f"{path}.{key} is {'empty' if subs == [] else 'not a list'}; give it a "
                                      f"list of schemas, or drop it")
            for i, sub in enumerate(subs):
                _check_node(sub, f"{path}.{key}[{i}]", defs)
    for key in _SUBSCHEMA_MAPS:
        if key in node:
            if not isinstance(node[key], dict):
                raise InvalidArgument(f"{path}.{key} is {json.dumps(node[key])[:40]}, not an object; write "
                                      f"{{\"NAME\": {{schema}}, ...}} (an empty {key} is {{}})")
            for k, sub in node[key].items():
                _check_node(sub, f"{path}.{key}.{k}", defs)


def _skip(body: str, i: int) -> int:
    """The index after the GBNF element at ``body[i]``: a literal, a character class, a group or a name."""
    c = body[i]
    if c in "\"[":
        close, i = ("\"" if c == "\"" else "]"), i + 1
        while body[i] != close:
            i += 2 if body[i] == "\\" else 1
        return i + 1
    if c == "(":
        i += 1
        while body[i] != ")":
            i = _skip(body, i) if body[i] in "\"[(" else i + 1
        return i + 1
    j = i
    while j < len(body) and (body[j].isalnum() or body[j] in "-_"):
        j += 1
    if j == i:
        raise ValueError(f"unexpected {c!r} in GBNF")
    return j


def _alternatives(body: str) -> list[list[tuple[str, str]]]:
    """A rule's body as its top-level alternatives, each a list of (element, quantifier)."""
    alts: list[list[tuple[str, str]]] = [[]]
    i = 0
    while i < len(body):
        if body[i].isspace():
            i += 1
        elif body[i] == "|":
            alts.append([])
            i += 1
        else:
            j = _skip(body, i)
            k = j + 1 if j < len(body) and body[j] in "?*+" else body.index("}", j) + 1 if body[j:j + 1] == "{" else j
            alts[-1].append((body[i:j], body[j:k]))
            i = k
    return alts


def _names(body: str) -> set[str]:
    """The rules a body refers to (names anywhere in it, inside groups too; not inside literals)."""
    out, i = set(), 0
    while i < len(body):
        c = body[i]
        if c.isalnum():
            j = _skip(body, i)
            out.add(body[i:j])
            i = j
        elif c in "\"[":
            i = _skip(body, i)
        else:
            i += 1
    return out


def _no_trailing_space(gbnf: str) -> str:
    """``gbnf`` whose ``root`` ends where its JSON value ends, as llama.cpp's converter writes it (white space
    only between tokens): the converter's rules end every value with ``space``, so a model could add up to 22
    characters of white space after the value (SmolLM2 wrote ``}\\n\\n``), where llama-server's grammar
    leaves it nothing but the end of generation. Each rule a value can end in gets a copy without that
    ``space``; a grammar whose ``root`` is referred to by another rule is left as it is."""
    rules = dict(re.findall(r"(?m)^([\w-]+) ::= (.*)$", gbnf))
    if "root" not in rules or any("root" in _names(b) for b in rules.values()):
        return gbnf
    memo: dict[str, str] = {}
    added: dict[str, str] = {}

    def at_end(name: str) -> str:
        if name in memo:
            return memo[name]
        new, n = f"{name}-end", 1
        while new in rules or new in added:  # a property named "end" has a rule of that name
            new, n = f"{name}-end{n}", n + 1
        memo[name] = new
        alts, changed = _alternatives(rules[name]), False
        for alt in alts:
            last, quant = alt[-1] if alt else ("", "?")
            if quant:
                continue
            if last == "space":
                alt.pop()
                changed = True
            elif last in rules and (sub := at_end(last)) != last:
                alt[-1] = (sub, "")
                changed = True
        if not changed and not any(new in _names(b) for b in added.values()):
            memo[name] = name
            return name
        added[new] = " | ".join(" ".join(e + q for e, q in alt) for alt in alts)
        return new

    try:
        end = at_end("root")
    except (ValueError, IndexError):  # GBNF this reader does not know: the converter's, white space and all
        return gbnf
    if end == "root":
        return gbnf
    rules["root"] = added.pop(end)
    rules.update(added)
    return "\n".join(f"{k} ::= {v}" for k, v in rules.items()) + "\n"


_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_BEFORE_TYPE = {"$ref", "oneOf", "anyOf"}  # what the converter (and llama.cpp's) reads before "type"


def _to_gbnf(schema: dict) -> str:
    """llama-cpp-python's ``json_schema_to_gbnf``, with integer bounds enforced as llama.cpp's converter does
    (:mod:`ondevice.engine.int_range`); the converter drops them, and a ``maximum: 5`` let a model write 2023.
    ``number`` bounds stay unenforced: llama.cpp's converter does not enforce them either."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    from .int_range import int_bounds, min_max_int

    class Converter(SchemaConverter):
        def visit(self, schema, name):
            if not isinstance(schema, dict) or not _BOUNDS & schema.keys() or _BEFORE_TYPE & schema.keys():
                return super().visit(schema, name)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            types = schema.get("type")
            if isinstance(types, list) and "integer" in types:  # the converter keeps nothing but each type
                return self._add_rule(rule_name, self._generate_union_rule(
                    name, [{**schema, "type": t} for t in types]))  # llama.cpp keeps every key in each
            if types != "integer" or {"const", "enum"} & schema.keys():
                return super().visit(schema, name)
            lo, hi = int_bounds(schema)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"no integer is at least {lo} and at most {hi}")
            return self._add_rule(rule_name, f"({min_max_int(lo, hi)}) space")

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    return converter.format_grammar()


def schema_grammar(schema: dict, what: str = "response_format.json_schema.schema", whole: bool = True) -> str:
    """GBNF for a JSON schema (an error naming ``what`` when the converter cannot express it). ``whole``: the
    value is the whole reply, so nothing may follow it (:func:`_no_trailing_space`); else a part of one."""
    check_size(schema, what)
    schema = normalise(schema)
    if "$ref" in schema:
        # the converter resolves the $refs inside a node that has one only when that node is reached through
        # another: a root $ref (pydantic's recursive models) becomes a one-way union, the same language
        schema = {k: v for k, v in schema.items() if k != "$ref"} | {"anyOf": [{"$ref": schema["$ref"]}]}
    try:
        gbnf = _llama_cpp_rules(_to_gbnf(json.loads(json.dumps(schema))))
    except Exception as e:  # the converter raises assorted errors on schemas it cannot express
        raise InvalidArgument(f"{what} cannot be turned into a grammar ({e}); simplify the schema") from e
    if len(gbnf) > MAX_GRAMMAR:
        raise InvalidArgument(f"{what} makes a grammar of {len(gbnf) >> 10} KiB, more than ondevice takes "
                              f"({MAX_GRAMMAR >> 10} KiB); simplify the schema")
    return _no_trailing_space(gbnf) if whole else gbnf


def schema_rules(parts: dict[str, dict], what: str) -> str:
    """GBNF in which each ``parts`` name is a rule for its schema, from one converter run (so the rules
    the parts share are defined once); no ``root`` rule. Each part's ``$defs`` go to the root, renamed."""
    defs: dict = {}
    alts = [hoist(s, defs, f"p{i}-") for i, s in enumerate(parts.values())]
    gbnf = schema_grammar({"anyOf": alts, **({"$defs": defs} if defs else {})}, what, whole=False)
    m = re.search(r"(?m)^root ::= (.*)$", gbnf)
    names = m.group(1).split(" | ") if m else []
    if len(names) != len(parts):  # the converter's root is one rule per alternative; anything else is a bug
        raise InvalidArgument(f"{what} cannot be turned into a grammar (unexpected root {m and m.group(1)!r})")
    return "\n".join([gbnf[:m.start()] + gbnf[m.end() + 1:], *(f"{n} ::= {r}" for n, r in zip(parts, names))])


FENCED_ROOT = "ondevice-format"


def fenced(gbnf: str) -> str:
    """``gbnf`` (a whole reply's JSON value) or that value in a ```` ```json ```` block, as llama-server's
    ``response_format`` grammar allows: a small model that would open a code block is not forced off its path
    (SmolLM2, asked "Give a person" for a name-and-age schema, padded ``{"name"\\n\\n:\\n\\n...`` with blank lines
    up to max_tokens, where llama-server's fenced reply was the object). The server takes the fence off the
    content (:class:`ondevice.serve.structured.FormatStream`). A grammar whose ``root`` another rule refers to
    is left as it is."""
    rules = dict(re.findall(r"(?m)^([\w-]+) ::= (.*)$", gbnf))
    if "root" not in rules or FENCED_ROOT in rules or any("root" in _names(b) for b in rules.values()):
        return gbnf
    rules[FENCED_ROOT] = rules.pop("root")
    rules["root"] = f'{FENCED_ROOT} | "```" "json"? "\\n" {FENCED_ROOT} "\\n"? "```"'
    return "\n".join(f"{k} ::= {v}" for k, v in rules.items()) + "\n"


def json_object_grammar() -> str:
    """GBNF for any JSON object (``response_format`` ``json_object``), as llama-server makes it."""
    return schema_grammar({"type": "object"}, "response_format")


def tool_call_schema(functions: Sequence[tuple[str, dict]], parallel: bool, max_calls: int | None = None) -> dict:
    """JSON schema of one call (or, with ``parallel``, also an array of up to ``max_calls`` calls) to
    ``(name, parameters)``; the parameters' ``$defs`` are moved to its root (renamed per tool)."""
    defs: dict = {}
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": hoist(params, defs, f"t{i}-")},
              "required": ["name", "arguments"], "additionalProperties": False}
             for i, (name, params) in enumerate(functions)]
    one = calls[0] if len(calls) == 1 else {"oneOf": calls}
    many = {"type": "array", "items": one, "minItems": 1, **({"maxItems": max_calls} if max_calls else {})}
    return ({"anyOf": [one, many]} if parallel else one) | ({"$defs": defs} if defs else {})
