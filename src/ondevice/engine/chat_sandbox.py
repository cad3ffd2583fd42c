"""The Jinja sandbox chat templates render in (:func:`ondevice.engine.chat.render`), and its limits.

A chat template is code from a model file: the sandbox stops it reaching Python internals, and the limits
here stop it exhausting the process. Every loop iteration, call, filter and arithmetic operation checks a
deadline. Every operation that builds a value (repetition, powers, concatenation, ``%`` formatting,
``str.format``, joins, filters, ``str`` methods, printing a value, a block's captured output) has the size of
its result bounded before it is built, or (``str.format``) field by field as it is built, so no single step
builds more than a few times the output limit or runs long in C code the deadline cannot interrupt; and all
the values one render builds together stay under :data:`BUILT_FACTOR` times that limit, so a loop that keeps
what it builds runs out of budget, not of memory. A template over a limit raises :class:`TemplateLimit`; a
failure keeps its original traceback, not jinja2's rewritten one (whose frames would keep the template's
variables alive until the garbage collector's next full pass).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache

RENDER_TIMEOUT_S = 5.0  # a real template renders in milliseconds
MIN_OUTPUT_CHARS = 1 << 20  # the output limit is max(this, CHARS_PER_CTX_TOKEN * context tokens)
CHARS_PER_CTX_TOKEN = 32  # far above any tokenizer's characters per token
BUILT_FACTOR = 64  # all the strings and lists one render builds: at most this many times its output limit
_FLOAT_CHARS = 330  # the most characters a float prints as ('%f' of 1e308: 309 digits, '.', 6 decimals)


class _Budget(threading.local):
    deadline = float("inf")
    timeout = RENDER_TIMEOUT_S
    max_chars = MIN_OUTPUT_CHARS
    built = 0  # characters (or list items) built by this render so far


_budget = _Budget()


class TemplateLimit(Exception):
    """A chat template went over its time or size limit (raised inside the render, turned into an error)."""


@contextmanager
def limits(timeout: float, max_chars: int):
    """The limits of one render on this thread: ``timeout`` seconds, values of at most ``max_chars``."""
    _budget.deadline, _budget.timeout = time.monotonic() + timeout, timeout
    _budget.max_chars, _budget.built = max_chars, 0
    try:
        yield
    finally:
        _budget.deadline, _budget.built = float("inf"), 0


def _tick() -> None:
    if time.monotonic() > _budget.deadline:
        raise TemplateLimit(f"it ran longer than {_budget.timeout:g} s")


def _check_size(n: int, what: str) -> None:
    if n > _budget.max_chars:
        raise TemplateLimit(f"{what} would hold {n} items, over the limit of {_budget.max_chars}")


def _built(out, what: str):
    """``out``, just built: within the size limit, and counted against the render's total."""
    if isinstance(out, (str, list, tuple)):
        _check_size(len(out), what)
        _budget.built += len(out)
        total = BUILT_FACTOR * _budget.max_chars
        if _budget.built > total:
            raise TemplateLimit(f"the values it built add up to over {total} characters ({BUILT_FACTOR} times "
                                f"its output limit): a loop keeps building large strings or lists")
    return out


