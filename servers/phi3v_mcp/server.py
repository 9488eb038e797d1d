"""The phi3v-tools MCP server: the tools of :func:`phi3v_tools.tools.tool_specs` (describe_image, read_text,
read_table, compare_images, ask_images).

Built on the MCP Python SDK 2.x high-level server (:class:`mcp.server.MCPServer`). Each tool is one entry of
the tools' table, registered by :func:`add_spec_tool` and nothing else:

- its parameters are the spec's arguments model (the SDK builds ``inputSchema`` from a function signature, so
  the handler's signature is made from the model's fields) and its ``outputSchema`` the result model;
  a result carries ``structuredContent`` plus a short text block (:func:`~phi3v_tools.tools.result_text`);
- annotations: read-only, and open-world only when URL fetching is enabled;
- progress notifications while the model generates (when the caller asks for them), throttled;
- cancellation: a ``notifications/cancelled`` from the client cancels the handler, which cancels the
  request in the runner (it leaves its batch before the next decode step);
- expected failures (:class:`~phi3v_tools.errors.Phi3VToolsError`) become ``ToolError`` results with the
  message; anything else is reported by the SDK as a bare "Error executing tool" (the traceback stays in
  the server log).

:func:`run` serves it over stdio or streamable HTTP. HTTP binds to ``settings.mcp_host`` (127.0.0.1 by
default) with DNS-rebinding protection on, an optional static bearer token (``PHI3V_MCP_TOKEN``) and a
request-body limit (``PHI3V_MCP_MAX_BODY_MB``). Its sessions and connections are bounded (every bound a
setting; see SECURITY.md):

- sessions (pre-2026 handshake only): at most ``PHI3V_MCP_MAX_SESSIONS`` (100) open; a new one takes the
  place of the longest-idle session with no request in flight, and only when all are busy is it refused
  (503, Retry-After); a session with no request for ``PHI3V_MCP_SESSION_IDLE_S`` (600 s) is closed
  (:mod:`phi3v_mcp.sessions`);
- connections: at most ``PHI3V_MCP_MAX_CONNECTIONS`` (200) open, beyond that refused at once (503); a
  request's headers must arrive within ``PHI3V_MCP_HEADER_TIMEOUT_S`` (10 s) of the connection opening or of
  the previous answer, its body within ``PHI3V_MCP_BODY_TIMEOUT_S`` (60 s) of its headers (408 otherwise);
  an idle keep-alive connection is closed after ``PHI3V_MCP_KEEP_ALIVE_S`` (5 s). These apply while a request
  is received, never while an answer streams (:mod:`phi3v_mcp.connections`).
"""

import asyncio
import concurrent.futures
import contextlib
import hmac
import inspect
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

import anyio
import anyio.abc
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi3v_mcp.connections import ConnectionLimits, limited_protocol
from phi3v_mcp.sessions import SessionEvictor
from phi3v_tools import __version__
from phi3v_tools.api import toolbox_from_settings
from phi3v_tools.errors import Phi3VToolsError
from phi3v_tools.settings import Settings
from phi3v_tools.signals import Terminated
from phi3v_tools.tools import IMAGE_FORMS, UNTRUSTED_NOTE, Toolbox, ToolResult, ToolSpec, result_text, tool_specs

__all__ = [
    "AppContext",
    "BearerTokenMiddleware",
    "BodyLimitMiddleware",
    "DisconnectMiddleware",
    "add_spec_tool",
    "create_server",
    "http_app",
    "run",
    "serve_stdio",
    "serve_stdio_until_stopped",
    "uvicorn_config",
]

logger = logging.getLogger("phi3v_mcp")

SERVER_NAME = "phi3v-tools"
MCP_PATH = "/mcp"
PROGRESS_INTERVAL_S = 0.25  # at most one progress notification per interval (plus the first one at once)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CLIENT_GONE = "phi3v.client_gone"  # ASGI scope key: set when the client closes the HTTP request


def instructions(max_compare: int) -> str:
    """The server's instructions: one line per tool of the table, then how images are referred to."""
    lines = ["Vision tools backed by a local Phi-3-vision model."]
    lines += [f"- {spec.name}: {spec.description.split('. ')[0].rstrip('.')}." for spec in tool_specs(max_compare)]
    lines += [
        f"Images are strings, each {IMAGE_FORMS}.",
        "Reuse handles for follow-up questions about the same image: nothing is re-sent and the image's features are "
        f"cached. {UNTRUSTED_NOTE}",
    ]
    return "\n".join(lines)


