"""The MCP server's streamable HTTP app on a loopback port in this process, and a client for it (tests only)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx2
from mcp import Client
from phi3v_mcp.server import create_server, http_app, listening_socket

from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox


@contextmanager
def http_server(settings: Settings, toolbox: Toolbox) -> Iterator[str]:
    """The server's HTTP app under uvicorn in a thread, on a free loopback port; yields the /mcp URL."""
    import uvicorn

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        http_app(create_server(settings, toolbox), settings), lifespan="on", log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mcp-http-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
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
