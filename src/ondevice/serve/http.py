"""OpenAI-style errors for every failure, and the ASGI guard: API key, body size limit, request metrics."""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflow, OndeviceError
from .batcher import JobTimeout, QueueFull


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_payload(exc: BaseException) -> tuple[int, dict, dict | None]:
    """(status, OpenAI error body, headers) for an exception raised while serving a request."""
    from .state import PromptTooLong

    def body(msg, type_, code=None, param=None):
        return {"error": {"message": msg, "type": type_, "param": param, "code": code}}

    if isinstance(exc, QueueFull):
        return 429, body(str(exc), "rate_limit_error", "queue_full"), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, JobTimeout):
        return 504, body(str(exc) + "; raise --timeout or ask for fewer tokens", "timeout_error", "timeout"), None
    if isinstance(exc, (PromptTooLong, ContextOverflow)):
        return 400, body(str(exc), "invalid_request_error", "context_length_exceeded", "messages"), None
    if isinstance(exc, OndeviceError):
        return 400, body(str(exc), "invalid_request_error", "invalid_value"), None
    return 500, body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error"), None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('msg')}); send JSON with "
                                       f"Content-Type: application/json", code="invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return error_response(400, f"invalid request: {msg}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type_,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        status, body, headers = error_payload(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    for cls in (OndeviceError, QueueFull, JobTimeout):
        app.add_exception_handler(cls, _any)


class Guard:
    """Pure ASGI middleware: API key, body size limit (413 before the body is parsed), request counts."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics, routes: set[str]):
        self.app, self.api_key, self.max_body, self.metrics, self.routes = app, api_key, max_body, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status_seen = []

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status_seen.append(msg["status"])
            await send(msg)

        try:
            if self.api_key and path != "/health":
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return await _send_error(send_counted, 401, "missing or wrong API key; send "
                                             "'Authorization: Bearer <key>' with the server's --api-key",
                                             "authentication_error", "invalid_api_key")
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, too_big = await self._read_body(scope, receive)
                if too_big:
                    return await _send_error(send_counted, 413, f"the request body is larger than {self.max_body} "
                                             f"bytes (--max-body-bytes); send a smaller body",
                                             "invalid_request_error", "body_too_large")
                receive = _replay(body, receive)
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(route, status_seen[0] if status_seen else 499)

    async def _read_body(self, scope, receive) -> tuple[bytes, bool]:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return b"", True
        chunks, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks), False


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
