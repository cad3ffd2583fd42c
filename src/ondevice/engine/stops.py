"""Stop strings in streamed text: the one rule for what is shown, held back or cut; and llama-server's line
limits for code infill (:class:`LineLimits`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import Sampling


def with_prompt_stops(sampling: Sampling, tokens: Sequence[int]) -> Sampling:
    """``sampling`` with the stop strings the prompt ``tokens`` were rendered with added to its own (a plain
    transcript's next turn: :class:`ondevice.engine.chat.PromptTokens`), where Model and the server make a request."""
    extra = tuple(x for x in getattr(tokens, "stops", ()) if x not in sampling.stop)
    return dataclasses.replace(sampling, stop=(*sampling.stop, *extra)) if extra else sampling


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, str | None]:
    """``(shown, held, stop)`` for streamed ``text``: cut before the first stop string (``stop``: the one that
    matched, the first listed of those that start there), or else hold back the longest suffix that may still
    grow into one (``stop`` None). The one stop-string rule."""
    if not stops:
        return text, "", None
    hit, stop = min(((i, k) for k, i in enumerate(text.find(x) for x in stops) if i >= 0), default=(-1, -1))
    if hit >= 0:
        return text[:hit], "", stops[stop]
    keep = stop_hold(text, stops)
    return text[:len(text) - keep], text[len(text) - keep:], None


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back)."""
    for k in range(min(max(map(len, stops)) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(x.startswith(tail) for x in stops):
            return k
    return 0


class LineLimits:
    """llama-server's ``n_indent`` and ``t_max_predict_ms``, fed the reply's text as it is shown: after the first
    newline, a line whose first character that is not a space or tab (a newline included) comes after fewer than
    ``n_indent`` of them ends the reply just before that character; a newline shown after ``t_max_s`` seconds of
    generation ends it after that text."""

    def __init__(self, n_indent: int, t_max_s: float):
        self.n_indent, self.t_max_s = n_indent, t_max_s
        self.indent: int | None = None  # blanks so far at the start of the line being read; None: not deciding

    def feed(self, text: str, elapsed_s: float) -> tuple[str, bool]:
        """(the part of ``text`` to show, whether the reply ends with it)."""
        for i, ch in enumerate(text):
            if self.n_indent and self.indent is not None:
                if ch in " \t":
                    self.indent += 1
                    continue
                if self.indent < self.n_indent:
                    return text[:i], True
                self.indent = None
            if ch == "\n":
                self.indent = 0
        return text, bool(self.t_max_s) and "\n" in text and elapsed_s > self.t_max_s