def _check_args(args: Iterable, kwargs: Mapping) -> None:
    """Integer arguments (widths, indents, counts) above the output limit can only build a huge value."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and abs(v) > _budget.max_chars:
            raise TemplateLimit(f"an argument of {v} is over the limit of {_budget.max_chars}")


_WIDTHS = re.compile(r"\d+")


def _check_format(fmt: str, fields: bool = False) -> int:
    """A width or precision in a format string (``%9999999s``, ``{:>9999999}``) over the limit, or ``*``;
    with ``fields`` (``str.format``), a field nested in a spec (``{0:{1}}``: a width from an argument).
    Returns the sum of the numbers in ``fmt`` (at least the padding its widths and precisions add)."""
    if fields:
        import string

        try:
            specs = [spec for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
        except ValueError:
            specs = []  # str.format will raise on it itself
        if any("{" in (spec or "") for spec in specs):
            raise TemplateLimit("a format field nested in a format spec is not allowed")
    total = 0
    for m in _WIDTHS.finditer(fmt):
        if len(m.group()) > 9 or int(m.group()) > _budget.max_chars:
            raise TemplateLimit(f"a format width of {m.group()} is over the limit of {_budget.max_chars}")
        total += int(m.group())
    return total


def _items(v) -> Iterable | None:
    """What ``str(v)`` shows of a container (None for a scalar)."""
    from jinja2.utils import Namespace

    if isinstance(v, Mapping):
        return (x for kv in v.items() for x in kv)
    if isinstance(v, Namespace):
        return _items(object.__getattribute__(v, "_Namespace__attrs"))
    if isinstance(v, (list, tuple, set, frozenset)) or type(v).__name__ in ("dict_keys", "dict_values"):
        return v
    if type(v).__name__ == "dict_items":
        return (x for kv in v for x in kv)
    return None


def _text_size(v) -> int:
    """About how many characters ``str(v)`` has, counted without building it (stops once over the limit;
    iterative, so a deep or shared structure is measured too)."""
    n, todo, limit = 0, [v], _budget.max_chars
    while todo and n <= limit:
        x = todo.pop()
        if isinstance(x, str):
            n += len(x) + 2
        elif isinstance(x, (int, float)) or x is None:
            n += _sized(x) + 8
        elif (inner := _items(x)) is not None:
            n += 2
            for y in inner:
                n += 2
                todo.append(y)
                if n > limit or len(todo) > limit:
                    break
        else:
            n += _sized(x) + 8
    return n


def _sized(v) -> int:
    if isinstance(v, (str, bytes, list, tuple)):
        return len(v)
    if isinstance(v, int):
        return v.bit_length() // 3  # about the decimal digits
    return 0


def _arg_size(v) -> int:
    """The most characters a formatted argument can take (a float: its fixed-point digits)."""
    return _FLOAT_CHARS if isinstance(v, float) else _text_size(v)


_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*\d*(?:\.\d*)?[hlL]?(.)")


def _percent_size(fmt: str, args) -> int:
    """An upper bound of ``len(fmt % args)``, counted before it is built (``%r``/``%a``: escapes make an
    argument up to 10 times longer)."""
    n = len(fmt) + _check_format(fmt)
    specs = [(key, conv) for key, conv in _PERCENT.findall(fmt) if conv != "%"]
    if any(conv == "*" for _, conv in specs):
        raise TemplateLimit("'*' widths in % formats are not allowed")
    if isinstance(args, tuple):
        n += sum(_arg_size(a) for a in args)
    elif isinstance(args, Mapping) and any(key for key, _ in specs):
        n += sum(_arg_size(args.get(key)) for key, _ in specs)  # a key may be used many times
    else:
        n += _arg_size(args)
    return n * (10 if any(conv in "ra" for _, conv in specs) else 1)


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
        _check_size(_percent_size(left, right), "a %-formatted string")
    return _built({"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
                   "//": operator.floordiv, "**": operator.pow, "%": operator.mod}[op](left, right), "a result")


def _guard_iter(iterable):
    """Every ``{% for %}`` loop goes through here: the deadline is checked on each item."""
    for item in iterable:
        _tick()
        yield item


def _concat(*parts) -> str:
    """The ``~`` operator, bounded (a list's text is measured before it is made)."""
    _tick()
    _check_size(sum(len(p) if isinstance(p, str) else _text_size(p) for p in parts), "a joined string")
    return _built("".join(map(str, parts)), "a joined string")


def _join_output(parts) -> str:
    """The text of a captured block (``{% set x %}``, a macro, ``{% filter %}``, a call block), measured before
    it is joined: its output is not the render's, so the output count never sees it."""
    parts = parts if isinstance(parts, list) else list(parts)
    _tick()
    _check_size(sum(map(len, parts)), "a block's output")
    return _built("".join(parts), "a block's output")


def _finalize(value):
    """Each ``{{ value }}`` printed: a list's or an object's text is measured before it is made."""
    if not isinstance(value, str):
        _tick()
        _check_size(_text_size(value), "a printed value's text")
    return value


def _precheck(name: str, value, rest: tuple, kwargs: Mapping):
    """Refuse a filter or ``str`` method whose result would pass the limit (or whose C loop is quadratic) before
    it runs; returns ``value`` (a generator is turned into a list so it can be measured and still used)."""
    _tick()
    _check_args(rest, kwargs)
    if name == "format" and isinstance(value, str):  # the filter: value|format(...) is value % args
        _check_size(_percent_size(value, kwargs or rest), "a %-formatted string")
    elif name == "expandtabs" and isinstance(value, str):
        size = rest[0] if rest else kwargs.get("tabsize", 8)
        _check_size(len(value) + value.count("\t") * (size if isinstance(size, int) else 8), "an expanded string")
    elif name in ("string", "pprint", "tojson") and not isinstance(value, str):
        _check_size(_text_size(value), "a value's text")
    elif name == "join":  # the filter: value|join(sep); str.join arrives as (sep, [value])
        value = list(value) if not isinstance(value, (str, list, tuple, dict)) else value
        sep = rest[0] if rest else kwargs.get("d", "")
        _check_size(sum(len(x) if isinstance(x, str) else _text_size(x) for x in value)
                    + len(str(sep)) * len(value), "a joined string")
    elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
        old, new = str(rest[0]), str(rest[1])
        n = value.count(old) if old else len(value) + 1
        _check_size(len(value) + n * len(new), "a replaced string")
    elif name == "translate" and isinstance(value, str) and rest:
        table = rest[0]
        out = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
        _check_size(len(value) * max([len(x) for x in out if isinstance(x, str)] + [1]), "a translated string")
    elif name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        _check_size(len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))),
                    "an indented string")
    elif name == "wordwrap" and isinstance(value, str):
        _check_wordwrap(value, rest, kwargs)
    elif name == "sum":
        value = list(value) if not isinstance(value, (list, tuple)) else value
        start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
        if isinstance(start, (str, list, tuple)) or any(isinstance(x, (str, list, tuple)) for x in value[:1]):
            raise TemplateLimit("sum over sequences is not allowed (its cost grows with the square of the size)")
    return value


