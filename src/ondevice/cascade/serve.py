"""``ondevice serve --cascade URL``: the server's cascade tier, called from two small hooks in serve/runner.py.

Non-streaming: the device's whole answer is scored; an unsure one is sent to the cloud (the device's slot is
already free by then) and the client gets the cloud's answer, or the device's marked as a fallback when the
cloud fails, is slow or the budget is spent. A request deferred whatever the device answers (``always_defer``) does
not wait for the device's whole answer: its first token is scored, then the cloud is asked while the device decodes
on (:meth:`ServerCascade.finish_early`), as a stream does.

Streaming has to decide before the first byte goes out (the tier is in the response headers): the first
``--cascade-prefix-tokens`` device tokens are buffered and scored (an answer that ends sooner is scored
whole); then either the device stream continues, or the cloud's stream is relayed. While the cloud's first
token is awaited the device keeps generating, so a cloud that fails before its first token costs nothing
but the wait: the device's answer streams on, marked as a fallback. Once cloud text has been sent, a cloud
failure ends the stream with an error event (text from two models is not spliced). ``--cascade-timeout`` bounds
the cloud's whole streamed answer, as a whole one's: a stream kept alive with empty deltas or comments falls back
to the device when nothing was relayed yet, else ends where it is, ``finish_reason: "error"`` and ``fallback:
"timeout"`` (not "length": no token cap ended it). The trade-off: a larger
prefix decides better (more tokens scored) but delays the first token by that many decode steps; 0 buffers
the whole answer (best decision, no streaming benefit). A request whose policy decides without the confidence
(``never_defer``, ``always_defer``, threshold 0) buffers one token only. ``benchmarks/cascade_bench.py`` measures both.

A reply's ``usage`` describes the completion the client received: the cloud's, when the cloud answered, as the
cloud counted it (or, where it reports no usage, the device's count of the same prompt and the device
tokenizer's count of the cloud's text, and ``cascade.usage_source`` says so); the device's own figures are
``cascade.device_usage``. Streaming and non-streaming replies agree (:meth:`ServerCascade._usage`). That count runs
in a worker thread, never on the event loop, and the text is bounded (a larger reply is a ``too_large`` fallback,
:mod:`.guard`): a cloud that sends megabytes does not stall the device tier.

The budget charges every deferral whose request may have reached the cloud (answered, timed out, cut, or whose
client left: the cloud may bill each); only one never sent (a refused connection, a cooldown, a failed listing) is
refunded.

Requests the cascade does not apply to (tools, response_format, logprobs, n > 1) are served by the device as
usual, with ``cascade.reason = "not_applicable"``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..engine.records import Generation, Sampling
from ..errors import InvalidArgument
from ..serve import replies as R
from .cloud import CloudAnswer, CloudClient, CloudError
from .confidence import GeometricMean, TokenStats, combiner_warning, find_combiner
from .core import CascadeResult, finish, headers, keep_sample, request_policy, should_keep
from .policy import Budget, Policy, decide, threshold_warning, with_combiner


class ClientGone(Exception):
    """The client of a request that waited on the cloud disconnected."""


async def _unless_gone(call, request):
    """``await call``, unless the client of ``request`` (None: not watched) leaves first: then the call is
    cancelled and :class:`ClientGone` raised. Starlette's check looks once, so it is polled as the server's
    one-piece replies poll it."""
    from ..serve.runner import DISCONNECT_POLL_S

    task = asyncio.ensure_future(call)
    if request is None:
        return await task

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # the cloud's request ended (its connection closed)
        raise ClientGone
    return task.result()


class ServerCascade:
    """Policy, budget, combiner and cloud client of one server; counters for /metrics."""

    def __init__(self, state):
        from ..models.store import cached_sha256

        s = state.settings
        self.state = state
        self.policy = Policy(threshold=s.cascade_threshold, budget=s.cascade_budget, window_s=s.cascade_window,
                             timeout_s=s.cascade_timeout, keep_hard=s.cascade_keep_hard,
                             defer_share=s.cascade_defer_share)
        self.budget = Budget(self.policy.budget, self.policy.window_s)
        self.cloud = CloudClient(s.cascade, model=s.cascade_model, key_env=s.cascade_key_env,
                                 timeout=s.cascade_timeout, model_flag="--cascade-model")
        _ = self.cloud.async_client  # no openai package: a clear error now, not at the first deferral
        self.sha256 = cached_sha256(state.path)
        self.combiner = find_combiner(self.sha256, s.cascade_combiner)
        self.policy = with_combiner(self.policy, self.combiner)
        self.prefix_tokens = s.cascade_prefix_tokens
        self.counts = {"device": 0, "cloud": 0, "fallback": 0, "cut": 0}
        self.failing: set[tuple[str, bool]] = set()  # (kind, cut) of the cloud failures said since it last answered
        m = state.metrics
        m.gauge("cascade_device_answers", "Cascade replies the device wrote.", lambda: self.counts["device"])
        m.gauge("cascade_cloud_answers", "Cascade replies the cloud wrote.", lambda: self.counts["cloud"])
        m.gauge("cascade_fallbacks", "Deferred requests the cloud failed (device answered).",
                lambda: self.counts["fallback"])
        m.gauge("cascade_cloud_streams_cut", "Relayed cloud streams that failed after their first token (the "
                "client got a cut-off cloud answer, finish_reason error).", lambda: self.counts["cut"])

    @staticmethod
    def applies(req, plan) -> bool:
        return req.n == 1 and not plan.tools and not plan.grammar and not req.logprobs

    def sampling(self, s: Sampling) -> Sampling:
        return dataclasses.replace(s, token_stats=True)

    async def aclose(self) -> None:
        await self.cloud.aclose()

    # -- shared -------------------------------------------------------------------------------------------
    @staticmethod
    def _request_policy(req):
        return request_policy(req.cascade.model_dump() if req.cascade is not None else None)

    def _prefix(self, req) -> int:
        """Device tokens a stream buffers before its tier is picked: ``--cascade-prefix-tokens``, or one when the
        request's policy picks it without the confidence (never_defer, always_defer, threshold 0), where the buffer
        would only delay the private answer's first token or the cloud's call."""
        rp = self._request_policy(req)
        threshold = self.policy.threshold if rp.threshold is None else rp.threshold
        return 1 if rp.never_defer or rp.always_defer or threshold <= 0 else self.prefix_tokens

    def _decide(self, req, stats: TokenStats):
        rp = self._request_policy(req)
        feats = stats.features()
        conf = self.combiner.predict(feats)
        return rp, conf, feats, decide(conf, self.policy, rp, self.budget)

    @staticmethod
    def _cloud_params(req) -> dict:
        """The request's fields the cloud gets (cloud.PASS_THROUGH keeps those it may take): the token cap under
        the name the client used, and the OpenAI fields only the cloud acts on, where the request schema has them."""
        only_cloud = {name: getattr(req, name, None) for name in CLOUD_ONLY}
        # Ollama's routes take any temperature; the cloud takes OpenAI's 0..2
        t = req.temperature if req.temperature is None else min(req.temperature, 2)
        return {"temperature": t, "top_p": req.top_p, "max_tokens": req.max_tokens,
                "max_completion_tokens": req.max_completion_tokens, "stop": req.stop, "seed": req.seed,
                "presence_penalty": req.presence_penalty or None,
                "frequency_penalty": req.frequency_penalty or None} | only_cloud

    @staticmethod
    def _client_messages(req) -> list[dict]:
        """The request's messages as the client sent them (content parts unjoined, tool arguments as JSON text),
        for the cloud and the hard-sample store; the device's rendered form is for its template only."""
        return [m.model_dump(exclude_none=True) for m in req.messages]

    async def _usage(self, device: R.Usage, cloud: CloudAnswer | None) -> tuple[R.Usage, dict]:
        """The reply's ``usage`` (of the answer the client got: the cloud's, when ``cloud`` wrote it) and the
        cascade fields that go with it: the device's own figures and where ``usage`` comes from."""
        extra = {"device_usage": {"prompt_tokens": device.prompt_tokens,
                                  "completion_tokens": device.completion_tokens}}
        if cloud is None:
            return device, extra | {"usage_source": "device"}
        if cloud.usage_reported:
            p, c, source = cloud.prompt_tokens, cloud.completion_tokens, "cloud"
        else:  # the same messages as the device counted them; the cloud's text by the device's tokenizer
            c = len(await run_in_threadpool(self.state.tokenize, cloud.text, add_special=False,
                                            parse_special=False))
            p, source = device.prompt_tokens, "device_tokenizer"
        return R.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c), extra | {"usage_source": source}

    def _cloud_name(self, named: str | None, req) -> str:
        """The top-level ``model`` of a reply the cloud wrote (routers with a fallback name the model that
        answered): the name its reply gave (``named``), else the one asked for (``--cascade-model``, or the one the
        cloud lists), else the client's."""
        return named or self.cloud.model or req.model or ""

    def describe(self) -> str:
        """The server's start-up line's part on the cascade: where it defers, at what threshold, and whether the
        key's variable is set (a 401 on every deferral is otherwise seen only in the replies)."""
        p, env = self.policy, self.cloud.key_env
        how = (f"defer share {p.defer_share:g}: threshold {p.threshold:.6g}" if p.defer_share is not None
               else f"threshold {p.threshold:g}")
        fitted = ("uncalibrated" if isinstance(self.combiner, GeometricMean) else
                  "fitted combiner" if self.combiner.calibrated else "combiner fitted for another model")
        model = f"model {self.cloud.model}" if self.cloud.model else "model: the one it lists"
        return (f"cascade -> {self.cloud.url} ({how}, {fitted}; key from {env}: "
                f"{'set' if os.environ.get(env) else 'not set'}; {model})")

    def warning(self) -> str | None:
        """The start-up warning for a threshold that would defer (nearly) every request (:func:`threshold_warning`)
        and for a combiner fitted for another model (:func:`combiner_warning`)."""
        said = (threshold_warning(self.policy, self.combiner), combiner_warning(self.combiner, self.state.model_id))
        return "; ".join(filter(None, said)) or None

    def _note(self, cloud: CloudAnswer | CloudError | None, cut: bool = False) -> None:
        """Say on stderr when the cloud starts failing a new way, and when it answers again: a fallback is
        otherwise seen only in each reply, and a refused key or a wrong URL would fall back on every deferral
        with the server's log showing nothing but 200s. ``cut``: a relayed stream failed after its first token,
        so the client got a cut-off cloud answer, not the device's."""
        log = logging.getLogger("ondevice.serve")  # the server's notes: dated, `ondevice serve: warning: cascade: ...`
        if isinstance(cloud, CloudError) and cloud.kind != "shutdown" and (cloud.kind, cut) not in self.failing:
            self.failing.add((cloud.kind, cut))
            then = ("the client got a cut-off cloud answer (finish_reason \"error\")" if cut
                    else f"deferred requests get the device's answer (fallback \"{cloud.kind}\")")
            log.warning("cascade: %s; %s", cloud, then)
        elif isinstance(cloud, CloudAnswer) and self.failing:
            self.failing.clear()
            log.info("cascade: the cloud at %s answers again", self.cloud.url)

    def _refund(self, e: CloudError) -> None:
        """A deferral the cloud never got does not count against the budget; one it may have got (and billed) does."""
        if not e.sent:
            self.budget.refund()

    def _count(self, r: CascadeResult) -> None:
        self.counts[r.tier] += 1
        self.counts["fallback"] += r.fallback is not None

    def _keep_task(self, rp, result: CascadeResult, messages: list[dict]) -> BackgroundTask | None:
        if not should_keep(self.policy, rp, result):
            return None
        return BackgroundTask(run_in_threadpool, keep_sample, None, "serve", self.state.model_id, self.sha256,
                              messages, result)

    @staticmethod
    def not_applicable(resp) -> JSONResponse:
        resp.cascade = not_applicable_info(resp.model)
        return JSONResponse(resp.model_dump(mode="json"), headers=NOT_APPLICABLE_HEADERS)

    # -- non-streaming ------------------------------------------------------------------------------------
    def defers_early(self, req) -> bool:
        """Whether the request's policy defers it whatever the device answers (``always_defer``): its cloud call
        need not wait for the device's whole answer (:meth:`finish_early`)."""
        return self._request_policy(req).always_defer

    async def _ask_cloud(self, req, request) -> CloudAnswer | CloudError | None:
        """The cloud's answer to a deferred request, or its error (the deferral refunded only when the request was
        never sent); None when the client of ``request`` left meanwhile (the cloud's request ended too, a paid one
        included, and charged)."""
        try:
            cloud = await _unless_gone(self.cloud.achat(self._client_messages(req), **self._cloud_params(req)),
                                       request)
        except CloudError as e:
            self._refund(e)
            cloud = e
        except ClientGone:
            self.state.metrics.cancelled += 1
            return None
        self._note(cloud)
        return cloud

    async def finish(self, req, resp: R.ChatCompletion, gen: list[Generation], messages: list[dict],
                     request=None) -> Response:
        """The device's reply ``resp`` (records ``gen``), possibly replaced by the cloud's answer. A client of
        ``request`` that leaves while the cloud answers ends the cloud's request too (a paid one included)."""
        stats = TokenStats(messages)
        for g in gen:
            stats.add(g)
        rp, conf, feats, decision = self._decide(req, stats)
        cloud = await self._ask_cloud(req, request) if decision.defer else None
        if decision.defer and cloud is None:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        return await self._reply(req, resp, gen, rp, conf, feats, decision, cloud)

    async def finish_early(self, runner, job, req, request, messages: list[dict], completion) -> Response:
        """:meth:`finish` for a request deferred whatever the device answers: the device's first token is scored
        (the reply's confidence, as a stream's one-token prefix), then the cloud is asked while the device decodes
        on. The cloud's answer ends the device's job; when the cloud fails, the device's answer is awaited and
        returned, marked as a fallback (a server stopping meanwhile: what it has, finish_reason "error").
        ``completion(records)``: the device's chat completion of its records."""
        from ..serve.http import ShuttingDown

        events = runner.events(job, request, poll_disconnect=True)
        stats, gen, cut, gone = TokenStats(messages), [], False, False
        rp = conf = feats = decision = cloud = None
        try:
            async for g in events:
                stats.add(g)
                gen.append(g)
                break
            if gen:
                rp, conf, feats, decision = self._decide(req, stats)
                cloud = await self._ask_cloud(req, request) if decision.defer else None
                gone = decision.defer and cloud is None
            try:
                while gen and not (gen[-1].finish_reason or gone or isinstance(cloud, CloudAnswer)):
                    gen.append(await anext(events))  # the device answers: the rest of it
            except StopAsyncIteration:  # the client went away
                pass
            except ShuttingDown:
                if not isinstance(cloud, CloudError):
                    raise
                cut = True
        finally:
            await events.aclose()  # a job still decoding is cancelled: its slot is free
        if gone or not (isinstance(cloud, CloudAnswer) or cut or (gen and gen[-1].finish_reason)):
            return Response(status_code=499)  # nobody reads it
        resp = completion(gen)
        if cut:
            resp.choices[0].finish_reason = "error"  # the device's answer did not end
        return await self._reply(req, resp, gen, rp, conf, feats, decision, cloud)

    async def _reply(self, req, resp: R.ChatCompletion, gen: list[Generation], rp, conf: float, feats: dict, decision,
               cloud: CloudAnswer | CloudError | None) -> JSONResponse:
        """The reply to a request the policy decided (``decision``): the cloud's answer when ``cloud`` is one, else
        the device's ``resp`` (records ``gen``), with the ``cascade`` object and its headers."""
        device_text = resp.choices[0].message.content or ""
        result = finish(decision, conf, self.combiner.calibrated, feats, device_text, gen[-1].t,
                        gen[-1].finish_reason, cloud)
        self._count(result)
        answer = cloud if result.tier == "cloud" else None
        device_model = resp.model
        if answer is not None:
            resp.model = self._cloud_name(answer.model, req)
            resp.choices[0].message.content = result.text
            resp.choices[0].finish_reason = result.finish_reason or "stop"
            resp.choices[0].stop_reason = None  # the device's stop string did not end the cloud's answer
            resp.timings = None  # llama-server's timings are the device's decode: not the answer's (as in a relay)
        resp.usage, extra = await self._usage(resp.usage, answer)
        info = result.info() | extra | {"device_model": device_model}
        resp.cascade = info
        return JSONResponse(resp.model_dump(mode="json"), headers=headers(info),
                            background=self._keep_task(rp, result, self._client_messages(req)))

    # -- streaming ----------------------------------------------------------------------------------------
    async def stream(self, runner, job, req, request, messages: list[dict], include_usage: bool):
        """Buffer a prefix, decide, then stream the device's answer or relay the cloud's (see module doc)."""
        from ..serve.chunks import sse, timings_of, usage_of

        st = self.state
        cid, created = R.reply_id("chatcmpl"), int(time.time())
        t0 = time.perf_counter()
        events = runner.events(job, request, poll_disconnect=True)
        stats, buffered, last, prefix = TokenStats(messages), [], None, self._prefix(req)
        async for g in events:
            stats.add(g)
            buffered.append(g.text)
            last = g
            if g.finish_reason or (prefix and len(stats.logprobs) >= prefix):
                break
        if last is None:  # the client went away (the job is cancelled)
            await events.aclose()
            return JSONResponse({}, status_code=499)
        rp, conf, feats, decision = self._decide(req, stats)
        device_s = time.perf_counter() - t0
        cloud_stream = first = None
        fallback: CloudError | None = None
        t_cloud = time.perf_counter()
        seen: dict = {}  # the model the cloud's chunks name
        device_model = st.answered_by(req.model)
        named = {"device_model": device_model}  # in every cascade object: the top-level model may be the cloud's
        if decision.defer:
            cloud_stream = self.cloud.astream(self._client_messages(req), seen, **self._cloud_params(req))
            try:  # text: a cloud that sends none fails here; a client that leaves meanwhile ends it
                first = await _unless_gone(anext(cloud_stream), request)
            except CloudError as e:
                self._refund(e)
                fallback, cloud_stream = e, None
            except ClientGone:
                st.metrics.cancelled += 1
                await events.aclose()
                return Response(status_code=499)  # nobody reads it
            self._note(fallback)

        def chunk(delta: R.ChatDelta, finish=None, usage=None, choices=True, timings=None, cascade=None,
                  model=device_model) -> bytes:
            ch = [R.ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else []
            return sse(R.ChatCompletionChunk(id=cid, created=created, model=model, choices=ch, usage=usage,
                                              timings=timings, cascade=cascade))

        def result_of(device_text: str, device_s: float, cloud=None, cloud_s=None) -> CascadeResult:
            return finish(decision, conf, self.combiner.calibrated, feats, device_text, device_s, None,
                          cloud if cloud is not None else fallback, cloud_s=cloud_s)

        if cloud_stream is not None:  # the cloud answers: drop the device's job
            await events.aclose()
            device_text = "".join(buffered)
            head = result_of(device_text, device_s).info() | {
                "tier": "cloud", "cloud_model": self.cloud.model,
                "cloud_first_token_ms": round((time.perf_counter() - t_cloud) * 1e3, 3)} | named
            cloud_chunk = functools.partial(chunk, model=self._cloud_name(seen.get("model"), req))

            async def relay():
                try:
                    yield cloud_chunk(R.ChatDelta(role="assistant", content=""))
                    yield cloud_chunk(R.ChatDelta(content=first))
                    async for item in cloud_stream:  # text deltas, then the whole answer
                        if isinstance(item, CloudAnswer):
                            answer = item
                        else:
                            yield cloud_chunk(R.ChatDelta(content=item))
                except CloudError as e:
                    self.counts["cut"] += 1
                    self._note(e, cut=True)
                    yield cloud_chunk(R.ChatDelta(), finish="error",
                                      cascade=dict(head, fallback=e.kind, error=str(e)))
                    yield b"data: [DONE]\n\n"
                    return
                finally:
                    await cloud_stream.aclose()
                self._note(answer)
                self.counts["cloud"] += 1
                r = result_of(device_text, device_s, cloud=answer)
                usage, extra = await self._usage(usage_of(last), answer)
                yield cloud_chunk(R.ChatDelta(), finish=r.finish_reason or "stop", cascade=r.info() | extra | named)
                if include_usage:
                    yield cloud_chunk(R.ChatDelta(), usage=usage, choices=False)
                yield b"data: [DONE]\n\n"
                if should_keep(self.policy, rp, r):
                    await run_in_threadpool(keep_sample, None, "serve", st.model_id, self.sha256,
                                            self._client_messages(req), r)

            return StreamingResponse(relay(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers(head)})

        head = result_of("".join(buffered), device_s, cloud_s=(time.perf_counter() - t_cloud) if fallback else None)
        self._count(head)
        info0 = head.info() | named

        async def device():
            text, g_last = list(buffered), last
            try:
                yield chunk(R.ChatDelta(role="assistant", content=""))
                if "".join(buffered):
                    yield chunk(R.ChatDelta(content="".join(buffered)))
                if not last.finish_reason:
                    async for g in events:
                        g_last = g
                        text.append(g.text)
                        if g.text:
                            yield chunk(R.ChatDelta(content=g.text))
                usage, extra = await self._usage(usage_of(g_last), None)
                info = dict(info0, device_ms=round(g_last.t * 1e3, 3)) | extra
                yield chunk(R.ChatDelta(), finish=g_last.finish_reason, timings=timings_of(g_last), cascade=info)
                if include_usage:
                    yield chunk(R.ChatDelta(), usage=usage, choices=False)
                yield b"data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an SSE event
                from ..serve.http import error_payload

                yield sse(error_payload(e)[1])
            finally:
                await events.aclose()

        return StreamingResponse(device(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers(info0)})


# OpenAI request fields the device does not act on but the cloud may (passed on where the request schema holds them)
# a request the cascade does not apply to (tools, a grammar, logprobs, n > 1): the device answers, and says so
NOT_APPLICABLE_HEADERS = {"X-Ondevice-Tier": "device", "X-Ondevice-Cascade": "not_applicable"}


def not_applicable_info(device_model: str) -> dict:
    return {"tier": "device", "reason": "not_applicable", "confidence": None, "device_model": device_model}


CLOUD_ONLY = ("user", "reasoning_effort", "service_tier", "metadata", "store")

# a request's ``cascade`` object on a server started without ``--cascade URL`` (its policy cannot be honoured)
NO_CLOUD = ("this server has no cloud tier: start it with `ondevice serve --cascade URL`, or leave `cascade` out "
            "(only {\"never_defer\": true} and {\"keep\": false}, which keep a request on the device, are served)")


def only_restricts(cascade) -> bool:
    """Whether a request's ``cascade`` object only keeps it on the device (``never_defer``, ``keep: false``): a
    server with no cloud tier honours that (a client marking private requests keeps working when the operator
    turns the cascade off); one asking for the cloud (``always_defer``, ``threshold``, ``keep: true``) it cannot. A
    malformed object raises InvalidArgument, as on a cascade server."""
    value = cascade.model_dump() if hasattr(cascade, "model_dump") else cascade
    if not isinstance(value, dict):
        return False
    rp = request_policy(value)
    return (rp.never_defer or rp.keep is False) and not (rp.always_defer or rp.keep or rp.threshold is not None)


def device_only(cascade, why: str, fix: str) -> None:
    """Refuse a ``cascade`` object asking for the cloud on a prompt the device alone answers (``why``: Ollama's
    ``raw`` and ``suffix``; a completion's prompt); one that only keeps it here (:func:`only_restricts`) is
    served."""
    if cascade is not None and not only_restricts(cascade):
        raise InvalidArgument(f"cascade: {why}, so the device alone answers it (the cloud tier answers chat "
                              f"messages); {fix}, or leave cascade unset ({{\"never_defer\": true}} and "
                              f"{{\"keep\": false}} are served)")


def completion_cascade(cascade) -> None:
    """A completion's ``cascade`` object (/v1/completions, /completion): :func:`device_only`, naming the chat routes
    where the prompt may be deferred."""
    device_only(cascade, "a completion continues its prompt as it is", "send it as a user message to a chat route "
                "(/v1/chat/completions, /v1/responses, /v1/messages, /api/chat), where it may be deferred")


def server_cascade(state) -> ServerCascade | None:
    """The cascade tier of a server started with ``--cascade URL``, else None."""
    return ServerCascade(state) if state.settings.cascade else None
