"""Sessions and connections of the MCP streamable-HTTP server are bounded (phi3v_mcp.sessions, .connections).

The real server (``http_app`` under uvicorn with ``uvicorn_config``, as ``phi3v-tools mcp --transport http``
runs it) on a loopback port in this process, over a fake backend, with the limits set small. Hostile clients
are raw sockets: a client that dribbles its headers, one that connects and says nothing, a slow body, more
connections than the cap, thousands of abandoned ``initialize`` handshakes. Each test also makes an innocent
tool call beside them and checks that it is answered (and, next to slow clients, answered without delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
from anyio.abc import SocketStream
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import MCPServer
from mcp.server.streamable_http import StreamableHTTPServerTransport
from phi3v_mcp.server import AppContext, create_server
from phi3v_mcp.sessions import SessionEvictor

from phi3v_tools.images import ImagePolicy
from phi3v_tools.runner import GenerationRequest, GenerationResult
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox
from tests.fakes import FakeBackend
from tests.mcp_http import http_client, http_server

POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
HELLO = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
HELLO_BYTES = json.dumps(HELLO).encode()
T = TypeVar("T")
SLACK_S = 1.0  # how late a timeout may fire on a shared, loaded test machine
# The defaults; each test sets small values for the limits it tests (and only those: a 0.5 s keep-alive
# under load makes ordinary clients race the server's close of a connection they are about to reuse).
LIMITS = Settings(allow_urls=False)


class StreamingBackend(FakeBackend):
    """The first call generates for ``seconds``, one text piece every 0.1 s (progress notifications); later
    calls answer at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        for _ in range(round(self.seconds / 0.1) if not self.requests else 0):
            if request.on_text is not None:
                request.on_text("word ")
            await asyncio.sleep(0.1)
        return self._answer(request)


@pytest.fixture(scope="module")
def image(sample_images: dict[str, Path]) -> str:
    return str(sample_images["chart"])


def _toolbox(image: str, backend: FakeBackend | None = None) -> Toolbox:
    return Toolbox(backend or FakeBackend(), ImagePolicy(allowed_dirs=(Path(image).parent,)))


@contextlib.contextmanager
def _served(image: str, **limits: Any) -> Iterator[tuple[str, MCPServer[AppContext]]]:
    """The server with LIMITS changed by ``limits``; yields (URL, the MCP server, for its session manager)."""
    settings = replace(LIMITS, **limits)
    toolbox = _toolbox(image)
    server = create_server(settings, toolbox)
    with http_server(settings, toolbox, server=server) as url:
        yield url, server


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


# ---------------------------------------------------------------------------------------------------------------------
# Raw clients


@dataclass
class Closed:
    """What a raw client saw: seconds from connecting until the server closed, and what the server sent."""

    after_s: float
    received: bytes

    @property
    def status(self) -> int | None:
        head = self.received.split(b"\r\n", 1)[0].split()
        return int(head[1]) if len(head) > 1 and head[1].isdigit() else None


async def _read_until_closed(stream: SocketStream, received: bytearray) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        while True:
            received += await stream.receive()


async def raw_client(port: int, parts: list[bytes], interval: float, limit_s: float = 30.0) -> Closed:
    """Connects, sends ``parts`` one every ``interval`` seconds (first at once), reads until the server closes."""
    started = time.monotonic()
    received = bytearray()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:

        async def send() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                for i, part in enumerate(parts):
                    if i:
                        await anyio.sleep(interval)
                    await stream.send(part)
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            with anyio.fail_after(limit_s):
                await _read_until_closed(stream, received)
            tg.cancel_scope.cancel()
    return Closed(time.monotonic() - started, bytes(received))