@dataclass
class AppContext:
    """What the lifespan yields to the tools: the toolbox over the loaded model."""

    toolbox: Toolbox
    settings: Settings


AppCtx = Context[AppContext, Any]


# ---------------------------------------------------------------------------------------------------------------------
# The server


def create_server(settings: Settings, toolbox: Toolbox | None = None) -> MCPServer[AppContext]:
    """The MCP server over ``toolbox``, or over a toolbox built from ``settings`` (model loaded at start-up)."""

    @asynccontextmanager
    async def lifespan(_server: MCPServer[AppContext]) -> AsyncIterator[AppContext]:
        if toolbox is not None:
            yield AppContext(toolbox, settings)
            return
        tools = toolbox_from_settings(settings)
        started = time.perf_counter()
        if settings.backend == "local":
            logger.info("loading model %s", settings.model)
        backend = await anyio.to_thread.run_sync(lambda: tools.backend)  # loads the model, or asks the server
        where = getattr(backend, "base_url", None) or backend.info()["device"]  # type: ignore[attr-defined]
        name = await anyio.to_thread.run_sync(lambda: backend.model_name)
        logger.info("model %s ready on %s in %.1fs", name, where, time.perf_counter() - started)
        # For the local engine, the toolbox's factory returned the runner get_runner shares per model per process.
        yield AppContext(tools, settings)

    max_compare = toolbox.max_compare if toolbox is not None else settings.max_compare
    server: MCPServer[AppContext] = MCPServer(
        SERVER_NAME,
        title="Phi-3-vision tools",
        description="Describe images, read their text and tables, compare them, answer questions about them.",
        instructions=instructions(max_compare),
        version=__version__,
        lifespan=lifespan,
    )
    for spec in tool_specs(max_compare):
        add_spec_tool(server, spec, open_world=spec.open_world and settings.allow_urls)
    return server


def add_spec_tool(server: MCPServer[AppContext], spec: ToolSpec, *, open_world: bool) -> None:
    """Register ``spec`` as an MCP tool: its arguments model as the parameters, its result model as outputSchema."""

    async def handler(ctx: AppCtx, **arguments: Any) -> CallToolResult:
        return await _call(ctx, lambda tb, progress: spec.acall(tb, arguments, progress.on_text, progress.on_page))

    handler.__signature__ = spec_signature(spec)  # type: ignore[attr-defined]
    handler.__name__ = spec.name
    annotations = ToolAnnotations(title=spec.title, read_only_hint=spec.read_only, open_world_hint=open_world)
    server.add_tool(
        handler, name=spec.name, title=spec.title, description=spec.model_description, annotations=annotations
    )


def spec_signature(spec: ToolSpec) -> inspect.Signature:
    """A function signature with one parameter per field of the spec's arguments model (types, descriptions,
    limits and defaults), a Context parameter, and the result model as the structured output."""
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=AppCtx)
    params = [ctx]
    for name, info in spec.args.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else None
        described = Field(description=info.description, json_schema_extra=extra)
        annotation: Any = Annotated.__class_getitem__((info.annotation, *info.metadata, described))  # type: ignore[attr-defined]
        default = inspect.Parameter.empty if info.is_required() else info.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return inspect.Signature(params, return_annotation=Annotated[CallToolResult, spec.result])