def _check_wordwrap(value: str, rest: tuple, kwargs: Mapping) -> None:
    """``wordwrap``: a long wrap string on every line, or a long word cut at a small width (Python's textwrap
    takes time that grows with the square of the word's length)."""
    width = rest[0] if rest else kwargs.get("width", 79)
    width = width if isinstance(width, int) and width > 0 else 1
    wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring")
    lines = len(value) // width + value.count("\n") + 1
    _check_size(len(value) + lines * len(wrap if isinstance(wrap, str) else "\n"), "a wrapped string")
    if not (rest[1] if len(rest) > 1 else kwargs.get("break_long_words", True)):
        return  # long words kept whole: linear
    longest = max(map(len, value.split()), default=0)
    if longest > width and longest * longest // width > _budget.max_chars * 16384:
        raise TemplateLimit(f"wordwrap({width}) of a {longest}-character word takes too long; wrap at a larger width")


def _guard_filter(fn: Callable, name: str) -> Callable:
    """The filter registered as ``name`` (``string`` is markupsafe's ``soft_str``), bounded."""
    from jinja2.utils import _PassArg

    skip = 0 if _PassArg.from_obj(fn) is None else 1  # the environment or context comes first

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if len(args) > skip:
            value = _precheck(name, args[skip], args[skip + 1:], kwargs)
            args = (*args[:skip], value, *args[skip + 1:])
        else:
            _tick()
        return _built(fn(*args, **kwargs), "a filter's result")

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


def _bounded_formatters():
    """jinja2's sandboxed ``str.format`` formatters, bounded field by field: each field's text measured before
    it is formatted, the string so far after."""
    from jinja2.sandbox import SandboxedEscapeFormatter, SandboxedFormatter

    class Bounded:
        size = 0

        def vformat(self, format_string, args, kwargs):
            self.size = len(format_string) + _check_format(format_string, fields=True)
            return _built(super().vformat(format_string, args, kwargs), "a formatted string")

        def format_field(self, value, format_spec):
            _tick()
            _check_size(self.size + _arg_size(value), "a formatted string")
            out = super().format_field(value, format_spec)
            self.size += len(out)
            _check_size(self.size, "a formatted string")
            return out

    class Plain(Bounded, SandboxedFormatter):
        pass

    class Escaping(Bounded, SandboxedEscapeFormatter):
        pass

    return Plain, Escaping


@lru_cache(maxsize=1)
def environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from markupsafe import Markup

    plain, escaping = _bounded_formatters()

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("+", "-", "*", "/", "//", "**", "%"))
        concat = staticmethod(_join_output)

        def call_binop(self, context, operator, left, right):
            return _binop(operator, left, right)

        def is_safe_attribute(self, obj, attr, value):
            # bytes would need every bound here twice over, and no chat template has a use for them
            return not (isinstance(obj, str) and attr == "encode") and super().is_safe_attribute(obj, attr, value)

        def wrap_str_format(self, value):
            """jinja2's own (``str.format`` and ``format_map``, however reached), with a bounded formatter."""
            if not isinstance(getattr(value, "__self__", None), str) or super().wrap_str_format(value) is None:
                return None
            f_self, is_map = value.__self__, value.__name__ == "format_map"
            fmt = escaping(self, escape=f_self.escape) if isinstance(f_self, Markup) else plain(self)

            @functools.wraps(value)
            def wrapper(*args, **kwargs):
                if is_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument and no keyword arguments")
                    args, kwargs = (), args[0]
                return type(f_self)(fmt.vformat(f_self, args, kwargs))

            return wrapper

        def call(self, context, obj, /, *args, **kwargs):
            owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
            if isinstance(owner, str) and name == "join" and args:
                args = (_precheck("join", args[0], (owner,), {}), *args[1:])
            elif isinstance(owner, str):
                _precheck(name, owner, args, kwargs)
            else:
                _tick()
                _check_args(args, kwargs)
            return _built(super().call(context, obj, *args, **kwargs), "a call's result")

        def handle_exception(self, source=None):
            import sys

            from jinja2.exceptions import TemplateSyntaxError

            if isinstance(sys.exc_info()[1], TemplateSyntaxError):
                return super().handle_exception(source)
            # as raised: jinja2's rewritten traceback copies the template's variables into new frames, in a cycle
            # that keeps what the template built until the garbage collector's next full pass
            raise  # noqa: PLE0704 -- called from jinja2's except block

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

    env = Env(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, finalize=_finalize)
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
def compile_template(source: str):
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

    env = environment()
    tree = Guards().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)
