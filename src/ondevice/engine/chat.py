"""Chat templates from GGUF metadata, rendered in a Jinja sandbox (as llama.cpp / transformers do).

A chat template is code from a model file: the sandbox stops it reaching Python internals, and the limits
here stop it exhausting the process. Every loop iteration, call, filter and arithmetic operation checks a
deadline; repetition, powers, ``%`` formatting, joins and integer arguments that would build a value larger
than the output limit are refused before the value is built; the output is counted as it is generated.
Whatever a template does then ends as :class:`InvalidArgument` naming the template as the problem.

Message contents are text, never control tokens: :func:`encode` swaps control-token text inside the
messages (and tools) for placeholders before rendering, then tokenizes the template's own markers as
special tokens and everything between them, contents included, as plain text.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache

from ..errors import InvalidArgument

Message = dict  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}

RENDER_TIMEOUT_S = 5.0  # a real template renders in milliseconds
MIN_OUTPUT_CHARS = 1 << 20  # the output limit is max(this, CHARS_PER_CTX_TOKEN * context tokens)
CHARS_PER_CTX_TOKEN = 32  # far above any tokenizer's characters per token


class _Budget(threading.local):
    deadline = float("inf")
    max_chars = MIN_OUTPUT_CHARS


_budget = _Budget()


# the template is the model file's, or one given with --chat-template / --chat-template-file / load(chat_template=)
_FIX = "fix the template, give another with --chat-template, or use a model whose template renders this conversation"


class TemplateLimit(Exception):
    """A chat template went over its time or size limit (raised inside the render, turned into an error)."""


def _tick() -> None:
    if time.monotonic() > _budget.deadline:
        raise TemplateLimit(f"it ran longer than {RENDER_TIMEOUT_S:g} s")


def _check_size(n: int, what: str) -> None:
    if n > _budget.max_chars:
        raise TemplateLimit(f"{what} would hold {n} items, over the limit of {_budget.max_chars}")


def _check_args(args: Iterable, kwargs: Mapping) -> None:
    """Integer arguments (widths, indents, counts) above the output limit can only build a huge value."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and abs(v) > _budget.max_chars:
            raise TemplateLimit(f"an argument of {v} is over the limit of {_budget.max_chars}")


_WIDTHS = re.compile(r"\d+")