async def _call(ctx: AppCtx, start: Callable[[Toolbox, "_Progress"], Awaitable[ToolResult]]) -> CallToolResult:
    """Run one toolbox call with progress reporting; expected failures become ToolError.

    The call stops (and the runner drops the request) when the client cancels it, or when the HTTP
    connection that carries it closes: without an event store the answer could never be delivered.
    """
    app = ctx.request_context.lifespan_context
    progress = _Progress(ctx)
    loop = asyncio.get_running_loop()
    pump = loop.create_task(progress.pump())
    gone = _client_gone(ctx)
    with anyio.CancelScope() as scope:
        watcher = loop.create_task(_cancel_when_set(gone, scope)) if gone is not None else None
        try:
            result = await start(app.toolbox, progress)
        except Phi3VToolsError as exc:
            raise ToolError(str(exc)) from None
        except anyio.get_cancelled_exc_class():
            # The client cancelled (notifications/cancelled) or went away: the runner drops the request too.
            logger.info("request %s cancelled after %d characters; generation stopped", ctx.request_id, progress.chars)
            raise
        finally:
            pump.cancel()  # not awaited: awaiting here could swallow a cancellation meant for this call
            if watcher is not None:
                watcher.cancel()
    if scope.cancelled_caught:
        logger.info(
            "request %s: the client disconnected after %d characters; generation stopped",
            ctx.request_id,
            progress.chars,
        )
        raise ToolError("the client disconnected before the answer was ready")
    await progress.finish()
    return CallToolResult(
        content=[TextContent(type="text", text=result_text(result))],
        structured_content=result.model_dump(mode="json"),
    )


def _client_gone(ctx: AppCtx) -> anyio.Event | None:
    """The event :class:`DisconnectMiddleware` sets when this call's HTTP request is closed by the client."""
    request = ctx.request_context.request
    scope = getattr(request, "scope", None)
    event = scope.get(CLIENT_GONE) if isinstance(scope, dict) else None
    return event if isinstance(event, anyio.Event) else None


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class _Progress:
    """Turns the runner's text pieces (worker thread) into throttled progress notifications (event loop).

    The progress value is the number of characters generated so far; there is no total (the answer's
    length is not known in advance). For a call that reads the pages of a PDF it is the pages read so far, with
    the number of pages as the total ("2 of 3 pages read"): the pages are read at once, so their characters are not
    one answer's, and the value must never decrease.
    """

    def __init__(self, ctx: AppCtx) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.chars = 0  # written by the worker thread, read on the loop (an int assignment is atomic)
        self.sent = 0
        self.pages: tuple[int, int] | None = None  # (read, total) for a call on a PDF
        self.pages_sent = -1

    def on_page(self, done: int, total: int) -> None:
        """The toolbox's page progress (called on the event loop, or from a worker thread)."""
        self.pages = (done, total)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)

    def on_text(self, piece: str) -> None:
        self.chars += len(piece)
        with contextlib.suppress(RuntimeError):  # a closed loop: a piece arrived while a cancelled call unwound
            self._loop.call_soon_threadsafe(self._changed.set)

    async def pump(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            if not await self._send():
                return
            await anyio.sleep(PROGRESS_INTERVAL_S)

    async def finish(self) -> None:
        await self._send()

    async def _send(self) -> bool:
        """Report the characters (or pages) so far, if there are new ones; False when reporting failed."""
        try:
            if self.pages is not None:
                done, total = self.pages
                if done > self.pages_sent:
                    self.pages_sent = done
                    await self._ctx.report_progress(done, total, message=f"{done} of {total} pages read")
                return True
            chars = self.chars
            if chars <= self.sent:
                return True
            self.sent = chars
            await self._ctx.report_progress(chars, message=f"generating: {chars} characters so far")
        except Exception:  # a client that went away must not fail the call
            logger.debug("progress reporting failed", exc_info=True)
            return False
        return True


# ---------------------------------------------------------------------------------------------------------------------
# HTTP: the app and its guards


class BearerTokenMiddleware:
    """Refuses HTTP requests without ``Authorization: Bearer <token>`` (401); other scopes pass through."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Header values arrive decoded as latin-1: encoding them back gives the bytes that were sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self._token):
            response = PlainTextResponse(
                "Unauthorized: send the server's token as 'Authorization: Bearer <token>' (PHI3V_MCP_TOKEN)",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="phi3v-tools"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses HTTP request bodies over ``max_bytes`` with a 413 that states the limit and what to do instead.

    The app sees a request only once its whole body is in: one whose client left mid-body (or that the body
    timeout cut off) is dropped here, with nothing to answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PlainTextResponse:
        mb = round(self.max_bytes / 2**20, 3)
        return PlainTextResponse(
            f"Request body too large: the limit is {mb:g} MB (PHI3V_MCP_MAX_BODY_MB). Send images as file paths, "
            "URLs or image://sha256/ handles from earlier results instead of base64, or send smaller files.",
            status_code=413,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        # No (or a smaller) declared length: count what actually arrives, then replay it to the app.
        body = bytearray()
        queued: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body (or timed out): nobody to answer
                return
            body.extend(message.get("body", b""))
            if len(body) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                queued.append({"type": "http.request", "body": bytes(body), "more_body": False})
                break

        async def replay() -> Message:
            return queued.pop(0) if queued else await receive()

        await self.app(scope, replay, send)


class DisconnectMiddleware:
    """Marks a POST whose client went away: sets ``scope[CLIENT_GONE]`` (an :class:`anyio.Event`).

    With a session (the pre-2026 handshake), the SDK keeps running a tool call whose POST stream the client
    closed, since the spec lets a client resume the stream from an event store. This server keeps no event
    store, so such an answer can never be delivered: the tool call watches this event and stops (freeing its
    place in the batch). Calls in the 2026 per-request mode are already cancelled by the SDK on disconnect.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        gone = anyio.Event()
        scope[CLIENT_GONE] = gone

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        await self.app(scope, watched, send)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The names a request's ``Host`` (and a browser's ``Origin``) may carry, without port or brackets; None when
    ``PHI3V_MCP_ALLOWED_HOSTS`` is ``*`` (the check is off: a proxy in front checks, or the token is enough).

    Always the loopback names, and ``PHI3V_MCP_ALLOWED_HOSTS``. A specific address bound adds itself; a wildcard
    bind (``0.0.0.0``, ``::``) adds this machine's host name, its fully qualified name and their addresses, so
    that ``http://gpu-box:8000`` works from the network. A name that only resolves here (an attacker's domain
    rebound to this machine, the DNS-rebinding attack) is refused with 421.
    """
    extra = [h.strip().strip("[]").lower() for h in settings.mcp_allowed_hosts if h.strip()]
    if "*" in extra:
        return None
    hosts = [h.strip("[]") for h in LOOPBACK_HOSTS]
    bound = settings.mcp_host.strip("[]")
    if bound in ("0.0.0.0", "::", ""):
        hosts += _this_machine()
    elif not _is_loopback(bound):
        hosts.append(bound.lower())
    return list(dict.fromkeys(hosts + extra))


def _this_machine() -> list[str]:
    """This machine's host name, its fully qualified name and their addresses (best effort: no DNS wait)."""
    names = [socket.gethostname(), socket.getfqdn()]
    addresses: list[str] = []
    with contextlib.suppress(OSError):
        addresses = socket.gethostbyname_ex(names[0])[2]
    return [n.lower() for n in names + addresses if n]


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """The SDK's DNS-rebinding protection over :func:`allowed_hosts` (Host and Origin, any port)."""
    hosts = allowed_hosts(settings)
    if hosts is None:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    named = [f"[{h}]" if ":" in h else h for h in hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in named] + named,
        allowed_origins=[f"{scheme}://{h}:*" for h in named for scheme in ("http", "https")]
        + [f"{scheme}://{h}" for h in named for scheme in ("http", "https")],
    )


