"""The cloud tier: any OpenAI-compatible endpoint (another ``ondevice serve``, llama-server, vLLM, a hosted
API), reached with the official ``openai`` client.

The key comes from an environment variable whose *name* is configured (``ONDEVICE_CLOUD_KEY`` by default);
the key itself is never printed or stored. No retries: a cascade that waits for retries is slower than its
own device fallback. Every failure becomes a :class:`CloudError` with a short ``kind`` (``timeout``,
``unreachable``, ``http_503``, ``bad_reply``) that the reply reports. A reply with no text (HTTP 200 with a web
page, no ``choices``, ``content: null``, only whitespace) is a ``bad_reply`` too: it is no answer to give a user
or to learn from.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import OndeviceError

DEFAULT_KEY_ENV = "ONDEVICE_CLOUD_KEY"
# sampling fields passed through to the cloud as they are (OpenAI names)
PASS_THROUGH = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty")


class CloudError(OndeviceError):
    """``kind`` names the failure for replies and counts; ``brief`` is its cause without the cloud's URL (one
    line per item in ``eval --cascade`` / ``cascade fit``)."""

    def __init__(self, kind: str, message: str, brief: str | None = None):
        self.kind = kind
        self.brief = brief or message
        super().__init__(message)


@dataclass(frozen=True)
class CloudAnswer:
    text: str
    model: str
    latency_s: float
    prompt_tokens: int  # as the cloud reported them; 0 when it did not (``usage_reported``)
    completion_tokens: int
    finish_reason: str | None
    usage_reported: bool = True


def _openai():
    try:
        import openai
    except ImportError as e:
        raise OndeviceError("the cascade's cloud client needs the openai package; install it with "
                            "pip install 'ondevice[cascade]'") from e
    return openai


def base_url(url: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/chat/completions`` -> the ``.../v1`` the client wants."""
    u = url.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        u = u.removesuffix(tail)
    if not u.startswith(("http://", "https://")):
        raise OndeviceError(f"--cascade / cloud_url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8081/v1")
    return u if u.endswith("/v1") else u + "/v1"


def _classify(e: BaseException, url: str, timeout: float, stopping: bool = False, key_env: str | None = None
              ) -> CloudError:
    openai = _openai()
    if isinstance(e, CloudError):
        return e
    if stopping and isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return CloudError("shutdown", "the server is stopping: the device answered")
    if isinstance(e, (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError)):
        return CloudError("timeout", f"the cloud at {url} did not answer within {timeout:g} s",
                          f"no answer within {timeout:g} s")
    if isinstance(e, openai.APIConnectionError):
        return CloudError("unreachable", f"cannot reach the cloud at {url}", "cannot connect")
    if isinstance(e, openai.APIStatusError):
        if e.status_code in (401, 403) and key_env:  # the usual cause: the key's variable is unset or misnamed
            why = (f": it refused the key, read from the environment variable {key_env}, "
                   + ("which is not set" if not os.environ.get(key_env) else "which holds a key it does not accept"))
        else:
            why = f": {body!r}" if (body := _error_text(e)) else ""
        return CloudError(f"http_{e.status_code}", f"the cloud at {url} answered HTTP {e.status_code}{why}",
                          f"HTTP {e.status_code}{why}")
    return CloudError("bad_reply", f"the cloud at {url} sent an unusable reply ({type(e).__name__})",
                      f"unusable reply ({type(e).__name__})")


def _clip(text: str, n: int = 80) -> str:
    """The start of a reply's text, on one line."""
    t = " ".join(text.split())
    return t if len(t) <= n else t[:n - 1] + "…"


def _error_text(e) -> str:
    """An HTTP error's own message (OpenAI's ``{"error": {"message": ...}}``), else the start of its body."""
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    if isinstance(msg, str) and msg.strip():
        return _clip(msg)
    try:
        return _clip(e.response.text)
    except Exception:  # noqa: BLE001 — a streamed body not read: no text to show
        return ""


def _params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in PASS_THROUGH and v is not None}