def _check_format(fmt: str, fields: bool = False) -> None:
    """A width or precision in a format string (``%9999999s``, ``{:>9999999}``) over the limit, or ``*``;
    with ``fields`` (``str.format``), a field nested in a spec (``{0:{1}}``: a width from an argument)."""
    if "%" in fmt and "*" in fmt:
        raise TemplateLimit("'*' widths in % formats are not allowed")
    if fields:
        import string

        try:
            specs = [spec for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
        except ValueError:
            specs = []  # str.format will raise on it itself
        if any("{" in (spec or "") for spec in specs):
            raise TemplateLimit("a format field nested in a format spec is not allowed")
    for m in _WIDTHS.finditer(fmt):
        if len(m.group()) > 9 or int(m.group()) > _budget.max_chars:
            raise TemplateLimit(f"a format width of {m.group()} is over the limit of {_budget.max_chars}")


def _text_size(v, depth: int = 0) -> int:
    """About how many characters ``str(v)`` has, counted without building it (stops once over the limit)."""
    if isinstance(v, str):
        return len(v) + 2
    if isinstance(v, (list, tuple, dict)) and depth < 32:
        n = 2
        for x in (v.items() if isinstance(v, dict) else v):
            n += _text_size(x, depth + 1) + 2
            if n > _budget.max_chars:
                break
        return n
    return _sized(v) + 8


def _sized(v) -> int:
    if isinstance(v, (str, bytes, list, tuple)):
        return len(v)
    if isinstance(v, int):
        return v.bit_length() // 3  # about the decimal digits
    return 0


def _binop(op: str, left, right):
    """Every arithmetic operator of a template, bounded before it runs."""
    import operator

    _tick()
    if op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
            _check_size(len(seq) * max(n, 0), "a repeated sequence")
        elif isinstance(left, int) and isinstance(right, int):
            _check_size(_sized(left) + _sized(right), "a product")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _check_size(left.bit_length() * right // 3, "a power")
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_format(left)
        _check_args(right if isinstance(right, tuple) else (right,), {})
    return {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
            "//": operator.floordiv, "**": operator.pow, "%": operator.mod}[op](left, right)


def _guard_iter(iterable):
    """Every ``{% for %}`` loop goes through here: the deadline is checked on each item."""
    for item in iterable:
        _tick()
        yield item


def _concat(*parts) -> str:
    """The ``~`` operator, bounded (a list's text is measured before it is made)."""
    _tick()
    _check_size(sum(len(p) if isinstance(p, str) else _text_size(p) for p in parts), "a joined string")
    out = "".join(map(str, parts))
    _check_size(len(out), "a joined string")
    return out


def _precheck(name: str, value, rest: tuple, kwargs: Mapping):
    """Refuse a filter or ``str`` method whose result would pass the limit (or whose C loop is quadratic) before
    it runs; returns ``value`` (a generator is turned into a list so it can be measured and still used)."""
    _tick()
    _check_args(rest, kwargs)
    if name in ("format", "format_map") and isinstance(value, str):
        _check_format(value, fields=True)
    elif name == "expandtabs" and isinstance(value, str):
        size = rest[0] if rest else kwargs.get("tabsize", 8)
        _check_size(len(value) + value.count("\t") * (size if isinstance(size, int) else 8), "an expanded string")
    elif name in ("string", "pprint", "tojson") and not isinstance(value, str):
        _check_size(_text_size(value), "a value's text")
    elif name == "join":  # the filter: value|join(sep); str.join arrives as (sep, [value])
        value = list(value) if not isinstance(value, (str, list, tuple, dict)) else value
        sep = rest[0] if rest else kwargs.get("d", "")
        _check_size(sum(_sized(x) if isinstance(x, str) else 8 for x in value) + len(str(sep)) * len(value),
                    "a joined string")
    elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
        old, new = str(rest[0]), str(rest[1])
        n = value.count(old) if old else len(value) + 1
        _check_size(len(value) + n * len(new), "a replaced string")
    elif name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        _check_size(len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))),
                    "an indented string")
    elif name == "sum":
        value = list(value) if not isinstance(value, (list, tuple)) else value
        start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
        if isinstance(start, (str, list, tuple)) or any(isinstance(x, (str, list, tuple)) for x in value[:1]):
            raise TemplateLimit("sum over sequences is not allowed (its cost grows with the square of the size)")
    return value


def _guard_filter(fn: Callable, name: str) -> Callable:
    """The filter registered as ``name`` (``string`` is markupsafe's ``soft_str``), bounded."""
    from jinja2.utils import _PassArg

    skip = 0 if _PassArg.from_obj(fn) is None else 1  # the environment or context comes first

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if len(args) > skip:
            value = _precheck(name, args[skip], args[skip + 1:], kwargs)
            args = (*args[:skip], value, *args[skip + 1:])
        out = fn(*args, **kwargs)
        if isinstance(out, (str, list)):
            _check_size(len(out), "a filter's result")
        return out

    return guarded


