"""The FastAPI app: OpenAI routes over the batcher, plus /health, /metrics, /tokenize and /detokenize."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine.records import Sampling
from ..errors import InvalidArgument
from . import schemas as S
from . import structured
from .batcher import Job, JobTimeout
from .http import Guard, error_payload, install_error_handlers
from .state import ServerState, message_dicts

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/health", "/metrics",
          "/tokenize", "/detokenize"}


def create_app(state: ServerState) -> FastAPI:
    """An app serving ``state``'s model; the batcher runs while the app's lifespan is active."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(title="ondevice", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=state.settings.api_key, max_body=state.settings.max_body_bytes,
                       metrics=state.metrics, routes=ROUTES)
    app.state.ondevice = state
    runner = Runner(state)

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots_idle": state.settings.parallel - state.batcher.busy,
                "slots_processing": state.batcher.busy, "queue_depth": state.batcher.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return S.ModelList(data=[S.ModelCard(id=state.model_id, created=state.created, meta=state.model_meta())])

    @app.post("/tokenize")
    async def tokenize(req: S.TokenizeRequest):
        toks = state.tokenize(req.content, add_special=req.add_special, parse_special=req.parse_special)
        if req.with_pieces:
            return {"tokens": [{"id": t, "piece": state.vocab_bytes[t].decode("utf-8", errors="replace")}
                               for t in toks]}
        return {"tokens": toks}

    @app.post("/detokenize")
    async def detokenize(req: S.DetokenizeRequest):
        return {"content": state.detokenize(req.tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(req: S.EmbeddingRequest):
        inp = req.input
        if isinstance(inp, str) or (inp and isinstance(inp[0], int)):
            inp = [inp]
        if not inp:
            raise InvalidArgument("input is empty; give a string or a list of strings")
        token_lists = [state.tokenize(x) if isinstance(x, str) else list(x) for x in inp]
        data, n_tok = [], 0
        for i, toks in enumerate(token_lists):
            state.check_prompt(toks) if toks else None
            vec = await run_in_threadpool(state.embed, toks)
            if req.dimensions is not None:
                if req.dimensions > vec.shape[0]:
                    raise InvalidArgument(f"dimensions {req.dimensions} exceeds the model's {vec.shape[0]}")
                vec = vec[:req.dimensions]
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)  # unit length, as OpenAI returns
            emb = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                   else vec.astype(float).tolist())
            data.append(S.Embedding(index=i, embedding=emb))
            n_tok += len(toks)
        return S.EmbeddingResponse(data=data, model=state.model_id,
                                   usage=S.EmbeddingUsage(prompt_tokens=n_tok, total_tokens=n_tok))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        return await runner.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: S.CompletionRequest, request: Request):
        return await runner.completions(req, request)

    return app


def _sampling(req, max_tokens: int, grammar: str | None = None) -> Sampling:
    if req.presence_penalty or req.frequency_penalty:
        raise InvalidArgument("presence_penalty and frequency_penalty are not supported; use repeat_penalty "
                              "(1 = off) instead")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise InvalidArgument("stop contains an empty string; remove it")
    kw = dict(temp=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
              repeat_penalty=req.repeat_penalty, max_tokens=max_tokens, stop=tuple(stop), grammar=grammar,
              ignore_eos=req.ignore_eos)
    if req.seed is not None:
        kw["seed"] = req.seed
    return Sampling(**kw)


def _usage(end: dict) -> S.Usage:
    return S.Usage(prompt_tokens=end["prompt_tokens"], completion_tokens=end["completion_tokens"],
                   total_tokens=end["prompt_tokens"] + end["completion_tokens"],
                   prompt_tokens_details=S.PromptTokensDetails(cached_tokens=end["cached_tokens"]))


def _sse(obj) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


_MARK = "\u0000ondevice-text\u0000"


def _text_sse(make) -> Callable[[str], bytes]:
    """The per-token SSE event, serialised once: ``make(text)`` builds the chunk model for ``text``.

    The hot path (one plain text delta per token) then costs a string join, not a pydantic model.
    """
    head, tail = _sse(make(_MARK)).decode().split(json.dumps(_MARK)[1:-1])
    head, tail = head[:-1], tail[1:]  # drop the quotes around the mark

    def event(text: str) -> bytes:
        return (head + json.dumps(text, ensure_ascii=False) + tail).encode()

    return event


