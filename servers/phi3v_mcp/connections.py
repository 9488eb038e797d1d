"""HTTP connection limits for the MCP server under uvicorn: header, body and keep-alive timeouts, a connection cap.

uvicorn (0.54) bounds none of what a client does *before* its request is complete: it has no header-read
timeout and no body-read timeout, and ``timeout_keep_alive`` runs only after a response and stops at the
first byte received. A client that sends one header byte a second, or connects and sends nothing, holds
its connection (and its memory) for as long as it likes. ``limit_concurrency`` does not help: it counts
connections and running tasks together (so long tool calls and event streams use it up) and only answers
503 once a request's headers have arrived, which a slow client never lets happen.

So this is a small, hand-written subclass of uvicorn's h11 protocol (``uvicorn.Config(http=...)``):

- **header timeout**: a request's headers must be complete within ``header_timeout_s`` of the connection
  opening or of the end of the previous response. Otherwise the connection is closed: with a 408 if some of
  a request had arrived, silently if nothing had.
- **body timeout**: once its headers are in, the request's body must be complete within ``body_timeout_s``.
  Otherwise the request is answered 408 (if the app has not started its answer; the app sees the client
  disconnect) and the connection is closed.
- **keep-alive**: an idle connection between requests is closed after ``keep_alive_s`` (uvicorn's own
  keep-alive timer, with a float).
- **connection cap**: a connection beyond ``max_connections`` open ones is refused at once: it gets a 503
  with ``Retry-After`` and is closed, and it never counts as open. Counted here, at accept, from uvicorn's
  own set of open HTTP connections, so the cap covers idle, slow and streaming connections alike.

The timers run only while a request is being *received*. A response, however long it streams (a tool call
sending progress for minutes, the GET event stream), runs with no timer at all: the header timer starts
again only when the response is complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from phi3v_tools.settings import Settings

__all__ = ["ConnectionLimits", "LimitedH11Protocol", "limited_protocol", "log_sparsely"]

logger = logging.getLogger("phi3v_mcp")

RETRY_AFTER_S = 1  # what a refused connection is told to wait
REFUSED_LINGER_S = 1.0  # a refused connection is closed when its client is done sending, or after this


@dataclass(frozen=True)
class ConnectionLimits:
    """What one HTTP connection may do before its request is complete, and how many may be open."""

    max_connections: int = 200
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_connections <= 0:
            raise ValueError("max_connections must be positive")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.mcp_max_connections,
            header_timeout_s=settings.mcp_header_timeout_s,
            body_timeout_s=settings.mcp_body_timeout_s,
            keep_alive_s=settings.mcp_keep_alive_s,
        )


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that enforces ``limits`` (and counts what it cut)."""

    class Limited(LimitedH11Protocol):
        pass

    Limited.limits = limits
    Limited.counts = Counter()
    return Limited


def log_sparsely(log: logging.Logger, level: int, count: int, message: str, *args: object) -> None:
    """Logs the 1st, 10th and 100th event of a kind, then every 1000th (``count`` is the event's number), so
    that a flood of hostile connections is not also a flood of log lines."""
    if count in (1, 10, 100) or count % 1000 == 0:
        log.log(level, f"{message} (%d so far)", *args, count)


def _raw_response(status: int, reason: str, message: str, *extra: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (written before h11 has seen a request)."""
    body = message.encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: text/plain; charset=utf-8", "connection: close", *extra]
    return ("\r\n".join([*head, f"content-length: {len(body)}", "", ""])).encode("latin-1") + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a body timeout, a float keep-alive and a connection cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    # Connections refused (and refused ones still lingering), closed for slow headers, closed for slow bodies.
    counts: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_s  # type: ignore[assignment]  # uvicorn types it int
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._lingering = False

    # -- the connection cap --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """503 and close. The client's request, if it sends one, is read and dropped (and the connection closed
        when the client closes its side): closing with unread data would reset the connection, which can destroy
        the 503 before the client reads it."""
        self._refused = True
        self.transport = transport
        self.counts["refused"] += 1
        log_sparsely(
            logger, logging.WARNING, self.counts["refused"], "refused a connection: %d are open", len(self.connections)
        )
        transport.write(
            _raw_response(
                503,
                "Service Unavailable",
                f"Too many open connections (PHI3V_MCP_MAX_CONNECTIONS={self.limits.max_connections}): retry shortly",
                f"retry-after: {RETRY_AFTER_S}",
            )
        )
        # Lingering is bounded too: past max_connections refused ones waiting for their clients, close at once.
        if transport.can_write_eof() and self.counts["lingering"] < self.limits.max_connections:
            self.counts["lingering"] += 1
            self._lingering = True
            transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, transport.close)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._refused:
            if self._lingering:
                self.counts["lingering"] -= 1
            return
        super().connection_lost(exc)

    # -- the timeouts --------------------------------------------------------------------------------------------------

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_request()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_header_timer()  # before the base class parses a pipelined request, which cancels it again
        super().on_response_complete()

    def _follow_request(self) -> None:
        """Moves the timers along with h11's view of the request being received."""
        if self._refused or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # waiting for headers: the header timer runs
            return
        self._cancel(self._header_timer)
        self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        else:  # the request is complete (or the connection is failing): nothing more to wait for
            self._cancel(self._body_timer)
            self._body_timer = None

    def _arm_header_timer(self) -> None:
        self._cancel(self._header_timer)
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started = bool(self.conn.trailing_data[0])  # bytes of a request that h11 is still waiting to complete
        self.counts["header_timeout"] += 1
        what = "request headers not complete" if started else "no request"
        log_sparsely(
            logger,
            logging.INFO,
            self.counts["header_timeout"],
            "closed a connection from %s: %s within %g s",
            self._peer(),
            what,
            self.limits.header_timeout_s,
        )
        if started:
            self.transport.write(
                _raw_response(
                    408, "Request Timeout", f"Request headers not complete within {self.limits.header_timeout_s:g} s"
                )
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        self.counts["body_timeout"] += 1
        log_sparsely(
            logger,
            logging.INFO,
            self.counts["body_timeout"],
            "closed a connection from %s: request body not complete within %g s",
            self._peer(),
            self.limits.body_timeout_s,
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
            message = f"Request body not complete within {self.limits.body_timeout_s:g} s".encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(message)).encode()),
                (b"connection", b"close"),
            ]
            for event in (
                h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                h11.Data(data=message),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        if cycle is not None:  # the app's receive() now returns http.disconnect, and what it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"