def _raise(msg: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


def _tojson(value, indent=None, ensure_ascii=False, **_):
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
        raise TemplateLimit(f"tojson indent {indent!r} is not an integer from 0 to 16")
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _guards_extension():
    from jinja2.ext import Extension

    class Guards(Extension):
        """Holds the guards the compiled template calls (no tags of its own)."""

        iter = staticmethod(_guard_iter)
        concat = staticmethod(_concat)

    return Guards


@lru_cache(maxsize=1)
def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("+", "-", "*", "/", "//", "**", "%"))

        def call_binop(self, context, operator, left, right):
            return _binop(operator, left, right)

        def call(self, context, obj, /, *args, **kwargs):
            owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
            if isinstance(owner, str) and name == "join" and args:
                args = (_precheck("join", args[0], (owner,), {}), *args[1:])
            elif isinstance(owner, str):
                _precheck(name, owner, args, kwargs)
            else:
                _tick()
                _check_args(args, kwargs)
            out = super().call(context, obj, *args, **kwargs)
            if isinstance(out, (str, list)):
                _check_size(len(out), "a call's result")
            return out

        def getitem(self, obj, argument):
            _tick()
            if isinstance(obj, str) and argument in ("format", "format_map"):
                _check_format(obj, fields=True)
            return super().getitem(obj, argument)

        def getattr(self, obj, attribute):
            _tick()
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_format(obj, fields=True)  # the sandbox wraps str.format: the call hook no longer sees it
            return super().getattr(obj, attribute)

    env = Env(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    env.filters = {k: _guard_filter(f, k) for k, f in env.filters.items()}
    # reached as environment.extensions[...].<name> from the compiled code: no template can rebind it
    guards = _guards_extension()
    env.add_extension(guards)
    env.ondevice_guards = guards.identifier
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template with every loop's iterable and every ``~`` routed through the guards above."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def guard(name: str, args: list, lineno: int):
        return nodes.Call(nodes.ExtensionAttribute(env.ondevice_guards, name, lineno=lineno), args, [], None, None,
                          lineno=lineno)

    class Guards(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = guard("iter", [node.iter], node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return guard("concat", list(node.nodes), node.lineno)

    env = _environment()
    tree = Guards().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise InvalidArgument("messages is empty; give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidArgument(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise InvalidArgument(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool")
        # OpenAI's "developer" messages are system messages to a chat template (as llama-server reads them)
        out.append(dict(m, role="system" if m["role"] == "developer" else m["role"], content=message_text(m, i)))
    return out


def message_text(m: Message, i: int) -> str:
    """A message's content as text: a string, none, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    content = m.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "text" and not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content has a text part without a string 'text'; give "
                                      f"{{'type': 'text', 'text': '...'}}")
            if kind == "refusal" and m.get("role") == "assistant" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])  # an earlier reply's refusal (OpenAI's shape): its text is history
                continue
            if kind != "text":
                raise InvalidArgument(f"messages[{i}].content has a {kind!r} part; text parts only "
                                      f"({{'type': 'text', 'text': ...}}): this is a text model")
            texts.append(part["text"])
        return "\n".join(texts)  # as llama-server joins them
    raise InvalidArgument(f"messages[{i}].content is {content!r}; give a string or a list of text parts")


def calls_as_text(messages: Sequence[Message]) -> list[Message]:
    """For a template that does not render ``tool_calls``: each assistant message's calls appended to its
    content as the JSON it was asked to write (one ``{"name", "arguments"}`` object, or an array of them)."""
    out = []
    for m in messages:
        calls = [c.get("function", c) for c in m.get("tool_calls") or ()]
        if calls:
            calls = [{"name": c.get("name"), "arguments": c.get("arguments")} for c in calls]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m.get("content") or "") + json.dumps(calls[0] if len(calls) == 1 else calls)
        out.append(m)
    return out


def render(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, tools: list | None = None, n_ctx: int = 0,
           timeout: float = RENDER_TIMEOUT_S, **extra) -> str:
    """Render ``messages`` with a GGUF chat template (Jinja, sandboxed, bounded in time and output size).

    ``n_ctx`` (the context in tokens) sets the output limit; any failure of the template, its limits
    included, is an :class:`InvalidArgument` naming the template.
    """
    from jinja2.exceptions import TemplateError

    messages = validate_messages(messages)
    prefill = ""
    last = messages[-1]
    if add_generation_prompt and len(messages) > 1 and last["role"] == "assistant" and not last.get("tool_calls"):
        # a reply the caller began (an assistant prefill): continued, not closed as a turn and answered anew,
        # as llama-server, Ollama and Anthropic's API do
        prefill, messages = last["content"], messages[:-1]
    if "tool_calls" not in template:
        messages = calls_as_text(messages)
    limit = max(MIN_OUTPUT_CHARS, CHARS_PER_CTX_TOKEN * n_ctx)
    _budget.deadline, _budget.max_chars = time.monotonic() + timeout, limit
    try:
        tpl = _compile(template)
        parts, n = [], 0
        for chunk in tpl.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                  add_generation_prompt=add_generation_prompt, tools=tools, **extra):
            n += len(chunk)
            if n > limit:
                raise TemplateLimit(f"its output passed {limit} characters ({CHARS_PER_CTX_TOKEN} per token of "
                                    f"the {n_ctx}-token context)")
            parts.append(chunk)
            _tick()
        return "".join(parts) + prefill
    except TemplateLimit as e:
        raise InvalidArgument(f"the chat template was stopped: {e}; {_FIX}") from None
    except TemplateError as e:
        raise InvalidArgument(f"the chat template failed: {e}; {_FIX}") from e
    except (RecursionError, MemoryError, ArithmeticError, ValueError, TypeError, LookupError, AttributeError) as e:
        raise InvalidArgument(f"the chat template failed ({type(e).__name__}: {str(e)[:200]}); {_FIX}") from None
    finally:
        _budget.deadline = float("inf")


# a plain transcript's turns, one a line (validate_messages allows these roles only)
PLAIN_LABELS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}
# a base model goes on past its reply with the next turn ("\nUser: ..."): any turn's label on a new line ends
# the reply, as llama.cpp's templates carry their end of turn and Ollama's plain templates a `stop` parameter
PLAIN_STOPS = tuple(f"\n{label.rstrip()}" for label in PLAIN_LABELS.values())


class PromptTokens(list):
    """A prompt's token ids and the stop strings that end a reply to it, as its rendering gives them (a plain
    transcript's next turn, :data:`PLAIN_STOPS`); generation adds them to the request's own
    (:func:`ondevice.engine.stops.with_prompt_stops`)."""

    def __init__(self, tokens: Iterable[int] = (), stops: Sequence[str] = ()):
        super().__init__(tokens)
        self.stops = tuple(stops)


def plain_prompt(messages: Sequence[Message]) -> tuple[str, tuple[str, ...]]:
    """Fallback for base models (no template): the conversation as plain text, ready to continue, and the stop
    strings that end the reply there (the next turn's label, :data:`PLAIN_STOPS`)."""
    parts = []
    for m in calls_as_text(validate_messages(messages)):
        parts.append(f"{PLAIN_LABELS[m['role']]}{m['content']}")
    if messages and messages[-1].get("role") != "assistant":
        parts.append(PLAIN_LABELS["assistant"].rstrip())
    return "\n".join(parts), PLAIN_STOPS


# -- tokenizing a rendered chat: the template's markers are special, message text never is -----------------

def _protect(value, pattern: re.Pattern, literals: dict[str, str], mark: Callable[[int], str]):
    """``value`` with the control-token text inside its strings swapped for placeholders (``literals`` maps
    each placeholder back to its text)."""
    if isinstance(value, str):
        def swap(m: re.Match) -> str:
            key = next((k for k, v in literals.items() if v == m.group()), None) or mark(len(literals))
            literals[key] = m.group()
            return key

        return pattern.sub(swap, value)
    if isinstance(value, dict):
        return {k: (v if k == "role" else _protect(v, pattern, literals, mark)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protect(v, pattern, literals, mark) for v in value]
    return value


@lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def encode(template: str | None, messages: Sequence[Message], *, specials: Mapping[str, int],
           tokenize: Callable[[str, bool], list[int]], bos_token: str = "", eos_token: str = "",
           tools: list | None = None, n_ctx: int = 0, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a conversation: rendered with ``template`` (or as plain text when None: a
    :class:`PromptTokens` carrying the transcript's stops), with only the template's own control tokens special.

    Args:
        specials: control-token text -> id (the tokens a tokenizer matches only when parsing specials).
        tokenize: ``tokenize(text, add_bos)``, the model's tokenizer with special parsing off.
    """
    messages = validate_messages(messages)
    if template is None:  # a base model: the transcript is text, BOS added by the tokenizer; its stops with it
        text, stops = plain_prompt(messages)
        return PromptTokens(tokenize(text, True), stops)
    if not specials:
        return tokenize(render(template, messages, bos_token=bos_token, eos_token=eos_token, tools=tools,
                               n_ctx=n_ctx, add_generation_prompt=add_generation_prompt), False)
    pattern = _specials_pattern(tuple(specials))
    literals: dict[str, str] = {}
    nonce = secrets.randbelow(10**12)
    # private-use characters around digits: no tokenizer merges them, and case or whitespace filters keep them
    def mark(i: int) -> str:
        return f"\U000F0000{nonce}\U000F0001{i}\U000F0002"

    safe_messages = _protect(messages, pattern, literals, mark)
    safe_tools = _protect(tools, pattern, literals, mark) if tools else tools
    text = render(template, safe_messages, bos_token=bos_token, eos_token=eos_token, tools=safe_tools,
                  n_ctx=n_ctx, add_generation_prompt=add_generation_prompt)
    restore = re.compile("|".join(map(re.escape, literals))) if literals else None
    tokens: list[int] = []
    pos = 0
    for m in pattern.finditer(text):  # the template's markers (contents hold none: they are placeholders)
        if m.start() > pos:
            piece = text[pos:m.start()]
            tokens += tokenize(restore.sub(lambda x: literals[x.group()], piece) if restore else piece, False)
        tokens.append(specials[m.group()])
        pos = m.end()
    if pos < len(text):
        piece = text[pos:]
        tokens += tokenize(restore.sub(lambda x: literals[x.group()], piece) if restore else piece, False)
    return tokens
