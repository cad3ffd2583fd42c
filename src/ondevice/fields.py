"""Keyword arguments of the Python API checked against the dataclass they fill: a wrong name, a wrong type or a
bare string where a list belongs is an :class:`InvalidArgument` naming the field, never a ``TypeError`` from
deep inside (``'<' not supported between 'str' and 'int'``) or a string split into its characters."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from functools import cache

from .errors import InvalidArgument, UnknownArgument

# names users bring from llama-cpp-python, the OpenAI SDK and mlx-lm, and ours
ALIASES = {"temperature": "temp", "max_new_tokens": "max_tokens", "n_predict": "max_tokens",
           "max_completion_tokens": "max_tokens", "stop_sequences": "stop", "ctx": "n_ctx", "n_ctx_size": "n_ctx",
           "ctx_size": "n_ctx", "threads": "n_threads", "model_path": "name", "model": "name", "path": "name"}


def unknown(what: str, given: Iterable[str], known: Iterable[str]) -> UnknownArgument | None:
    """The error for keyword arguments ``given`` that are not in ``known`` (None when all are), with the
    closest known name or the one a user of another library means."""
    known = sorted(known)
    bad = [k for k in given if k not in known]
    if not bad:
        return None
    hints = []
    for k in bad:
        guess = ALIASES.get(k) if ALIASES.get(k) in known else next(iter(difflib.get_close_matches(k, known, 1)), None)
        hints.append(f"{k!r}" + (f" (did you mean {guess!r}?)" if guess else ""))
    return UnknownArgument(f"{what} has no argument {', '.join(hints)}; it takes {', '.join(known)}")


def keywords(what: str):
    """A decorator for a public function or class (its ``__init__``; put it above ``@dataclass``): a keyword
    argument it does not take is an :class:`UnknownArgument` naming the closest one it does (``outptu``:
    ``output``), not Python's bare ``got an unexpected keyword argument``."""
    def wrap(target):
        f = target.__init__ if isinstance(target, type) else target
        params = inspect.signature(f).parameters.values()
        known = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}

        @functools.wraps(f)
        def checked(*args, **kw):
            if not kw.keys() <= known and (err := unknown(what, kw, known)):
                raise err
            return f(*args, **kw)

        if isinstance(target, type):
            target.__init__ = checked
            return target
        return checked
    return wrap


@cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _accepts(tp: object, value: object) -> bool:
    """Whether ``value`` fits the simple annotation ``tp`` (int, float, str, bool, None and unions of them;
    anything else is not checked here). An int is a float; a bool is neither."""
    if tp is typing.Any:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # numpy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(
        getattr(tp, "__name__", ""), str(tp))


def check(obj: object) -> None:
    """Check a frozen dataclass's fields against their annotations, in place: a number where a number belongs,
    a tuple of strings from a list or from one bare string (one item, not its characters)."""
    for f in dataclasses.fields(obj):
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if typing.get_origin(tp) is tuple:
            strings = typing.get_args(tp)[:1] == (str,)
            if isinstance(value, str) and strings:
                value = (value,)
            elif value is None:
                value = ()
            elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):  # a list, a set...
                value = tuple(value)
            elif not isinstance(value, Mapping):  # a dict is the field's own business (logit_bias)
                raise InvalidArgument(f"{f.name}={value!r} must be a list")
            if strings and isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{f.name}={value!r} must be strings")
            object.__setattr__(obj, f.name, value)
            continue
        if not _accepts(tp, value):
            want = _type_name(tp)
            raise InvalidArgument(f"{f.name}={value!r} must be {'an' if want[0] in 'aeiou' else 'a'} {want}")


def progress_sink(progress: object) -> typing.Callable[[str], None]:
    """A verb's ``progress`` argument as a function of one line: None or False say nothing, True prints to
    stderr (as ``bench(progress=True)`` does), a callable gets each line."""
    import sys

    if progress is None or progress is False:
        return lambda line: None
    if progress is True:
        return lambda line: print(line, file=sys.stderr, flush=True)
    if callable(progress):
        return progress
    raise InvalidArgument(f"progress={progress!r} must be True, False or a function of one line of text")


def build(cls: type, value: object, what: str):
    """``value`` as a ``cls`` (a dataclass): itself, the fields in a dict (names checked), or the defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        if err := unknown(what, value, cls.__dataclass_fields__):
            raise err
        return cls(**value)
    raise InvalidArgument(f"{what}={value!r} is not a {cls.__name__}; give a {cls.__name__} or a dict of its fields")


def model_ref(model: object) -> object:
    """A loaded :class:`~ondevice.Model` given where a model name or path goes (``bench``, ``evaluate``, which
    load models of their own): its file."""
    return str(model.path) if hasattr(model, "engine") and hasattr(model, "path") else model
