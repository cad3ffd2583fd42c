"""OpenAI-style errors for every failure, and the ASGI guard: API key, body size limit, request metrics."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import sys
import time
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflow, NonFiniteLogits, OndeviceError
from .batcher import JobTimeout, QueueFull, QueueTimeout
from .schemas import MAX_DEPTH


class ShuttingDown(Exception):
    """A request the server ended because it is stopping (a 503; an error event in a stream)."""

    def __init__(self):
        super().__init__("the server is shutting down; retry once it is back")


def one_line(text: str) -> str:
    """``text`` with its unprintable characters escaped (``\\n``): an error message stays one line whatever the
    request's field names or values hold."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": one_line(message), "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


PROMPT_FIELD = {"/v1/completions": "prompt", "/v1/embeddings": "input", "/v1/responses": "input"}  # else "messages"


def error_payload(exc: BaseException, path: str = "") -> tuple[int, dict, dict | None]:
    """(status, OpenAI error body, headers) for an exception raised while serving a request to ``path``."""
    from .state import PromptTooLong, UnknownModel

    def body(msg, type_, code=None, param=None):
        return {"error": {"message": one_line(msg), "type": type_, "param": param, "code": code}}

    if isinstance(exc, QueueFull):
        return 429, body(str(exc), "rate_limit_error", "queue_full"), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, QueueTimeout):  # overload, not the request: retryable once a slot frees
        return 503, body(str(exc), "server_error", "queue_timeout"), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, JobTimeout):  # the same request would time out again: the openai client must not retry it
        return 504, body(str(exc) + "; raise --timeout or ask for fewer tokens", "timeout_error", "timeout"), \
            {"x-should-retry": "false"}
    if isinstance(exc, UnknownModel):
        return 404, body(str(exc), "invalid_request_error", "model_not_found", "model"), None
    if isinstance(exc, ShuttingDown):
        return 503, body(str(exc), "server_error", "shutting_down"), None
    if isinstance(exc, (PromptTooLong, ContextOverflow)):
        return 400, body(str(exc), "invalid_request_error", "context_length_exceeded",
                         PROMPT_FIELD.get(path, "messages")), None
    if isinstance(exc, NonFiniteLogits):  # the model is broken, not the request
        return 500, body(str(exc), "server_error", "model_error"), None
    if isinstance(exc, OndeviceError):
        return 400, body(str(exc), "invalid_request_error", "invalid_value", getattr(exc, "param", None)), None
    if isinstance(exc, UnicodeError):  # e.g. a lone surrogate ("\ud800") in a field that reaches an encoder
        return 400, body(f"the request holds text that is not valid Unicode ({getattr(exc, 'reason', exc)}); "
                         f"send UTF-8 text without lone surrogates", "invalid_request_error", "invalid_value"), None
    return 500, body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error"), None


