"""What the cascade takes from the cloud, bounded: the size of its reply, and the secrets its text may echo.

A cloud (or a proxy in front of it) that ignores ``max_tokens`` and sends megabytes must not stall the device tier:
the reply is read through :func:`capped_client`'s response hook, which stops reading past :func:`reply_bytes` (a
generous bound from the token cap the cloud was asked for) and raises :class:`ReplyTooLarge`, a ``too_large``
fallback. The cloud is asked for an uncompressed reply (the cap counts bytes as they come); one compressed anyway
gets a cap :data:`COMPRESSED_RATIO` times smaller, so a small compressed body cannot expand to gigabytes. A reply's
text is held to :func:`text_chars` too (a stream's deltas, a whole reply's content), so the device tokenizer never
counts more than that.

Error text the cloud writes (an HTTP error body, an error event) may echo the key it received (some gateways do):
:func:`redact` puts ``***`` in place of every secret the client holds before the text is clipped and shown.
A reply that is no answer (a proxy's or captive portal's HTML page sent with HTTP 200) is said by what it is
(:func:`what_came`: its content type, title and first bytes, kept by the capped stream) and what to check.
"""

from __future__ import annotations

import base64
import json
import re
import time
from urllib.parse import quote

MIN_REPLY_BYTES = 1 << 20  # any reply may be this large (error pages, a model listing's descriptions)
LISTING_BYTES = 32 << 20  # a model listing (GET): a router's lists hundreds of models with descriptions
BYTES_PER_TOKEN = 64  # a whole reply's JSON per token asked for (a \uXXXX-escaped character is 6 bytes)
STREAM_BYTES_PER_TOKEN = 1024  # a stream sends a JSON event per token (~250 bytes at OpenAI; more with logprobs)
UNCAPPED_TOKENS = 32768  # the token cap assumed for a request that sets none
CHARS_PER_TOKEN = 32  # the text an answer of N tokens may have (a token is a few characters; long ones ~30)
MIN_TEXT_CHARS = 4096
COMPRESSED_RATIO = 100  # a compressed reply's cap is this much smaller (JSON text compresses ~5x; a "bomb" 1000x)
MAX_ERROR_CHARS = 600  # a cloud error's whole message, as replies and logs show it
HEAD_BYTES = 2048  # a reply's start, kept to say what came when it is no answer (a proxy's login page)
MIN_SECRET_CHARS = 4  # shorter "secrets" (a key of "x" for a local server) would blank every such letter


class ReplyTooLarge(Exception):
    """The cloud's reply passed its cap (see the module doc); ``cloud_errors.classify`` makes it a ``too_large``
    CloudError."""

    def __init__(self, size: int, cap: int, whole: bool):
        self.size, self.cap = size, cap
        super().__init__(f"{'its reply is' if whole else 'its reply passed'} {size} bytes, over the {cap} bytes "
                         f"a reply to this request may have")


def token_cap(params: dict) -> int:
    """The tokens the cloud was asked for at most (``max_completion_tokens`` or ``max_tokens``)."""
    n = params.get("max_completion_tokens") or params.get("max_tokens")
    return n if isinstance(n, int) and n > 0 else UNCAPPED_TOKENS


def reply_bytes(tokens: int, stream: bool) -> int:
    return max(MIN_REPLY_BYTES, tokens * (STREAM_BYTES_PER_TOKEN if stream else BYTES_PER_TOKEN))


def text_chars(tokens: int) -> int:
    return max(MIN_TEXT_CHARS, tokens * CHARS_PER_TOKEN)


def _cap_of(request) -> int:
    """The byte cap of the reply to ``request``: from its JSON body's token cap (a chat request), else a listing's."""
    if request.method == "GET":
        return LISTING_BYTES
    try:
        body = json.loads(request.content or b"{}")
    except (ValueError, RuntimeError):  # not JSON, or a streamed body: the cap of an uncapped request
        body = {}
    body = body if isinstance(body, dict) else {}
    return reply_bytes(token_cap(body), bool(body.get("stream")))


class _Capped:
    """A response's byte stream that raises :class:`ReplyTooLarge` once more than ``cap`` bytes came; ``head``: its
    first :data:`HEAD_BYTES` (:func:`what_came` says what a reply that is no answer was)."""

    def __init__(self, stream, cap: int):
        self._stream, self._cap, self._n, self.head = stream, cap, 0, b""

    def _count(self, part: bytes) -> bytes:
        if len(self.head) < HEAD_BYTES:
            self.head += part[:HEAD_BYTES - len(self.head)]
        self._n += len(part)
        if self._n > self._cap:
            raise ReplyTooLarge(self._n, self._cap, whole=False)
        return part

    async def __aiter__(self):
        async for part in self._stream:
            yield self._count(part)

    async def aclose(self) -> None:
        await self._stream.aclose()