def _head(port: int, length: int | None = None) -> bytes:
    """A POST to /mcp: the request line and headers."""
    lines = ["POST /mcp HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Accept: {POST_HEADERS['accept']}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join([*lines, "", ""])).encode()


def _bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# ---------------------------------------------------------------------------------------------------------------------
# Innocent clients


async def _timed_calls(client: Client, image: str, n: int) -> list[float]:
    """Seconds for each of ``n`` describe_image calls, one after another; every one must succeed."""
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        result = await client.call_tool("describe_image", {"image": image})
        latencies.append(time.perf_counter() - started)
        assert not result.is_error, result.content
    return latencies


async def innocent_call(url: str, image: str) -> None:
    async with http_client(url, None) as client:
        await _timed_calls(client, image, 1)


async def beside_an_innocent_call(url: str, image: str, hostile: Awaitable[T]) -> T:
    """Awaits ``hostile``; 0.3 s in (the hostile client connected and at work), an innocent client makes a tool
    call, which must succeed. Returns what ``hostile`` returned."""

    async def innocent() -> None:
        await anyio.sleep(0.3)
        await innocent_call(url, image)

    async with anyio.create_task_group() as tg:
        tg.start_soon(innocent)
        result = await hostile
    return result


@contextlib.asynccontextmanager
async def legacy_client(url: str) -> AsyncIterator[Client]:
    """A client of the pre-2026 handshake (initialize, a session, its GET event stream)."""
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", read_timeout_seconds=120) as client,
    ):
        yield client


# ---------------------------------------------------------------------------------------------------------------------
# Header, body and keep-alive timeouts


def test_clients_dribbling_their_headers_are_cut_off_at_the_header_timeout_and_others_are_answered_meanwhile(
    image: str,
) -> None:
    header_timeout = 2.0
    slow_clients = 8
    with _served(image, mcp_header_timeout_s=header_timeout) as (url, _server):
        port = _port(url)

        async def scenario() -> tuple[list[Closed], list[float], list[float]]:
            async with http_client(url, None) as client:
                await _timed_calls(client, image, 3)  # warm up
                alone = await _timed_calls(client, image, 15)
                closed: list[Closed] = []

                async def slow() -> None:  # one header byte every 0.25 s: the headers would take 25 s
                    closed.append(await raw_client(port, _bytes(_head(port, length=len(HELLO_BYTES))), interval=0.25))

                async with anyio.create_task_group() as tg:
                    for _ in range(slow_clients):
                        tg.start_soon(slow)
                    await anyio.sleep(0.3)  # all of them dribbling
                    beside = await _timed_calls(client, image, 15)
                return closed, alone, beside

        closed, alone, beside = anyio.run(scenario)
    assert len(closed) == slow_clients
    for c in closed:
        assert header_timeout - 0.1 <= c.after_s <= header_timeout + SLACK_S, c
        assert c.status == 408, c.received
    median_alone, median_beside = statistics.median(alone), statistics.median(beside)
    print(f"innocent calls: {median_alone * 1e3:.1f} ms alone, {median_beside * 1e3:.1f} ms beside {slow_clients} slow")
    assert max(beside) < header_timeout, "an innocent call waited for the slow clients"
    assert median_beside <= max(3 * median_alone, median_alone + 0.1), (alone, beside)


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(image: str) -> None:
    with _served(image, mcp_header_timeout_s=1.0) as (url, _server):
        closed = anyio.run(beside_an_innocent_call, url, image, raw_client(_port(url), [], interval=0))
    assert 0.9 <= closed.after_s <= 1.0 + SLACK_S, closed
    assert closed.received == b"", "a connection that sent nothing got an answer"


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_time(image: str) -> None:
    # The header timeout (3 s) is longer: what closes the connection here is the keep-alive time (0.5 s).
    with _served(image, mcp_header_timeout_s=3.0, mcp_keep_alive_s=0.5) as (url, _server):

        async def keep_alive() -> tuple[float, Closed]:
            request = b"GET /elsewhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            received = bytearray()
            started = time.monotonic()
            async with await anyio.connect_tcp("127.0.0.1", _port(url)) as stream:
                await stream.send(request)
                received += await stream.receive()  # the 404 (one small write)
                answered = time.monotonic() - started
                with anyio.fail_after(10):
                    await _read_until_closed(stream, received)
            return answered, Closed(time.monotonic() - started, bytes(received))

        answered, closed = anyio.run(beside_an_innocent_call, url, image, keep_alive())
    assert closed.status == 404, closed.received
    idle = closed.after_s - answered
    assert 0.4 <= idle <= 0.5 + SLACK_S, f"closed {idle:.2f} s after the answer"