class CloudClient:
    """Sync and async chat calls to one endpoint; one connection pool each, closed by :meth:`close`/:meth:`aclose`."""

    def __init__(self, url: str, *, model: str | None = None, key_env: str = DEFAULT_KEY_ENV,
                 timeout: float = 10.0):
        self.url = base_url(url)
        self.model = model
        self.key_env = key_env
        self.timeout = timeout
        self.stopping = False
        self.stream_usage = True  # ask a stream for its usage chunk (False once the server refused the field)
        self._waits: set = set()  # the asyncio.timeout of every wait on the cloud in progress
        self._sync = None
        self._async = None

    def _error(self, e: BaseException) -> CloudError:
        return _classify(e, self.url, self.timeout, self.stopping, self.key_env)

    def _key(self) -> str:
        return os.environ.get(self.key_env) or "none"  # local servers take any key; the client needs one

    @property
    def sync_client(self):
        if self._sync is None:
            self._sync = _openai().OpenAI(base_url=self.url, api_key=self._key(), timeout=self.timeout,
                                          max_retries=0)
        return self._sync

    @property
    def async_client(self):
        if self._async is None:
            self._async = _openai().AsyncOpenAI(base_url=self.url, api_key=self._key(), timeout=self.timeout,
                                                max_retries=0)
        return self._async

    # -- sync (library, eval) ----------------------------------------------------------------------------
    def model_id(self) -> str:
        if self.model is None:
            try:
                self.model = self.sync_client.models.list().data[0].id
            except Exception as e:
                raise self._error(e) from e
        return self.model

    def chat(self, messages: list[dict], **params) -> CloudAnswer:
        t0 = time.perf_counter()
        try:
            r = self.sync_client.chat.completions.create(model=self.model_id(), messages=messages, **_params(params))
            return _answer(r, time.perf_counter() - t0)
        except Exception as e:
            raise self._error(e) from e

    # -- async (server) ----------------------------------------------------------------------------------
    async def amodel_id(self) -> str:
        if self.model is None:
            try:
                async with asyncio.timeout(self.timeout):
                    self.model = (await self.async_client.models.list()).data[0].id
            except Exception as e:
                raise self._error(e) from e
        return self.model

    @contextlib.asynccontextmanager
    async def _wait(self):
        """``asyncio.timeout(self.timeout)``, ended at once by :meth:`stop_waiting`."""
        async with asyncio.timeout(0 if self.stopping else self.timeout) as t:
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
            async with self._wait():
                r = await self.async_client.chat.completions.create(model=await self.amodel_id(), messages=messages,
                                                                    **_params(params))
            return _answer(r, time.perf_counter() - t0)
        except Exception as e:
            raise self._error(e) from e

    async def astream(self, messages: list[dict], seen: dict | None = None, **params
                      ) -> AsyncIterator[str | CloudAnswer]:
        """The text deltas of a streamed answer (none empty), then the whole :class:`CloudAnswer` (its finish
        reason and, where the cloud sends them, its token counts). Waits at most ``timeout`` for each chunk
        (the first included); a stream without text, or with only whitespace, raises ``bad_reply`` before anything
        is yielded. ``seen["model"]`` is the model the stream's chunks name (else the one asked for), set before
        each delta is yielded: a relay names it from its first chunk on."""
        t0, stream = time.perf_counter(), None
        parts, model, finish, usage = [], self.model or "", None, None
        seen = {} if seen is None else seen
        pending, sent = "", False  # leading whitespace is held back: alone it is no answer
        try:
            stream = await self._open_stream(messages, params)
            model = model or self.model or ""  # the one asked for, when listing picked it (amodel_id)
            it = stream.__aiter__()
            while True:
                try:
                    async with self._wait():
                        chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                model, usage = chunk.model or model, chunk.usage or usage
                seen["model"] = model
                choice = chunk.choices[0] if chunk.choices else None
                finish = (choice.finish_reason if choice else None) or finish
                if choice and choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                    pending += choice.delta.content
                    if sent or pending.strip():
                        yield pending
                        pending, sent = "", True
            answer = _answer_of("".join(parts), model, time.perf_counter() - t0, usage, finish)
            if finish is None:  # the stream ended with no finish_reason (nor, then, [DONE]): the answer was cut
                raise CloudError("bad_reply", f"the cloud at {self.url} ended its stream before the answer's end "
                                 f"(no finish_reason)", "stream cut off (no finish_reason)")
            yield answer
        except Exception as e:
            raise self._error(e) from e
        finally:
            if stream is not None:
                await stream.close()  # returns the connection to the pool (or drops it) at once

    async def _open_stream(self, messages: list[dict], params: dict):
        """The cloud's stream, asking for its usage chunk (``stream_options``). A server that answers that with
        HTTP 400/422 (some OpenAI-compatible servers refuse fields they do not know) is asked once more without
        the field; when that works the field is never sent to it again, and its streamed answers are counted
        with the device's tokenizer (``usage_source``)."""
        async def create(**extra):
            async with self._wait():
                return await self.async_client.chat.completions.create(
                    model=await self.amodel_id(), messages=messages, stream=True, **extra, **_params(params))

        if not self.stream_usage:
            return await create()
        try:
            return await create(stream_options={"include_usage": True})
        except _openai().APIStatusError as e:
            if e.status_code not in (400, 422):
                raise
        stream = await create()
        self.stream_usage = False
        return stream

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None
        self.close()


def _answer(r, latency: float) -> CloudAnswer:
    if isinstance(r, str):  # the client hands back a body that is not JSON as its text
        raise CloudError("bad_reply", f"the cloud's reply is not JSON: {_clip(r)!r}")
    if not getattr(r, "choices", None) or r.choices[0].message is None:
        raise CloudError("bad_reply", "the cloud's reply has no choices[0].message")
    return _answer_of(r.choices[0].message.content or "", r.model or "", latency, r.usage, r.choices[0].finish_reason)


def _answer_of(text: str, model: str, latency: float, usage, finish_reason: str | None) -> CloudAnswer:
    """The answer of a whole reply or of a stream: one with no text is no answer (``bad_reply``)."""
    if not text.strip():
        raise CloudError("bad_reply", "the cloud's reply has no text" + (" (only whitespace)" if text else ""))
    return CloudAnswer(text=text, model=model, latency_s=latency, finish_reason=finish_reason,
                       prompt_tokens=usage.prompt_tokens if usage else 0,
                       completion_tokens=usage.completion_tokens if usage else 0, usage_reported=usage is not None)