def capped_client(openai):
    """The httpx client for the cloud's ``AsyncOpenAI``: the SDK's defaults, every reply read under its cap."""
    import importlib

    client = openai.DefaultAsyncHttpxClient()
    base = next(c for c in type(client).__mro__ if c.__name__ == "AsyncClient")  # httpx2's, or an older SDK's httpx
    httpx = importlib.import_module(base.__module__.partition(".")[0])

    class Capped(_Capped, httpx.AsyncByteStream):
        pass

    async def uncompressed(request) -> None:
        request.headers["Accept-Encoding"] = "identity"  # the cap counts bytes off the wire: those of the text

    async def cap_reply(response) -> None:
        cap = _cap_of(response.request)
        if response.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
            cap //= COMPRESSED_RATIO  # compressed although asked not to be: a small body may expand a thousandfold
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:  # said up front: not read at all
            raise ReplyTooLarge(int(length), cap, whole=True)
        response.stream = Capped(response.stream, cap)

    client.event_hooks = {"request": [uncompressed], "response": [cap_reply]}
    return client


def secret_forms(values) -> list[str]:
    """Each secret as the cloud may echo it: as is, URL-quoted; longest first (a key containing another)."""
    out = set()
    for v in values:
        if v and len(v) >= MIN_SECRET_CHARS:
            out |= {v, quote(v, safe="")}
    return sorted(out, key=len, reverse=True)


def basic_auth(user: str | None, password: str | None) -> str | None:
    """The HTTP Basic credentials a URL's ``user:pass@`` is sent as (a cloud may echo its Authorization header)."""
    if not password:
        return None
    return base64.b64encode(f"{user or ''}:{password}".encode()).decode()


def redact(text: str, secrets) -> str:
    """``text`` with every secret (:func:`secret_forms`) replaced by ``***``."""
    for s in secrets:
        text = text.replace(s, "***")
    return text


def cause(e: BaseException, name: str) -> BaseException | None:
    """The exception in ``e``'s chain (itself, its causes) whose class is named ``name`` (httpx's or httpx2's)."""
    seen = 0
    while e is not None and seen < 10:
        if type(e).__name__ == name:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (a number, or an HTTP date), None when absent, unreadable or past."""
    if not value:
        return None
    try:
        wait = float(value)
    except ValueError:
        import email.utils

        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return wait if wait > 0 else None


_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def what_came(text: str, content_type: str, secrets=()) -> str:
    """What a reply that is no answer was, as its error says it: its content type, an HTML page's title, its start
    (the ``secrets`` it echoes redacted), and what to check. A web page where the API should answer comes from a
    proxy or a captive portal's login, or from a URL that is a website's, not the API's base."""
    ctype = content_type.split(";")[0].strip().lower() or "no content type"
    start = text.lstrip()[:64].lower()
    if ctype in ("text/html", "application/xhtml+xml") or start.startswith(("<!doctype html", "<html")):
        title = _TITLE.search(text)
        named = f" titled {clip(title.group(1), secrets=secrets)!r}" if title and title.group(1).strip() else ""
        return (f"a web page ({ctype}){named}, not an event stream: {clip(text, secrets=secrets)!r}; check that the "
                f"URL is the OpenAI-compatible API's base (e.g. http://host:port/v1) and that no proxy or login page "
                f"(a captive portal) stands between this machine and the cloud")
    if not text.strip():
        return f"an empty {ctype} body, not an event stream; check the URL and that the server streams chat answers"
    return (f"a {ctype} body, not an event stream: {clip(text, secrets=secrets)!r}; check the URL and that the "
            f"server streams chat answers (text/event-stream)")


def not_a_stream(response, secrets=()) -> str | None:
    """What came instead of an event stream (:func:`what_came`: a proxy's or captive portal's HTML page sent with
    HTTP 200), or None when the reply says it is one."""
    ctype = response.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() == "text/event-stream":
        return None
    head = getattr(response.stream, "head", b"")  # its first bytes, kept by :class:`_Capped`
    return what_came(head.decode("utf-8", "replace"), ctype, secrets)


def clip(text: str, n: int = 80, secrets=()) -> str:
    """The start of a reply's text, on one line, with the ``secrets`` it echoes redacted (before it is cut: a cut
    secret would no longer be found)."""
    t = " ".join(redact(text, secrets).split())
    return t if len(t) <= n else t[:n - 1] + "…"
