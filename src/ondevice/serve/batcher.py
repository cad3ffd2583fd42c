"""Continuous batching: one thread owns the engine and decodes every active sequence in one llama_decode.

All llama.cpp compute of the server runs on this thread (embeddings too, via :meth:`Batcher.call`): with
llama.cpp's OpenMP build a second computing thread anywhere in the process slows every decode by ~30%.

Each step carries the next token of every decoding slot plus a chunk of prompt tokens from slots that are
still prefilling (chunked prefill, so a long prompt never stalls the running streams). Requests join
between steps. Each slot keeps the tokens whose KV it holds; a new request takes the idle slot with the
longest common prefix (or copies a longer one from another slot) and only computes the rest: the prefix
cache of llama-server's ``--cache-reuse``-less slot selection, plus a cross-slot copy.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.logprobs import log_softmax, token_stats, top_k
from ..engine.model import split_stop
from ..engine.records import Generation, Sampling

ECHO_CHUNK = 128  # prompt tokens per step when every position's logits are kept (echo logprobs)
COPY_MIN_GAIN = 4  # copy another slot's KV only when it saves at least this many tokens

# what a job's asyncio queue receives, in order:
#   ("prompt", [(token, lp | None, top | None), ...])   echo logprobs of prompt tokens (only when asked for)
#   Generation                                         one per token, the engine's record; the last one has
#                                                      finish_reason set (token -1 when it carries no token)
#   ("err", exception)                                 instead of the rest, when the job fails


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"all slots are busy and the wait queue is full; retry after {retry_after} s")


class JobTimeout(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One generation request as the batcher sees it."""

    tokens: list[int]
    sampling: Sampling
    sampler: object  # engine Sampler (built by the caller so a bad grammar is a 400 before queueing)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    timeout: float
    logprobs: int | None = None  # top-k logprobs of generated tokens (0: only the chosen one)
    prompt_logprobs: int | None = None  # echo: logprobs of every prompt token (forces recompute)
    # legacy completions with logprobs: a sampled end-of-sequence token is a generated token with its own
    # logprobs entry (as llama-server and OpenAI give it; lm-eval drops the last entry as the generated one)
    eos_entry: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Called from the event loop (disconnect, timeout): the batcher frees the slot next step."""
        self.cancelled = True


class Slot:
    def __init__(self, i: int):
        self.id = i
        self.cached: list[int] = []  # tokens whose KV sequence ``id`` holds, position by position
        self.job: Job | None = None
        self.last_used = 0.0

    def start(self, job: Job, n_reuse: int) -> None:
        self.job = job
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


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    i = int(np.argmax(diff))
    return i if diff[i] else n


class Batcher:
    """Owns a LlamaEngine with ``parallel`` sequences; call :meth:`submit` from any thread."""

    def __init__(self, engine, *, parallel: int, slot_ctx: int, prefill_chunk: int, max_queue: int,
                 metrics, vocab_bytes: list[bytes]):
        self.eng = engine
        self.slots = [Slot(i) for i in range(parallel)]
        self.slot_ctx = slot_ctx
        self.n_batch = engine.n_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.metrics = metrics
        self.vocab_bytes = vocab_bytes
        self.eos = engine.eos_tokens
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.mean_job_s = 1.0  # running mean of job durations, for Retry-After
        self._stop = False
        self._out: list[tuple[Job, tuple]] = []
        self.thread = threading.Thread(target=self._run, name="ondevice-batcher", daemon=True)

    # -- called from other threads -----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self.thread.join(timeout=30)

    @property
    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise :class:`QueueFull` when every slot is busy and the queue is full."""
        with self.cv:
            free = len(self.slots) - self.busy
            if len(self.waiting) >= self.max_queue + free:
                wait = self.mean_job_s * (len(self.waiting) + 1) / len(self.slots)
                raise QueueFull(max(1, min(60, math.ceil(wait))))
            self.waiting.append(job)
            self.cv.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the batcher thread between two steps (other llama.cpp compute, e.g. embeddings)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            self.calls.append((fn, fut))
            self.cv.notify()
        return fut

    # -- the batcher thread -------------------------------------------------------------------------
    def _run(self) -> None:
        self.eng.warmup()  # on this thread: see the module docstring
        while True:
            with self.cv:
                while not self._stop and not self.waiting and not self.busy and not self.calls:
                    self.cv.wait()
                if self._stop:
                    break
                calls, self.calls = self.calls, deque()
                admit = []
                while self.waiting and len(admit) < len(self.slots) - self.busy:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 — the caller gets it
                        fut.set_exception(e)
            for job in admit:
                self._admit(job)
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 — a failed decode fails the jobs in it, never the server
                for s in self.slots:
                    if s.job is not None:
                        self._emit(s.job, ("err", e))
                        self._release(s, clear=True)
            self._flush()
        for s in self.slots:
            if s.job is not None:
                self._emit(s.job, ("err", RuntimeError("the server is shutting down")))
                self._release(s, clear=True)
        for job in self.waiting:
            self._emit(job, ("err", RuntimeError("the server is shutting down")))
        for _, fut in self.calls:
            fut.cancel()
        self._flush()

    def _admit(self, job: Job) -> None:
        """Put ``job`` in the idle slot whose cached tokens share the longest prefix with its prompt."""
        toks = job.tokens
        cap = 0 if job.prompt_logprobs is not None else len(toks) - 1  # the last token is always recomputed
        free = [s for s in self.slots if s.job is None]
        scored = [(min(common_prefix(s.cached, toks), cap), s) for s in self.slots]
        n, dst = max(((n, s) for n, s in scored if s.job is None), key=lambda x: (x[0], -x[1].last_used))
        n_src, src = max(scored, key=lambda x: x[0])
        if src is not dst and n_src >= n + COPY_MIN_GAIN and free:
            self.eng.copy_seq(src.id, dst.id)  # a buffer copy, far cheaper than recomputing
            dst.cached = list(src.cached)
            n = n_src
        self.eng.truncate(n, dst.id)
        del dst.cached[n:]
        dst.start(job, n)
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(toks)
            self.metrics.cached_tokens += n

    def _step(self) -> None:
        now = time.perf_counter()
        for s in self.slots:
            j = s.job
            if j is not None and (j.cancelled or now - j.t_arrival > j.timeout):
                if not j.cancelled:
                    self._emit(j, ("err", JobTimeout(f"the request took longer than {j.timeout:g} s")))
                with self.metrics.lock:
                    self.metrics.cancelled += 1
                self._release(s)
        items: list[tuple[int, int, int, bool]] = []
        decoding = [s for s in self.slots if s.job is not None and s.next_tok is not None]
        for s in decoding:
            s.row = len(items)
            items.append((s.next_tok, len(s.cached), s.id, True))
        budget = self.n_batch - len(items)
        if decoding:
            budget = min(budget, self.prefill_chunk)
        chunks = []
        for s in sorted((s for s in self.slots if s.job is not None and s.next_tok is None),
                        key=lambda s: s.job.t_arrival):
            if budget <= 0:
                break
            job = s.job
            n = min(budget, len(job.tokens) - s.prompt_i)
            echo = job.prompt_logprobs is not None
            if echo:
                n = min(n, ECHO_CHUNK)
            start, pos0 = len(items), len(s.cached)
            last = s.prompt_i + n == len(job.tokens)
            for j, t in enumerate(job.tokens[s.prompt_i:s.prompt_i + n]):
                items.append((t, pos0 + j, s.id, echo or (last and j == n - 1)))
            chunks.append((s, start, n, last))
            budget -= n
        if not items:
            return
        self.eng.decode_batch(items)
        with self.metrics.lock:
            self.metrics.decode_steps += 1
            self.metrics.batch_tokens.observe(len(items))
        for s in decoding:
            s.cached.append(s.next_tok)
        rows = None
        ready = list(decoding)
        for s, start, n, last in chunks:
            job = s.job
            if job.prompt_logprobs is not None:
                if rows is None:  # logits rows are numbered over the items that asked for logits
                    rows = np.cumsum([it[3] for it in items]) - 1
                    logits = self.eng.all_logits()  # (n_rows, n_vocab)
                self._prompt_logprobs(s, logits[rows[start]:rows[start + n - 1] + 1])
            s.cached.extend(job.tokens[s.prompt_i:s.prompt_i + n])
            s.prompt_i += n
            if last:
                s.row = start + n - 1
                ready.append(s)
        for s in ready:
            self._sample(s)

    def _prompt_logprobs(self, s: Slot, logits: np.ndarray) -> None:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        job, toks, k = s.job, s.job.tokens, s.job.prompt_logprobs
        out = [(toks[0], None, None)] if s.prompt_i == 0 else []
        for r in range(logits.shape[0]):
            p = s.prompt_i + r + 1  # the token these logits predict
            if p >= len(toks):
                break
            lp = log_softmax(logits[r])
            out.append((toks[p], float(lp[toks[p]]), top_k(lp, k)))
        self._emit(job, ("prompt", out))

    def _sample(self, s: Slot) -> None:
        job = s.job
        if job.sampling.max_tokens == 0:
            s.t_first = s.t_last = time.perf_counter()
            self._emit(job, self._record(s, -1, "", "length"))
            self._release(s)
            return
        tok = self.eng.sample(job.sampler, s.row)
        lp = top = None
        if job.logprobs is not None:
            lps = log_softmax(self.eng.logits(s.row))
            lp, top = float(lps[tok]), tuple(top_k(lps, job.logprobs))
        ent = None
        if job.sampling.token_stats and tok >= 0:  # the cascade's confidence: one exp pass over the row
            lp_row, ent = token_stats(self.eng.logits(s.row), tok)
            lp = lp_row if lp is None else lp
        now = time.perf_counter()
        eos = tok in self.eos and not job.sampling.ignore_eos
        with self.metrics.lock:  # once per token
            (self.metrics.ttft.observe(now - job.t_arrival) if s.n_gen == 0
             else self.metrics.itl.observe(now - s.t_last))
            self.metrics.generation_tokens += not eos
        if s.n_gen == 0:
            s.t_first = now
        s.t_last = now
        if eos:
            tail = s.held + s.utf8.decode(b"", final=True)
            if job.eos_entry:
                s.n_gen += 1
                self._emit(job, self._record(s, tok, tail, "stop", lp, top))
            else:
                self._emit(job, self._record(s, -1, tail, "stop"))
            self._release(s)
            return
        s.n_gen += 1
        text, s.held, stopped = split_stop(s.held + s.utf8.decode(self.vocab_bytes[tok]), job.sampling.stop)
        finish = "stop" if stopped else None
        if finish is None and (s.n_gen >= job.sampling.max_tokens or len(s.cached) >= self.slot_ctx):
            text, s.held, finish = text + s.held + s.utf8.decode(b"", final=True), "", "length"
        self._emit(job, self._record(s, tok, text, finish, lp, top, ent))
        if finish:
            self._release(s)
        else:
            s.next_tok = tok

    def _record(self, s: Slot, tok: int, text: str, finish: str | None, lp: float | None = None,
                top: tuple | None = None, ent: float | None = None) -> Generation:
        """The engine's per-token record; times count from the request's arrival (queueing included)."""
        job = s.job
        t0 = job.t_arrival
        prompt_time = s.t_first - s.t_admit
        n_computed = len(job.tokens) - s.n_cached
        gen_time = s.t_last - s.t_first
        return Generation(text=text, token=tok, index=s.n_gen - 1 if tok >= 0 else s.n_gen, t=s.t_last - t0,
                          ttft=s.t_first - t0, prompt_tokens=len(job.tokens), prompt_time=prompt_time,
                          prompt_tps=n_computed / prompt_time if prompt_time > 0 else 0.0,
                          generation_tokens=s.n_gen,
                          generation_tps=(s.n_gen - 1) / gen_time if s.n_gen > 1 and gen_time > 0 else 0.0,
                          finish_reason=finish, logprob=lp, cached_tokens=s.n_cached, top_logprobs=top,
                          entropy=ent)

    def _release(self, s: Slot, clear: bool = False) -> None:
        job = s.job
        close = getattr(job.sampler, "close", None)
        if close:
            close()
        now = time.perf_counter()
        self.mean_job_s += 0.1 * ((now - job.t_arrival) - self.mean_job_s)
        s.job, s.next_tok, s.last_used = None, None, now
        if clear:  # the KV of a failed step is unknown: forget it
            self.eng.truncate(0, s.id)
            s.cached = []

    def _emit(self, job: Job, event: tuple) -> None:
        self._out.append((job, event))

    def _flush(self) -> None:
        """Deliver this step's events with one wake-up per event loop."""
        if not self._out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, ev in self._out:
            by_loop.setdefault(job.loop, []).append((job.queue, ev))
        self._out = []
        for loop, evs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, evs)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass


def _deliver(evs: list) -> None:
    for q, ev in evs:
        q.put_nowait(ev)