def test_a_body_that_does_not_arrive_within_the_body_timeout_gets_408_and_the_connection_is_closed(
    image: str,
) -> None:
    with _served(image, mcp_header_timeout_s=5.0, mcp_body_timeout_s=1.0) as (url, _server):
        port = _port(url)
        # The headers at once, then the body a byte every 0.2 s (it would take 20 s).
        parts = [_head(port, length=len(HELLO_BYTES)), *_bytes(HELLO_BYTES)]
        closed = anyio.run(beside_an_innocent_call, url, image, raw_client(port, parts, interval=0.2))
    assert closed.status == 408, closed.received
    assert b"Request body not complete within 1 s" in closed.received
    assert 0.9 <= closed.after_s <= 1.0 + SLACK_S, closed


def test_a_body_slower_than_the_header_timeout_but_within_the_body_timeout_is_served(image: str) -> None:
    # The header timer stops once the headers are in: a 1.6 s body against a 1 s header timeout is fine.
    with _served(image, mcp_header_timeout_s=1.0, mcp_body_timeout_s=4.0) as (url, _server):

        async def slow_body() -> bytes:
            port = _port(url)
            step = len(HELLO_BYTES) // 8 + 1  # the body in 8 pieces, 0.2 s apart
            parts = [_head(port, length=len(HELLO_BYTES))]
            parts += [HELLO_BYTES[i : i + step] for i in range(0, len(HELLO_BYTES), step)]
            received = bytearray()
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                for i, part in enumerate(parts):
                    if i:
                        await anyio.sleep(0.2)
                    await stream.send(part)
                with anyio.fail_after(10):
                    while b"protocolVersion" not in received:
                        received += await stream.receive()
            return bytes(received)

        received = anyio.run(beside_an_innocent_call, url, image, slow_body())
    assert received.startswith(b"HTTP/1.1 200"), received


# ---------------------------------------------------------------------------------------------------------------------
# Long answers are not cut


@pytest.mark.parametrize("mode", ["2026", "legacy"])
def test_a_streaming_tool_call_longer_than_every_timeout_is_not_cut(image: str, mode: str) -> None:
    settings = replace(LIMITS, mcp_header_timeout_s=1.0, mcp_body_timeout_s=1.0, mcp_keep_alive_s=0.5)
    toolbox = _toolbox(image, StreamingBackend(seconds=3.0))
    with http_server(settings, toolbox) as url:

        async def scenario() -> tuple[Any, list[float], float]:
            seen: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen.append(progress)

            client_cm = http_client(url, None) if mode == "2026" else legacy_client(url)
            async with client_cm as client:
                started = time.monotonic()
                result = await client.call_tool("describe_image", {"image": image}, progress_callback=on_progress)
                took = time.monotonic() - started
                # The session's GET stream (legacy) and the client's connections outlived every timeout: the
                # next call on the same client still works.
                await anyio.sleep(1.2)
                second = await client.call_tool("read_text", {"image": image})
                assert not second.is_error, second.content
            return result, seen, took

        result, progress, took = anyio.run(scenario)
    assert not result.is_error, result.content
    assert took >= 3.0
    assert len(progress) >= 5, progress


# ---------------------------------------------------------------------------------------------------------------------
# The connection cap


