"""Requests to batcher jobs, and their events to OpenAI responses (streamed or whole): what the routes of
``app.py`` call."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import weakref
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..cascade.serve import NOT_APPLICABLE_HEADERS, not_applicable_info
from ..engine.records import Generation, Sampling
from ..engine.stops import with_prompt_stops
from ..errors import InvalidArgument
from . import replies as R
from . import schemas as S
from . import structured
from .batcher import Job, JobTimeout, QueueTimeout
from .chunks import (
    PING,
    SSE_PING,
    ShownTokens,
    TextOffset,
    chat_logprobs,
    completion_logprobs,
    lp_entry,
    null_content,
    sse,
    text_sse,
    timings_of,
    usage_of,
)
from .fim import fim_prompt
from .http import ShuttingDown, error_payload, note
from .sampling import choice_samplings, request_sampling
from .state import ServerState, message_dicts

DISCONNECT_POLL_S = 0.25  # how often a request answered in one piece checks that its client is still there


class Runner:
    """Turns requests into batcher jobs and their events into OpenAI responses."""

    def __init__(self, state: ServerState):
        self.state = state
        self.live: weakref.WeakSet[Job] = weakref.WeakSet()  # jobs submitted and not yet forgotten

    def end_requests(self) -> None:
        """The server is stopping: end every request in flight now, on the event loop (a stream gets an error
        event, any other request a 503), rather than generate on until the graceful shutdown's time is up."""
        self.state.closing = True
        if self.state.cascade is not None:  # deferred requests waiting on the cloud: the device answers now
            self.state.cascade.cloud.stop_waiting()
        for job in list(self.live):
            job.cancel()
            job.queue.put_nowait(("err", ShuttingDown()))  # after the job's last event it is never read

    def _job(self, loop, tokens: list[int], sampling: Sampling, **kw) -> Job:
        st = self.state
        st.check_prompt(tokens)
        room = st.settings.ctx - len(tokens)
        if sampling.max_tokens > room:  # never ask for more than the slot can hold
            sampling = dataclasses.replace(sampling, max_tokens=room)
        if sampling.draft == "model" and st.draft_engine is None:
            raise InvalidArgument("draft 'model' needs a server started with --draft MODEL; use draft 'lookup'")
        sampler = st.engine.make_sampler(sampling, tokens)  # a grammar that does not parse fails here: a 400
        return Job(tokens=tokens, sampling=with_prompt_stops(sampling, tokens), sampler=sampler, loop=loop,
                   queue=asyncio.Queue(), timeout=st.settings.timeout, **kw)

    def ping_interval(self, req) -> float | None:
        """Seconds of silence after which a stream sends an SSE ping: the request's ``sse_ping_interval`` where
        its schema keeps it (llama-server's), else ``--sse-ping-interval``; None when 0 or less (off)."""
        given = getattr(req, "sse_ping_interval", None)
        n = self.state.settings.sse_ping_interval if given is None else given
        return n if n > 0 else None

    async def events(self, job: Job, request: Request, poll_disconnect: bool,
                     ping: float | None = None) -> AsyncIterator[Generation | tuple]:
        """The job's events until its end; a timeout or a gone client cancels it and frees the slot. With
        ``poll_disconnect`` (no stream writes to notice a gone client) the connection is checked every
        ``DISCONNECT_POLL_S`` while tokens come, and after a second without any. With ``ping``, :data:`PING`
        after that many seconds without an event (a queue wait, a long prefill)."""
        finished = False
        next_poll = time.perf_counter() + DISCONNECT_POLL_S
        next_ping = time.perf_counter() + ping if ping else math.inf
        try:
            while True:
                now = time.perf_counter()
                left = job.timeout - (now - job.t_arrival)
                if left <= 0:
                    if job.slot < 0:  # never admitted: the queue, not the request, took the time
                        raise QueueTimeout(job.timeout, self.state.batcher.retry_after())
                    raise JobTimeout(f"the request took longer than {job.timeout:g} s")
                if poll_disconnect and now >= next_poll:  # Starlette's check does not wait: it looks once
                    next_poll = now + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                if now >= next_ping:
                    next_ping = now + ping
                    yield PING
                    continue
                try:
                    if job.queue.empty():  # asyncio.timeout, not wait_for: no extra task per token
                        async with asyncio.timeout(min(left, 1.0, next_ping - now)):
                            ev = await job.queue.get()
                    else:
                        ev = job.queue.get_nowait()
                except TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return
                    continue
                if ping:
                    next_ping = time.perf_counter() + ping
                if isinstance(ev, Generation):
                    finished = ev.finish_reason is not None
                elif ev[0] == "err":
                    finished = True
                    raise ev[1]
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                job.cancel()

    async def indexed(self, jobs: list[Job], request: Request, ping: float | None = None
                      ) -> AsyncIterator[tuple[int, Generation | tuple]]:
        """Every job's events tagged with its index (its choice), in the order they come; a failure of one
        ends them all. Streams of ``n`` choices (and of several prompts) interleave their choices this way.
        ``ping``: as :meth:`events`' (the first choice's silences only)."""
        if len(jobs) == 1:  # the common stream: no task, no second queue
            async for ev in self.events(jobs[0], request, poll_disconnect=False, ping=ping):
                yield 0, ev
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for ev in self.events(job, request, poll_disconnect=False, ping=ping if i == 0 else None):
                    merged.put_nowait((i, ev))
                merged.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 — handed to the reader, which raises it
                merged.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            left = len(jobs)
            while left:
                i, ev = await merged.get()
                if ev is None:
                    left -= 1
                elif isinstance(ev, Exception):
                    raise ev
                else:
                    yield i, ev
        finally:  # the client went away or one choice failed: stop the others and free their slots
            for t in tasks:
                t.cancel()
            for job in jobs:
                job.cancel()

    # -- chat ------------------------------------------------------------------------------------------
    def chat_prompt(self, req: S.ChatCompletionRequest) -> tuple[structured.Plan, list[dict], list[dict] | None]:
        """The structured-output plan, messages and tools a chat request's prompt is rendered from."""
        # tool_choice none: the model is not shown the tools (a template that renders them would invite calls)
        tools = [t.model_dump() for t in req.tools] if req.tools and req.tool_choice != "none" else None
        return structured.plan(req, self.state.model.template), message_dicts(req.messages), tools

    async def prompt_tokens(self, req: S.ChatCompletionRequest) -> int:
        """How many tokens the prompt ``req`` renders to, as :meth:`chat` renders it (the token-count routes)."""
        plan, messages, tools = self.chat_prompt(req)
        return len(await run_in_threadpool(self.state.chat_tokens, messages, tools, plan.system_note))

    async def chat(self, req: S.ChatCompletionRequest, request: Request):
        st = self.state
        plan, messages, tools = self.chat_prompt(req)
        loop = asyncio.get_running_loop()
        cascade = st.cascade if st.cascade is not None and st.cascade.applies(req, plan) else None

        def prepare():
            toks = st.chat_tokens(messages, tools, plan.system_note)
            max_t = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            sampling = request_sampling(req, st.settings.ctx if max_t is None else max_t, plan.grammar,
                                        st.default_draft)
            if plan.tool_mode == "required" and plan.tools:  # only calls: a stop string could only cut one
                sampling = dataclasses.replace(sampling, stop=())
            if cascade is not None:
                sampling = cascade.sampling(sampling)
            lp = (req.top_logprobs or 0) if req.logprobs else None
            return [self._job(loop, toks, s, logprobs=lp, adapters=st.adapters_for(req.model, req.lora))
                    for s in choice_samplings(req, sampling)]

        jobs = await run_in_threadpool(prepare)
        self._submit(jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if cascade is not None:
                return await cascade.stream(self, jobs[0], req, request, messages, include_usage)
            told = st.cascade is not None  # a cascade server says who answered a request it does not apply to too
            return StreamingResponse(self._chat_stream(jobs, req, request, plan, include_usage, told),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **(NOT_APPLICABLE_HEADERS if told else {})})
        if cascade is not None and cascade.defers_early(req):  # the cloud is asked before the device's answer ends
            return await cascade.finish_early(self, jobs[0], req, request, messages,
                                              lambda gen: self._completion(req, plan, [([], gen)], request))
        results = await self._gather(jobs, request)
        if results is None:  # client gone: nobody reads this
            return JSONResponse({}, status_code=499)
        resp = self._completion(req, plan, results, request)
        if st.cascade is not None:
            if cascade is None:
                return st.cascade.not_applicable(resp)
            return await cascade.finish(req, resp, results[0][1], messages, request)
        return resp

    def _completion(self, req: S.ChatCompletionRequest, plan: structured.Plan, results: list, request: Request
                    ) -> R.ChatCompletion:
        """The chat completion of the jobs' ``results`` (each choice's (echo logprobs, records))."""
        st = self.state
        choices = []
        for i, (_, gen) in enumerate(results):
            text = "".join(g.text for g in gen)
            finish = gen[-1].finish_reason
            content, calls = (structured.split_reply(text, plan) if plan.tools
                              else (structured.unfence(text) if plan.fenced else text, None))
            if calls:
                finish = "tool_calls"
            elif plan.tools:  # a reply that started a call and was cut short: the calls so far, as streamed
                content, calls, cut = structured.cut_reply(text, plan)
                finish = _cut_finish(finish) if cut else finish
            msg = R.AssistantMessage(content=content, tool_calls=calls)
            lps = ([chat_logprobs(self.state, g) for g in ShownTokens.of(gen, st.engine.eos_tokens)]
                   if req.logprobs else None)
            choices.append(R.ChatChoice(index=i, message=msg, finish_reason=finish, stop_reason=gen[-1].stop,
                                        logprobs=R.ChoiceLogprobs(content=lps) if req.logprobs else None))
        lasts = [gen[-1] for _, gen in results]
        usage = usage_of(*lasts, n=req.n)
        note(request, tokens=(usage.prompt_tokens, usage.completion_tokens))
        return R.ChatCompletion(model=st.answered_by(req.model), choices=choices, usage=usage,
                                timings=timings_of(lasts[0]) if len(lasts) == 1 else None)

    def _check_room(self, n_jobs: int) -> None:
        room = self.state.settings.parallel + self.state.settings.max_queue
        if n_jobs > room:
            raise InvalidArgument(f"the request asks for {n_jobs} generations (prompts x n) but the server holds "
                                  f"at most {room} (--parallel + --max-queue); ask for fewer")

    def _submit(self, jobs: list[Job]) -> None:
        """Queue every job, or none: a full queue cancels those already queued."""
        if self.state.closing:
            raise ShuttingDown()
        self._check_room(len(jobs))
        try:
            for job in jobs:
                self.state.batcher.submit(job)
                self.live.add(job)
        except Exception:
            for job in jobs:
                job.cancel()
            raise

    async def _gather(self, jobs: list[Job], request: Request) -> list[tuple[list, list[Generation]]] | None:
        """Every job's (echo logprobs, records); a failure cancels them all; None when the client went away."""
        results = await asyncio.gather(*(self._collect(job, request) for job in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                for job in jobs:
                    job.cancel()
                raise r
        return None if any(r is None for r in results) else results

    async def _chat_stream(self, jobs: list[Job], req, request: Request, plan, include_usage: bool,
                           not_applicable: bool = False):
        """SSE chunks of every choice (``index`` tells them apart), then the usage of all when asked for.
        ``not_applicable``: a cascade server's request the cascade does not apply to: each choice's last chunk
        says the device answered, as the whole reply's ``cascade`` object does."""
        st = self.state
        cid, created = R.reply_id("chatcmpl"), int(time.time())
        told = not_applicable_info(st.answered_by(req.model)) if not_applicable else None

        def chunk(i: int, delta: R.ChatDelta, finish=None, logprobs=None, usage=None, choices=True, timings=None,
                  stop=None):
            ch = ([R.ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs, stop_reason=stop)]
                  if choices else [])
            return sse(R.ChatCompletionChunk(id=cid, created=created, model=st.answered_by(req.model), choices=ch,
                                             usage=usage, timings=timings, cascade=told if finish else None))

        text_chunk = [text_sse(lambda t, i=i: R.ChatCompletionChunk(
            id=cid, created=created, model=st.answered_by(req.model),
            choices=[R.ChatChunkChoice(index=i, delta=R.ChatDelta(content=t))])) for i in range(len(jobs))]
        calls = [structured.ToolStream(plan) for _ in jobs]  # a reply that may be tool calls is held until read
        fences = [structured.FormatStream() if plan.fenced else None for _ in jobs]  # a response_format's ```json
        shown = [ShownTokens(st.engine.eos_tokens) for _ in jobs]
        lasts: list[Generation | None] = [None] * len(jobs)
        made, ended = 0, False
        try:
            for i in range(len(jobs)):  # content null while the reply may be calls (OpenAI's, llama-server's)
                yield null_content(chunk(i, R.ChatDelta(role="assistant"))) if plan.tools else \
                    chunk(i, R.ChatDelta(role="assistant", content=""))
            async for i, g in self.indexed(jobs, request, self.ping_interval(req)):
                if g is PING:
                    yield SSE_PING
                    continue
                made += g.token >= 0
                text, deltas = calls[i].feed(g.text)
                if fences[i] is not None:
                    text = fences[i].feed(text)
                for d in deltas:
                    yield chunk(i, R.ChatDelta(tool_calls=[d]))
                lps = shown[i].feed(g)
                if text is not None:
                    if lps:
                        yield chunk(i, R.ChatDelta(content=text),
                                    logprobs=R.ChoiceLogprobs(content=[chat_logprobs(st, r) for r in lps]))
                    elif text:
                        yield text_chunk[i](text)
                if g.finish_reason:
                    lasts[i] = g
                    finish = g.finish_reason
                    were_calls, text = calls[i].finish()
                    for d in calls[i].rest():
                        yield chunk(i, R.ChatDelta(tool_calls=[d]))
                    if were_calls:
                        finish = "tool_calls"
                    else:
                        if text:
                            yield chunk(i, R.ChatDelta(content=text))
                        if calls[i].cut:
                            finish = _cut_finish(finish)
                    yield chunk(i, R.ChatDelta(), finish=finish, timings=timings_of(g), stop=g.stop)
            usage = usage_of(*lasts, n=req.n)
            note(request, tokens=(usage.prompt_tokens, usage.completion_tokens))
            ended = True
            if include_usage:
                yield chunk(0, R.ChatDelta(), usage=usage, choices=False)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an SSE event
            ended = True
            yield _stream_error(e, request)
        finally:
            if not ended:  # the client went away: what it was sent, for the access log
                note(request, tokens=(sum(len(j.tokens) for j in jobs), made))

    # -- completions -------------------------------------------------------------------------------------
    async def completions(self, req: S.CompletionRequest, request: Request):
        st = self.state
        p = req.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise InvalidArgument("prompt is empty; give a string, a list of strings or token ids")
        self._check_room(len(prompts) * req.n)  # before any prompt is tokenized and given a sampler
        if req.suffix and (req.echo or not all(isinstance(x, str) for x in prompts)):
            raise InvalidArgument("suffix (fill in the middle) takes text prompts and no echo: send the text before "
                                  "the gap as prompt, the text after it as suffix")
        k = req.logprobs
        loop = asyncio.get_running_loop()

        def prepare():
            jobs = []
            for x in prompts:  # prompt-major: choice index = prompt index * n + i, as OpenAI numbers them
                toks = (fim_prompt(st, x, req.suffix) if req.suffix  # fill in the middle (a code model's tokens)
                        else st.tokenize(x, add_special=True, parse_special=True) if isinstance(x, str) else list(x))
                jobs += [self._job(loop, toks, s, logprobs=k, prompt_logprobs=k if (req.echo and k is not None)
                                   else None, eos_entry=k is not None, adapters=st.adapters_for(req.model, req.lora))
                         for s in choice_samplings(req, request_sampling(req, req.max_tokens, None,
                                                                         st.default_draft))]
            return jobs

        jobs = await run_in_threadpool(prepare)
        self._submit(jobs)
        if req.stream:
            return StreamingResponse(self._completion_stream(jobs, [x for x in prompts for _ in range(req.n)], req,
                                                             request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await self._gather(jobs, request)
        if results is None:
            return JSONResponse({}, status_code=499)
        choices = []
        per_choice = [x for x in prompts for _ in range(req.n)]
        for i, (job, x, (prompt_lp, gen)) in enumerate(zip(jobs, per_choice, results)):
            source = x if isinstance(x, str) else st.detokenize(job.tokens)
            text = (source if req.echo else "") + "".join(g.text for g in gen)
            logprobs = None
            if k is not None:
                base = 0 if req.echo else len(source)  # text offsets count from the echoed prompt, or past it
                shown = ShownTokens.of(gen, st.engine.eos_tokens)
                entries = (prompt_lp if req.echo else []) + [lp_entry(g) for g in shown]
                # a prompt sent as text is echoed as sent, control tokens' text and all: the offsets count it
                logprobs = completion_logprobs(self.state, entries,
                                               TextOffset(base, source if req.echo and isinstance(x, str) else None))
            choices.append(R.CompletionChoice(index=i, text=text, logprobs=logprobs,
                                              finish_reason=gen[-1].finish_reason))
        lasts = [gen[-1] for _, gen in results]
        usage = usage_of(*lasts, n=req.n)
        note(request, tokens=(usage.prompt_tokens, usage.completion_tokens))
        return R.Completion(model=st.answered_by(req.model), choices=choices, usage=usage,
                            timings=timings_of(lasts[0]) if len(lasts) == 1 else None)

    async def _collect(self, job: Job, request: Request) -> tuple[list, list[Generation]] | None:
        """Echo logprobs and the records of one job; None when the client went away."""
        prompt_lp, gen = [], []
        async for ev in self.events(job, request, poll_disconnect=True):
            if isinstance(ev, Generation):
                gen.append(ev)
            else:
                prompt_lp.extend(ev[1])
        return (prompt_lp, gen) if gen and gen[-1].finish_reason else None

    async def _completion_stream(self, jobs: list[Job], prompts: list, req, request: Request):
        """SSE chunks of every choice (``index``: prompt-major, as OpenAI numbers them; ``prompts``: each job's),
        then the usage of all when asked for."""
        st = self.state
        cid, created = R.reply_id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sources = [x if isinstance(x, str) else st.detokenize(job.tokens) for job, x in zip(jobs, prompts)]
        # logprobs text offsets, per choice; a text prompt is echoed as sent, control tokens' text and all
        offset = [TextOffset(0, x if isinstance(p, str) else None) if req.echo else TextOffset(len(x))
                  for x, p in zip(sources, prompts)]
        shown = [ShownTokens(st.engine.eos_tokens) for _ in jobs]

        def chunk(i: int, text: str, lp=None, finish=None, usage=None, choices=True, timings=None):
            ch = [R.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)] if choices else []
            return sse(R.Completion(id=cid, created=created, model=st.answered_by(req.model), choices=ch, usage=usage,
                                     timings=timings))

        text_chunk = [text_sse(lambda t, i=i: R.Completion(id=cid, created=created, model=st.answered_by(req.model),
                                                            choices=[R.CompletionChoice(index=i, text=t)]))
                      for i in range(len(jobs))]
        lasts: list[Generation | None] = [None] * len(jobs)
        made, ended = 0, False
        try:
            if req.echo and req.logprobs is None:  # with logprobs the echo comes as the prompt's entries
                for i, x in enumerate(sources):
                    if x:
                        yield chunk(i, x)
            async for i, ev in self.indexed(jobs, request, self.ping_interval(req)):
                if ev is PING:
                    yield SSE_PING
                    continue
                if not isinstance(ev, Generation):  # echo logprobs of the prompt: its text as sent, piece by piece
                    start = offset[i].chars
                    lp = completion_logprobs(self.state, ev[1], offset[i])
                    yield chunk(i, sources[i][start:offset[i].chars] if isinstance(prompts[i], str)
                                else st.detokenize([t for t, _, _ in ev[1]]), lp=lp)
                    continue
                made += ev.token >= 0
                lps = shown[i].feed(ev)
                if lps:
                    yield chunk(i, ev.text, lp=completion_logprobs(st, [lp_entry(g) for g in lps], offset[i]))
                elif ev.text:
                    yield text_chunk[i](ev.text)
                if ev.finish_reason:
                    lasts[i] = ev
                    yield chunk(i, "", finish=ev.finish_reason, timings=timings_of(ev))
            usage = usage_of(*lasts, n=req.n)
            note(request, tokens=(usage.prompt_tokens, usage.completion_tokens))
            ended = True
            if include_usage:
                yield chunk(0, "", usage=usage, choices=False)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an SSE event
            ended = True
            yield _stream_error(e, request)
        finally:
            if not ended:  # the client went away: what it was sent, for the access log
                note(request, tokens=(sum(len(j.tokens) for j in jobs), made))


def _cut_finish(finish: str | None) -> str | None:
    """The finish reason of a reply whose last call was cut short: ``length`` (the call is incomplete, as after
    max_tokens), also when a stop string cut it."""
    return "length" if finish == "stop" else finish


def _stream_error(e: BaseException, request: Request) -> bytes:
    """The SSE error event that ends a stream whose headers are sent; the access log and the metrics count the
    request under the status it would have had unstreamed."""
    status, payload, _ = error_payload(e)
    note(request, error=payload["error"]["message"], status=status)
    return sse(payload)