class Runner:
    """Turns requests into batcher jobs and their events into OpenAI responses."""

    def __init__(self, state: ServerState):
        self.state = state

    def _job(self, loop, tokens: list[int], sampling: Sampling, **kw) -> Job:
        st = self.state
        st.check_prompt(tokens)
        room = st.settings.ctx - len(tokens)
        if sampling.max_tokens > room:  # never ask for more than the slot can hold
            sampling = dataclasses.replace(sampling, max_tokens=room)
        sampler = st.engine.make_sampler(sampling)  # a grammar that does not parse fails here: a 400
        return Job(tokens=tokens, sampling=sampling, sampler=sampler, loop=loop,
                   queue=asyncio.Queue(), timeout=st.settings.timeout, **kw)

    async def events(self, job: Job, request: Request, poll_disconnect: bool) -> AsyncIterator[tuple]:
        """The job's events until its end; a timeout or a gone client cancels it and frees the slot."""
        finished = False
        try:
            while True:
                left = job.timeout - (time.perf_counter() - job.t_arrival)
                if left <= 0:
                    raise JobTimeout(f"the request took longer than {job.timeout:g} s")
                try:
                    if job.queue.empty():  # asyncio.timeout, not wait_for: no extra task per token
                        async with asyncio.timeout(min(left, 1.0)):
                            ev = await job.queue.get()
                    else:
                        ev = job.queue.get_nowait()
                except TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        return
                    continue
                if ev[0] == "err":
                    finished = True
                    raise ev[1]
                if ev[0] == "end":
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                job.cancel()

    # -- chat ------------------------------------------------------------------------------------------
    async def chat(self, req: S.ChatCompletionRequest, request: Request):
        st = self.state
        plan = structured.plan(req)
        messages = message_dicts(req.messages)
        tools = [t.model_dump() for t in req.tools] if req.tools else None
        loop = asyncio.get_running_loop()

        def prepare():
            text = st.render_chat(messages, tools, plan.system_note)
            toks = st.tokenize(text, add_special=st.template is None, parse_special=True)
            max_t = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            sampling = _sampling(req, st.settings.ctx if max_t is None else max_t, plan.grammar)
            lp = (req.top_logprobs or 0) if req.logprobs else None
            return self._job(loop, toks, sampling, logprobs=lp)

        job = await run_in_threadpool(prepare)
        st.batcher.submit(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(job, req, request, plan, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, lps, end = [], [], None
        async for ev in self.events(job, request, poll_disconnect=True):
            if ev[0] == "tok":
                parts.append(ev[2])
                if ev[3] is not None:
                    lps.append(self._chat_lp(ev[1], ev[3]))
            elif ev[0] == "end":
                end = ev
        if end is None:  # client gone: nobody reads this
            return JSONResponse({}, status_code=499)
        text = "".join(parts)
        finish = end[1]
        calls = structured.parse_tool_call(text, plan) if plan.tools else None
        msg = S.AssistantMessage(content=None if calls else text, tool_calls=calls)
        if calls:
            finish = "tool_calls"
        choice = S.ChatChoice(message=msg, finish_reason=finish,
                              logprobs=S.ChoiceLogprobs(content=lps) if req.logprobs else None)
        return S.ChatCompletion(model=st.model_id, choices=[choice], usage=_usage(end[2]))

    def _chat_lp(self, tok: int, lp: tuple) -> S.TokenLogprob:
        pieces = self.state.pieces
        return S.TokenLogprob(token=pieces[tok], logprob=lp[0], bytes=list(pieces[tok].encode()),
                              top_logprobs=[S.TopLogprob(token=pieces[t], logprob=v, bytes=list(pieces[t].encode()))
                                            for t, v in lp[1]])

    async def _chat_stream(self, job: Job, req, request: Request, plan, include_usage: bool):
        st = self.state
        cid, created = S._id("chatcmpl"), int(time.time())

        def chunk(delta: S.ChatDelta, finish=None, logprobs=None, usage=None, choices=True):
            ch = [S.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else []
            return _sse(S.ChatCompletionChunk(id=cid, created=created, model=st.model_id, choices=ch, usage=usage))

        text_chunk = _text_sse(lambda t: S.ChatCompletionChunk(
            id=cid, created=created, model=st.model_id, choices=[S.ChatChunkChoice(delta=S.ChatDelta(content=t))]))

        # a reply that may be a tool call is held until it can be parsed (it is one JSON object)
        hold = plan.tool_mode in ("required", "auto") and bool(plan.tools)
        held: list[str] = []
        try:
            yield chunk(S.ChatDelta(role="assistant", content=""))
            async for ev in self.events(job, request, poll_disconnect=False):
                if ev[0] == "tok":
                    text, lp = ev[2], ev[3]
                    if hold:
                        held.append(text)
                        if plan.tool_mode == "auto" and "".join(held).lstrip()[:1] not in ("", "{"):
                            hold, text = False, "".join(held)  # free text after all: stream it
                        else:
                            continue
                    if lp is not None:
                        logprobs = S.ChoiceLogprobs(content=[self._chat_lp(ev[1], lp)])
                        yield chunk(S.ChatDelta(content=text), logprobs=logprobs)
                    elif text:
                        yield text_chunk(text)
                elif ev[0] == "end":
                    finish = ev[1]
                    if hold:
                        text = "".join(held)
                        calls = structured.parse_tool_call(text, plan)
                        if calls:
                            finish = "tool_calls"
                            yield chunk(S.ChatDelta(tool_calls=[S.ToolCallDelta(
                                index=0, id=calls[0].id, type="function", function=calls[0].function)]))
                        elif text:
                            yield chunk(S.ChatDelta(content=text))
                    yield chunk(S.ChatDelta(), finish=finish)
                    if include_usage:
                        yield chunk(S.ChatDelta(), usage=_usage(ev[2]), choices=False)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an SSE event
            yield _sse(error_payload(e)[1])

    # -- completions -------------------------------------------------------------------------------------
    async def completions(self, req: S.CompletionRequest, request: Request):
        st = self.state
        if req.suffix:
            raise InvalidArgument("suffix (fill-in-the-middle) is not supported; send the prompt only")
        p = req.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise InvalidArgument("prompt is empty; give a string, a list of strings or token ids")
        if req.stream and len(prompts) > 1:
            raise InvalidArgument("streaming takes one prompt; send one request per prompt (they run in parallel)")
        k = req.logprobs
        loop = asyncio.get_running_loop()

        def prepare():
            jobs = []
            for x in prompts:
                toks = st.tokenize(x, add_special=True, parse_special=True) if isinstance(x, str) else list(x)
                jobs.append(self._job(loop, toks, _sampling(req, req.max_tokens), logprobs=k,
                                      prompt_logprobs=k if (req.echo and k is not None) else None))
            return jobs

        jobs = await run_in_threadpool(prepare)
        try:
            for job in jobs:
                st.batcher.submit(job)
        except Exception:
            for job in jobs:
                job.cancel()
            raise
        if req.stream:
            return StreamingResponse(self._completion_stream(jobs[0], prompts[0], req, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(self._collect(job, request) for job in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                for job in jobs:
                    job.cancel()
                raise r
        if any(r is None for r in results):
            return JSONResponse({}, status_code=499)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        for i, (job, x, (prompt_lp, gen, end)) in enumerate(zip(jobs, prompts, results)):
            prompt_text = (x if isinstance(x, str) else st.detokenize(job.tokens)) if req.echo else ""
            text = prompt_text + "".join(g[2] for g in gen)
            logprobs = None
            if k is not None:
                base = 0 if req.echo else len(x if isinstance(x, str) else st.detokenize(job.tokens))
                entries = (prompt_lp if req.echo else []) + [(g[1], g[3][0], g[3][1]) for g in gen if g[1] >= 0]
                logprobs, _ = self._completion_lp(entries, base)
            choices.append(S.CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=end[1]))
            for key in usage:
                usage[key] += end[2][key]
        return S.Completion(model=st.model_id, choices=choices, usage=_usage(usage))

    async def _collect(self, job: Job, request: Request):
        prompt_lp, gen, end = [], [], None
        async for ev in self.events(job, request, poll_disconnect=True):
            if ev[0] == "prompt":
                prompt_lp.extend(ev[1])
            elif ev[0] == "tok":
                gen.append(ev)
            elif ev[0] == "end":
                end = ev
        return None if end is None else (prompt_lp, gen, end)

    def _completion_lp(self, entries: list, offset: int) -> tuple[S.CompletionLogprobs, int]:
        """Legacy completions logprobs: entries are (token, logprob | None, top [(token, lp)] | None)."""
        pieces, vb = self.state.pieces, self.state.vocab_bytes
        out = S.CompletionLogprobs()
        for tok, lp, top in entries:
            out.tokens.append(pieces[tok])
            out.token_logprobs.append(lp)
            out.top_logprobs.append(None if top is None else {pieces[t]: v for t, v in top})
            out.text_offset.append(offset)
            offset += len(vb[tok].decode("utf-8", errors="replace"))
        return out, offset

    async def _completion_stream(self, job: Job, prompt, req, request: Request):
        st = self.state
        cid, created = S._id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        prompt_text = (prompt if isinstance(prompt, str) else st.detokenize(job.tokens)) if req.echo else ""
        offset = 0 if req.echo else len(prompt if isinstance(prompt, str) else st.detokenize(job.tokens))

        def chunk(text: str, lp=None, finish=None, usage=None, choices=True):
            ch = [S.CompletionChoice(text=text, logprobs=lp, finish_reason=finish)] if choices else []
            return _sse(S.Completion(id=cid, created=created, model=st.model_id, choices=ch, usage=usage))

        text_chunk = _text_sse(lambda t: S.Completion(id=cid, created=created, model=st.model_id,
                                                      choices=[S.CompletionChoice(text=t)]))

        try:
            if prompt_text and not (req.echo and req.logprobs is not None):
                yield chunk(prompt_text)
            async for ev in self.events(job, request, poll_disconnect=False):
                if ev[0] == "prompt":
                    lp, offset = self._completion_lp(ev[1], offset)
                    yield chunk(st.detokenize([t for t, _, _ in ev[1]]), lp=lp)
                elif ev[0] == "tok":
                    lp = None
                    if ev[3] is not None and ev[1] >= 0:
                        lp, offset = self._completion_lp([(ev[1], ev[3][0], ev[3][1])], offset)
                    yield chunk(ev[2], lp=lp) if lp is not None else text_chunk(ev[2])
                elif ev[0] == "end":
                    yield chunk("", finish=ev[1])
                    if include_usage:
                        yield chunk("", usage=_usage(ev[2]), choices=False)
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an SSE event
            yield _sse(error_payload(e)[1])
