"""Stop strings in streamed text: the one rule for what is shown, held back or cut."""

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
