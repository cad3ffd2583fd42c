"""The cloud tier's failures: :class:`CloudError` and how an exception of the ``openai`` client (or a gateway's error
body) becomes one, with its ``kind``, a message that names the cause and the fix, and the cloud's own text with
the key and the URL's credentials replaced by ``***`` (:mod:`.guard`)."""

from __future__ import annotations

import asyncio
import os

from ..errors import OndeviceError
from . import guard


class CloudError(OndeviceError):
    """``kind`` names the failure for replies and counts; ``brief`` is its cause without the cloud's URL (one
    line per item in ``eval --cascade`` / ``cascade fit``)."""

    def __init__(self, kind: str, message: str, brief: str | None = None, retry_after: float | None = None,
                 sent: bool = True):
        self.kind = kind
        self.sent = sent  # whether the chat request may have reached the cloud (a budget charges those: they cost)
        self.brief = brief or message
        self.retry_after = retry_after  # seconds the cloud asked to be left alone (its Retry-After header)
        self.latency_s: float | None = None  # how long the cloud was waited on before it failed (None: not asked)
        super().__init__(message)


def openai_module():
    try:
        import openai
    except ImportError as e:
        raise OndeviceError("the cascade's cloud client needs the openai package; install it with "
                            "pip install 'ondevice[cascade]'") from e
    return openai


def classify(e: BaseException, url: str, timeout: float, stopping: bool = False, key_env: str | None = None,
             secrets=(), basic: bool = False) -> CloudError:
    """``e`` as a CloudError. ``secrets``: what the cloud's text must not show (:func:`guard.redact`); ``basic``:
    the URL's ``user:pass@`` was sent (as HTTP Basic) for want of the key's variable."""
    openai = openai_module()
    if isinstance(e, CloudError):
        return e
    if (big := guard.cause(e, "ReplyTooLarge")) is not None:
        return CloudError("too_large", f"the cloud at {url} sent too large a reply: {big}", str(big))
    if stopping and isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return CloudError("shutdown", "the server is stopping: the device answered")
    if isinstance(e, (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError)):
        return CloudError("timeout", f"the cloud at {url} did not answer within {timeout:g} s",
                          f"no answer within {timeout:g} s", sent=guard.cause(e, "ConnectTimeout") is None)
    if guard.cause(e, "TooManyRedirects") is not None:
        return CloudError("redirect_loop", f"the cloud at {url} redirected again and again (a redirect loop); check "
                          f"the URL and the server or proxy behind it", "redirect loop")
    if isinstance(e, openai.APIConnectionError):
        connect = guard.cause(e, "ConnectError")
        return CloudError("unreachable", f"cannot reach the cloud at {url}{_why_unreachable(connect or e)}",
                          "cannot connect", sent=connect is None)
    if isinstance(e, openai.APIStatusError):
        if e.status_code in (401, 403) and basic:  # the URL's credentials were sent, not a key
            why = (f": it refused the URL's user:pass@ credentials (sent as HTTP Basic, the environment variable "
                   f"{key_env} being unset); fix them, or set {key_env} to the key")
        elif e.status_code in (401, 403) and key_env:  # the usual cause: the key's variable is unset or misnamed
            why = (f": it refused the key, read from the environment variable {key_env}, "
                   + ("which is not set" if not os.environ.get(key_env) else "which holds a key it does not accept"))
        else:
            why = f": {body!r}" if (body := _error_text(e, secrets)) else ""
        wait = guard.retry_after(e.response.headers.get("retry-after"))
        status = f"HTTP {e.status_code}" + (f" (Retry-After {wait:g} s)" if wait else "")
        return CloudError(f"http_{e.status_code}", f"the cloud at {url} answered {status}{why}", f"{status}{why}",
                          retry_after=wait)
    if isinstance(e, openai.APIError) and (said := _error_text(e, secrets)):  # an error event in a stream
        return CloudError("cloud_error", f"the cloud at {url} sent an error: {said!r}", f"error: {said!r}")
    return CloudError("bad_reply", f"the cloud at {url} sent an unusable reply ({type(e).__name__})",
                      f"unusable reply ({type(e).__name__})")


def _why_unreachable(e: BaseException) -> str:
    """Why a connection failed, and the fix, for the error's text (``e``: httpx's ConnectError, else the client's)."""
    if guard.cause(e, "gaierror") is not None:
        return ": its host name does not resolve; fix the host in the URL"
    if guard.cause(e, "ConnectionRefusedError") is not None or "connection attempts failed" in str(e):
        return ": nothing accepts connections there; start its server, or fix the host or port in the URL"
    said = guard.clip(str(e)) if type(e).__name__ == "ConnectError" and str(e) else "the connection failed"
    return f" ({said}); check the URL and that its server is running"


def _error_text(e, secrets=()) -> str:
    """An HTTP error's own message (OpenAI's ``{"error": {"message": ...}}``), else the start of its body."""
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    if isinstance(msg, str) and msg.strip():
        return guard.clip(msg, secrets=secrets)
    try:
        return guard.clip(e.response.text, secrets=secrets)
    except Exception:  # noqa: BLE001 — a streamed body not read: no text to show
        return ""


def body_error(err, url: str, secrets=()) -> CloudError:
    """An OpenAI-style ``{"error": {...}}`` body sent with HTTP 200 (gateways such as OpenRouter relay an upstream
    provider's failure so): the gateway's message and code, not "no choices"."""
    msg = err.get("message") if isinstance(err, dict) else err
    code = err.get("code") if isinstance(err, dict) else None
    said = f"{guard.clip(str(msg), secrets=secrets)!r}" + (f" (code {guard.redact(str(code), secrets)})"
                                                      if code is not None else "")
    return CloudError("cloud_error", f"the cloud at {url} answered an error in an HTTP 200 body: {said}",
                      f"error in an HTTP 200 body: {said}")