def test_connections_beyond_the_cap_are_refused_at_once_and_new_ones_are_served_once_others_close(image: str) -> None:
    cap = 6
    with _served(image, mcp_max_connections=cap, mcp_header_timeout_s=20.0, mcp_keep_alive_s=20.0) as (url, _):
        port = _port(url)

        async def scenario() -> tuple[int, int, float]:
            async with http_client(url, None) as client:
                await _timed_calls(client, image, 1)  # its connection is open (kept alive) from here on
                held: list[SocketStream] = []
                refused = 0
                slowest_refusal = 0.0
                try:
                    for _ in range(cap + 4):
                        started = time.monotonic()
                        stream = await anyio.connect_tcp("127.0.0.1", port)
                        received = bytearray()
                        with anyio.move_on_after(0.5):
                            await _read_until_closed(stream, received)
                        if received:
                            assert Closed(0, bytes(received)).status == 503, received
                            assert b"retry-after: 1" in received.lower()
                            refused += 1
                            slowest_refusal = max(slowest_refusal, time.monotonic() - started)
                            await stream.aclose()
                        else:
                            held.append(stream)
                    # The cap is full, and the client already connected is still served.
                    await _timed_calls(client, image, 3)
                finally:
                    for stream in held:
                        await stream.aclose()
                opened = len(held)
            await anyio.sleep(0.2)  # the server sees the closes
            await innocent_call(url, image)  # a new client, on new connections
            return opened, refused, slowest_refusal

        opened, refused, slowest_refusal = anyio.run(scenario)
    assert opened + refused == cap + 4
    assert cap - 2 <= opened <= cap - 1, f"{opened} raw connections held beside the client's own"
    assert slowest_refusal < 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Sessions


def _sessions(server: MCPServer[AppContext]) -> dict[str, StreamableHTTPServerTransport]:
    return server.session_manager._server_instances


@contextlib.contextmanager
def traced_growth() -> Iterator[list[float]]:
    """MiB of Python memory allocated during the block and still held at its end (all threads; tracemalloc)."""
    grown: list[float] = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        yield grown
        gc.collect()
        grown.append((tracemalloc.get_traced_memory()[0] - before) / 2**20)
    finally:
        tracemalloc.stop()


