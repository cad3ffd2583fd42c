"""Run the app with uvicorn, in the foreground (the CLI) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
import threading
import time

from ..errors import OndeviceError
from .settings import ServeSettings


def _check_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise OndeviceError(f"the server needs {e.name}; install it with: pip install 'ondevice[server]'") from e


def build_app(settings: ServeSettings):
    """(app, state): the model is loaded here; the batcher starts with the app's lifespan."""
    _check_extra()
    from .app import create_app
    from .state import ServerState

    state = ServerState(settings)
    return create_app(state), state


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port is a clear error, not a traceback from uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # connections inherit it: without it each stream's first token waits ~40 ms behind the headers'
    # unacknowledged segment (Nagle + the client's delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # the host, not the port
            raise OndeviceError(f"cannot listen on {host}:{port} ({e.strerror}): --host must be an address of "
                                f"this machine (127.0.0.1, 0.0.0.0 for every interface, ::1)") from e
        raise OndeviceError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                            f"or stop what is using it") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


LOADING = json.dumps({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}).encode()


class Loading:
    """The ASGI app ``serve`` listens with while the model loads: every request gets llama-server's answer
    meanwhile, a 503 ``Loading model`` (with Retry-After), at once; then the app ``load()`` builds (on a
    thread) serves them once its batcher has warmed up, its lifespan run inside this one's. A failed load stops
    the server (``error``)."""

    def __init__(self, load, on_ready):
        self.load, self.on_ready = load, on_ready
        self.app = None
        self.error: BaseException | None = None
        self.server = None  # the uvicorn server, stopped when the load fails

    def end_requests(self) -> None:
        if self.app is not None:
            self.app.state.end_requests()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(LOADING)).encode())]})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else LOADING})

    async def _lifespan(self, receive, send) -> None:
        await receive()  # lifespan.startup: listening now, loading meanwhile
        await send({"type": "lifespan.startup.complete"})
        loading = asyncio.create_task(self._load())
        await receive()  # lifespan.shutdown
        ctx = await loading  # a load in progress ends first: llama.cpp's cannot be stopped midway
        if ctx is not None:
            await ctx.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})

    async def _load(self):
        try:
            app, state = await asyncio.to_thread(self.load)
            ctx = app.router.lifespan_context(app)
            await ctx.__aenter__()  # the batcher starts: ready once its warmup decode is done
            await asyncio.to_thread(state.batcher.warmed.wait)
        except BaseException as e:  # noqa: BLE001 — serve() raises it once the server has stopped
            self.error = e
            if self.server is not None:
                self.server.should_exit = True
            return None
        if self.server is None or not self.server.should_exit:  # not when stopped while loading
            self.on_ready(state)  # first: a request answered by the app comes after the line that says it is ready
        self.app = app
        return ctx


HEAD_LIMIT = 64 * 1024  # bytes of a request line and headers (llama-server: 8 KiB a line; Ollama: 1 MiB in all)


