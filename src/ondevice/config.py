"""Typed verb configs: one pydantic-settings declaration gives the flag, the env var, the validation and the help.

Modelled on llama-cpp-python's ``server/settings.py``; ``ServeSettings``, ``BenchConfig`` and ``EvalConfig``
all go through here, so the CLI and the Python API take the same fields with the same checks.
Precedence: command-line flag (or API keyword) > environment (``cls.model_config["env_prefix"]``) > default.

List fields (``CommaList[int]``) take comma lists and repeat (``-t 1,2 -t 4``), as llama-bench's flags do
(``IntList[int]`` also its ranges, ``-t 1-4``, ``-b 128-512*2``);
``AnyList[str]`` repeats without splitting (values that hold commas themselves).
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, NoDecode

from . import fields as checked
from .errors import InvalidArgument

T = TypeVar("T")


_RANGE = re.compile(r"(\d+)-(\d+)(?:([+*])(\d+))?")
MAX_RANGE = 256


def int_range(item: str) -> list[str]:
    """llama-bench's ranges, ``first-last``, ``first-last+step`` and ``first-last*mult`` (``16-64+16`` is 16,
    32, 48, 64), as the numbers' strings; any other item is returned as it is.

    Raises:
        ValueError: a range that gives no number, never ends or gives more than ``MAX_RANGE``.
    """
    m = _RANGE.fullmatch(item.strip())
    if not m:
        return [item]
    first, last, op, step = int(m[1]), int(m[2]), m[3] or "+", int(m[4] or 1)
    if last < first:
        raise ValueError(f"the range {item} is empty: its last number is below its first (write {last}-{first})")
    if (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
        raise ValueError(f"the range {item} never ends: a step must be +1 or more, a multiplier *2 or more from 1 "
                         f"up (e.g. 16-64+16, 1-8*2)")
    out, i = [], first
    while i <= last:
        out.append(str(i))
        if len(out) > MAX_RANGE:
            raise ValueError(f"the range {item} gives over {MAX_RANGE} values; take a larger step")
        i = i + step if op == "+" else i * step
    return out


def _listed(split: bool, ranges: bool = False):
    def check(v: Any) -> Any:
        if v is None or isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            v = [] if v is None else [v]  # a scalar from the API (threads=2) or one env value
        out: list = []
        for x in v:
            items = [s.strip() for s in x.split(",") if s.strip()] if split and isinstance(x, str) else [x]
            out += [n for s in items for n in (int_range(s) if isinstance(s, str) else [s])] if ranges else items
        return out

    return BeforeValidator(check)


CommaList = Annotated[list[T], NoDecode, _listed(True)]
IntList = Annotated[list[T], NoDecode, _listed(True, ranges=True)]  # also llama-bench's ranges (int_range)
AnyList = Annotated[list[T], NoDecode, _listed(False)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[BaseSettings],
                         flags: Mapping[str, Sequence[str]] | None = None, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` (``flags`` names a field's flags when not ``--field-name``); absent flags
    fall through to the env var, then the default. A field whose ``json_schema_extra`` has ``const`` may be
    given bare (``--wait-idle`` means ``--wait-idle 120``)."""
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        env = f"{prefix}{name.upper()}"
        default = field.default if field.default_factory is None else field.default_factory()
        help_ = f"{field.description} (default: {default}; env {env})".replace("%", "%%")
        names = list((flags or {}).get(name) or [flag(name)])
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.annotation is bool:
            parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
        elif _is_list(field.annotation):
            parser.add_argument(*names, dest=name, action="append", default=argparse.SUPPRESS,
                                metavar=name.upper(), help=help_)
        elif "const" in extra:
            parser.add_argument(*names, dest=name, nargs="?", const=extra["const"], default=argparse.SUPPRESS,
                                metavar=name.upper(), help=help_)
        else:
            parser.add_argument(*names, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_)


def config_from(cls: type[BaseSettings], args: argparse.Namespace | None = None, *, verb: str, what: str,
                flags: Mapping[str, Sequence[str]] | None = None, **over: Any):
    """A ``cls`` from the flags given in ``args`` and ``over`` (API keywords), over env vars; a bad value is an
    InvalidArgument naming its flag and env var, and an unknown keyword one naming the fields there are."""
    fields = cls.model_fields
    if err := checked.unknown(cls.__name__, over, fields):
        raise err
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if k in fields}
    given.update(over)
    prefix = cls.model_config.get("env_prefix", "")
    try:
        return cls(**given)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            if loc in fields:
                name = (flags or {}).get(loc, [flag(loc)])[-1]
                msg = err["msg"].removeprefix("Value error, ")
                msgs.append(f"{name} / {prefix}{loc.upper()}: {msg} (got {err.get('input')!r})")
            else:
                msgs.append(err["msg"].removeprefix("Value error, "))
        raise InvalidArgument(f"invalid {what}: " + "; ".join(msgs) + f"; see `ondevice {verb} --help`") from e