async def abandon_sessions(url: str, n: int, concurrency: int = 8) -> list[int]:
    """``n`` initialize requests that are never followed up (as a careless or hostile client sends them)."""
    statuses: list[int] = []
    limiter = anyio.CapacityLimiter(concurrency)
    async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=concurrency)) as http:

        async def one() -> None:
            async with limiter:
                statuses.append((await http.post(url, json=HELLO, headers=POST_HEADERS)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return statuses


def _abandoned_sessions_leave_room(image: str, n: int, cap: int) -> float:
    """Abandons ``n`` sessions against a cap of ``cap``; checks new clients get in; returns the MiB still held."""
    with _served(image, mcp_max_sessions=cap) as (url, server):

        async def scenario() -> float:
            await abandon_sessions(url, 2 * cap)  # warm up: the cap reached once, the allocator's pools filled
            with traced_growth() as grown:
                statuses = await abandon_sessions(url, n)
                await anyio.sleep(0.5)  # the evicted sessions' tasks wind down
            assert statuses == [200] * n, {s: statuses.count(s) for s in set(statuses)}
            assert len(_sessions(server)) <= cap
            async with legacy_client(url) as client:  # a new session client is let in and served
                await _timed_calls(client, image, 2)
            await innocent_call(url, image)
            return grown[0]

        held = anyio.run(scenario)
    print(f"{n} abandoned initializes against a cap of {cap}: {held * 1024 / n:.2f} KiB each still held")
    return held


def test_abandoned_sessions_beyond_the_cap_do_not_lock_new_clients_out_and_memory_stays_bounded(image: str) -> None:
    # Unbounded, each abandoned session keeps about 40 KiB (20 MiB for these 500); at the cap they are evicted.
    assert _abandoned_sessions_leave_room(image, n=500, cap=20) < 3


@pytest.mark.heavy
def test_heavy_10000_abandoned_initializes_at_the_default_cap_leave_memory_bounded(image: str) -> None:
    # Before the cap (SDK defaults, 10 000 sessions) this cost about 390 MiB and then locked new clients out.
    assert _abandoned_sessions_leave_room(image, n=10_000, cap=Settings().mcp_max_sessions) < 20


def test_a_session_with_a_request_in_flight_is_never_evicted_and_when_all_are_busy_a_new_one_gets_503(
    image: str,
) -> None:
    with _served(image, mcp_max_sessions=2) as (url, server):

        async def scenario() -> None:
            async with httpx2.AsyncClient(timeout=30) as http:
                ids = []
                for _ in range(2):
                    opened = await http.post(url, json=HELLO, headers=POST_HEADERS)
                    ids.append(opened.headers["mcp-session-id"])
                    headers = {**POST_HEADERS, "mcp-session-id": ids[-1]}
                    await http.post(
                        url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
                    )
                ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
                get = [{"accept": "text/event-stream", "mcp-session-id": session_id} for session_id in ids]
                # Each session's GET event stream is open: a request in flight in each.
                async with http.stream("GET", url, headers=get[1]) as second_stream:
                    assert second_stream.status_code == 200
                    async with http.stream("GET", url, headers=get[0]) as first_stream:
                        assert first_stream.status_code == 200
                        await anyio.sleep(0.1)
                        refused = await http.post(url, json=HELLO, headers=POST_HEADERS)
                        assert refused.status_code == 503
                        assert refused.headers["retry-after"] == "5"
                        assert "Too many open sessions, all of them busy" in refused.json()["error"]["message"]
                        assert set(_sessions(server)) == set(ids)
                        for session_id in ids:  # the busy sessions still work
                            answer = await http.post(
                                url, json=ping, headers={**POST_HEADERS, "mcp-session-id": session_id}
                            )
                            assert answer.status_code == 200, answer.text
                        await innocent_call(url, image)  # 2026 clients need no session
                    await anyio.sleep(0.2)  # the first session is idle now, the second still busy
                    admitted = await http.post(url, json=HELLO, headers=POST_HEADERS)
                    assert admitted.status_code == 200
                    gone = await http.post(url, json=ping, headers={**POST_HEADERS, "mcp-session-id": ids[0]})
                    assert gone.status_code == 404, "the idle session was not the one evicted"
                    kept = await http.post(url, json=ping, headers={**POST_HEADERS, "mcp-session-id": ids[1]})
                    assert kept.status_code == 200

        anyio.run(scenario)


def test_an_idle_session_is_closed_after_the_idle_limit_and_a_used_one_is_kept(image: str) -> None:
    with _served(image, mcp_session_idle_s=1.0) as (url, server):

        async def scenario() -> None:
            async with httpx2.AsyncClient(timeout=30) as http:
                idle, used = [
                    (await http.post(url, json=HELLO, headers=POST_HEADERS)).headers["mcp-session-id"] for _ in range(2)
                ]
                ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
                for _ in range(5):  # 2 s in all; never more than 0.4 s between requests
                    await anyio.sleep(0.4)
                    answer = await http.post(url, json=ping, headers={**POST_HEADERS, "mcp-session-id": used})
                    assert answer.status_code == 200, answer.text
                await innocent_call(url, image)
                assert set(_sessions(server)) == {used}
                expired = await http.post(url, json=ping, headers={**POST_HEADERS, "mcp-session-id": idle})
                assert expired.status_code == 404

        anyio.run(scenario)


def test_the_session_adapter_refuses_an_sdk_without_the_internals_it_relies_on() -> None:
    class NotTheSdk:
        asgi_app = None

    with pytest.raises(RuntimeError, match=r"mcp>=2.3,<3"):
        SessionEvictor(NotTheSdk(), 10)  # type: ignore[arg-type]
