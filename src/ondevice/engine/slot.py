"""A slot of the batch generator: one sequence of the KV cache, the tokens it holds, and the request it serves
(its prefill position, sampled token, text held back for stop strings, timings and speculative-decoding state).
:class:`~ondevice.engine.generator.BatchGenerator` owns the slots; slotfile.py saves and restores one."""

from __future__ import annotations

import codecs
import time

import numpy as np

from .drafters import Acceptance, PromptLookup
from .records import Request
from .stops import LineLimits


class Slot:
    """One sequence of the KV cache and the request it serves."""

    def __init__(self, seq: int):
        self.seq = seq
        self.cached: list[int] = []  # tokens whose KV sequence ``seq`` holds, position by position
        self.req: Request | None = None
        self.last_used = 0.0
        self.ads: tuple[str, ...] = ()  # the adapter set ``cached`` was computed under (and its request's)
        self.saved: np.ndarray | None = None  # logits after the first ``len(saved_for)`` cached tokens (a copy)
        self.saved_for: list[int] = []  # the prompt those logits followed
        self.follow: Slot | None = None  # a slot computing this request's very prompt: copy it when it is in

    def cut(self, n: int) -> None:
        """Keep the first ``n`` cached tokens, and the saved logits only while their whole prompt is kept."""
        del self.cached[n:]
        if n < len(self.saved_for):
            self.saved, self.saved_for = None, []

    def forget(self) -> None:
        self.cached, self.saved, self.saved_for = [], None, []

    def start(self, req: Request, n_reuse: int) -> None:
        self.req = req
        req.slot = self.seq
        self.n_cached = n_reuse
        self.prompt_i = n_reuse  # next prompt token to prefill
        self.next_tok: int | None = None  # sampled, to be decoded next step
        self.row = -1
        self.n_gen = 0
        self.held = ""  # text that may be the start of a stop string
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.t_admit = time.perf_counter()
        self.t_first = 0.0  # when the first token was sampled (prefill done)
        self.t_last = 0.0
        # speculative decoding
        self.drafts: list[int] = []
        self.acc = Acceptance()
        self.n_drafted = self.n_accepted = self.n_steps = 0  # n_steps: target decodes that gave it a token
        self.step_open = False  # the current decode has not given it a token yet
        # the first token comes from logits already computed: the last decode's (-1) or a saved row
        self.pending: int | np.ndarray | None = -1 if req.from_logits else None
        self.lookup = PromptLookup(req.tokens) if req.sampling.draft == "lookup" else None
        sm = req.sampling
        self.lines = LineLimits(sm.n_indent, sm.t_max_predict_ms / 1e3) if sm.n_indent or sm.t_max_predict_ms else None