def unreadable_body(cause: BaseException) -> str:
    """What is wrong with a request body that Python's JSON parser gave up on (not a syntax error), and the fix."""
    if isinstance(cause, RecursionError):
        return (f"the request body nests deeper than this server reads JSON; send at most {MAX_DEPTH} levels of "
                f"nested arrays and objects")
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not UTF-8 ({cause.reason} at byte {cause.start}); send JSON encoded as UTF-8"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # Python's int-from-string limit
        return (f"the request body holds a number longer than {sys.get_int_max_str_digits()} digits; send "
                f"shorter numbers")
    return f"the request body could not be read as JSON ({type(cause).__name__}: {cause}); send UTF-8 JSON"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error") or first.get("msg")
            return error_response(400, f"the request body is not valid JSON ({why} at character "
                                       f"{loc[-1] if loc else 0}); send JSON with Content-Type: application/json",
                                  code="invalid_json")
        # a validator's own message already names the field and the fix: without pydantic's "Value error, "
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                        f"{str(e.get('msg')).removeprefix('Value error, ')}" for e in errs[:5])
        return error_response(400, f"invalid request: {msg}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI: the body did not parse as JSON
            return error_response(400, unreadable_body(exc.__cause__), code="invalid_json")
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type_,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        status, body, headers = error_payload(exc, request.url.path)
        if body["error"]["code"] == "internal_error":  # unclassified, a bug: keep the traceback (the others
            # have their access log line)
            logging.getLogger("ondevice.serve").error("%s %s failed", request.method, request.url.path,
                                                      exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    # handled here: the connection stays open
    for cls in (OndeviceError, QueueFull, QueueTimeout, JobTimeout, ShuttingDown, UnicodeError):
        app.add_exception_handler(cls, _any)


NOTE = "ondevice.note"  # scope key: what a handler tells the access log (tokens, an error inside a stream)


def note(request: Request, **kw) -> None:
    """Tell the access log about this request (``tokens=(prompt, completion)``, ``error="..."``, ``status=N``:
    what a stream that ended in an error event would have answered unstreamed)."""
    request.scope.setdefault(NOTE, {}).update(kw)


class _Stderr(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at creation: tests and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Notes(logging.Formatter):
    """``2026-12-07 15:04:05 ondevice serve: warning: ...``: the server's own notes, dated as its access lines and
    worded as its start-up lines."""

    def format(self, record: logging.LogRecord) -> str:
        level = "note" if record.levelno == logging.INFO else record.levelname.lower()  # as the start-up notes
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": level}))


def _stderr_logger(name: str, formatter: logging.Formatter) -> logging.Logger:
    """Logger ``name`` writing to stderr from INFO on, unless the caller configured it."""
    log = logging.getLogger(name)
    if not log.handlers:
        h = _Stderr()
        h.setFormatter(formatter)
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def access_logger() -> logging.Logger:
    """The ``ondevice.access`` logger: one line per request on stderr unless the caller configured it."""
    # dated: a server runs for days
    return _stderr_logger("ondevice.access", logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))


def notes_logger() -> logging.Logger:
    """The ``ondevice.serve`` logger (a clamped Ollama ``num_ctx``, a slot save that failed, a request's bug):
    dated lines with the ``ondevice serve:`` prefix on stderr, unless the caller configured it."""
    return _stderr_logger("ondevice.serve", _Notes("%(asctime)s ondevice serve: %(levelname)s: %(message)s",
                                                   "%Y-%m-%d %H:%M:%S"))


def _as_json(scope) -> None:
    """Read any request body as JSON, as llama-server does: ``curl -d`` sends form-urlencoded by default."""
    headers = scope.get("headers") or []
    ctype = next((v for k, v in headers if k == b"content-type"), b"").split(b";")[0].strip().lower()
    if ctype == b"application/json" or ctype.endswith(b"+json"):
        return
    scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]


# llama-server's other names for the same OpenAI routes: a client given the server's address without /v1 (or a
# llama-server health check) reaches them here too (its native /completion, /completions and /embeddings answer
# in llama-server's own shape: native.py)
ALIASES = {"/chat/completions": "/v1/chat/completions", "/responses": "/v1/responses", "/models": "/v1/models",
           "/v1/health": "/health", "/chat/completions/input_tokens": "/v1/chat/completions/input_tokens",
           "/responses/input_tokens": "/v1/responses/input_tokens"}


class Aliases:
    """Pure ASGI middleware, outermost: an alias of :data:`ALIASES` is served, checked, counted and logged as the
    route it names."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (to := ALIASES.get(scope["path"])) is not None:
            scope = {**scope, "path": to, "raw_path": to.encode()}
        return await self.app(scope, receive, send)


# polled by health checks and Prometheus, not asked by users: llama-server's log leaves them out (server-http.cpp)
QUIET = frozenset({"/health", "/metrics", "/v1/models", "/props"})


def log_request(log: logging.Logger, scope, status: int, seconds: float, err_body: bytes = b"") -> None:
    """``CLIENT METHOD /path STATUS [P+C tok] MS ms[: reason]``, at WARNING for an error; the probes' and
    scrapes' successes (:data:`QUIET`) at DEBUG, as llama-server leaves them out of its log. CLIENT is the
    peer's address (a proxy's, behind one), as llama-server and uvicorn log it. The line's control characters
    are escaped (:func:`one_line`): a path holding ``%0d%0a`` cannot forge a second line."""
    info = scope.get(NOTE) or {}
    parts = [(scope.get("client") or ("-",))[0], scope["method"], scope["path"], str(status)]
    if info.get("tokens"):
        p, c = info["tokens"]
        parts.append(f"{p}+{c} tok")
    parts.append(f"{seconds * 1e3:.0f} ms")
    line = " ".join(map(str, parts))
    reason = info.get("error") or ("client went away" if status == 499 else None)
    if reason is None and err_body:
        try:
            reason = json.loads(err_body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = err_body[:200].decode("utf-8", errors="replace")
    level = logging.WARNING if reason else logging.DEBUG if scope["path"] in QUIET else logging.INFO
    log.log(level, one_line(line + (f": {reason}" if reason else "")))


class Guard:
    """Pure ASGI middleware: API key, body size limit (413 before the body is parsed), request counts, the
    access log, and bodies read as JSON whatever their Content-Type."""

    def __init__(self, app, *, api_keys: tuple[str, ...], max_body: int, metrics, routes: set[str],
                 log: logging.Logger | None = None):
        self.app, self.api_keys, self.max_body, self.metrics, self.routes = app, api_keys, max_body, metrics, routes
        self.log = log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status_seen = []
        err_body: list[bytes] = []
        sent_all = failed = False
        t0 = time.perf_counter()

        async def send_counted(msg):
            nonlocal sent_all
            if msg["type"] == "http.response.start":
                status_seen.append(msg["status"])
            elif msg["type"] == "http.response.body":
                if status_seen and status_seen[0] >= 400:
                    err_body.append(msg.get("body", b"")[:4096])  # an error's reason, for the log
                await send(msg)
                sent_all = not msg.get("more_body", False)
                return
            await send(msg)

        try:
            # public, as on llama-server: the health check and the heartbeat at / (Ollama's CLI sends HEAD /)
            if self.api_keys and path != "/health" and not (path == "/" and scope["method"] in ("GET", "HEAD")):
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"")
                # Bearer, as OpenAI's clients send it; x-api-key, as Anthropic's do. Bytes as sent against the
                # keys' UTF-8 (curl sends a non-ASCII key so; decoding the header as latin-1 never matched it)
                token = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
                # every key compared (a list, not a generator): the time does not tell which key was near
                if not any([hmac.compare_digest(token, k.encode()) for k in self.api_keys]):  # noqa: C419
                    return await _send_error(send_counted, 401, "missing or wrong API key; send "
                                             "'Authorization: Bearer <key>' (or 'x-api-key: <key>') with the "
                                             "server's --api-key",
                                             "authentication_error", "invalid_api_key")
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, too_big = await self._read_body(scope, receive)
                if body is None:  # the client left before its body was whole (or --body-timeout cut it): 499/408
                    return
                if too_big:
                    return await _send_error(send_counted, 413, f"the request body is larger than {self.max_body} "
                                             f"bytes (--max-body-bytes); send a smaller body",
                                             "invalid_request_error", "body_too_large")
                receive = _replay(body, receive)
                _as_json(scope)
            await self.app(scope, receive, send_counted)
        except Exception:
            if not status_seen:  # a bug: the app's outermost layer answers 500 after this; count it so
                status_seen.append(500)
                failed = True
            raise
        finally:
            # a response begun but not sent whole (a stream the client left) is nginx's 499, as an unsent one;
            # a stream that ended in an error event counts as the status it would have had unstreamed
            info = scope.get(NOTE) or {}
            status = (status_seen[0] if failed else 408 if info.get("body_timeout")
                      else 499 if not (status_seen and sent_all) else info.get("status", status_seen[0]))
            self.metrics.request(route, status)
            if self.log is not None:
                log_request(self.log, scope, status, time.perf_counter() - t0, b"".join(err_body))

    async def _read_body(self, scope, receive) -> tuple[bytes | None, bool]:
        """(the body, too big); the body is None when the client left before it was whole."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return b"", True
        chunks, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, False
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks), False


