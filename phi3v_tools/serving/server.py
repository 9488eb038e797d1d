"""``phi3v-tools serve``: one HTTP server over the shared engine, for OpenAI clients and MCP clients alike.

- ``/v1/chat/completions``, ``/v1/models``, ``/health``: the OpenAI-compatible app
  (:mod:`phi3v_tools.serving.app`), over this process's engine;
- ``/mcp``: the MCP server's streamable HTTP app (:func:`phi3v_mcp.server.http_app`), over the same engine.

Both sit behind the MCP HTTP server's guards, which are reused, not copied: one bearer token for every path
(``PHI3V_API_KEY``, the variable the remote backend sends, or ``PHI3V_MCP_TOKEN``), the body limit
(``PHI3V_MCP_MAX_BODY_MB``), the connection limits and timeouts (``PHI3V_MCP_MAX_CONNECTIONS`` ...), and the
graceful drain on SIGTERM (``PHI3V_MCP_SHUTDOWN_GRACE_S``). ``/mcp`` keeps the SDK's DNS-rebinding protection,
and the other paths (``/v1``, ``/health``, ``/metrics``) get the same Host and Origin check over the same names
(:func:`phi3v_mcp.server.allowed_hosts`: loopback, the bound address or on a wildcard bind this machine's
names, and ``PHI3V_MCP_ALLOWED_HOSTS``; ``*`` turns it off behind a proxy). Off loopback the token is what keeps
strangers out (a warning says so when it is unset). Every response is counted for ``/metrics``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from phi3v_tools.engine.types import Backend
from phi3v_tools.settings import Settings

__all__ = ["serve", "serving_app"]

logger = logging.getLogger("phi3v_tools.serving")


def http_settings(settings: Settings) -> Settings:
    """``settings`` with the serve address where the shared HTTP helpers read the MCP one."""
    return replace(settings, mcp_host=settings.serve_host, mcp_port=settings.serve_port)


def server_token(settings: Settings) -> str | None:
    if settings.api_key and settings.mcp_token and settings.api_key != settings.mcp_token:
        raise ValueError("PHI3V_API_KEY and PHI3V_MCP_TOKEN differ; phi3v-tools serve takes one token: set one of them")
    return settings.api_key or settings.mcp_token


class _Paths:
    """``/mcp`` (and its lifespan: the MCP session manager) to the MCP app, everything else to the OpenAI app."""

    def __init__(self, mcp: ASGIApp, openai: ASGIApp, allowed_hosts: list[str] | None) -> None:
        self.mcp, self.openai, self.allowed_hosts = mcp, openai, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "lifespan" or path == "/mcp" or path.startswith("/mcp/"):
            await self.mcp(scope, receive, send)
            return
        if scope["type"] == "http" and self.allowed_hosts is not None:
            headers = Headers(scope=scope)
            host = _hostname(headers.get("host", ""))
            origin = headers.get("origin")
            if host not in self.allowed_hosts:
                message = f"Host {host!r} is not this server's (DNS rebinding protection)"
                await _refuse(scope, receive, send, 421, message)
                return
            if origin is not None and _hostname(urlsplit(origin).netloc) not in self.allowed_hosts:
                await _refuse(scope, receive, send, 403, f"requests from web pages at {origin!r} are not accepted")
                return
        await self.openai(scope, receive, send)


def _hostname(netloc: str) -> str:
    """The host of a Host header or an origin's netloc, without port or IPv6 brackets, lower-cased."""
    netloc = netloc.rsplit("@", 1)[-1].strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    await JSONResponse(body, status_code=status)(scope, receive, send)


def serving_app(settings: Settings, backend: Backend | None = None) -> ASGIApp:
    """The whole app: OpenAI paths and ``/mcp``, over ``backend`` (default: this process's engine for
    ``settings``), behind the shared guards."""
    from phi3v_mcp.server import BearerTokenMiddleware, BodyLimitMiddleware, allowed_hosts, create_server, http_app

    from phi3v_tools.api import toolbox_from_settings
    from phi3v_tools.serving.app import OpenAIServer
    from phi3v_tools.serving.metrics import CountResponses

    served = http_settings(replace(settings, mcp_token=None))  # the token goes outermost, once, below
    toolbox = toolbox_from_settings(settings, backend)
    mcp = http_app(create_server(served, toolbox), served)
    server = OpenAIServer(
        backend if backend is not None else (lambda: toolbox.backend),
        settings.image_policy(),
        settings.served_model_name or (backend.model_name if backend is not None else settings.model),
        default_max_tokens=min(512, settings.max_new_tokens),
        max_context=settings.max_context,
        max_images=settings.max_images,
    )
    openai: ASGIApp = BodyLimitMiddleware(server.app(), int(settings.mcp_max_body_mb * 2**20))
    app: ASGIApp = _Paths(mcp, openai, allowed_hosts(served))
    token = server_token(settings)
    if token:
        app = BearerTokenMiddleware(app, token)
    if server.metrics is not None:
        app = CountResponses(app, server.metrics)
    return app


def serve(settings: Settings) -> None:
    """Load the model, then serve the whole app on ``serve_host:serve_port`` until SIGTERM or Ctrl-C."""
    import uvicorn
    from phi3v_mcp.server import _is_loopback, configure_logging, listening_socket, uvicorn_config

    from phi3v_tools.runner import close_runners, get_runner

    configure_logging()
    token = server_token(settings)
    runner = get_runner(settings)  # before serving: a start-up failure is one clear error
    app = serving_app(settings, runner)
    if not _is_loopback(settings.serve_host) and not token:
        logger.warning(
            "serving on %s, which is not a loopback address, without a token; set PHI3V_API_KEY so that only "
            "clients with the key get in",
            settings.serve_host,
        )
    host = f"[{settings.serve_host}]" if ":" in settings.serve_host else settings.serve_host
    logger.info(
        "serving %s at http://%s:%d/v1 (OpenAI) and /mcp (MCP)%s",
        runner.model_name,
        host,
        settings.serve_port,
        ", bearer token required" if token else "",
    )
    sock = listening_socket(settings.serve_host, settings.serve_port)
    try:
        uvicorn.Server(uvicorn_config(app, http_settings(settings))).run(sockets=[sock])
    finally:
        sock.close()
        close_runners()
