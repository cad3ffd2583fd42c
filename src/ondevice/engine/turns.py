"""One generation at a time on a :class:`~ondevice.engine.model.Model`: its KV cache, slot and sampler are one.

A stream holds the model only while it is read: a call waits while another generation runs or its stream is being
read, and a stream nobody has read for the model's ``idle_timeout`` while a call waits is abandoned to that call
(its iterator closed, its slot freed; reading it again raises :class:`~ondevice.errors.StreamAbandoned`). Closing
the model waits for a running step, ends an open stream and frees the engines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ModelClosed, StreamAbandoned
from .records import Generation

if TYPE_CHECKING:
    from .model import Model


@dataclass(eq=False)
class Turn:
    """One generation's hold on its model: the iterator it reads, whether a step of it runs now, when it
    last gave a token."""

    inner: Iterator[Generation] | None = None
    running: bool = False
    last: float = dataclasses.field(default_factory=time.monotonic)
    abandoned: bool = False


class Turns:
    """One generation at a time on a model (its KV cache, slot and sampler are one). A call waits while
    another generation runs or its stream is being read; one whose stream nobody has read for the model's
    ``idle_timeout`` while a call waits is abandoned to that call (its iterator is closed: its slot freed)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.current: Turn | None = None
        self.closed = False
        self.closing = False  # close() waits for a running step: no other step or call starts meanwhile

    def closed_error(self, model: Model) -> ModelClosed:
        # a model loaded by path is named after its file, a name load() does not know: give the path back
        again = str(model.path) if model.path.stem == model.name else model.name
        return ModelClosed(f"{model.name} was closed; load it again with ondevice.load({again!r})")

    def begin(self, model: Model) -> Turn:
        with self.cond:
            while True:
                if self.closed or self.closing:
                    raise self.closed_error(model)
                cur = self.current
                if cur is None:
                    self.current = turn = Turn()
                    return turn
                idle = time.monotonic() - cur.last
                if not cur.running and idle >= model.idle_timeout:
                    self._abandon(cur)
                    continue
                self.cond.wait(model.idle_timeout - idle if not cur.running else model.idle_timeout)

    @contextlib.contextmanager
    def hold(self, model: Model):
        """The model for one call that is not a stream (reset, a prompt cache, embeddings), in its turn."""
        turn = self.begin(model)
        try:
            yield
        finally:
            self.end(turn)

    def read(self, model: Model, make: Callable[[], Iterator[Generation]]) -> Iterator[Generation]:
        """``make()``'s records, each advance in the model's turn; the turn is taken at the first read."""
        turn = self.begin(model)
        try:
            turn.inner = make()
            while True:
                with self.step(model, turn):
                    try:
                        g = next(turn.inner)
                    except StopIteration:
                        return
                yield g
        finally:
            self.end(turn)

    @contextlib.contextmanager
    def step(self, model: Model, turn: Turn):
        """One advance of ``turn``'s iterator (a token), with nothing else using the model meanwhile."""
        with self.cond:
            if self.closed or self.closing:  # a generation in another thread ends at its next token
                raise self.closed_error(model)
            if turn.abandoned:
                raise StreamAbandoned(f"this stream of {model.name} was not read for {model.idle_timeout:g} s "
                                      f"while another call waited, and was ended for it; read a stream to its "
                                      f"end or close it (or raise Model.idle_timeout)")
            turn.running = True
        try:
            yield
        finally:
            with self.cond:
                turn.running, turn.last = False, time.monotonic()
                self.cond.notify_all()

    def end(self, turn: Turn) -> None:
        with self.cond:
            if self.current is turn:
                self._close_inner(turn)
                self.current = None
                self.cond.notify_all()

    def _abandon(self, turn: Turn) -> None:
        turn.abandoned = True
        self._close_inner(turn)
        self.current = None

    @staticmethod
    def _close_inner(turn: Turn) -> None:
        if turn.inner is not None:  # suspended (never running here): its cleanup frees the slot now
            inner, turn.inner = turn.inner, None
            inner.close()

    def close(self, model: Model) -> None:
        with self.cond:
            self.closing = True
            while self.current is not None and self.current.running:
                self.cond.wait()
            if self.closed:
                return
            if self.current is not None:
                self._abandon(self.current)
            self.closed = True
            model.engine.close()
            for other in (model.draft_engine, model._embedder):
                if other is not None:
                    other.close()
            self.cond.notify_all()
