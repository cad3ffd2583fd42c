"""Ollama's ``truncate`` (on by default) for /api/chat and /api/generate: a prompt longer than the context is cut
to fit, not refused. A conversation loses its oldest turns (Ollama's chatPrompt); what still does not fit loses
tokens after its first ``num_keep``, so that the newest text stays (Ollama's runner: "truncating input prompt")."""

from __future__ import annotations

import logging

NUM_KEEP = 4  # Ollama's default options.num_keep: the prompt's first tokens that its runner never cuts
_ROUNDS = 3  # cut text re-tokenizes a token or two differently inside the whole prompt: measure and cut again
_HOW = "to fit the context (Ollama's truncate; send truncate: false for the error instead)"


def room(state, max_tokens: int | None) -> int:
    """The prompt tokens that leave a quarter of the context (or ``max_tokens``, if less) for the reply."""
    ctx = state.settings.ctx
    return min(state.settings.prompt_limit, ctx - 1 - min(max_tokens or ctx // 4, ctx // 4))


def cut_start(n: int, over: int, keep: int) -> int:
    """Where Ollama's runner starts cutting ``over`` of ``n`` tokens: after the first ``keep`` (< 0: all of them),
    or sooner when keeping them would leave too few to cut, so that the end always stays."""
    return min(n if keep < 0 else keep, n - over)


def fit_tokens(state, tokens: list[int], limit: int, keep: int, route: str) -> list[int]:
    """A raw prompt's ``tokens`` cut to ``limit`` as Ollama's runner cuts them; as they are when they fit."""
    over = len(tokens) - limit
    if over <= 0:
        return tokens
    # the model's BOS is kept besides num_keep, as Ollama's runner keeps it
    i = cut_start(len(tokens), over, keep + bool(state.engine.add_bos) if keep >= 0 else keep)
    _log().info("%s: %d of the prompt's %d tokens were cut after its first %d %s", route, over, len(tokens), i, _HOW)
    return tokens[:i] + tokens[i + over:]


async def fit_context(runner, req: dict, as_request, keep: int = NUM_KEEP, route: str = "/api/chat") -> dict:
    """``req`` (a chat request's fields) cut to :func:`room`, as Ollama cuts it: its oldest turns dropped (system
    messages and the last message stay, and what is kept starts at a user turn: no tool result without its call),
    then, if that is not enough, the messages' text cut after its first ``keep`` tokens (:func:`cut_text`). The
    chat template's own tokens (role markers, the generation prompt) are never cut. Unchanged when it fits, or
    when not even the template's tokens do (the context error then says so). ``as_request`` makes the chat
    request of a body (its field names in errors as the route's)."""
    limit = room(runner.state, req.get("max_tokens"))

    async def size(msgs: list[dict]) -> int:
        return await runner.prompt_tokens(as_request({**req, "messages": msgs}))

    if await size(req["messages"]) <= limit:
        return req
    msgs, dropped = await _drop_turns(req["messages"], limit, size)
    cut = msgs
    for _ in range(_ROUNDS):
        over = await size(cut) - limit
        if over <= 0:
            if dropped:
                _log().info("%s: the %d oldest messages were dropped %s", route, dropped, _HOW)
            if cut is not msgs:
                _log().info("%s: the prompt's text was cut after its first %d tokens %s", route, keep, _HOW)
            return {**req, "messages": cut}
        if (cut := cut_text(runner.state, cut, over, keep)) is None:
            break
    return req


async def _drop_turns(msgs: list[dict], limit: int, size) -> tuple[list[dict], int]:
    """(``msgs`` without the fewest oldest turns that make them fit in ``limit``, or all that may go when none
    do; how many went)."""
    system = [m for m in msgs if m.get("role") == "system"]
    turns = [m for m in msgs if m.get("role") != "system"]
    if len(turns) < 2:
        return msgs, 0
    starts = [k for k, m in enumerate(turns) if m.get("role") == "user" and k > 0] or [len(turns) - 1]
    lo, hi = 0, len(starts) - 1  # by bisection over the turns' starts (none fits: the last start)
    while lo < hi:
        mid = (lo + hi) // 2
        if await size(system + turns[starts[mid]:]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return system + turns[starts[lo]:], starts[lo]


def cut_text(state, msgs: list[dict], over: int, keep: int) -> list[dict] | None:
    """``msgs`` with ``over`` tokens of their text (their contents, in order) cut after the first ``keep``
    (:func:`cut_start`); None when the text has fewer than ``over`` tokens."""
    toks = [state.tokenize(c, add_special=False, parse_special=False) if isinstance(c := m.get("content"), str)
            else [] for m in msgs]  # the text as the chat template reads it: never a control token
    total = sum(map(len, toks))
    if total < over:
        return None
    skip = cut_start(total, over, keep)
    out = []
    for m, t in zip(msgs, toks):
        kept = min(skip, len(t))
        gone = min(over, len(t) - kept)
        skip, over = skip - kept, over - gone
        out.append({**m, "content": state.detokenize(t[:kept] + t[kept + gone:])} if gone else m)
    return out


def _log() -> logging.Logger:
    return logging.getLogger("ondevice.serve")