def http_app(server: MCPServer[AppContext], settings: Settings) -> ASGIApp:
    """The streamable HTTP app at ``/mcp``, behind the token check (if a token is set) and the body limit.

    Sessions are capped at ``mcp_max_sessions`` (the longest-idle one makes room for a new one) and closed
    after ``mcp_session_idle_s`` without a request.
    """
    max_bytes = int(settings.mcp_max_body_mb * 2**20)
    app: ASGIApp = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        max_request_body_size=max_bytes,
        transport_security=transport_security(settings),
        host=settings.mcp_host,
        max_sessions=settings.mcp_max_sessions,
        session_idle_timeout=settings.mcp_session_idle_s,
        stateless_http=settings.mcp_stateless,
    )
    SessionEvictor(server.session_manager, settings.mcp_max_sessions).install()
    app = DisconnectMiddleware(app)
    app = BodyLimitMiddleware(app, max_bytes)
    if settings.mcp_token:
        app = BearerTokenMiddleware(app, settings.mcp_token)  # outermost: nothing is read before the token
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Running


def run(settings: Settings, transport: str = "stdio") -> None:
    """Serve the tools over ``stdio`` or streamable HTTP (``http``) until stopped."""
    transport = {"streamable-http": "http", "streamable_http": "http"}.get(transport, transport)
    if transport not in ("stdio", "http"):
        raise ValueError(f"unknown transport {transport!r}; use 'stdio' or 'http'")
    configure_logging()
    # Load the model (or reach the remote server) before serving: a start-up failure is then one clear error, not
    # an HTTP lifespan traceback. The server's lifespan gets this same runner from get_runner (one per model per
    # process), or asks the remote server again.
    if settings.backend == "local":
        from phi3v_tools.runner import get_runner

        get_runner(settings)
    else:
        from phi3v_tools.api import remote_backend

        remote_backend(settings).model_name  # noqa: B018  # reachable, and serving a model
    server = create_server(settings)
    try:
        if transport == "stdio":
            stop = anyio.run(serve_stdio_until_stopped, server)
            if stop is not None:
                raise stop
        else:
            _run_http(server, settings)
    finally:
        runner = sys.modules.get("phi3v_tools.runner")  # not imported with a remote backend: nothing to close
        if runner is not None:
            runner.close_runners()


