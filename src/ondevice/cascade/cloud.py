"""The cloud tier: any OpenAI-compatible endpoint (another ``ondevice serve``, llama-server, vLLM, a hosted
API), reached with the official ``openai`` client.

The key comes from an environment variable whose *name* is configured (``ONDEVICE_CLOUD_KEY`` by default);
the key itself is never printed or stored, nor are credentials written into the URL (``user:pass@``, ``?key=``):
every message names the cloud by :func:`display_url`. No retries for the server and the library: a cascade that
waits for retries is slower than its own device fallback (offline batch work, ``eval --cascade`` and ``cascade
fit``, asks for :data:`OFFLINE_RETRIES`: there a rate-limited item left out biases the figures). Every failure
becomes a :class:`CloudError` with a short ``kind`` (``timeout``, ``unreachable``, ``http_503``, ``bad_reply``,
``too_large``, ``redirect_loop``, ``cloud_error``, ``no_model``) that the reply reports; the cloud's own text in it
has the key and the URL's credentials replaced by ``***`` (:mod:`.guard`). A reply larger than its request's token
cap allows is ``too_large`` (:mod:`.guard`), read no further. The sync door (the library, ``eval --cascade``,
``cascade fit``) runs the async one on a loop of its own, so ``timeout`` bounds the whole answer there as in the
server, not each read. A reply with no text (HTTP 200 with a web
page, no ``choices``, ``content: null``, only whitespace) is a ``bad_reply`` too: it is no answer to give a user
or to learn from; a stream that is no event stream says what came instead (a proxy's or captive portal's
page: its content type and title). ``timeout`` bounds a relayed stream's whole answer too: a cloud that keeps it
alive with empty deltas or comments is a ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import OndeviceError
from . import guard
from .cloud_errors import CloudError, body_error, classify, openai_module

DEFAULT_KEY_ENV = "ONDEVICE_CLOUD_KEY"
# fields passed through to the cloud as they are (OpenAI names): sampling, the token cap under the name the client
# used (OpenAI's reasoning models refuse max_tokens), and fields only the cloud acts on (logit_bias is not one: its
# token ids are the device tokenizer's)
PASS_THROUGH = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
                "frequency_penalty", "user", "reasoning_effort", "service_tier", "metadata", "store")
OFFLINE_RETRIES = 3  # eval --cascade / cascade fit: the openai client's back-off, honouring Retry-After
LISTED_SHOWN = 5  # models named when the cloud lists several and none was chosen
# query parameters whose values are credentials (Azure's api-key, signed URLs' sig, ...): never shown
_SECRET_QUERY = re.compile(r"key|token|secret|sig|pass|auth|cred", re.IGNORECASE)


@dataclass(frozen=True)
class CloudAnswer:
    text: str
    model: str
    latency_s: float
    prompt_tokens: int  # as the cloud reported them; 0 when it did not (``usage_reported``)
    completion_tokens: int
    finish_reason: str | None
    usage_reported: bool = True


def base_url(url: str) -> str:
    """The base URL the client wants: ``/v1`` added to a bare origin (``http://host:port``) only; any other path
    is used as given (Gemini's ``.../v1beta/openai``, a gateway's ``.../openai``), less a trailing
    ``/chat/completions``. The query is not part of it: :func:`url_query` passes it on as a query."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OndeviceError(f"--cascade / cloud_url {display_url(url)!r} is not an http(s) URL; give e.g. "
                            f"http://127.0.0.1:8081/v1")
    path = parts.path.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        path = path.removesuffix(tail)
    return urlunsplit((parts.scheme, parts.netloc, path or "/v1", "", ""))


def url_query(url: str) -> dict[str, str]:
    """The URL's query (e.g. Azure's ``api-version``), sent with every request (the client's ``default_query``)."""
    return dict(parse_qsl(urlsplit(url.strip()).query, keep_blank_values=True))


