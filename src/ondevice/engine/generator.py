"""One synchronous batch generator: every generated token of the library, bench, eval and server comes from here.

Modelled on mlx-lm's ``BatchGenerator``: no threads, no asyncio. :meth:`BatchGenerator.insert` puts a request
in an idle slot (the one whose cached tokens share the longest prefix with its prompt, or a copy of a longer
one from another slot, so only the rest is computed); :meth:`BatchGenerator.step` runs ONE ``llama_decode``
carrying the next token of every decoding slot (with its speculative drafts) and a chunk of prompt tokens from
slots still prefilling (chunked prefill: a long prompt never stalls running streams), then samples and returns
the step's events. With ``prefill_batch`` set, a step starts no further new prompt once it holds that many prompt
tokens, or ``prefill_share`` of those waiting if more: a burst of short prompts gets its first tokens a share per
step (half, a quarter, ...) in arrival order, not all after the whole burst's prefill (on a CPU a prompt costs
0-15% less in a batch of eight than alone) nor one prompt per step. ``Model.stream`` is a batch of
one; the server's batcher is a thread that calls ``insert``/``step``/``remove`` and forwards the events to
asyncio.

A slot also keeps the logits that followed its last prompt (one row, a copy). A request whose whole prompt a
slot holds with those logits (the same prompt again: a regenerate, a retry, ``n`` choices sent as separate
requests, a benchmark's repeated prompt) samples its first token from them, with no decode at all; otherwise the
prompt's last token is always computed again, as llama-server does, for its logits. A request whose very prompt
another slot is computing (``n`` choices, a burst of one prompt) waits for it and then takes a copy of its KV
and those logits, rather than computing the same prompt again beside it.

LoRA adapters (engine/adapters.py): llama.cpp applies one adapter set to a whole ``llama_decode``, so a step
runs one decode per adapter set among its requests (each set's decoding tokens and prompt chunks, then that
decode's sampling); requests of different adapters are all in flight at once, and a decode holds exactly the
rows it would hold without the others. A slot's KV is reused only by a request of the adapter set it was
computed under.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
prompt lookup after Saxena 2023): a slot's next token goes into the step together with drafted tokens (as
many as pay off, from the measured cost of larger steps and the request's acceptance rate), each with its
logits; the target's sampler then samples row after row and keeps going while
its token equals the draft. Drafts are deterministic (an n-gram continuation or a draft model's argmax), and
for such a one-point draft distribution "sample from the target, accept if equal" IS the standard rejection
rule (accept with probability p(d), otherwise draw from p with d removed, renormalised), so the output is
distributed exactly as plain decoding's, and greedy output is the same token for token.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import ContextOverflow, InvalidArgument
from .abort import AbortGuard, DecodeAborted, rewind
from .base import Engine
from .drafters import ModelDrafter, StepCosts, common_prefix
from .logprobs import log_softmax, token_stats, top_k
from .records import Generation, Request
from .slot import Slot
from .stops import split_stop

ECHO_CHUNK = 128  # prompt tokens per step when every position's logits are kept (echo logprobs)
COPY_MIN_GAIN = 4  # copy another slot's KV only when it saves at least this many tokens

# an event: (request, Generation) one per token, the last with finish_reason set (token -1 when it carries none),
# or (request, ("prompt", [(token, logprob | None, top | None), ...])) echo logprobs of prompt tokens
Event = tuple["Request", "Generation | tuple"]


class BatchGenerator:
    """Slots over one engine's sequences; every method runs on the caller's thread (keep it one thread)."""

    def __init__(self, engine: Engine, *, seqs: Sequence[int] | None = None, slot_ctx: int | None = None,
                 prefill_chunk: int = 512, prefill_batch: int | None = None, prefill_share: float = 0.0,
                 vocab_bytes: Sequence[bytes] | None = None, draft_engine: Engine | None = None):
        self.eng = engine
        n_seq = max(1, engine.config.n_seq_max)
        self.slots = [Slot(i) for i in (seqs if seqs is not None else range(n_seq))]
        self.slot_ctx = slot_ctx or (engine.n_ctx if engine.config.kv_unified else engine.n_ctx // n_seq)
        self.n_batch = engine.n_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = prefill_batch
        self.prefill_share = prefill_share
        self.vocab_bytes = vocab_bytes
        self.eos = engine.eos_tokens
        self.draft_engine = draft_engine
        self.drafter = ModelDrafter(draft_engine, [s.seq for s in self.slots]) if draft_engine else None
        self.adapters = getattr(engine, "adapters", None)  # engine/adapters.py (None: an engine without LoRA)
        self.last_batch = 0  # tokens in the last step's llama_decode(s)
        self.step_cost = StepCosts()  # what a llama_decode of n items costs here, now (drafts are weighed by it)
        self.guard = AbortGuard(engine)  # stops a decode whose requests were cancelled (engine/abort.py)

    # -- slots ----------------------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def free(self) -> int:
        return len(self.slots) - self.busy

    def insert(self, req: Request) -> int:
        """Put ``req`` in the idle slot whose cached tokens share the longest prefix with its prompt; returns
        how many prompt tokens are reused. Raises RuntimeError when no slot is idle."""
        toks = req.tokens
        if not self.free:
            raise RuntimeError("no idle slot; insert after a request finishes")
        if req.from_logits:  # sample from the logits of the slot's last decode: its KV is the whole prompt
            cap = len(toks)
        elif not toks:
            raise ValueError("a request needs at least one prompt token")
        else:
            cap = 0 if req.prompt_logprobs is not None else len(toks) - 1  # the last token is always recomputed
        if len(toks) + (not req.from_logits) > self.slot_ctx:
            raise ContextOverflow(len(toks), self.slot_ctx)
        ads = self._adapter_set(req)
        for s in self.slots:  # someone else moved the engine's KV (truncate, reset): trust only what is left
            n_past = self.eng.n_past(s.seq)
            if n_past < len(s.cached):
                s.cut(n_past)
            elif n_past > len(s.cached):
                s.forget()
                self.eng.truncate(0, s.seq)
        free = [s for s in self.slots if s.req is None]
        # KV computed under another adapter set is no prefix of this request's
        hit_ok = _saves(req)
        # a slot holding the whole prompt with the logits that followed it (saved_for) computes nothing
        scored = [(0 if s.ads != ads else len(toks) if hit_ok and s.saved_for == toks
                   else min(common_prefix(s.cached, toks), cap), s) for s in self.slots]
        n, dst = max(((n, s) for n, s in scored if s.req is None), key=lambda x: (x[0], -x[1].last_used))
        n_src, src = max(scored, key=lambda x: x[0])
        if src is not dst and n_src >= n + COPY_MIN_GAIN and free:
            self._lend(src, dst)
            n = n_src
        # the same prompt is being computed in another slot (a burst of it, or n choices): wait for it, then copy
        lead = next((s for s in self.slots if s.req is not None and s.follow is None and s.ads == ads
                     and s.req.tokens == toks and s.prompt_i < len(toks) and _saves(s.req)),
                    None) if hit_ok and n < len(toks) - COPY_MIN_GAIN else None
        self.eng.truncate(n, dst.seq)
        dst.cut(n)
        if req.sampler is None:
            req.sampler = self.eng.make_sampler(req.sampling, toks)
        if req.post_probs:
            req.sampler.post = req.logprobs or 0
        dst.ads = ads
        dst.start(req, n)
        dst.follow = lead
        if hit_ok and n == len(toks):
            dst.pending = dst.saved
        return n

    def to_compute(self, req: Request) -> int:
        """Read-only: the prompt tokens :meth:`insert` would compute for ``req`` now, less what a slot holds (its
        KV, or another slot's to copy); 0 where none would be (its logits kept, or its very prompt computing in
        another slot) or ``req`` would fail. Never more than insert computes: an admission may rely on it."""
        toks = req.tokens
        try:
            ads = self._adapter_set(req)
        except InvalidArgument:
            return 0
        if req.from_logits or not toks:
            return 0
        hit_ok, cap = _saves(req), (0 if req.prompt_logprobs is not None else len(toks) - 1)
        held = 0
        for s in self.slots:
            if s.ads != ads:
                continue
            if hit_ok and (s.saved_for == toks or (s.req is not None and s.req.tokens == toks and _saves(s.req))):
                return 0  # the same prompt: kept logits, or a copy once that slot has computed it
            held = max(held, min(common_prefix(s.cached, toks), cap))
        return len(toks) - held

    def _lend(self, src: Slot, dst: Slot) -> None:
        """Give ``dst`` a copy of ``src``'s KV, with its cached tokens and saved logits (read-only, shared)."""
        self.eng.copy_seq(src.seq, dst.seq)  # a buffer copy, far cheaper than recomputing
        dst.cached, dst.saved, dst.saved_for = list(src.cached), src.saved, src.saved_for

    def _adapter_set(self, req: Request) -> tuple[str, ...]:
        """The adapter set ``req`` runs under (checked: an unknown name fails this request only)."""
        if self.adapters is None:
            if req.adapters:
                raise InvalidArgument(f"adapters {', '.join(req.adapters)} requested, but this engine has none")
            return ()
        if req.adapters is None:
            return self.adapters.active
        self.adapters.check(req.adapters)
        return tuple(req.adapters)

    def remove(self, req: Request) -> None:
        """Stop ``req`` (cancelled, timed out); its slot keeps the KV computed so far for prefix reuse."""
        for s in self.slots:
            if s.req is req:
                self._release(s)

    def fail(self) -> list[Request]:
        """After a failed step: free every slot, forget their KV (its state is unknown); the requests dropped."""
        reqs = []
        for s in self.slots:
            if s.req is not None:
                reqs.append(s.req)
                self._release(s, clear=True)
        return reqs

    def reset(self) -> None:
        """Forget every slot's cached tokens (after the engine's KV was cleared)."""
        for s in self.slots:
            s.forget()

    # -- one step ---------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One ``llama_decode`` per adapter set in use (one, without adapters) over its active slots, each
        followed by its sampling; the events of this step. A step that finds requests whose first token's
        logits are already computed (saved, or the last decode's) only samples those first tokens."""
        out: list[Event] = []
        for s in self.slots:  # requests that sample straight from logits already computed
            if s.req is not None and s.pending is not None:
                row, s.pending = s.pending, None
                self._first(s, row, out)
        if out:  # those first tokens go out now, not after a decode of the other slots (the next step's)
            self.last_batch = 0
            return out
        active = [s for s in self.slots if s.req is not None]
        groups: dict[tuple[str, ...], list[Slot]] = {}  # adapter set -> its slots; sets by earliest arrival
        for s in sorted(active, key=lambda s: s.req.t_arrival):
            groups.setdefault(s.ads, [])
        for s in active:
            groups[s.ads].append(s)
        if self.adapters is not None and self.adapters.active in groups:
            # the set still active goes first: a switch costs llama.cpp a graph re-reserve (~5-10 ms here),
            # and the first set (first share of the prompt budget) rotates from step to step
            groups = {self.adapters.active: groups.pop(self.adapters.active), **groups}
        # prompt tokens this step: with streams decoding, one chunk shared by all sets (chunked prefill: a long
        # prompt never stalls them); else as many as each set's decode holds
        budget = self.prefill_chunk if any(s.next_tok is not None for s in active) else self.n_batch * len(groups)
        self.last_batch = 0
        for ads, slots in groups.items():
            budget -= self._decode_group(ads, slots, budget, out)
        return out

    def _decode_group(self, ads: tuple[str, ...], slots: list[Slot], budget: int, out: list[Event]) -> int:
        """One ``llama_decode`` under adapter set ``ads`` over ``slots``, then their sampling; the number of
        prompt tokens it took (at most ``budget``)."""
        items: list[tuple[int, int, int, bool]] = []
        decoding = [s for s in slots if s.next_tok is not None]
        for s in decoding:
            s.row = len(items)
            pos = len(s.cached)
            items.append((s.next_tok, pos, s.seq, True))
            s.drafts = self._draft(s, len(items), room=self.n_batch - len(items) - (len(decoding) - 1))
            items += [(d, pos + 1 + j, s.seq, True) for j, d in enumerate(s.drafts)]
            s.n_drafted += len(s.drafts)
        budget = min(budget, self.n_batch - len(items))
        used = 0
        chunks = []
        waiting = sorted((s for s in slots
                          if s.next_tok is None and s.follow is None and s.prompt_i < len(s.req.tokens)),
                         key=lambda s: s.req.t_arrival)
        admit = self.prefill_batch
        if admit is not None and self.prefill_share:
            admit = max(admit, int(self.prefill_share * sum(len(s.req.tokens) - s.prompt_i for s in waiting)))
        for s in waiting:
            if budget - used <= 0:
                break
            if admit is not None and used >= admit and s.prompt_i == s.n_cached:
                continue  # a new prompt waits a step: the ones already in this step get their first token sooner
            req = s.req
            n = min(budget - used, len(req.tokens) - s.prompt_i)
            echo = req.prompt_logprobs is not None
            if echo:
                n = min(n, ECHO_CHUNK)
            start, pos0 = len(items), len(s.cached)
            last = s.prompt_i + n == len(req.tokens)
            for j, t in enumerate(req.tokens[s.prompt_i:s.prompt_i + n]):
                items.append((t, pos0 + j, s.seq, echo or (last and j == n - 1)))
            chunks.append((s, start, n, last))
            used += n
        if not items:
            return 0
        if self.adapters is not None:
            self.adapters.use(ads)  # a no-op when they are active already
        self.last_batch += len(items)
        t0 = time.perf_counter()
        try:
            self.guard.decode(items, [s.req for s in decoding] + [s.req for s, *_ in chunks])
        except DecodeAborted:  # its requests were cancelled: the others go again next step from what the KV kept
            rewind(self.eng, decoding, chunks)
            self.last_batch -= len(items)
            return used
        self.step_cost.observe(len(items), time.perf_counter() - t0)
        for s in decoding:
            s.cached.append(s.next_tok)
            s.next_tok = None
        rows = logits = None
        ready, followers = [], []
        for s, start, n, last in chunks:
            req = s.req
            if req.prompt_logprobs is not None:
                if rows is None:  # logits rows are numbered over the items that asked for logits
                    rows = np.cumsum([it[3] for it in items]) - 1
                    logits = self.eng.all_logits()  # (n_rows, n_vocab)
                out.append((req, self._prompt_logprobs(s, logits[rows[start]:rows[start + n - 1] + 1])))
            s.cached.extend(req.tokens[s.prompt_i:s.prompt_i + n])
            s.prompt_i += n
            if last:
                s.row = start + n - 1
                ready.append(s)
                if _saves(req):
                    s.saved, s.saved_for = self.eng.logits(s.row), list(req.tokens)
                    for f in self.slots:  # requests waiting for this very prompt: its KV, and these logits
                        if f.follow is s:
                            self._lend(s, f)
                            f.follow, f.n_cached = None, len(f.cached)
                            f.prompt_i = f.n_cached
                            followers.append((f, s.row))
        for s in decoding:
            self._sample_run(s, s.row, out)
        for s in ready:
            self._first(s, s.row, out)
        for f, row in followers:
            self._first(f, row, out)
        return used

    def cancel(self, req: Request) -> None:
        """From any thread, once ``req.cancelled`` is true: the decode in flight stops now when cancelled
        requests hold at least half of it (engine/abort.py). The caller still removes ``req`` between steps."""
        self.guard.cancel()

    def stream(self, req: Request) -> Iterator[Generation]:
        """A batch of one: insert ``req``, step until it ends, yield its records (not its echo logprobs)."""
        self.insert(req)
        try:
            while any(s.req is req for s in self.slots):
                for r, ev in self.step():
                    if r is req and isinstance(ev, Generation):
                        yield ev
        finally:
            self.remove(req)

    # -- sampling -----------------------------------------------------------------------------------------
    def _first(self, s: Slot, row: int, out: list[Event]) -> None:
        """The prompt is in: the first token (or, with max_tokens=0, a last record without one)."""
        if s.req.sampling.max_tokens == 0:
            s.t_first = s.t_last = time.perf_counter()
            out.append((s.req, self._record(s, -1, "", "length")))
            self._release(s)
        else:
            self._sample_run(s, row, out)

    def _sample_run(self, s: Slot, row: int, out: list[Event]) -> None:
        """Sample row after row while the sampled token equals the next draft (its logits are the next row)."""
        drafts = s.drafts
        n_acc = 0
        s.step_open = True  # counted in n_steps once it gives a token (not for an end-of-text alone)
        while True:
            tok = self._sample_one(s, row, out)
            if tok is None:  # finished: the slot is released (and rejected drafts' KV dropped)
                return
            if n_acc < len(drafts) and tok == drafts[n_acc]:
                n_acc += 1
                s.n_accepted += 1
                s.cached.append(tok)  # its KV was computed in this step
                row += 1
                continue
            s.next_tok = tok
            break
        if drafts:
            s.acc.update(len(drafts), n_acc)
            self.eng.truncate(len(s.cached), s.seq)  # the KV of rejected drafts
        s.drafts = []

    def _sample_one(self, s: Slot, row: int, out: list[Event]) -> int | None:
        """Sample one token from ``row`` and emit its record; the token, or None when the request finished."""
        req = s.req
        tok = self.eng.sample(req.sampler, row)
        lp = top = None
        ent = None
        if req.logprobs is not None and tok >= 0:
            if req.post_probs:
                lp, top = req.sampler.post_out
            else:
                lps = log_softmax(self.eng.logits(row))
                lp, top = float(lps[tok]), tuple(top_k(lps, req.logprobs))
        if req.sampling.token_stats and tok >= 0:  # the cascade's confidence: one exp pass over the row
            lp_row, ent = token_stats(self.eng.logits(row), tok)
            lp = lp_row if lp is None else lp
        now = time.perf_counter()
        if s.n_gen == 0 and not s.t_first:
            s.t_first = now
        s.t_last = now
        sampling = req.sampling
        if tok < 0 or (tok in self.eos and not sampling.ignore_eos):  # tok < 0: the grammar is complete
            tail = s.held + _end_text(s.utf8)
            if req.eos_entry and tok >= 0:
                self._produced(s)
                out.append((req, self._record(s, tok, tail, "stop", lp, top)))
            else:
                out.append((req, self._record(s, -1, tail, "stop")))
            self._release(s)
            return None
        self._produced(s)
        if s.lookup is not None:
            s.lookup.append(tok)
        piece = self.vocab_bytes[tok] if self.vocab_bytes is not None else self.eng.token_bytes(tok)
        text, s.held, stopped = split_stop(s.held + s.utf8.decode(piece), sampling.stop)
        finish = "stop" if stopped else None
        if s.lines is not None and finish is None:  # code infill's line limits end it as a length limit does
            shown, cut = s.lines.feed(text, now - s.t_first)
            if cut:  # before a line's text (its indent), or after a newline (time): what was held goes too
                text, s.held, finish = shown if shown != text else text + s.held + _end_text(s.utf8), "", "length"
        if finish is None and (s.n_gen >= sampling.max_tokens or len(s.cached) >= self.slot_ctx):
            whole = getattr(req.sampler, "complete", None)  # a grammar whose text ended with this token: stop
            text, s.held = text + s.held + _end_text(s.utf8), ""
            finish = "stop" if whole is not None and whole(self.eos) else "length"
        out.append((req, self._record(s, tok, text, finish, lp, top, ent, stopped)))
        if finish:
            self._release(s)
            return None
        return tok

    @staticmethod
    def _produced(s: Slot) -> None:
        s.n_gen += 1
        if s.step_open:
            s.n_steps, s.step_open = s.n_steps + 1, False

    def _prompt_logprobs(self, s: Slot, logits: np.ndarray) -> tuple:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        toks, k = s.req.tokens, s.req.prompt_logprobs
        out = [(toks[0], None, None)] if s.prompt_i == 0 else []
        for r in range(logits.shape[0]):
            p = s.prompt_i + r + 1  # the token these logits predict
            if p >= len(toks):
                break
            lp = log_softmax(logits[r])
            out.append((toks[p], float(lp[toks[p]]), top_k(lp, k)))
        return ("prompt", out)

    def _record(self, s: Slot, tok: int, text: str, finish: str | None, lp: float | None = None,
                top: tuple | None = None, ent: float | None = None, stop: str | None = None) -> Generation:
        """The per-token record; times count from the request's arrival (queueing included)."""
        req = s.req
        t0 = req.t_arrival
        prompt_time = s.t_first - s.t_admit
        n_computed = len(req.tokens) - s.n_cached
        gen_time = s.t_last - s.t_first
        return Generation(text=text, token=tok, index=s.n_gen - 1 if tok >= 0 else s.n_gen, t=s.t_last - t0,
                          ttft=s.t_first - t0, prompt_tokens=len(req.tokens), prompt_time=prompt_time,
                          prompt_tps=n_computed / prompt_time if prompt_time > 0 else 0.0,
                          generation_tokens=s.n_gen,
                          generation_tps=(s.n_gen - 1) / gen_time if s.n_gen > 1 and gen_time > 0 else 0.0,
                          finish_reason=finish, logprob=lp, cached_tokens=s.n_cached, top_logprobs=top,
                          entropy=ent, draft_tokens=s.n_drafted, draft_accepted=s.n_accepted,
                          decode_steps=s.n_steps, stop=stop)

    def _release(self, s: Slot, clear: bool = False) -> None:
        req = s.req
        if req is None:
            return
        close = getattr(req.sampler, "close", None)
        if close:
            close()
        s.req, s.next_tok, s.drafts, s.last_used, s.follow = None, None, [], time.perf_counter(), None
        for f in self.slots:  # requests that waited for this prompt compute it themselves
            if f.follow is s:
                f.follow = None
        if clear:  # the KV of a failed step is unknown: forget it
            s.forget()
        self.eng.truncate(len(s.cached), s.seq)  # drafts decoded past the end are not part of the cache

    # -- speculative drafts ------------------------------------------------------------------------------
    def _draft(self, s: Slot, base: int, room: int) -> list[int]:
        """Tokens to verify after ``s.next_tok`` in a step that already holds ``base`` items: as many as pay
        (drafters.Acceptance), never past the slot's context, the request's max_tokens or the batch."""
        sampling = s.req.sampling
        if not sampling.draft:
            return []
        k_max = min(sampling.draft_max, self.slot_ctx - len(s.cached) - 2, sampling.max_tokens - s.n_gen - 1, room)
        k_max = min(k_max, self._trusted(base, base + k_max) - base)
        k = s.acc.length(base, k_max, self._cost)
        if k == 0:
            return []
        if s.lookup is not None:
            return s.lookup.draft(k)
        if self.drafter is None:
            return []
        return self.drafter.draft(s.seq, s.cached + [s.next_tok], k)

    def _cost(self, n: int) -> float:
        """Seconds of a llama_decode of ``n`` items here, now (a method, so a test can fix the curve)."""
        return self.step_cost(n)

    def _trusted(self, base: int, top: int) -> int:
        """The largest step from ``base`` items whose cost the curve knows well enough to draft into."""
        return self.step_cost.trusted(base, top)


def _saves(req: Request) -> bool:
    """Whether the logits after ``req``'s prompt are kept for the same prompt again (and it may take kept ones)."""
    return not req.from_logits and req.prompt_logprobs is None


def _end_text(utf8: codecs.IncrementalDecoder) -> str:
    """The end of a generation's text: the bytes of a character cut by the end (``max_tokens`` inside an
    emoji) are dropped, as llama-server drops them, not shown as U+FFFD (logprobs keep every token's bytes)."""
    utf8.reset()
    return ""
