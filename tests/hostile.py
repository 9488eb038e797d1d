"""Hostile inputs made on the fly, shared by the image tests and the reliability suite.

Image bytes (noise pictures in any format, PNG headers that lie about their size) and loopback web servers that
record every request they get (so a test can assert that a refused address was never contacted).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import socket
import socketserver
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image


def noise(width: int = 16, height: int = 12, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PNG = encode(noise())
HTML = b"<!doctype html><html><head><title>x</title></head><body>not an image</body></html>"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression-bomb shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.requests: list[tuple[str, str | None]] = []  # (path, Host header) of every request received
        self.routes: dict[str, Route] = {}
        super().__init__((host, 0), RecordingHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn (a reverse DNS lookup); these servers need no name
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "test", self.port

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.server.requests.append((self.path, self.headers.get("Host")))
        route = self.server.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404, "no such test route")
            else:
                route(self)
        except OSError:
            self.close_connection = True  # the client hung up (it stopped reading on purpose)


def body_route(data: bytes, content_type: str = "image/png", length: int | None = -1) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if length is not None:
            h.send_header("Content-Length", str(len(data) if length == -1 else length))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect_route(location: str, status: int = 302) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def chunked_route(pieces: Iterator[bytes]) -> Route:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.protocol_version = "HTTP/1.1"
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for piece in pieces:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.flush()
        h.wfile.write(b"0\r\n\r\n")

    return route


def trickle(seconds: float, step: float = 0.2) -> Iterator[bytes]:
    """One byte every ``step`` seconds, for at most ``seconds`` (every server loop is bounded)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield b"x"
        time.sleep(step)


@contextlib.contextmanager
def serving(host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> Iterator[Recorder]:
    server = Recorder(host, family)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
