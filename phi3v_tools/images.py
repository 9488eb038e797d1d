"""Image references -> validated RGB images. The only code in phi3v-tools that reads files or URLs.

A reference is one of: a PIL image or raw bytes (Python callers), an ``image://sha256/<hex>`` handle
returned by an earlier call, a ``data:image/...;base64,`` URI, bare base64, an ``http(s)://`` URL, a
``file://`` URL or a local path. Every way in is bounded:

- paths (and ``file://``) only under the allowed directories, after resolving symlinks and ``..``;
- URLs (if enabled) only to hosts whose every address is public: loopback, private, link-local,
  carrier-grade NAT, metadata and other special addresses are refused, the connection is pinned to the
  checked address, every redirect is checked again, the body is streamed under a byte cap and a deadline,
  and proxies from the environment are ignored;
- bytes and pixels are capped before decoding (decompression bombs), only real raster formats are
  accepted, and truncated or corrupt data is an error.

Every error is an :class:`~phi3v_tools.errors.ImageError` that says what was wrong and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from phi3v_tools.errors import ImageError
from phi3v_tools.feature_cache import image_digest
from phi3v_tools.model.image_processing import to_rgb

HANDLE_PREFIX = "image://sha256/"
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})
_HANDLE = re.compile(r"^image://sha256/([0-9a-f]{64})$")
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[^,]*)?,(.*)$", re.IGNORECASE | re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\s-]+$")
# Addresses that are never fetched, beyond what `ipaddress` already calls non-global.
_DENIED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (also Alibaba's metadata address 100.100.100.200)
        "169.254.0.0/16",  # link-local, incl. the cloud metadata address 169.254.169.254
        "198.18.0.0/15",
        "240.0.0.0/4",
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "::ffff:0:0/96",  # IPv4-mapped IPv6: checked through the mapped address instead
        "64:ff9b::/96",  # NAT64
        "2002::/16",  # 6to4, which embeds an IPv4 address
        "2001::/32",  # Teredo, likewise
        "::/96",  # IPv4-compatible (deprecated)
    )
)

Resolver = Callable[[str, int], list[str]]


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class ImagePolicy:
    """What may be read. Built from Settings at the edges; the defaults are the safe ones."""

    allowed_dirs: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    allow_urls: bool = True
    max_bytes: int = 20 * 2**20  # compressed size of one image
    max_pixels: int = 40_000_000  # width x height before decoding
    url_timeout_s: float = 15.0  # whole fetch, connect to last byte
    max_redirects: int = 3
    trusted_hosts: frozenset[str] = frozenset()  # exempt from the address check (internal deployments, tests)
    resolver: Resolver = _system_resolver

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_dirs", tuple(Path(d).expanduser().resolve() for d in self.allowed_dirs))


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, checked RGB image and its content identity."""

    image: Image.Image
    digest: str  # sha256 of size + RGB pixels (the feature-cache key)
    source: str  # where it came from, for messages (never the bytes)

    @property
    def handle(self) -> str:
        return HANDLE_PREFIX + self.digest

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


class ImageStore:
    """Images by handle, so a chained call can say ``image://sha256/<hex>`` instead of sending it again."""

    def __init__(self, max_images: int = 64) -> None:
        self.max_images = max_images
        self._images: OrderedDict[str, LoadedImage] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, loaded: LoadedImage) -> None:
        with self._lock:
            self._images[loaded.digest] = loaded
            self._images.move_to_end(loaded.digest)
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)

    def get(self, digest: str) -> LoadedImage | None:
        with self._lock:
            loaded = self._images.get(digest)
            if loaded is not None:
                self._images.move_to_end(digest)
            return loaded


ImageRef = str | bytes | os.PathLike[str] | Image.Image


def load_image(ref: ImageRef, policy: ImagePolicy, store: ImageStore | None = None) -> LoadedImage:
    """Resolve one reference to a checked RGB image (and remember it in ``store`` for its handle)."""
    if isinstance(ref, Image.Image):
        loaded = _finish(ref, "a PIL image", policy)
    elif isinstance(ref, bytes | bytearray):
        loaded = decode_bytes(bytes(ref), "the given bytes", policy)
    elif isinstance(ref, os.PathLike):
        loaded = _from_path(os.fspath(ref), policy)
    elif isinstance(ref, str):
        loaded = _from_string(ref.strip(), policy, store)
    else:
        raise ImageError(
            f"an image must be a path, URL, data: URI, base64 string or image handle, not {type(ref).__name__}"
        )
    if store is not None:
        store.add(loaded)
    return loaded


def load_images(refs: Iterable[ImageRef], policy: ImagePolicy, store: ImageStore | None = None) -> list[LoadedImage]:
    return [load_image(ref, policy, store) for ref in refs]


def _from_string(ref: str, policy: ImagePolicy, store: ImageStore | None) -> LoadedImage:
    if not ref:
        raise ImageError("the image reference is empty; give a path, URL, data: URI, base64 or image handle")
    if ref.startswith("image://"):
        match = _HANDLE.match(ref)
        if match is None:
            raise ImageError(f"{ref[:80]!r} is not an image handle; handles look like {HANDLE_PREFIX}<64 hex digits>")
        loaded = store.get(match.group(1)) if store is not None else None
        if loaded is None:
            raise ImageError(
                f"unknown image handle {ref}: it was not seen by this server recently; send the image itself again"
            )
        return loaded
    if ref[:5].lower() == "data:":
        return _from_data_uri(ref, policy)
    scheme = urlsplit(ref).scheme.lower() if "://" in ref[:12] else ""
    if scheme in ("http", "https"):
        return fetch_url(ref, policy)
    if scheme == "file":
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file:// URLs must name a local file (file:///path), not host {parts.netloc!r}")
        return _from_path(unquote(parts.path), policy)
    if scheme:
        raise ImageError(f"URL scheme {scheme!r} is not supported; use http(s)://, file://, data: or a path")
    # Long strings of base64 characters are data, unless they name an existing file ('.' is never base64).
    if len(ref) > 256 and "." not in ref and _BASE64.match(ref[:1024]) and not _exists(ref):
        return _from_base64(ref, "base64 data", policy)
    return _from_path(ref, policy)


def _exists(path: str) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _from_data_uri(ref: str, policy: ImagePolicy) -> LoadedImage:
    match = _DATA_URI.match(ref)
    if match is None or not (match.group(2) or "").lower().endswith(";base64"):
        media = ref[5:].split(",", 1)[0].split(";", 1)[0].strip()[:60]
        if media and not media.lower().startswith("image/"):
            raise ImageError(
                f"a data: URI of type {media!r} is not an image; send data:image/png;base64,<data> (or JPEG, GIF, "
                "WebP, BMP, TIFF)"
            )
        raise ImageError("a data: URI must look like data:image/png;base64,<data>")
    return _from_base64(match.group(3), "a data: URI", policy)


def _from_base64(text: str, source: str, policy: ImagePolicy) -> LoadedImage:
    if len(text) > policy.max_bytes * 4 // 3 + 4096:
        raise ImageError(f"{source} is larger than the {_mib(policy.max_bytes)} image limit")
    compact = re.sub(r"\s+", "", text)
    try:
        urlsafe = "-" in compact or "_" in compact
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{source} is not valid base64 ({exc})") from exc
    return decode_bytes(data, source, policy)


def _from_path(path: str, policy: ImagePolicy) -> LoadedImage:
    shown = _shown(path)
    try:
        # Resolve symlinks and ".." first and check the directory before looking at the file, so paths
        # outside the allowed directories cannot be probed for existence.
        resolved = Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ImageError(f"{shown} is not a usable path ({type(exc).__name__})") from exc
    if not any(resolved.is_relative_to(d) for d in policy.allowed_dirs):
        allowed = ", ".join(str(d) for d in policy.allowed_dirs) or "none"
        raise ImageError(
            f"{shown} is outside the allowed directories ({allowed}); allow more with PHI3V_ALLOWED_DIRS or "
            "--allow-dir, or send the image as a URL or base64"
        )
    try:
        if not resolved.exists():
            raise ImageError(f"no image file at {shown}")
        if not resolved.is_file():
            raise ImageError(f"{shown} is not a regular file")
        size = resolved.stat().st_size
        if size > policy.max_bytes:
            raise ImageError(f"{shown} has {size} bytes; the limit is {policy.max_bytes}")
        with open(resolved, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except ImageError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {shown} ({getattr(exc, 'strerror', None) or type(exc).__name__})") from exc
    return decode_bytes(data, f"file {shown}", policy)


def decode_bytes(data: bytes, source: str, policy: ImagePolicy) -> LoadedImage:
    """Decode image bytes under the policy's byte, pixel and format limits."""
    if not data:
        raise ImageError(f"{source} is empty")
    if len(data) > policy.max_bytes:
        raise ImageError(f"{source} has {len(data)} bytes; the limit is {policy.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_decoders())  # no other decoder is tried
            _check_pixels(image.width, image.height, source, policy)
            image.seek(0)  # animations: the first frame
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{source} decodes to too many pixels (a decompression bomb?): {exc}") from exc
    except Exception as exc:  # any decoder failure on untrusted bytes (struct.error, KeyError... included)
        kind = _sniff(data)
        detail = f"it is {'an' if kind and kind[0] in 'AEHIOSU' else 'a'} {kind} file" if kind else _reason(exc)
        raise ImageError(
            f"{source} is not a readable image ({detail}); allowed formats: {', '.join(sorted(ALLOWED_FORMATS))} "
            "(send a PNG, JPEG, GIF, WebP, BMP or TIFF file)"
        ) from exc
    return _finish(image, source, policy)


_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "ZIP"),
)


def _sniff(data: bytes) -> str | None:
    """A name for common non-image or disallowed formats, from their first bytes (for the message only)."""
    head = data[:512].lstrip()
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if re.match(rb"P[1-7]\s", head[:3]):
        return "PPM"
    lowered = head.lower()
    if lowered.startswith((b"<svg", b"<?xml")) and b"<svg" in lowered:
        return "SVG"
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return "not an image file" if text.startswith("cannot identify image file") else text