def display_url(url: str) -> str:
    """The URL as messages, logs and replies show it: ``user:pass@`` and key-like query values redacted."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    netloc = f"***@{netloc}" if "@" in parts.netloc else netloc
    query = "&".join(f"{k}={'***' if _SECRET_QUERY.search(k) else v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def wire_messages(messages) -> list[dict]:
    """Chat messages in OpenAI's shape, as the cloud and fine-tuning files want them: a tool call's ``arguments``
    as JSON text (a chat template takes them parsed, an object; OpenAI refuses that with HTTP 400)."""
    return [_wire_message(m) for m in messages]


def _wire_message(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = [c | {"function": c["function"] | {"arguments": _json_text(c["function"].get("arguments"))}}
             if isinstance(c.get("function"), dict) else c for c in m["tool_calls"]]
    return m | {"tool_calls": calls}


def _json_text(arguments) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


# failures of a model listing that are not the listing's: the cloud is not reached, refuses the key, or lists several
_NOT_THE_LISTING = ("no_model", "shutdown", "timeout", "unreachable", "http_401", "http_403")


def _params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in PASS_THROUGH and v is not None}


class CloudClient:
    """Sync and async chat calls to one endpoint; one connection pool each, closed by :meth:`close`/:meth:`aclose`.

    ``url`` is the endpoint as every message shows it (:func:`display_url`: no credentials); ``model_flag`` is how
    the caller's user names the cloud's model (``--cascade-model``, ``--cloud-model``), said when the model
    listing fails or lists several. ``max_retries`` > 0 only for offline batch work (:data:`OFFLINE_RETRIES`).

    ``cooldown``: after a reply with Retry-After (a 429 or 503 saying when to come back) every call until then
    fails at once as ``cooldown``, without asking the cloud: each would only cost a round trip and keep the key
    rate-limited (a deferral never sent is refunded, so the budget does not throttle them). Offline work, which
    retries and waits instead, has it off.

    The sync door (:meth:`chat`, :meth:`model_id`) runs the async one on an event loop of the client's own, in a
    thread: one code path, whose ``timeout`` bounds the whole answer (retries included), not each read."""

    def __init__(self, url: str, *, model: str | None = None, key_env: str = DEFAULT_KEY_ENV,
                 timeout: float = 10.0, max_retries: int = 0, model_flag: str = "Cascade(cloud_model=...)",
                 cooldown: bool = True):
        self._base = base_url(url)
        self._query = url_query(url)
        self.url = display_url(urlunsplit(urlsplit(self._base)._replace(query=urlsplit(url.strip()).query)))
        self.model = model
        self.key_env = key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.model_flag = model_flag
        self.cooldown = cooldown
        self._cool: tuple[float, CloudError] | None = None  # (monotonic end, the error that asked for it)
        self.stopping = False
        self.stream_usage = True  # ask a stream for its usage chunk (False once the server refused the field)
        self._waits: set = set()  # the asyncio.timeout of every wait on the cloud in progress
        self._loop = None  # the sync door's event loop, and its thread (:meth:`_run`)
        self._loop_thread = None
        self._loop_lock = threading.Lock()  # eval's cloud workers call the sync door from several threads
        self._async = None

    def _secrets(self) -> list[str]:
        """What no message may show: the key, the URL's password (and its Basic form), key-like query values."""
        parts = urlsplit(self._base)
        values = [os.environ.get(self.key_env), parts.password, guard.basic_auth(parts.username, parts.password)]
        values += [v for k, v in self._query.items() if _SECRET_QUERY.search(k)]
        return guard.secret_forms(values)

    def _error(self, e: BaseException, t0: float | None = None) -> CloudError:
        """``e`` as a CloudError; ``t0``: when the cloud was asked (the error's ``latency_s`` counts from it). Its
        text never shows a secret (:meth:`_secrets`) and is at most ``guard.MAX_ERROR_CHARS`` long."""
        secrets = self._secrets()
        basic = not os.environ.get(self.key_env) and urlsplit(self._base).password is not None
        err = classify(e, self.url, self.timeout, self.stopping, self.key_env, secrets, basic)
        said = guard.redact(str(err), secrets)
        if len(said) > guard.MAX_ERROR_CHARS:
            said = said[:guard.MAX_ERROR_CHARS - 1] + "…"
        err.args, err.brief = (said,), guard.clip(err.brief, guard.MAX_ERROR_CHARS, secrets)
        if t0 is not None and err.kind != "cooldown":
            err.latency_s = time.perf_counter() - t0
        if self.cooldown and err.retry_after:
            self._cool = (time.monotonic() + err.retry_after, err)
        return err

    def _check_cooldown(self) -> None:
        """Raise ``cooldown`` while the cloud's Retry-After lasts (see the class doc)."""
        if self._cool is None:
            return
        end, why = self._cool
        if (left := end - time.monotonic()) <= 0:
            self._cool = None
            return
        raise CloudError("cooldown", f"{why}; not asked again for {left:.1f} s more (the device answers meanwhile)",
                         f"cooling down {left:.1f} s more after {why.brief}", sent=False)

    def _key(self) -> str:
        return os.environ.get(self.key_env) or "none"  # local servers take any key; the client needs one

    def _client_args(self) -> dict:
        """The client's arguments. The key variable, when set, wins over a URL's ``user:pass@``: both would be the
        Authorization header, and httpx puts the URL's Basic credentials over the client's Bearer key; so the
        credentials are taken out of the URL then, and sent (as Basic) only when the variable is unset."""
        base = self._base
        if os.environ.get(self.key_env) and "@" in (parts := urlsplit(base)).netloc:
            base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return {"base_url": base, "api_key": self._key(), "timeout": self.timeout,
                "max_retries": self.max_retries, "default_query": self._query or None}

    @property
    def async_client(self):
        if self._async is None:
            openai = openai_module()
            self._async = openai.AsyncOpenAI(**self._client_args(), http_client=guard.capped_client(openai))
        return self._async

    def _listed(self, listing) -> str:
        """The model to ask for, from the cloud's listing: its only model. Of several, none is picked (the first
        listed may be an embedding model, or an expensive one): the user names it."""
        ids = [m.id for m in getattr(listing, "data", None) or []]
        if len(ids) == 1:
            return ids[0]
        shown = ", ".join(ids[:LISTED_SHOWN]) + (", …" if len(ids) > LISTED_SHOWN else "")
        what = f"lists {len(ids)} models ({shown})" if ids else "lists no models"
        raise CloudError("no_model", f"the cloud at {self.url} {what}; choose one with {self.model_flag}",
                         f"{what}; choose one with {self.model_flag}")

    def _listing_error(self, e: BaseException) -> CloudError:
        """A failed model listing (GET .../models), said as such: the chat endpoint was not called, and naming
        the model skips the listing (some clouds, Azure-style deployments, have none). A cloud not reached, or
        refusing the key, fails the same whichever endpoint is asked: that error is said as it is."""
        err = self._error(e)
        err.sent = False  # the chat request was not made
        if err.kind in _NOT_THE_LISTING:
            return err
        fix = f"; name the model with {self.model_flag} to skip the listing"
        return CloudError(err.kind, f"listing the models of the cloud at {self.url} (GET /models) failed: "
                          f"{err.brief}{fix}", f"model listing failed: {err.brief}{fix}", sent=False)

    # -- sync (library, eval): the async door, run on a loop of the client's own -----------------------------
    def _run(self, coro):
        with self._loop_lock:
            _ = self.async_client  # made once (importing openai takes seconds): not the cloud's latency
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="ondevice-cloud",
                                                     daemon=True)
                self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def model_id(self) -> str:
        return self._run(self.amodel_id())

    def chat(self, messages: list[dict], **params) -> CloudAnswer:
        """The cloud's answer. Offline batch work (``max_retries`` > 0: ``eval --cascade``, ``cascade fit``) stops at
        a refused key (HTTP 401/403) with an OndeviceError, not a CloudError that leaves one item out: every item
        would be refused the same, each after the device's answer."""
        try:
            return self._run(self.achat(messages, **params))
        except CloudError as e:
            if self.max_retries and e.kind in ("http_401", "http_403"):
                raise OndeviceError(f"{e}; every item would be refused the same, so none more is asked") from e
            raise

    # -- async (server) ----------------------------------------------------------------------------------
    async def amodel_id(self) -> str:
        if self.model is None:
            try:
                async with asyncio.timeout(self.timeout):
                    self.model = self._listed(await self.async_client.models.list())
            except Exception as e:
                raise self._listing_error(e) from e
        return self.model

    def deadline(self) -> float:
        """When an answer asked for now must have come (the event loop's clock): ``timeout`` from now."""
        return asyncio.get_running_loop().time() + self.timeout

    @contextlib.asynccontextmanager
    async def _wait(self, deadline: float | None = None):
        """``asyncio.timeout(self.timeout)`` (until ``deadline``, one answer's, when given), ended at once by
        :meth:`stop_waiting`."""
        when = 0 if self.stopping else self.deadline() if deadline is None else deadline
        async with asyncio.timeout_at(when) as t:
            self._waits.add(t)
            try:
                yield
            finally:
                self._waits.discard(t)

    def stop_waiting(self) -> None:
        """The server is stopping: every wait on the cloud ends now as a ``shutdown`` CloudError, so a deferred
        request gets its device answer (marked) instead of outliving the server's grace period."""
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for t in list(self._waits):
            t.reschedule(now)

    async def achat(self, messages: list[dict], **params) -> CloudAnswer:
        t0 = time.perf_counter()
        try:
            self._check_cooldown()
            async with self._wait():
                r = await self.async_client.chat.completions.create(
                    model=await self.amodel_id(), messages=wire_messages(messages), **_params(params))
            return _answer(r, time.perf_counter() - t0, self.url, self._secrets(),
                           guard.text_chars(guard.token_cap(params)))
        except Exception as e:
            raise self._error(e, t0) from e

    async def astream(self, messages: list[dict], seen: dict | None = None, **params
                      ) -> AsyncIterator[str | CloudAnswer]:
        """The text deltas of a streamed answer (none empty), then the whole :class:`CloudAnswer` (finish reason,
        token counts where sent). ``timeout`` bounds the whole answer, as a whole reply's: a stream kept alive with
        empty deltas or comments is a ``timeout`` then (said as a cut answer once text was yielded). A stream with
        no text (or only whitespace) is ``bad_reply`` before anything is yielded; one that is no event stream (a
        proxy's page) says what came (:func:`guard.not_a_stream`). ``seen["model"]``: the model the chunks name
        (else the one asked for), set before each delta. Text past ``guard.text_chars`` is ``too_large``."""
        t0, stream, deadline = time.perf_counter(), None, self.deadline()
        parts, model, finish, usage, chunks = [], self.model or "", None, None, 0
        chars, max_chars = 0, guard.text_chars(guard.token_cap(params))
        seen = {} if seen is None else seen
        pending, sent = "", False  # leading whitespace is held back: alone it is no answer
        try:
            stream = await self._open_stream(messages, params, deadline)
            model = model or self.model or ""  # the one asked for, when listing picked it (amodel_id)
            it = stream.__aiter__()
            while True:
                try:
                    async with self._wait(deadline):
                        chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                chunks += 1
                model, usage = chunk.model or model, chunk.usage or usage
                seen["model"] = model
                choice = chunk.choices[0] if chunk.choices else None
                finish = (choice.finish_reason if choice else None) or finish
                if choice and choice.delta and choice.delta.content:
                    chars += len(choice.delta.content)
                    if chars > max_chars:
                        raise CloudError("too_large", f"the cloud at {self.url} sent too large a reply: more than "
                                         f"{max_chars} characters of text for {guard.token_cap(params)} tokens",
                                         f"more than {max_chars} characters of text")
                    parts.append(choice.delta.content)
                    pending += choice.delta.content
                    if sent or pending.strip():
                        yield pending
                        pending, sent = "", True
            if not chunks and (what := guard.not_a_stream(stream.response, self._secrets())):  # a proxy's page
                raise CloudError("bad_reply", f"the cloud at {self.url} answered the stream with {what}", what)
            answer = _answer_of("".join(parts), model, time.perf_counter() - t0, usage, finish)
            if finish is None:  # the stream ended with no finish_reason (nor, then, [DONE]): the answer was cut
                raise CloudError("bad_reply", f"the cloud at {self.url} ended its stream before the answer's end "
                                 f"(no finish_reason)", "stream cut off (no finish_reason)")
            yield answer
        except Exception as e:
            err = self._error(e)
            if err.kind == "timeout" and sent:  # the client has part of the answer: say where it was cut
                err = CloudError("timeout", f"the cloud at {self.url} did not end its streamed answer within "
                                 f"{self.timeout:g} s (the whole answer's deadline); it was cut after "
                                 f"{chars} characters", f"answer cut at the {self.timeout:g} s deadline")
            raise err from e
        finally:
            if stream is not None:
                await stream.close()  # returns the connection to the pool (or drops it) at once

    async def _open_stream(self, messages: list[dict], params: dict, deadline: float | None = None):
        """The cloud's stream, asking for its usage chunk (``stream_options``). A server that answers that with
        HTTP 400/422 (some OpenAI-compatible servers refuse fields they do not know) is asked once more without
        the field; when that works the field is never sent to it again, and its streamed answers are counted
        with the device's tokenizer (``usage_source``)."""
        self._check_cooldown()

        async def create(**extra):
            async with self._wait(deadline):
                return await self.async_client.chat.completions.create(
                    model=await self.amodel_id(), messages=wire_messages(messages), stream=True, **extra,
                    **_params(params))

        if not self.stream_usage:
            return await create()
        try:
            return await create(stream_options={"include_usage": True})
        except openai_module().APIStatusError as e:
            if e.status_code not in (400, 422):
                raise
        stream = await create()
        self.stream_usage = False
        return stream

    def close(self) -> None:
        """End the sync door's loop (its client closed on it)."""
        if self._loop is None:
            return
        if self._async is not None:
            self._run(self.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        self._loop.close()
        self._loop = self._loop_thread = None

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None


def _answer(r, latency: float, url: str, secrets=(), max_chars: int | None = None) -> CloudAnswer:
    """The answer of a whole reply; ``secrets``: what its error text must not show; ``max_chars``: the most text
    it may have (more is ``too_large``)."""
    if isinstance(r, str):  # the client hands back a body that is not JSON as its text
        said = guard.clip(r, secrets=secrets)
        raise CloudError("bad_reply", f"the cloud at {url} sent a reply that is not JSON: {said!r}")
    if (err := (getattr(r, "model_extra", None) or {}).get("error")) is not None:
        raise body_error(err, url, secrets)
    if not getattr(r, "choices", None) or r.choices[0].message is None:
        raise CloudError("bad_reply", f"the cloud at {url} sent a reply with no choices[0].message")
    text = r.choices[0].message.content or ""
    if max_chars is not None and len(text) > max_chars:
        raise CloudError("too_large", f"the cloud at {url} sent too large a reply: {len(text)} characters of text, "
                         f"over the {max_chars} its token cap allows", f"{len(text)} characters of text")
    return _answer_of(text, r.model or "", latency, r.usage, r.choices[0].finish_reason)


def _answer_of(text: str, model: str, latency: float, usage, finish_reason: str | None) -> CloudAnswer:
    """The answer of a whole reply or of a stream: one with no text is no answer (``bad_reply``)."""
    if not text.strip():
        raise CloudError("bad_reply", "the cloud's reply has no text" + (" (only whitespace)" if text else ""))
    return CloudAnswer(text=text, model=model, latency_s=latency, finish_reason=finish_reason,
                       prompt_tokens=usage.prompt_tokens if usage else 0,
                       completion_tokens=usage.completion_tokens if usage else 0, usage_reported=usage is not None)