async def serve_stdio(server: MCPServer[AppContext]) -> None:
    """Serve ``server`` over this process's stdin and stdout until stdin ends (or the task is cancelled).

    The SDK's stdio transport (``MCPServer.run("stdio")``), except that stdin is read on a daemon thread
    (:class:`StdinLines`). The SDK reads it on an anyio worker thread, which is not a daemon: blocked on a
    client's pipe that stays open, the interpreter waited for it at exit, so Ctrl-C (SIGINT) left the process
    running until the client closed stdin.
    """
    from mcp.server.stdio import stdio_server

    lowlevel = server._lowlevel_server  # what MCPServer.run_stdio_async serves
    stdin = StdinLines.claim()
    try:
        async with stdio_server(stdin=cast("anyio.AsyncFile[str]", stdin)) as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
    finally:
        stdin.release()


async def serve_stdio_until_stopped(server: MCPServer[AppContext]) -> KeyboardInterrupt | None:
    """:func:`serve_stdio` until stdin ends or SIGINT or SIGTERM arrives; the signal, as the KeyboardInterrupt (or
    :class:`~phi3v_tools.signals.Terminated`) the caller raises once the loop has stopped, or None.

    The signal cancels the serving task, so the SDK's transport and session unwind as on any cancellation. Raised
    inside the loop instead (Python's own SIGINT handler, or ``terminate_as_interrupt``), the KeyboardInterrupt
    could land in one of the transport's tasks, which then ended with an exception group that asyncio logged as
    "unhandled exception during asyncio.run() shutdown", a second line after "terminated". The process's handlers
    for both signals are restored on the way out. Where the loop takes no signal handlers (Windows, a thread other
    than the main one), this is :func:`serve_stdio` alone.
    """
    stops = (signal.SIGINT, signal.SIGTERM)
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        await serve_stdio(server)
        return None
    previous = {sig: signal.getsignal(sig) for sig in stops}
    received: list[KeyboardInterrupt] = []

    serving = anyio.CancelScope()

    async def watch(signals: AsyncIterator[int]) -> None:
        async for signum in signals:  # a repeated signal while the server unwinds changes nothing
            if not received:
                received.append(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
                serving.cancel()

    try:
        # The receiver stays open until the server has unwound, so that no signal meets a default handler meanwhile.
        with anyio.open_signal_receiver(*stops) as signals:
            async with anyio.create_task_group() as group:
                group.start_soon(watch, signals)
                with serving:
                    await serve_stdio(server)
                group.cancel_scope.cancel()  # served: stop watching
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to restore
                signal.signal(sig, handler)
    return received[0] if received else None


class StdinLines:
    """The lines of a file descriptor as an async iterator of text (UTF-8, bad bytes replaced), read ahead by at
    most one line on a daemon thread, which the interpreter does not wait for at exit.

    The thread may still be blocked reading when the server stops; it ends at the next line or end of file
    (a process that goes on after serving should not read that descriptor meanwhile).
    """

    def __init__(self, fd: int, *, on_release: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._on_release = on_release
        self._queue: asyncio.Queue[bytes] | None = None
        self._ended = False

    @classmethod
    def claim(cls) -> "StdinLines":
        """The lines of stdin; meanwhile fd 0 reads the null device (as in the SDK: what a handler or a child
        process reads there is not taken from the client's messages), until :meth:`release`."""
        try:
            private = os.dup(0)
        except OSError:
            return cls(0)
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(null, 0)
            finally:
                os.close(null)
        except OSError:
            return cls(private)

        def restore() -> None:
            with contextlib.suppress(OSError):
                os.dup2(private, 0)

        return cls(private, on_release=restore)

    def release(self) -> None:
        """Give fd 0 back (once); the descriptor read here stays open while its thread may still read it."""
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()

    def __aiter__(self) -> "StdinLines":
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=1)
            loop = asyncio.get_running_loop()
            threading.Thread(target=self._read, args=(loop, self._queue), name="mcp-stdin", daemon=True).start()
        line = await self._queue.get()
        if not line:
            self._ended = True
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")

    def _read(self, loop: asyncio.AbstractEventLoop, lines: "asyncio.Queue[bytes]") -> None:
        """Read lines (and a last unterminated one) until end of file or an error, then hand over b""."""
        parts: list[bytes] = []  # the line so far (a long line arrives in many chunks: joined once)
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                parts.append(chunk[start : end + 1])
                line, parts, start = b"".join(parts), [], end + 1
                if not self._hand_over(loop, lines, line):
                    return
            if start < len(chunk):
                parts.append(chunk[start:])
        if parts and not self._hand_over(loop, lines, b"".join(parts)):
            return
        self._hand_over(loop, lines, b"")

    @staticmethod
    def _hand_over(loop: asyncio.AbstractEventLoop, lines: "asyncio.Queue[bytes]", line: bytes) -> bool:
        """Put ``line`` on the queue once there is room; False when the loop has gone (nobody reads any more)."""
        try:
            put = asyncio.run_coroutine_threadsafe(lines.put(line), loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                put.result(timeout=1.0)
                return True
            except concurrent.futures.TimeoutError:
                if loop.is_closed():
                    return False
            except (concurrent.futures.CancelledError, RuntimeError):
                return False


def configure_logging(level: int = logging.INFO) -> None:
    """Plain logging to stderr for a server process: phi3v's loggers at ``level``, libraries at WARNING.

    Runs before the MCPServer is built, which makes the SDK's own set-up a no-op: that puts a rich handler
    on the root logger at INFO, which takes about 4 ms to format one record (measured: per HTTP request
    of an in-process client, 40 % of the HTTP surface's overhead). Does nothing to a root logger that the
    embedding application has already configured.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)  # stdout belongs to the stdio transport
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    for name in ("phi3v_mcp", "phi3v_tools"):
        logging.getLogger(name).setLevel(level)


def _run_http(server: MCPServer[AppContext], settings: Settings) -> None:
    if not _is_loopback(settings.mcp_host):
        logger.warning(
            "serving on %s, which is not a loopback address%s",
            settings.mcp_host,
            "" if settings.mcp_token else "; set PHI3V_MCP_TOKEN so that only clients with the token get in",
        )
    logger.info(
        "MCP endpoint: http://%s:%d%s%s",
        f"[{settings.mcp_host}]" if ":" in settings.mcp_host else settings.mcp_host,
        settings.mcp_port,
        MCP_PATH,
        " (bearer token required)" if settings.mcp_token else "",
    )
    config = uvicorn_config(http_app(server, settings), settings)
    sock = listening_socket(settings.mcp_host, settings.mcp_port)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def uvicorn_config(app: ASGIApp, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for ``app``: our h11 protocol with the connection limits of ``settings``.

    WebSocket upgrades are off: the app has no WebSocket route, and an upgraded connection would leave the
    protocol that enforces the limits.
    """
    # On SIGTERM: stop accepting, let calls in flight finish for the grace period, then cancel them (the runner
    # drops their requests) and exit. Without a bound, an open event stream would hold the process forever.
    return uvicorn.Config(
        app,
        http=limited_protocol(ConnectionLimits.from_settings(settings)),
        ws="none",
        lifespan="on",
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.mcp_shutdown_grace_s)),
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket whose connections send small writes at once (TCP_NODELAY).

    Without it, the response's separate header and body writes wait for the client's delayed ACK: about
    44 ms per request on loopback (measured: 44 ms -> 1.7 ms per POST; benchmarks/surfaces_cpu.py).
    Accepted connections inherit the option from the listening socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock
