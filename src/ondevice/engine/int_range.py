"""GBNF for the integers in a range: JSON schema's ``minimum``/``maximum`` on an ``integer``, as llama-server
enforces them (llama-cpp-python's converter drops them). A port of ``build_min_max_int`` in llama.cpp's
``common/json-schema-to-grammar.cpp`` (MIT licence, (c) the ggml authors), the same rules byte for byte except
where llama.cpp's let a number out of range or not JSON through: a minimum with no maximum (:func:`_at_least`)
and a negative maximum with no minimum (llama.cpp allowed ``-05``). Python's integers stand in for int64,
``None`` for its "unbounded" (INT64_MIN / INT64_MAX).
"""

from __future__ import annotations

import math


def int_bounds(schema: dict) -> tuple[int | None, int | None]:
    """The inclusive (minimum, maximum) of an integer schema, ``None`` where unbounded, as llama.cpp's
    ``build_integer`` (common/json-schema.cpp) reads them: ``minimum`` wins over ``exclusiveMinimum`` (and
    ``maximum`` over ``exclusiveMaximum``); an exclusive bound is the next integer inside; a fractional bound
    rounds inwards. ``ValueError`` for a bound that is not a number."""

    def bound(key: str, up: bool) -> int:
        v = schema[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"{key} must be a number")
        return v if isinstance(v, int) else math.ceil(v) if up else math.floor(v)

    lo = bound("minimum", True) if "minimum" in schema else \
        bound("exclusiveMinimum", False) + 1 if "exclusiveMinimum" in schema else None
    hi = bound("maximum", False) if "maximum" in schema else \
        bound("exclusiveMaximum", True) - 1 if "exclusiveMaximum" in schema else None
    return lo, hi


def min_max_int(lo: int | None, hi: int | None, decimals_left: int = 16, top_level: bool = True) -> str:
    """A GBNF body (no parentheses around it) for the integers from ``lo`` to ``hi``, both inclusive, ``None``
    for no bound; as llama.cpp's, numbers with at most ``decimals_left`` digits where one side is open."""
    out: list[str] = []
    _build(lo, hi, out, decimals_left, top_level)
    return "".join(out)


def _digit_range(out: list[str], a: str, b: str) -> None:
    out.append(f"[{a}]" if a == b else f"[{a}-{b}]")


def _more_digits(out: list[str], lo: int, hi: int | None) -> None:
    """``[0-9]`` from ``lo`` to ``hi`` times (``None``: no upper limit). ``ValueError`` where ``lo > hi``:
    llama.cpp writes that (broken GBNF) for a one-sided bound too long for its 16 digits (``minimum: 1e16``)."""
    if hi is not None and lo > hi:
        raise ValueError("a bound of over 15 digits needs the other bound too (llama.cpp's open ranges "
                         "allow numbers of up to 16 digits)")
    out.append("[0-9]")
    if lo == hi == 1:
        return
    out.append("{" + str(lo))
    if hi != lo:
        out.append("," + ("" if hi is None else str(hi)))
    out.append("}")


def _uniform_range(out: list[str], lo: str, hi: str) -> None:
    """The numbers from ``lo`` to ``hi``, digit strings of the same length."""
    i = 0
    while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
        i += 1
    if i > 0:
        out.append(f'"{lo[:i]}"')
    if i < len(lo) and i < len(hi):
        if i > 0:
            out.append(" ")
        sub_len = len(lo) - i - 1
        if sub_len > 0:
            lo_sub, hi_sub = lo[i + 1:], hi[i + 1:]
            zeros, nines = "0" * sub_len, "9" * sub_len
            to_reached = False
            out.append("(")
            if lo_sub == zeros:
                _digit_range(out, lo[i], chr(ord(hi[i]) - 1))
                out.append(" ")
                _more_digits(out, sub_len, sub_len)
            else:
                out.append(f"[{lo[i]}] (")
                _uniform_range(out, lo_sub, nines)
                out.append(")")
                if ord(lo[i]) < ord(hi[i]) - 1:
                    out.append(" | ")
                    if hi_sub == nines:
                        _digit_range(out, chr(ord(lo[i]) + 1), hi[i])
                        to_reached = True
                    else:
                        _digit_range(out, chr(ord(lo[i]) + 1), chr(ord(hi[i]) - 1))
                    out.append(" ")
                    _more_digits(out, sub_len, sub_len)
            if not to_reached:
                out.append(" | ")
                _digit_range(out, hi[i], hi[i])
                out.append(" ")
                _uniform_range(out, zeros, hi_sub)
            out.append(")")
        else:
            out.append(f"[{lo[i]}-{hi[i]}]")


def _build(lo: int | None, hi: int | None, out: list[str], decimals_left: int, top_level: bool) -> None:
    if lo is not None and hi is not None:
        if lo < 0 and hi < 0:
            out.append('"-" (')
            _build(-hi, -lo, out, decimals_left, True)
            out.append(")")
            return
        if lo < 0:
            out.append('"-" (')
            _build(0, -lo, out, decimals_left, True)
            out.append(") | ")
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for digits in range(len(lo_s), len(hi_s)):
            _uniform_range(out, lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        _uniform_range(out, lo_s, hi_s)
        return

    if lo is not None:
        if lo < 0:
            out.append('"-" (')
            _build(None, -lo, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            _more_digits(out, 0, decimals_left - 1)
        else:
            _at_least(str(lo), out, decimals_left, top_level)
        return

    less_decimals = max(decimals_left - 1, 1)
    if hi is not None:
        if hi >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                _more_digits(out, 0, less_decimals)
                out.append(" | ")
            _build(0, hi, out, decimals_left, True)
        else:
            out.append('"-" (')
            _build(-hi, None, out, decimals_left, True)  # llama.cpp's False let in "-05" (not JSON)
            out.append(")")
        return

    raise ValueError("At least one of min_value or max_value must be set")


def _at_least(s: str, out: list[str], decimals_left: int, top_level: bool) -> None:
    """The digit strings of ``len(s)`` to ``decimals_left`` digits that are not below ``s``: a longer one, or
    one as long and at least as great. At the top level (a whole number) no leading zero, and at most
    ``decimals_left`` digits; inside, a number's last digits, zeros first included. llama.cpp recurses on
    ``int(s[1:])``, which loses ``s``'s leading zeros (its ``minimum: 105`` took 15 and 100), and inside it
    never starts a longer string with 0 after a 1 (its ``minimum: 1150`` refused 10000): here ``s`` stays a
    string; the rules it writes are llama.cpp's wherever llama.cpp's were right."""
    less_decimals = max(decimals_left - 1, 1)
    c, start = s[0], "1" if top_level else "0"
    if len(s) == 1:
        if c == "0":
            if top_level:
                out.append("[0] | [1-9] ")
                _more_digits(out, 0, less_decimals)
            else:
                _more_digits(out, 1, decimals_left)
            return
        if c > start:
            _digit_range(out, start, chr(ord(c) - 1))
            out.append(" ")
            _more_digits(out, 1, less_decimals)
            out.append(" | ")
        _digit_range(out, c, "9")
        out.append(" ")
        _more_digits(out, 0, less_decimals)
        return
    if c > start:
        _digit_range(out, start, chr(ord(c) - 1))
        out.append(" ")
        _more_digits(out, len(s), less_decimals)
        out.append(" | ")
    _digit_range(out, c, c)
    out.append(" (")
    _at_least(s[1:], out, less_decimals, False)
    out.append(")")
    if c < "9":
        out.append(" | ")
        _digit_range(out, chr(ord(c) + 1), "9")
        out.append(" ")
        _more_digits(out, len(s) - 1, less_decimals)
