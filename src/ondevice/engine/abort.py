"""Stopping a ``llama_decode`` midway: llama.cpp's abort callback, read without Python.

The CPU backend calls a context's abort callback after every graph node (ggml-cpu.c, on the calling thread);
when it returns true the compute stops and ``llama_decode`` returns 2, having removed from the KV cache every
position, from the lowest one on, of each sequence in the micro-batch that was running (earlier micro-batches
of the same call stay: llama-context.cpp ``llama_context::decode``). The server uses it to stop a prefill
whose client left (serve/batcher.py, engine/generator.py).

The callback is C's ``strlen`` over a two-byte buffer ``[flag, 0]``: it returns 1 when the flag byte is set
and 0 otherwise, which is the ``bool`` ggml asks for (the low byte of the return register). A Python ctypes
callback would take the GIL a thousand times per decode, waiting behind the event loop's thread each time;
this reads one byte and never enters Python. Setting or clearing the flag is a one-byte store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading


class DecodeAborted(Exception):
    """``llama_decode`` stopped on the abort flag; the KV of the micro-batch it was running was removed."""


def _strlen():
    """C's ``strlen`` as a function pointer, or None where no C library can be found."""
    try:
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(ctypes.util.find_library("c"))
        return libc.strlen
    except (OSError, AttributeError):
        return None


class AbortFlag:
    """One context's abort flag, installed as its abort callback; keep this object as long as the context."""

    def __init__(self, ll, ctx):
        import llama_cpp

        self._buf = ctypes.create_string_buffer(2)  # [flag, NUL]: strlen gives 0 or 1
        strlen = _strlen()
        self.installed = strlen is not None
        if self.installed:
            self._cb = ctypes.cast(strlen, llama_cpp.ggml_abort_callback)  # kept: the context holds the pointer
            ll.llama_set_abort_callback(ctx, self._cb, ctypes.cast(self._buf, ctypes.c_void_p))

    def set(self) -> None:
        self._buf[0] = b"\x01"

    def clear(self) -> None:
        self._buf[0] = b"\0"

    @property
    def is_set(self) -> bool:
        return self._buf[0] != b"\0"


class AbortGuard:
    """A generator's decodes, each abortable from another thread once its requests are cancelled: the flag is
    set only while the decode it is meant for runs, and only when cancelled requests (``cancelled`` true) hold
    at least half of its items, so it never stops a decode of live requests alone, nor a later decode."""

    def __init__(self, engine):
        flag = getattr(engine, "abort_flag", None)
        self.eng = engine
        self.flag = flag if flag is not None and flag.installed else None  # None: decodes are never aborted
        self.lock = threading.Lock()
        self.inflight: list[tuple[object, int]] | None = None  # the decode running: (request, its items)

    def cancel(self) -> None:
        """A request was cancelled (any thread): stop the decode in flight if it is now mostly cancelled."""
        with self.lock:
            self._arm()

    def _arm(self) -> None:
        flight = self.inflight
        if flight is None:
            return
        dead = sum(n for r, n in flight if getattr(r, "cancelled", False))
        if dead and 2 * dead >= sum(n for _, n in flight):
            self.flag.set()

    def decode(self, items: list, reqs: list) -> None:
        """``decode_batch(items)``, whose items belong to ``reqs`` (by their ``slot``, the sequence); raises
        :class:`DecodeAborted` when stopped."""
        if self.flag is None:
            self.eng.decode_batch(items)
            return
        counts: dict[int, int] = {}
        for _, _, seq, _ in items:
            counts[seq] = counts.get(seq, 0) + 1
        with self.lock:
            self.inflight = [(r, counts.get(r.slot, 0)) for r in reqs]
            self.flag.clear()
            self._arm()  # cancelled since the caller last looked
        try:
            self.eng.decode_batch(items)
        finally:
            with self.lock:  # no later decode sees a flag set for this one
                self.inflight = None
                self.flag.clear()


def rewind(eng, decoding: list, chunks: list) -> None:
    """After an aborted decode: each generator slot in it back to what the KV kept. A decoding slot's token
    (and drafts) goes again next step: its logits were never read. A prompt chunk ``(slot, start, n, last)``
    keeps the tokens the KV holds (``eng.n_past``, from llama.cpp's own count), less a last token whose logits
    are needed, and all of them when every position's logits are (echo)."""
    for s in decoding:
        s.n_drafted -= len(s.drafts)
        s.drafts = []
        eng.truncate(len(s.cached), s.seq)
    for s, _, n, last in chunks:
        kept = max(0, min(n, eng.n_past(s.seq) - len(s.cached)))
        if s.req.prompt_logprobs is not None:
            kept = 0
        elif last and kept == n:
            kept = n - 1
        eng.truncate(len(s.cached) + kept, s.seq)
        s.cached.extend(s.req.tokens[s.prompt_i:s.prompt_i + kept])
        s.prompt_i += kept