class ErrorShape:
    """Pure ASGI middleware: an error answered on another API's routes (by the key check, the body limit, request
    validation or a handler, all in OpenAI's shape) goes out in that API's shape. ``applies(path)`` picks the
    routes, ``body(status, message)`` is the API's error object and ``status(code)`` its status for ours."""

    def __init__(self, app, *, applies, body, status=lambda code: code):
        self.app, self.applies, self.body, self.status = app, applies, body, status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.applies(scope["path"]):
            return await self.app(scope, receive, send)
        start: dict | None = None
        parts: list[bytes] = []

        async def convert(msg):
            nonlocal start
            if msg["type"] == "http.response.start" and msg["status"] >= 400:
                start = msg  # held until the body is read
                return
            if start is None:
                return await send(msg)
            parts.append(msg.get("body", b""))
            if msg.get("more_body"):
                return
            raw = b"".join(parts)
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", errors="replace") or f"HTTP {start['status']}"
            payload = json.dumps(self.body(start["status"], message)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k not in (b"content-length", b"content-type")]
            if (status := self.status(start["status"])) != start["status"]:  # the access log's and metrics' too
                scope.setdefault(NOTE, {})["status"] = status
            await send({**start, "status": status,
                        "headers": headers + [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, convert)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: disconnect detection

    return replay


async def _send_error(send, status: int, message: str, type_: str, code: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# Ollama's default allow-list: pages on this machine (any port), and the apps it lets in (Electron and Obsidian
# app://, file://, Tauri, VS Code webviews)
LOCAL_ORIGINS = (r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?"
                 r"|(app|file|tauri|vscode-webview|vscode-file)://.*")


def _cors_where(cors: str) -> dict:
    """CORSMiddleware's allowed origins for a ``--cors`` setting other than ``none``."""
    return ({"allow_origin_regex": LOCAL_ORIGINS} if cors == "local" else
            {"allow_origins": ["*"] if cors == "*" else [o.strip() for o in cors.split(",")]})


def origin_allowed(cors: str):
    """``allowed(origin) -> bool``: whether a page from ``origin`` may call the server under ``--cors cors``, as
    CORSMiddleware decides its grant (``fullmatch`` of the local pattern, or one of the listed origins)."""
    if cors == "none":
        return lambda origin: False
    where = _cors_where(cors)
    if "allow_origin_regex" in where:
        rx = re.compile(where["allow_origin_regex"])
        return lambda origin: rx.fullmatch(origin) is not None
    listed = frozenset(where["allow_origins"])
    return lambda origin: "*" in listed or origin in listed


def install_cors(app: FastAPI, cors: str) -> None:
    """Let web pages from ``cors`` origins (settings ``cors``: local, *, none or a comma list) call the API
    from a browser: the preflight is answered before the API key check, as browsers send it without one. A page
    from any other origin is refused before this (:class:`Gate`), not only left without a CORS grant."""
    if cors == "none":
        return
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, **_cors_where(cors), allow_methods=["GET", "POST"], allow_headers=["*"],
                       expose_headers=["*"], max_age=600)  # "*": the cascade's X-Ondevice-* headers too


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(host: bytes | str) -> str:
    """The name in a Host header (or a ``--host``), lower case, without its port, brackets or final dot."""
    h = (host.decode("latin-1") if isinstance(host, bytes) else host).strip().lower()
    if h.startswith("["):  # [::1]:8080
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether a bind address (``--host``) listens on this machine only."""
    name = host_name(host)
    return name == "localhost" or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)


def host_allowed(bound: str, allowed_hosts: str | None):
    """``allowed(host_header) -> bool`` for a server bound to ``bound``, or None where Host is not checked.

    Checked when ``bound`` is a loopback address (against DNS rebinding: a page whose name now resolves to
    127.0.0.1 sends its own name as Host) or when ``--allowed-hosts`` lists names: localhost, ``*.localhost``
    (browsers resolve them to this machine themselves), any IP address (a page cannot rebind those), the bound
    host, and the listed names (``.example.com``: that domain and its subdomains); ``*`` turns the check off."""
    extra = [h.strip().lower().rstrip(".") for h in (allowed_hosts or "").split(",") if h.strip()]
    if "*" in extra or not (extra or is_loopback(bound)):
        return None
    names = frozenset([host_name(bound), *(h for h in extra if not h.startswith("."))])
    domains = tuple(h for h in extra if h.startswith("."))

    def allowed(header: bytes) -> bool:
        name = host_name(header)
        return (name in names or name == "localhost" or name.endswith(".localhost") or _is_ip(name)
                or name.endswith(domains) or name in {d[1:] for d in domains})

    return allowed


class Gate:
    """Pure ASGI middleware, outside everything (the model-loading app too): a 403, before any work, for a request
    from a web page that ``--cors`` does not let in (a browser sends a form-like POST without a preflight:
    reading every body as JSON would run it) and for one whose Host names no host this server answers to (DNS
    rebinding; see :func:`host_allowed`), as Ollama refuses both. Clients other than browsers send no Origin."""

    def __init__(self, app, *, cors: str, bound: str, allowed_hosts: str | None, log: logging.Logger | None = None):
        self.app, self.cors, self.bound, self.log = app, cors, bound, log
        self.origin_ok = origin_allowed(cors)
        self.host_ok = host_allowed(bound, allowed_hosts)

    def refusal(self, scope) -> tuple[str, str] | None:
        """(code, message) of the 403 for this request, or None."""
        headers = dict(scope.get("headers") or [])
        origin, host = headers.get(b"origin"), headers.get(b"host")
        if origin is not None and not self.origin_ok(o := origin.decode("latin-1")) and not self._own_page(o, host):
            return "origin_not_allowed", (f"a web page from {o} may not call this server (--cors {self.cors}); "
                                          f"to let it in, start the server with --cors {o} (or ONDEVICE_CORS)")
        if self.host_ok is not None and host is not None and not self.host_ok(host):
            h = host.decode("latin-1")
            return "host_not_allowed", (f"Host {h} is not a name this server answers to (it listens on "
                                        f"{self.bound}; only localhost and IP addresses are taken, against DNS "
                                        f"rebinding); to allow it, start the server with --allowed-hosts "
                                        f"{host_name(h)} (or ONDEVICE_ALLOWED_HOSTS)")
        return None

    def _own_page(self, origin: str, host: bytes | None) -> bool:
        """Whether a page comes from this server itself (its /docs, a UI it serves): browsers send Origin on a
        same-origin POST too. Same origin as the Host, where Host cannot be a rebound name: an IP address,
        localhost, or a name this server answers to (``--allowed-hosts``, or the bound host on loopback)."""
        if host is None or urllib.parse.urlsplit(origin).netloc.lower() != host.decode("latin-1").lower():
            return False
        name = host_name(host)
        return _is_ip(name) or name == "localhost" or name.endswith(".localhost") or \
            (self.host_ok is not None and self.host_ok(host))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (why := self.refusal(scope)) is not None:
            t0 = time.perf_counter()
            await _send_error(send, 403, one_line(why[1]), "permission_error", why[0])
            self._count(scope["path"])
            if self.log is not None:
                log_request(self.log, {**scope, NOTE: {"error": why[1]}}, 403, time.perf_counter() - t0)
            return None
        return await self.app(scope, receive, send)

    def _count(self, path: str) -> None:
        """A refusal in /metrics' requests_total, as the app's own 401s and 413s are (while the model loads there
        is no app, and nothing to count in)."""
        from .app import ROUTES

        app = getattr(self.app, "app", self.app)  # serve's Loading wrapper holds the app once it is built
        state = getattr(getattr(app, "state", None), "ondevice", None)
        if state is not None:
            state.metrics.request(path if path in ROUTES else "other", 403)
