"""The MCP server's streamable HTTP app on a loopback port in this process, and a client for it (tests only)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx2
from mcp import Client
from mcp.server import MCPServer
from phi3v_mcp.server import AppContext, create_server, http_app, listening_socket, uvicorn_config

from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox


@contextmanager
def http_server(settings: Settings, toolbox: Toolbox, server: MCPServer[AppContext] | None = None) -> Iterator[str]:
    """The server's HTTP app under uvicorn in a thread, on a free loopback port; yields the /mcp URL.

    Configured as ``phi3v-tools mcp --transport http`` configures it (the connection and session limits of
    ``settings`` included). Pass ``server`` (from :func:`create_server`) to look at its session manager.
    """
    import uvicorn

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    mcp = server if server is not None else create_server(settings, toolbox)
    config = uvicorn_config(http_app(mcp, settings), settings, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="mcp-http-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        uv.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive(), "the HTTP server did not stop"


@asynccontextmanager
async def http_client(url: str, token: str | None) -> AsyncIterator[Client]:
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=120) as client,
    ):
        yield client
