"""The MCP session cap with eviction: an adapter over the SDK's streamable-HTTP session manager.

Sessions exist only for clients of the pre-2026 handshake (``initialize``, then requests that carry an
``Mcp-Session-Id``); a 2026-07-28 client sends self-contained requests and opens none. The SDK (mcp 2.3)
caps sessions with ``max_sessions`` and closes one after ``session_idle_timeout`` seconds without a request
in flight, but at the cap it refuses every new session with 503. Abandoned sessions (an ``initialize`` that
is never followed up, about 40 KiB each) then lock every new client out until they expire.

:class:`SessionEvictor` changes what happens at the cap: the new session takes the place of the session that
has been idle longest, one with no request in flight (no POST being served, no open GET stream). Only when
every session is busy is the request refused: 503 with a message and ``Retry-After``. The evicted session
ends exactly as an idle one does (its idle scope is cancelled) and its ID answers 404 from then on, which
tells a client to start a new session (the spec's rule for an expired session).

The SDK has no public hook for this, so the adapter uses its private state, all checked when it is
installed (a clear error on an SDK that changed) and exercised by tests/reliability/test_http_limits.py:

- ``manager._admit_session(requestor)``: synchronous, called under ``manager._session_creation_lock`` for
  each request that would open a session; the eviction runs inside it, so choosing, evicting and admitting
  happen with no await in between (no two openers can take the same freed place);
- ``manager._server_instances`` and ``manager._session_owners``: the open sessions by ID;
- each transport's ``_requests_in_flight`` and ``idle_scope`` (whose deadline is the time the last request
  ended plus the idle timeout: the smallest deadline is the longest-idle session);
- ``manager.asgi_app``: wrapped, to answer the refusal.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from phi3v_mcp.connections import log_sparsely

__all__ = ["SessionEvictor", "SessionsBusy"]

logger = logging.getLogger("phi3v_mcp")

RETRY_AFTER_S = 5  # what a refused client is told to wait: sessions free up as their requests end
_PRIVATE_ATTRIBUTES = ("_admit_session", "_server_instances", "_session_owners", "asgi_app")


class SessionsBusy(Exception):
    """Raised inside the SDK's admission when every open session has a request in flight."""


class SessionEvictor:
    """Makes room at the session cap by closing the longest-idle session that has no request in flight."""

    def __init__(self, manager: StreamableHTTPSessionManager, max_sessions: int) -> None:
        missing = [name for name in _PRIVATE_ATTRIBUTES if not hasattr(manager, name)]
        if missing or not isinstance(getattr(manager, "_server_instances", None), dict):
            raise RuntimeError(
                f"this MCP SDK's session manager lacks {', '.join(missing) or '_server_instances as a dict'}: "
                "phi3v_mcp.sessions supports mcp>=2.3,<3 (see pyproject.toml)"
            )
        if max_sessions <= 0:
            raise ValueError("max_sessions must be positive")
        self.manager = manager
        self.max_sessions = max_sessions
        self.evicted = 0  # sessions closed to make room, since start
        self.refused = 0  # new sessions refused because every session was busy
        self._admit = manager._admit_session

    def install(self) -> SessionEvictor:
        """Hook into ``manager``: evict at admission, answer a refusal with 503 + Retry-After."""
        manager: Any = self.manager  # assigning to methods and private attributes: untyped on purpose
        manager._admit_session = self._admit_session
        manager.asgi_app = _RefuseWhenBusy(manager.asgi_app, self)
        return self

    @property
    def sessions(self) -> dict[str, StreamableHTTPServerTransport]:
        """The open sessions by ID (the SDK's own table)."""
        return self.manager._server_instances

    def _admit_session(self, requestor: Any) -> StreamableHTTPServerTransport | None:
        while len(self.sessions) >= self.max_sessions:
            if not self._evict_one():
                self.refused += 1
                raise SessionsBusy
        return self._admit(requestor)

    def _evict_one(self) -> bool:
        """Close the longest-idle session with no request in flight; False when there is none."""
        victim: tuple[float, str, StreamableHTTPServerTransport] | None = None
        for session_id, transport in self.sessions.items():
            deadline = _idle_deadline(transport)
            if deadline is not None and (victim is None or deadline < victim[0]):
                victim = (deadline, session_id, transport)
        if victim is None:
            return False
        _, session_id, transport = victim
        # Forgotten first (its ID answers 404 at once and its place is free now), then ended as an idle session
        # ends: its message loop is cancelled and the SDK's own clean-up terminates the transport.
        self.sessions.pop(session_id, None)
        self.manager._session_owners.pop(session_id, None)
        scope = transport.idle_scope
        assert scope is not None  # _idle_deadline returned a deadline
        scope.cancel()
        self.evicted += 1
        log_sparsely(logger, logging.INFO, self.evicted, "closed the longest-idle MCP session to make room")
        return True


def _idle_deadline(transport: StreamableHTTPServerTransport) -> float | None:
    """When the session's idle timeout would fire, if it is idle (nothing in flight); None if it is busy.

    A session whose opening request has not started has an idle scope with no deadline yet (infinity): it is
    busy, not idle. A session already expiring (its scope cancelled) has a deadline in the past, and one already
    terminated but not yet forgotten gets minus infinity: they go first.
    """
    scope = transport.idle_scope
    if scope is None:
        return None
    if transport.is_terminated:
        return -math.inf
    if getattr(transport, "_requests_in_flight", 1) != 0:
        return None
    return None if math.isinf(scope.deadline) else scope.deadline


class _RefuseWhenBusy:
    """Answers :class:`SessionsBusy` (raised before any response was started) with 503 and Retry-After."""

    def __init__(self, app: ASGIApp, evictor: SessionEvictor) -> None:
        self.app = app
        self.evictor = evictor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except SessionsBusy:
            log_sparsely(
                logger,
                logging.WARNING,
                self.evictor.refused,
                "refused a new MCP session: all %d open sessions have a request in flight",
                self.evictor.max_sessions,
            )
            response = JSONResponse(
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": -32603,
                        "message": "Too many open sessions, all of them busy (PHI3V_MCP_MAX_SESSIONS): retry in "
                        f"{RETRY_AFTER_S} s, or use protocol version 2026-07-28, which needs no session",
                    },
                },
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
