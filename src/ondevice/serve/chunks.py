"""What a client receives, shaped once: usage, llama-server style timings, legacy logprob entries, SSE events."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable

from ..engine.records import Generation
from . import replies as R


def usage_of(*last: Generation, n: int = 1) -> R.Usage:
    """Usage over the last records of one or more generations; with ``n`` choices per prompt (records in
    prompt-major order) each prompt counts once, as OpenAI counts it."""
    prompt = sum(g.prompt_tokens for g in last[::n])
    completion = sum(g.generation_tokens for g in last)
    cached = sum(g.cached_tokens for g in last[::n])
    return R.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=R.PromptTokensDetails(cached_tokens=cached))


def timings_of(g: Generation) -> R.Timings:
    decode_s = g.t - g.ttft
    return R.Timings(prompt_n=g.prompt_tokens - g.cached_tokens, prompt_ms=g.prompt_time * 1e3,
                     prompt_per_second=g.prompt_tps, predicted_n=g.generation_tokens, predicted_ms=decode_s * 1e3,
                     predicted_per_second=g.generation_tps, cache_n=g.cached_tokens, ttft_ms=g.ttft * 1e3,
                     draft_n=g.draft_tokens or None, draft_n_accepted=g.draft_accepted if g.draft_tokens else None)


class TextOffset:
    """Where the text stands, in characters, as tokens' bytes come: legacy logprobs' ``text_offset``. A
    character split over tokens (an emoji, CJK) counts once, when its last byte arrives. ``source``: the echoed
    prompt as the client wrote it, control tokens' text included (``<|im_start|>``): such a token then takes
    the room its text takes there (an added BOS, not in it, none)."""

    def __init__(self, chars: int = 0, source: str | None = None):
        self.chars = chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._src, self._pos = (source or "").encode(), 0

    def feed(self, piece: bytes) -> None:
        self.chars += len(self._utf8.decode(piece))
        self._pos += len(piece)

    def piece(self, state, tok: int) -> bytes:
        """The bytes token ``tok`` adds to the text: its text, or a control token's where ``source`` has it."""
        b = state.vocab_bytes[tok]
        if not b and self._src and (s := state.special_bytes[tok]) and self._src.startswith(s, self._pos):
            return s
        return b


def lp_entry(g: Generation) -> tuple:
    """(token, logprob, top) of a record, as the legacy completions logprobs take them."""
    return g.token, g.logprob, list(g.top_logprobs) if g.top_logprobs is not None else None


PING = ("ping",)  # the event Runner.events yields after ``ping`` seconds without one (a stream's keep-alive)
SSE_PING = b": ping\n\n"  # an SSE comment: clients skip it, proxies and idle timers see bytes


def sse(obj) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def null_content(event: bytes) -> bytes:
    """A chat chunk's SSE ``event`` with ``"content": null`` in its delta: the opening chunk of a reply that may
    be tool calls, as OpenAI and llama-server send it (``""`` would make a client's accumulated content ``""``
    for a reply of calls only, where the whole reply's is null)."""
    obj = json.loads(event[len(b"data: "):])
    for ch in obj["choices"]:
        ch["delta"]["content"] = None
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


MARK = "\u0000ondevice-text\u0000"


def text_sse(make) -> Callable[[str], bytes]:
    """The per-token SSE event, serialised once: ``make(text)`` builds the chunk model for ``text``.

    The hot path (one plain text delta per token) then costs a string join, not a pydantic model.
    """
    head, tail = sse(make(MARK)).decode().split(json.dumps(MARK)[1:-1])
    head, tail = head[:-1], tail[1:]  # drop the quotes around the mark

    def event(text: str) -> bytes:
        return (head + json.dumps(text, ensure_ascii=False) + tail).encode()

    return event


class ShownTokens:
    """Which generated tokens get a logprobs entry: those whose text the reply shows, so that the entries
    spell its content (as llama-server's do). A token whose text is held back (it may start a stop string, or
    holds part of a character) waits for the next text, and a stop string that cuts that text drops it. An
    end-of-text token adds no text and still gets one (completions' legacy shape, lm-eval reads it)."""

    def __init__(self, eos: frozenset[int]):
        self.eos, self.held = eos, []

    def feed(self, g: Generation) -> list[Generation]:
        """The records whose entries go out with ``g`` (none while its text is held back)."""
        if g.logprob is not None:
            self.held.append(g)
        if not (g.text or g.token in self.eos):
            return []
        out, self.held = self.held, []
        return out

    @classmethod
    def of(cls, gen: list[Generation], eos: frozenset[int]) -> list[Generation]:
        """The records of a whole reply that get an entry."""
        shown = cls(eos)
        return [r for g in gen for r in shown.feed(g)]


def chat_logprobs(state, g: Generation) -> R.TokenLogprob:
    """OpenAI's chat logprobs of one token: ``bytes`` are the token's own (joined they rebuild the text)."""
    pieces, raw = state.pieces, state.special_bytes
    return R.TokenLogprob(token=pieces[g.token], logprob=g.logprob, bytes=list(raw[g.token]),
                          top_logprobs=[R.TopLogprob(token=pieces[t], logprob=v, bytes=list(raw[t]))
                                        for t, v in g.top_logprobs or ()])


def completion_logprobs(state, entries: list, offset: TextOffset) -> R.CompletionLogprobs:
    """Legacy completions logprobs: entries are (token, logprob | None, top [(token, lp)] | None); ``offset``
    (advanced past them) says where the text stands."""
    pieces = state.pieces
    out = R.CompletionLogprobs()
    for tok, lp, top in entries:
        out.tokens.append(pieces[tok])
        out.token_logprobs.append(lp)
        out.top_logprobs.append(None if top is None else {pieces[t]: v for t, v in top})
        out.text_offset.append(offset.chars)
        offset.feed(offset.piece(state, tok))
    return out
