"""Continuous batching for the server: a thread around the engine's generator, admission, limits, asyncio.

The generator (``engine/generator.py``) owns every token decision: slots, chunked prefill, prefix reuse,
sampling, stop strings, speculative drafts, per-token records. This module only runs it on one thread,
admits queued requests into idle slots, enforces timeouts, cancellation and the queue limit (429), counts
metrics, and hands each step's events to the requests' event loops.

All llama.cpp compute of the server runs on this thread (embeddings too, via :meth:`Batcher.call`): with
llama.cpp's OpenMP build a second computing thread anywhere in the process slows every decode by ~30%.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.generator import BatchGenerator, Request
from ..engine.records import Generation

PREFILL_HALF_LIFE = 4096  # prompt tokens after which a prefill step counts half in the measured rate
PREFILL_SAMPLE = 64  # fewest prompt tokens a step computes to be a rate sample (below: mostly a step's overhead)

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
    """A job that ran past its timeout while generating: the same request would time out again (a 504)."""


class QueueTimeout(Exception):
    """A job whose timeout ended while it still waited for a slot: overload, retryable (a 503 with Retry-After)."""

    def __init__(self, waited: float, retry_after: int, prefill: tuple[int, float, float] | None = None):
        self.retry_after = retry_after
        if prefill is None:
            super().__init__(f"the request waited {waited:g} s (--timeout) for a free slot and got none: the "
                             f"server is busy; retry after {retry_after} s")
            return
        tokens, est, left = prefill
        super().__init__(f"the request waited {_secs(waited)} s for a free slot; the {_secs(left)} s left of its "
                         f"--timeout cannot compute its {tokens}-token prompt (about {_secs(est)} s here), so it was "
                         f"not started: the server is busy; retry after {retry_after} s")


@dataclass(eq=False, kw_only=True)
class Job(Request):
    """A generator request plus what the server needs to deliver it (its event loop and queue, its timeout)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    timeout: float
    cancelled: bool = False
    t_prev: float = 0.0  # time of its previous token (inter-token latency metric)
    adapters: tuple[str, ...] | None = ()  # the base unless the request's model names some ('BASE+NAME')
    on_cancel: Callable[[Job], None] | None = None  # the generator's: stops a decode that is now for nobody

    def cancel(self) -> None:
        """Called from the event loop (disconnect, timeout): the batcher frees the slot next step, and a decode
        running for this job alone (a long prompt's prefill) stops at once rather than when it ends."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)


class Batcher:
    """Runs a :class:`BatchGenerator` with ``parallel`` slots on its own thread; :meth:`submit` from any thread."""

    def __init__(self, engine, *, parallel: int, slot_ctx: int, prefill_chunk: int, prefill_batch: int,
                 prefill_share: float, max_queue: int, metrics, vocab_bytes: list[bytes], draft_engine=None):
        self.eng = engine
        self.gen = BatchGenerator(engine, seqs=range(parallel), slot_ctx=slot_ctx, prefill_chunk=prefill_chunk,
                                  prefill_batch=prefill_batch, prefill_share=prefill_share,
                                  vocab_bytes=vocab_bytes, draft_engine=draft_engine)
        self.parallel = parallel
        self.max_queue = max_queue
        self.metrics = metrics
        self.eos = engine.eos_tokens
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.step_s = 0.05  # running mean of one decode step's time, for Retry-After (a guess until measured)
        self.mean_gen = 0.0  # running mean of the tokens a finished job generated (0: none finished yet)
        # prompt tokens computed and their steps' seconds, older steps fading (PREFILL_HALF_LIFE): the prefill rate
        self.prefill_tokens = self.prefill_s = 0.0
        self.last_job: dict[int, Job] = {}  # each slot's last finished job (GET /slots shows it)
        self._stop = False
        self.warmed = threading.Event()  # set once the warmup decode is done (or failed): ready for requests
        self._out: list[tuple[Job, Any]] = []
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
        return self.gen.busy

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot whose clients are still there."""
        with self.cv:
            self._purge()
            return len(self.waiting)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise :class:`QueueFull` when every slot is busy and the queue is full."""
        with self.cv:
            self._purge()
            free = self.parallel - self.busy
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(self._retry_after())
            job.on_cancel = self.gen.cancel
            self.waiting.append(job)
            self.cv.notify()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a new request (Retry-After of a 429 or a queue timeout)."""
        with self.cv:
            self._purge()
            return self._retry_after()

    def _purge(self) -> None:
        """Drop the queued jobs whose clients left or timed out (under ``cv``): they hold no queue place."""
        if any(j.cancelled for j in self.waiting):
            kept = deque(j for j in self.waiting if not j.cancelled)
            with self.metrics.lock:
                self.metrics.cancelled += len(self.waiting) - len(kept)
            self.waiting = kept

    def _job_s(self, job: Job, n_gen: int = 0) -> float:
        """Seconds ``job`` likely still runs (``n_gen`` tokens made), one decode step a token: its token budget,
        or (a job that may end at its EOS) twice what jobs have been making, or what it made so far, if less;
        never past its timeout."""
        tokens = job.sampling.max_tokens
        if self.mean_gen and not job.sampling.ignore_eos:
            tokens = min(tokens, max(2 * self.mean_gen, 2 * n_gen, n_gen + 1))
        left = job.timeout - (time.perf_counter() - job.t_arrival)
        return max(0.0, min(left, (tokens - n_gen) * self.step_s))

    def _retry_after(self) -> int:
        """(under ``cv``) When a slot frees for a job queued behind the present ones: each slot's running job's
        remaining time, then the queued jobs given to the first slot free, in order."""
        free_at = []
        for s in self.gen.slots:  # read while the batcher steps: each value once
            req, n_gen = s.req, getattr(s, "n_gen", 0)
            free_at.append(self._job_s(req, n_gen) if req is not None else 0.0)
        free_at.sort()
        for job in self.waiting:
            free_at[0] += self._job_s(job)
            free_at.sort()
        return max(1, min(3600, math.ceil(free_at[0])))

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
        try:
            self.eng.warmup()  # on this thread: see the module docstring
        finally:
            self.warmed.set()
        gen = self.gen
        while True:
            with self.cv:
                while not self._stop and not self.waiting and not gen.busy and not self.calls:
                    self.cv.wait()
                if self._stop:
                    break
                calls, self.calls = self.calls, deque()
                self._purge()
                admit, late = [], []
                while self.waiting and len(admit) < gen.free:  # in arrival order, whatever their adapters
                    job = self.waiting.popleft()
                    if (why := self._too_late(job)) is not None:
                        late.append((job, why))
                    else:
                        admit.append(job)
                if late:
                    self._refuse(late)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 — the caller gets it
                        fut.set_exception(e)
            for job in admit:
                try:
                    gen.insert(job)
                except Exception as e:  # noqa: BLE001 — a bad request fails alone
                    self._fail(job, e)
                    continue
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(job.tokens)
            self._expire()
            prompts = self._prompts()
            t0 = time.perf_counter()
            try:
                events = gen.step()
            except Exception as e:  # noqa: BLE001 — a failed decode fails the jobs in it, never the server
                for job in gen.fail():
                    self._fail(job, e)
                events, prompts = [], {}
            if gen.last_batch:
                dt = time.perf_counter() - t0
                self.step_s += 0.1 * (dt - self.step_s)
                self._measure_prefill(prompts, dt)
            self._account(events)
            self._flush()
        for job in self.gen.fail():
            self._fail(job, RuntimeError("the server is shutting down"))
        for job in self.waiting:
            self._emit(job, ("err", RuntimeError("the server is shutting down")))
        for _, fut in self.calls:
            fut.cancel()
        self._flush()

    # -- admission: a job that cannot compute its prompt in the time it has left is not started --------
    def _prompts(self) -> dict:
        """Each slot computing its own prompt (not waiting to copy another's) and its next prompt token."""
        return {s: s.prompt_i for s in self.gen.slots
                if s.req is not None and s.follow is None and s.prompt_i < len(s.req.tokens)}

    def _measure_prefill(self, prompts: dict, dt: float) -> None:
        """Count a step of ``dt`` seconds that computed prompt tokens (from :meth:`_prompts` before it)."""
        n = sum(s.prompt_i - i for s, i in prompts.items())
        if n >= PREFILL_SAMPLE:
            fade = 0.5 ** (n / PREFILL_HALF_LIFE)
            self.prefill_tokens = self.prefill_tokens * fade + n
            self.prefill_s = self.prefill_s * fade + dt

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second the steps that computed prompts ran at, lately (0: none measured yet)."""
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    def _too_late(self, job: Job) -> tuple[int, float, float] | None:
        """(under ``cv``) For a job whose wait for a slot left it too little time to compute its prompt at the
        measured prefill rate: (prompt tokens to compute, their estimated seconds, seconds left). None: admit it
        (no rate measured yet, the part of its prompt no slot holds fits, or the wait is not to blame: a prompt
        longer than the whole --timeout, barely queued, runs as before and its 504 says to raise --timeout)."""
        rate = self.prefill_tps
        if not rate:
            return None
        waited = time.perf_counter() - job.t_arrival
        left = job.timeout - waited
        if left * rate >= len(job.tokens):  # even the whole prompt fits: no prefix to look for
            return None
        n = self.gen.to_compute(job)
        est = n / rate
        if est <= left or (est > job.timeout and waited < left):
            return None
        return n, est, max(0.0, left)

    def _refuse(self, late: list[tuple[Job, tuple[int, float, float]]]) -> None:
        """(under ``cv``) Answer jobs :meth:`_too_late` found with a retryable queue timeout, never started."""
        retry = self._retry_after()
        now = time.perf_counter()
        for job, why in late:
            self._emit(job, ("err", QueueTimeout(now - job.t_arrival, retry, prefill=why)))
        with self.metrics.lock:
            self.metrics.cancelled += len(late)
        self._flush()  # at once, not after the next step

    def _expire(self) -> None:
        """Free the slots of cancelled and timed-out jobs (a timeout is an error event)."""
        now = time.perf_counter()
        for s in self.gen.slots:
            j = s.req
            if j is not None and (j.cancelled or now - j.t_arrival > j.timeout):
                if not j.cancelled:
                    self._emit(j, ("err", JobTimeout(f"the request took longer than {j.timeout:g} s")))
                with self.metrics.lock:
                    self.metrics.cancelled += 1
                self.gen.remove(j)
                self._done(j)

    def _account(self, events: list) -> None:
        """Metrics of one step (one lock), then its events to the jobs' queues."""
        m, now = self.metrics, time.perf_counter()
        with m.lock:
            if self.gen.last_batch:
                m.decode_steps += 1
                m.batch_tokens.observe(self.gen.last_batch)
            for job, ev in events:
                if isinstance(ev, Generation):
                    if not job.t_prev:  # the first record: the prompt is in (reused KV known only now for a
                        m.ttft.observe(now - job.t_arrival)  # request that waited for another slot's prompt)
                        m.cached_tokens += ev.cached_tokens
                        if 0 <= job.slot < len(self.gen.slots):
                            m.prompt_seconds += now - self.gen.slots[job.slot].t_admit
                    else:
                        m.itl.observe(now - job.t_prev)
                    job.t_prev = now
                    m.generation_tokens += ev.token >= 0 and ev.token not in self.eos
        for job, ev in events:
            self._emit(job, ev)
            if isinstance(ev, Generation) and ev.finish_reason:
                self._done(job, ev.generation_tokens)

    def _fail(self, job: Job, e: BaseException) -> None:
        self._emit(job, ("err", e))
        self._done(job)

    def _done(self, job: Job, n_gen: int = 0) -> None:
        """``n_gen``: the tokens a job that finished made (0: it failed or was stopped)."""
        if job.slot >= 0:
            self.last_job[job.slot] = job
        if n_gen:
            self.mean_gen = n_gen if not self.mean_gen else self.mean_gen + 0.1 * (n_gen - self.mean_gen)

    def _emit(self, job: Job, event: Any) -> None:
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


def _secs(x: float) -> str:
    """Seconds for a message: two significant digits below 10 (0.25, 3.1), whole seconds above (153)."""
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def _deliver(evs: list) -> None:
    for q, ev in evs:
        q.put_nowait(ev)
