"""Ollama's ``truncate`` for /api/chat: a conversation longer than the context loses its oldest turns."""

from __future__ import annotations


async def fit_context(runner, req: dict, as_request) -> dict:
    """``req`` with its oldest turns dropped until its prompt leaves a quarter of the context (or max_tokens, if
    less) for the reply, as Ollama drops them (its ``truncate``, on by default): system messages and the last
    message stay, and what is kept starts at a user turn (no tool result without its call). Unchanged when it fits,
    or when not even the last message does (the context error then says so). ``as_request`` makes the chat
    request of a body (its field names in errors as the route's)."""
    ctx = runner.state.settings.ctx
    room = ctx - 1 - min(req.get("max_tokens") or ctx // 4, ctx // 4)
    msgs = req["messages"]
    system = [m for m in msgs if m.get("role") == "system"]
    turns = [m for m in msgs if m.get("role") != "system"]

    async def size(k: int) -> int:  # the prompt's tokens with the first k turns dropped
        return await runner.prompt_tokens(as_request({**req, "messages": system + turns[k:]}))

    if len(turns) < 2 or await size(0) <= room:
        return req
    starts = [k for k, m in enumerate(turns) if m.get("role") == "user" and k > 0] or [len(turns) - 1]
    lo, hi = 0, len(starts) - 1  # the fewest dropped that fits, by bisection over the turns' starts
    if await size(starts[hi]) > room:
        return req
    while lo < hi:
        mid = (lo + hi) // 2
        if await size(starts[mid]) <= room:
            hi = mid
        else:
            lo = mid + 1
    _dropped_turns(starts[lo])
    return {**req, "messages": system + turns[starts[lo]:]}


def _dropped_turns(n: int) -> None:
    import logging

    logging.getLogger("ondevice.serve").info("/api/chat: the %d oldest messages were dropped to fit the context "
                                             "(Ollama's truncate; send truncate: false for the error instead)", n)