def _protocol(head_timeout: float, body_timeout: float = 10.0):
    """uvicorn's httptools protocol, with a limit on a request's head (its request line and headers), which
    httptools has none of: over :data:`HEAD_LIMIT` bytes it gets a 431, and unfinished ``head_timeout`` seconds
    after the connection opened (or after the first byte of a kept-alive connection's next request) a 408, the
    connection closed either way. Without it one header line that never ends grew the process without bound and
    stalled every other request, and half-sent requests held their connections (file descriptors) for good.
    None where httptools is missing (uvicorn then uses h11, which has its own limit on the head's size).

    A request's body has ``body_timeout`` seconds between two successive reads (nginx's client_body_timeout):
    silent for longer before it is complete, the client gets a 408 with a JSON error (if no response started)
    and the connection is closed, so the app's receive() sees a disconnect. The clock stops while the client
    cannot send: uvicorn paused reading (the app has not taken what came) or the client waits for our
    ``100 Continue``. A body sent steadily, however large, is never cut."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

        from .http import NOTE
    except ImportError:
        return None

    class Protocol(HttpToolsProtocol):
        head_bytes = 0  # of the head being received, counted as the bytes come, before httptools parses them
        in_head = True  # the next bytes are (more of) a request's head
        head_tail = b""  # the last 3 bytes of the head so far: its end (CRLF CRLF) may span two reads
        head_timer = None  # armed while a request's head is being received
        body_timer = None  # armed while a request's body is being received, reset by each read of it

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(head_timeout, self._refuse, 408, "request headers not received "
                                                   f"within {head_timeout:g} s")

        def connection_lost(self, exc) -> None:
            self._head_done()
            self._body_done()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(head_timeout, self._refuse, 408, "request headers not "
                                                       f"received within {head_timeout:g} s")

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._head_done()
            super().on_headers_complete()
            self._body_wait()  # on_message_complete, at once for a request without a body, stops it

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            if self.body_timer is not None:
                self._body_wait()

        def on_message_complete(self) -> None:
            self._body_done()
            self.in_head, self.head_bytes, self.head_tail = True, 0, b""  # what comes next is the next request's
            super().on_message_complete()

        def _body_wait(self) -> None:
            self._body_done()
            self.body_timer = self.loop.call_later(body_timeout, self._body_silent)

        def _body_done(self) -> None:
            if self.body_timer is not None:
                self.body_timer.cancel()
                self.body_timer = None

        def _body_silent(self) -> None:
            self.body_timer = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None:
                return
            if self.flow.read_paused or cycle.waiting_for_100_continue:  # the client is waiting for us
                self._body_wait()
                return
            message = (f"request body not received: nothing came for {body_timeout:g} s before it was complete "
                       f"(--body-timeout); send the body without pauses")
            # the access log and /metrics count it as the 408 it is (the app never sees a body cut short)
            cycle.scope.setdefault(NOTE, {}).update(error=message, body_timeout=True)
            if not cycle.response_started:
                body = json.dumps({"error": {"message": message, "type": "timeout_error", "param": None,
                                             "code": "body_timeout"}}).encode()
                self.transport.write(STATUS_LINE[408] + b"content-type: application/json\r\n"
                                     + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
            cycle.disconnected = True  # now, as connection_lost will: receive() gives http.disconnect, send() drops
            cycle.message_event.set()
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.in_head and not self.transport.is_closing():  # counted before it is parsed: a head that came
                seen = self.head_tail + data  # whole in one read is complete (and its request started) after it
                end = seen.find(b"\r\n\r\n")
                self.head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self.head_tail))
                self.head_tail = seen[-3:]
                if self.head_bytes > HEAD_LIMIT:
                    self._refuse(431, f"request headers larger than {HEAD_LIMIT // 1024} KiB")
                    return
            super().data_received(data)

        def _head_done(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _refuse(self, status: int, message: str) -> None:
            self._head_done()
            if self.transport.is_closing():
                return
            if self.cycle is None and self.head_bytes == 0:  # a connection that never asked anything (a
                self.transport.close()  # browser's preconnect, a pool's spare): closed, not sent a reply
                return
            if self.cycle is None or self.cycle.response_complete:  # no earlier (pipelined) reply is under way
                body = message.encode()
                self.transport.write(STATUS_LINE[status] + b"content-type: text/plain; charset=utf-8\r\n"
                                     + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
            self.transport.close()

    return Protocol


def _uvicorn_server(app, graceful_s: float, end_requests=None, *, settings: ServeSettings):
    """uvicorn's server, stopping promptly: the requests in flight end at once (a stream with an error event,
    any other request with a 503; ``app.state.end_requests``) rather than generate on for ``graceful_s`` (the
    limit left for anything else) and then be cancelled with a traceback. The app is served behind
    :class:`~.http.Gate` (web pages ``--cors`` does not let in and unknown Host names refused) and with a limit on
    each request's headers (:func:`_protocol`).

    A repeated stop signal (Ctrl-C twice; a process-group kill, which the serving child of ``ondevice`` gets
    once directly and once forwarded by its supervisor) changes nothing: uvicorn would force an exit that
    skips the app's shutdown and then re-raise every signal it caught, which ends in tracebacks."""
    import uvicorn

    from .http import Gate, access_logger, notes_logger

    notes_logger()  # the server's own notes (a cut prompt, a failing cloud tier), dated on stderr as its access lines
    end_requests = end_requests or app.state.end_requests
    app = Gate(app, cors=settings.cors, bound=settings.host, allowed_hosts=settings.allowed_hosts,
               log=access_logger() if settings.access_log else None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            end_requests()
            await super().shutdown(sockets)

    protocol = _protocol(settings.header_timeout, settings.body_timeout)
    return Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s,
                                 http=protocol or "auto", h11_max_incomplete_event_size=HEAD_LIMIT))


def serve(settings: ServeSettings) -> None:
    """Serve until interrupted (Ctrl-C); every request is a 503 ``Loading model`` until the model is loaded."""
    _check_extra()
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]

    def ready(state) -> None:
        print(f"ondevice serve: {state.model_id} on http://{host}:{port}/v1 ({settings.parallel} slots x "
              f"{settings.ctx} ctx; key {'required' if settings.api_keys else 'off'})"
              + (f"; {state.cascade.describe()}" if state.cascade is not None else ""), file=sys.stderr, flush=True)
        if state.knobs_note:
            print(f"ondevice serve: {state.knobs_note}", file=sys.stderr, flush=True)
        if settings.timeout != type(settings).model_fields["timeout"].default:
            print(f"ondevice serve: note: --timeout {settings.timeout:g} is the most seconds a request may take, queue "
                  f"wait included (llama-server's -to is an idle socket timeout): longer generations are cut",
                  file=sys.stderr, flush=True)
        if state.cascade is not None and (warning := state.cascade.warning()):
            print(f"ondevice serve: warning: {warning}", file=sys.stderr, flush=True)

    app = Loading(lambda: build_app(settings), ready)
    app.server = _uvicorn_server(app, graceful_s=5, end_requests=app.end_requests, settings=settings)
    app.server.run(sockets=[sock])
    if app.error is not None:
        raise app.error


class BackgroundServer:
    """Run a server in a daemon thread: ``with BackgroundServer(settings) as srv: srv.base_url``."""

    def __init__(self, settings: ServeSettings):
        self.sock = _bind(settings.host, settings.port)
        try:
            self.app, self.state = build_app(settings)
        except BaseException:  # a model that fails to load must not leave its port bound
            self.sock.close()
            raise
        host, port = self.sock.getsockname()[:2]
        self.base_url = f"http://{host}:{port}"
        self.server = _uvicorn_server(self.app, graceful_s=2, settings=settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OndeviceError("the background server did not start; run with ONDEVICE_VERBOSE=1")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