def _decoders() -> list[str]:
    """The Pillow decoders of the allowed formats that this Pillow has (MPO is read by the JPEG one)."""
    Image.init()
    return [f for f in sorted(ALLOWED_FORMATS) if f in Image.OPEN]


def _check_pixels(width: int, height: int, source: str, policy: ImagePolicy) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{source} has no pixels ({width}x{height})")
    if width * height > policy.max_pixels:
        raise ImageError(
            f"{source} is {width}x{height} = {width * height} pixels; the limit is {policy.max_pixels} "
            "(downscale it first)"
        )


def _finish(image: Image.Image, source: str, policy: ImagePolicy) -> LoadedImage:
    _check_pixels(image.width, image.height, source, policy)
    rgb = to_rgb(image)  # EXIF orientation applied, any mode -> 8-bit RGB; raises ImageError on bad data
    return LoadedImage(rgb, image_digest(rgb), source)


# ---------------------------------------------------------------------------------------------------------------------
# URLs


def check_address(address: str) -> str | None:
    """Why ``address`` may not be fetched, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    for network in _DENIED_NETWORKS:
        if ip.version == network.version and ip in network:
            return f"{ip} is in the special-purpose network {network}"
    if ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return f"{ip} is a private or special-purpose address"
    return None


def _pinned_addresses(host: str, port: int, policy: ImagePolicy) -> list[str]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = policy.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageError(f"cannot resolve the host {host!r} ({exc})") from exc
    if not addresses:
        raise ImageError(f"the host {host!r} has no addresses")
    if host.lower() in policy.trusted_hosts:
        return addresses
    for address in addresses:
        problem = check_address(address)
        if problem is not None:
            raise ImageError(
                f"refusing to fetch {host!r}: {problem}; only public internet addresses may be fetched "
                "(send the image as base64 instead)"
            )
    return addresses


def fetch_url(url: str, policy: ImagePolicy) -> LoadedImage:
    """GET an image over http(s) under the policy (address checks on every hop, byte cap, hard deadline)."""
    if not policy.allow_urls:
        raise ImageError("fetching URLs is turned off here; send the image as base64 or a data: URI")
    deadline = time.monotonic() + policy.url_timeout_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        status, location, data = _get(current, policy, deadline)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise ImageError(f"{_short(current)} redirected without a Location")
            current = urljoin(current, location)
            continue
        if status != 200:
            raise ImageError(f"{_short(current)} answered HTTP {status}")
        return decode_bytes(data, f"URL {_short(url)}", policy)
    raise ImageError(f"{_short(url)} redirected more than {policy.max_redirects} times")


def _get(url: str, policy: ImagePolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET to the checked address of ``url``'s host: (status, Location, body capped at max_bytes).

    The socket is ours: it is connected to the pinned address (TLS still verifies the host name), proxies
    are never used, and a timer shuts it down at the deadline, however slowly the server trickles.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"a redirect led to {scheme!r}; only http(s) URLs may be fetched")
    if parts.username or parts.password:
        raise ImageError("URLs with credentials are not fetched")
    host = parts.hostname or ""
    if not host:
        raise ImageError(f"{_short(url)} has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise ImageError(f"{_short(url)} has an invalid port") from exc
    address = _pinned_addresses(host, port, policy)[0]
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
    try:
        sock = socket.create_connection((address, port), timeout=min(remaining, 10.0))
    except OSError as exc:
        raise ImageError(f"could not fetch {_short(url)}: no connection ({type(exc).__name__})") from exc
    timer = threading.Timer(remaining, _shut, (sock,))
    timer.start()
    connection: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection = http.client.HTTPConnection(host, port, timeout=remaining)
        connection.sock = sock  # already connected (and pinned); http.client only speaks HTTP on it
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection.request("GET", target, headers={"Accept": "image/*", "User-Agent": "phi3v-tools"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) or response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageError(f"{_short(url)} is {declared} bytes; the limit is {policy.max_bytes}")
        chunks, total = [], 0
        while chunk := response.read1(65536):
            total += len(chunk)
            if total > policy.max_bytes:  # Content-Length may lie; count what arrives
                raise ImageError(f"{_short(url)} sent more than the {policy.max_bytes}-byte limit")
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline - 0.05:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s") from exc
        raise ImageError(f"could not fetch {_short(url)} ({type(exc).__name__}: {exc})") from exc
    finally:
        timer.cancel()
        if response is not None:
            response.close()  # its file object holds a reference that keeps the socket open
        if connection is not None:
            connection.close()
        sock.close()


def _shut(sock: socket.socket) -> None:
    """Wake any read blocked on ``sock`` (the deadline passed)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def _shown(path: str) -> str:
    """A path for a message: quoted, and cut in the middle when long (a message must stay readable)."""
    return repr(path) if len(path) <= 160 else f"{path[:100]!r}...{path[-40:]!r} ({len(path)} characters)"


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
