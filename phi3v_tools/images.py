"""Image references -> validated RGB images. The only code in phi3v-tools that reads files or URLs.

A reference is one of: a PIL image or raw bytes (Python callers), an ``image://sha256/<hex>`` handle
returned by an earlier call, a ``data:image/...;base64,`` URI, bare base64, an ``http(s)://`` URL, a
``file://`` URL or a local path. Every way in is bounded:

- paths (and ``file://``) only under the allowed directories. The check is lexical (the path made absolute
  and normalised, ``~`` taken from $HOME; ``~user`` is refused, as expanding it would tell whether the user
  exists), so nothing is asked of the file system about a path before it passes, and a path is used exactly
  as given (a name may end with a space). The file is then opened from the allowed directory's descriptor one component at a time with
  ``O_NOFOLLOW``: a symbolic link under an allowed directory is never followed, so swapping a file for a link
  between the check and the open cannot lead outside. Only regular files are read (``O_NONBLOCK``: a FIFO
  cannot block), at most the byte cap plus one byte. Where ``os.open`` takes no ``dir_fd`` (Windows), the
  fallback checks each component with ``lstat``, opens with ``O_NOFOLLOW`` where it exists and compares the
  opened file's device and inode with the checked one: best effort, as a directory could still be swapped
  for a junction between the two;
- URLs (if enabled) only to hosts whose every address is public: every entry of the IANA IPv4 and IPv6
  special-purpose registries, multicast and anything outside 2000::/3 are refused, the connection is pinned
  to the checked address, every redirect is checked again, the body is streamed under a byte cap and a
  deadline, and proxies from the environment are ignored;
- bytes and pixels are capped before decoding, only real raster formats are accepted, and truncated or
  corrupt data is an error.

Decode bombs beyond the pixel cap (TIFF tiles, strips and directories, progressive-JPEG scans, PNG chunks,
GIF blocks, BMP RLE, huge EXIF blocks) are refused by structural pre-checks in this process
(``phi3v_tools.image_checks``), not by decoding in a separate process under hard limits. The choice was
made by measurement on a 2-core x86-64 CPU (``benchmarks/decode_bombs.py``, results/decode_bombs.json):

- with plain Pillow the bombs cost up to 1 GiB for a 1 MB 1x1 TIFF (one huge tile), 20 s and 757 MiB for
  a TIFF listing 3 million strips, 6-7 s for 5 million JPEG segments or 1.7 million PNG chunks, and an
  estimated 2.5 hours for a progressive JPEG repeating one 33-byte scan to 20 MiB; the pre-checks refuse each
  in under 0.1 s, before any allocation;
- on normal pictures (1 and 12 Mpx, JPEG and PNG, decoding in 6-190 ms) the pre-checks cost 0.05-1.4 ms,
  while a persistent decoding process under rlimits, handing the pixels back through shared memory, adds
  2.5-63 ms (13-109 %), and a fresh process per picture 100-310 ms.

A separate process would also bound bombs no check knows of, but every picture would pay for it, and it
needs a pool per concurrent decode, kill-and-respawn on timeout and a copy of every picture; what is left
after the checks is bounded by the byte and pixel caps (the worst valid case measured, a 36-Mpx 32-bit
float TIFF, decodes in 1.5 s within 589 MiB, about 16 bytes a pixel).

Every error is an :class:`~phi3v_tools.errors.ImageError` that says what was wrong and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
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
from phi3v_tools.image_checks import check_structure
from phi3v_tools.model.image_processing import to_rgb

HANDLE_PREFIX = "image://sha256/"
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})
MAX_URL_CHARS = 16384
_HANDLE = re.compile(r"^image://sha256/([0-9a-f]{64})$")
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[^,]*)?,(.*)$", re.IGNORECASE | re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\s-]+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_NAME = re.compile(r"^[a-z0-9_.-]+$")

# Never fetched: every entry of the IANA special-purpose address registries (tests/data/iana-*.csv, checked by
# the tests), even those marked globally reachable (anycast relays and DNS sinks serve no images), plus
# multicast. IPv6 outside 2000::/3 (the global unicast space) is refused as a whole besides.
_SPECIAL_NETWORKS = (
    ("0.0.0.0/8", '"this network"'),
    ("10.0.0.0/8", "private-use"),
    ("100.64.0.0/10", "shared address space, carrier-grade NAT: Alibaba's metadata address 100.100.100.200"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local: the cloud metadata address 169.254.169.254"),
    ("172.16.0.0/12", "private-use"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private-use"),
    ("192.175.48.0/24", "AS112 direct delegation"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the limited broadcast address"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible, deprecated"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy IPv6 prefix"),
    ("2001::/23", "IETF protocol assignments: Teredo, AMT, AS112, ORCHID, benchmarking, anycast"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "AS112 direct delegation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 SIDs"),
    ("fc00::/7", "unique-local: the AWS metadata address fd00:ec2::254"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local, deprecated"),
    ("ff00::/8", "multicast"),
)
_DENIED_NETWORKS = tuple((ipaddress.ip_network(net), name) for net, name in _SPECIAL_NETWORKS)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")

# Opening paths without following links: from the allowed directory's descriptor where the OS allows it.
_DIR_FD = os.open in os.supports_dir_fd
_CLOEXEC = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_BINARY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
_LINK_ERRNOS = {errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP), getattr(errno, "EFTYPE", errno.ELOOP)}

Resolver = Callable[[str, int], list[str]]


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class ImagePolicy:
    """What may be read. Built from Settings at the edges; the defaults are the safe ones.

    ``allowed_dirs`` is stored resolved (symlinks of the operator's own paths followed, for messages);
    ``allowed_roots`` holds both that form and the form as given, made absolute (``/tmp`` and
    ``/private/tmp`` on macOS), and a path is allowed when it is lexically under either.
    """

    allowed_dirs: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    allow_urls: bool = True
    max_bytes: int = 20 * 2**20  # compressed size of one image
    max_pixels: int = 40_000_000  # width x height before decoding
    url_timeout_s: float = 15.0  # whole fetch, connect to last byte
    max_redirects: int = 3
    trusted_hosts: frozenset[str] = frozenset()  # exempt from the address check (internal deployments, tests)
    resolver: Resolver = _system_resolver
    allowed_roots: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        given = tuple(Path(d).expanduser() for d in self.allowed_dirs)
        resolved = tuple(d.resolve() for d in given)
        spelled = tuple(os.path.normpath(os.path.abspath(d)) for d in given)
        object.__setattr__(self, "allowed_dirs", resolved)
        object.__setattr__(self, "allowed_roots", tuple(dict.fromkeys([str(d) for d in resolved] + list(spelled))))


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

    @property
    def nbytes(self) -> int:
        """Pixel bytes held (RGB: 3 per pixel)."""
        return self.image.width * self.image.height * 3


class ImageStore:
    """Images by handle, so a chained call can say ``image://sha256/<hex>`` instead of sending it again.

    A least-recently-used store bounded by count and by pixel bytes (width x height x 3): the oldest go until
    both bounds hold, and an image larger than ``max_bytes`` by itself is not stored.
    """

    def __init__(self, max_images: int = 64, max_bytes: int = 512 * 2**20) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, LoadedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, loaded: LoadedImage) -> None:
        with self._lock:
            old = self._images.pop(loaded.digest, None)
            if old is not None:
                self._bytes -= old.nbytes
            if loaded.nbytes > self.max_bytes or self.max_images < 1:
                return
            self._images[loaded.digest] = loaded
            self._bytes += loaded.nbytes
            while len(self._images) > self.max_images or self._bytes > self.max_bytes:
                _, evicted = self._images.popitem(last=False)
                self._bytes -= evicted.nbytes

    def get(self, digest: str) -> LoadedImage | None:
        with self._lock:
            loaded = self._images.get(digest)
            if loaded is not None:
                self._images.move_to_end(digest)
            return loaded

    @property
    def nbytes(self) -> int:
        """Pixel bytes held now."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)


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
        loaded = _from_string(ref, policy, store)
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
    """Handles, data: URIs, base64 and URLs are read stripped; a path is used exactly as given."""
    text = ref.strip()
    if not text:
        raise ImageError("the image reference is empty; give a path, URL, data: URI, base64 or image handle")
    if text.startswith("image://"):
        match = _HANDLE.match(text)
        if match is None:
            raise ImageError(f"{text[:80]!r} is not an image handle; handles look like {HANDLE_PREFIX}<64 hex digits>")
        loaded = store.get(match.group(1)) if store is not None else None
        if loaded is None:
            raise ImageError(
                f"unknown image handle {text}: it was not seen by this server recently; send the image itself again"
            )
        return loaded
    if text[:5].lower() == "data:":
        return _from_data_uri(text, policy)
    scheme_match = _SCHEME.match(text)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("http", "https"):
        return fetch_url(text, policy)
    if scheme == "file":
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise ImageError(f"{_short(text)} is not a valid file:// URL ({exc})") from exc
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file:// URLs must name a local file (file:///path), not host {parts.netloc!r}")
        return _from_path(unquote(parts.path), policy)
    if scheme:
        raise ImageError(f"URL scheme {scheme!r} is not supported; use http(s)://, file://, data: or a path")
    # Long strings of base64 characters are data ('.' is never base64), unless they name a file inside an
    # allowed directory: the file system is only asked about paths that passed the directory check.
    if len(text) > 256 and "." not in text and _BASE64.match(text[:1024]):
        try:
            return _from_path(ref, policy, missing_ok=True)
        except _NotThere:
            return _from_base64(text, "base64 data", policy)
    return _from_path(ref, policy)


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


# ---------------------------------------------------------------------------------------------------------------------
# Paths


class _NotThere(ImageError):
    """No file at a path that passed the directory check (a base64-looking string is then read as data)."""


def _from_path(path: str, policy: ImagePolicy, *, missing_ok: bool = False) -> LoadedImage:
    shown = _shown(path)
    root, parts = _locate(path, policy, shown, quiet=missing_ok)
    try:
        fd = _open_nofollow(root, parts, path) if _DIR_FD else _open_checked(root, parts, path)
    except ImageError as exc:
        if missing_ok and not isinstance(exc, _NotThere):  # a base64-looking name that cannot be opened: data
            raise _NotThere(str(exc)) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{shown} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise ImageError(f"{shown} has {info.st_size} bytes; the limit is {policy.max_bytes}")
        chunks, left = [], policy.max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ImageError(f"cannot read {shown} ({exc.strerror or type(exc).__name__})") from exc
    finally:
        os.close(fd)
    return decode_bytes(b"".join(chunks), f"file {shown}", policy)


def _locate(path: str, policy: ImagePolicy, shown: str, *, quiet: bool = False) -> tuple[str, list[str]]:
    """The allowed directory ``path`` is lexically under and the components below it. Asks the file system nothing.

    ``quiet``: a path outside every allowed directory raises :class:`_NotThere` (the caller has another reading).
    """
    if "\x00" in path:
        raise ImageError(f"{shown} is not a usable path (it contains a NUL byte)")
    expanded = _expand_home(path, shown)
    try:
        absolute = os.path.normpath(os.path.join(os.getcwd(), expanded))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{shown} is not a usable path ({type(exc).__name__})") from exc
    separators = os.sep + (os.altsep or "")
    if ".." in re.split(f"[{re.escape(separators)}]", absolute):
        raise ImageError(f"{shown} is not a usable path ('..' is left after normalising it)")
    roots = [r for r in policy.allowed_roots if _is_under(absolute, r)]
    if not roots:
        if quiet:
            raise _NotThere(shown)
        allowed = ", ".join(str(d) for d in policy.allowed_dirs) or "none"
        raise ImageError(
            f"{shown} is outside the allowed directories ({allowed}){_spaces(path)}; allow more with "
            "PHI3V_ALLOWED_DIRS or --allow-dir, or send the image as a URL or base64"
        )
    root = max(roots, key=len)  # the most specific allowed directory
    below = absolute[len(root) :]
    return root, [p for p in re.split(f"[{re.escape(separators)}]", below) if p]


def _is_under(path: str, root: str) -> bool:
    if os.name == "nt":
        path, root = os.path.normcase(path), os.path.normcase(root)
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _expand_home(path: str, shown: str) -> str:
    """``~`` and ``~/...`` from $HOME (no look-up); ``~user`` is refused, as its expansion tells who exists."""
    if not path.startswith("~"):
        return path
    rest = path[1:]
    if rest and rest[0] not in os.sep + (os.altsep or ""):
        name = re.split(r"[\\/]", rest, maxsplit=1)[0]
        raise ImageError(
            f"{shown} starts with {_shown('~' + name)}: other users' home directories are not expanded (only '~' "
            f"and '~/...' are, from $HOME); give the full path, or {_shown('./' + path)} for a file whose name "
            "starts with '~'"
        )
    home = os.environ.get("HOME") or os.environ.get("USERPROFILE")
    if not home:
        raise ImageError(f"{shown} starts with '~' but HOME is not set; give the full path")
    return home + rest


def _open_nofollow(root: str, parts: list[str], path: str) -> int:
    """Open ``root/parts...`` walking down from the allowed directory's descriptor; no link is ever followed."""
    try:
        current = os.open(root, _DIR_FLAGS)  # the operator's directory: a link there is the operator's choice
    except OSError as exc:
        raise _open_error(exc, path, None, -1) from exc
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                opened = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS | _NOFOLLOW, dir_fd=current)
            except OSError as exc:
                raise _open_error(exc, path, part, current, last) from exc
            os.close(current)
            current = opened
        opened, current = current, -1
        return opened
    finally:
        if current >= 0:
            os.close(current)


def _open_checked(root: str, parts: list[str], path: str) -> int:
    """The fallback without ``dir_fd`` (Windows): lstat every component, open, and compare identities."""
    shown, where = _shown(path), root
    try:
        checked = os.stat(root)
        for i, part in enumerate(parts):
            where = os.path.join(where, part)
            checked = os.lstat(where)
            if stat.S_ISLNK(checked.st_mode) or getattr(checked, "st_reparse_tag", None):
                raise ImageError(_link_message(shown, part, i == len(parts) - 1))
        fd = os.open(where, _FILE_FLAGS if parts else _DIR_FLAGS)
    except OSError as exc:
        raise _open_error(exc, path, None, -1) from exc
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise ImageError(f"{shown} changed while it was being opened; try again")
    return fd


def _open_error(exc: OSError, path: str, part: str | None, parent: int, last: bool = True) -> ImageError:
    shown = _shown(path)
    if exc.errno == errno.ENOENT:
        return _NotThere(f"no image file at {shown}{_spaces(path)}")
    is_link = exc.errno in _LINK_ERRNOS and _NOFOLLOW != 0
    if part is not None and parent >= 0 and exc.errno == errno.ENOTDIR:
        with contextlib.suppress(OSError):  # below an allowed directory: asking is fine
            is_link = stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
        if not is_link:
            return ImageError(f"no image file at {shown} ({part!r} is not a directory)")
    if is_link and part is not None:
        return ImageError(_link_message(shown, part, last))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageError(f"cannot read {shown} (permission denied)")
    return ImageError(f"cannot read {shown} ({exc.strerror or type(exc).__name__})")


def _link_message(shown: str, part: str, last: bool) -> str:
    where = "is a symbolic link" if last else f"goes through a symbolic link ({part!r})"
    return (
        f"{shown} {where}; links are not followed under the allowed directories (one could lead outside the "
        "allowed directories); give the path of the file itself"
    )


def _spaces(path: str) -> str:
    """A hint when a name starts or ends with whitespace (paths are used exactly as given)."""
    names = {" ": "a space", "\t": "a tab", "\n": "a newline", "\r": "a carriage return"}
    ends = [f"{end} with {names.get(ch, 'whitespace')}" for end, ch in (("starts", path[:1]), ("ends", path[-1:]))]
    ends = [e for e, ch in zip(ends, (path[:1], path[-1:]), strict=True) if ch.isspace()]
    return f" (the name {' and '.join(ends)})" if ends else ""


def decode_bytes(data: bytes, source: str, policy: ImagePolicy) -> LoadedImage:
    """Decode image bytes under the policy's byte, pixel and format limits and the structural checks."""
    if not data:
        raise ImageError(f"{source} is empty")
    if len(data) > policy.max_bytes:
        raise ImageError(f"{source} has {len(data)} bytes; the limit is {policy.max_bytes}")
    problem = check_structure(data)
    if problem is not None:
        raise ImageError(f"{source} is refused before decoding: {problem} (a decode bomb?)")
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
    if rgb is image:  # our own copy: not the caller's image, nor the decoded file with its buffers and metadata
        rgb = rgb.copy()
    rgb.info = {}
    return LoadedImage(rgb, image_digest(rgb), source)


# ---------------------------------------------------------------------------------------------------------------------
# URLs


def check_address(address: str) -> str | None:
    """Why ``address`` may not be fetched, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address)
    for network, name in _DENIED_NETWORKS:
        if ip.version == network.version and ip in network:
            mapped = getattr(ip, "ipv4_mapped", None)
            if mapped is not None:
                inner = check_address(str(mapped))
                about = f"; {inner}" if inner else ""
                return f"{ip} is in the special-purpose network {network}, IPv4-mapped {mapped}{about}; give it as IPv4"
            if name == "loopback":
                return f"{ip} is a loopback address"
            return f"{ip} is in the special-purpose network {network} ({name})"
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return f"{ip} is outside the global unicast space 2000::/3 (a reserved or special-purpose address)"
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
        try:
            problem = check_address(address)
        except ValueError:
            problem = f"{address!r} is not an IP address"
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
            try:
                current = urljoin(current, _header_text(location))
            except ValueError as exc:
                raise ImageError(f"{_short(current)} redirected to an invalid URL ({exc})") from exc
            continue
        if status != 200:
            raise ImageError(f"{_short(current)} answered HTTP {status}")
        return decode_bytes(data, f"URL {_short(url)}", policy)
    raise ImageError(f"{_short(url)} redirected more than {policy.max_redirects} times")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA-encoded), for DNS, the Host header and TLS SNI
    port: int
    path: str  # the request target, percent-encoded as browsers do


def _parse_url(url: str) -> _Target:
    """Split and check one URL: a clear ImageError for anything malformed, never another exception."""
    if len(url) > MAX_URL_CHARS:
        raise ImageError(f"the URL is {len(url)} characters long; at most {MAX_URL_CHARS} are fetched")
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port_text = parts.port
    except ValueError as exc:  # an unclosed IPv6 bracket, a port that is not a number or out of range...
        what = "an invalid port" if "port" in str(exc).lower() else f"a malformed address ({exc})"
        raise ImageError(f"{_short(url)} has {what}") from exc
    if scheme not in ("http", "https"):
        raise ImageError(f"a redirect led to {scheme!r}; only http(s) URLs may be fetched")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ImageError("URLs with credentials are not fetched")
    host = parts.hostname or ""
    if not host:
        raise ImageError(f"{_short(url)} has no host")
    if port_text == 0:
        raise ImageError(f"{_short(url)} has an invalid port (0)")
    port = port_text if port_text is not None else (443 if scheme == "https" else 80)
    if not _is_ip(host):
        try:
            host = host.encode("idna").decode("ascii").lower()  # a non-ASCII name: its IDNA form (xn--...)
        except UnicodeError as exc:
            raise ImageError(f"{_short(url)} has a host name that is not valid ({exc})") from exc
        if not _HOST_NAME.match(host):
            raise ImageError(f"{_short(url)} has a host name that is not valid ({host[:80]!r})")
    try:
        target = _percent_encode(parts.path or "/", '"#<>?`{} ')
        if parts.query:
            target += "?" + _percent_encode(parts.query, "\"#<>' ")
    except UnicodeError as exc:
        raise ImageError(f"{_short(url)} has characters that cannot be sent ({exc})") from exc
    return _Target(scheme, host, port, target)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _percent_encode(text: str, unsafe: str) -> str:
    """Non-ASCII, control and ``unsafe`` characters as UTF-8 percent-escapes, as browsers send them."""
    return "".join(
        "".join(f"%{b:02X}" for b in ch.encode("utf-8")) if ch > "\x7e" or ch < "\x21" or ch in unsafe else ch
        for ch in text
    )


def _header_text(value: str) -> str:
    """A header value as text: http.client decodes bytes as Latin-1, servers usually send UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _get(url: str, policy: ImagePolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET to the checked address of ``url``'s host: (status, Location, body capped at max_bytes).

    The socket is ours: it is connected to the pinned address (TLS still verifies the host name), proxies
    are never used, and a timer shuts it down at the deadline, however slowly the server trickles.
    """
    target = _parse_url(url)
    address = _pinned_addresses(target.host, target.port, policy)[0]
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
    try:
        sock = socket.create_connection((address, target.port), timeout=min(remaining, 10.0))
    except OSError as exc:
        raise ImageError(f"could not fetch {_short(url)}: no connection ({type(exc).__name__})") from exc
    timer = threading.Timer(remaining, _shut, (sock,))
    timer.start()
    connection: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
        connection.sock = sock  # already connected (and pinned); http.client only speaks HTTP on it
        connection.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": "phi3v-tools"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        _check_length(response.headers.get_all("Content-Length") or [], url, policy)
        chunks, total = [], 0
        while chunk := response.read1(65536):
            total += len(chunk)
            if total > policy.max_bytes:  # Content-Length may lie; count what arrives
                raise ImageError(f"{_short(url)} sent more than the {policy.max_bytes}-byte limit")
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: http.client's InvalidURL...
        if isinstance(exc, ImageError):
            raise
        if time.monotonic() >= deadline - 0.05:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s") from exc
        raise ImageError(f"could not fetch {_short(url)} ({type(exc).__name__}: {str(exc)[:200]})") from exc
    finally:
        timer.cancel()
        if response is not None:
            response.close()  # its file object holds a reference that keeps the socket open
        if connection is not None:
            connection.close()
        sock.close()


def _check_length(values: list[str], url: str, policy: ImagePolicy) -> None:
    """Content-Length must be one decimal number (repeated only identically) and within the byte cap."""
    declared = {v.strip() for value in values for v in value.split(",")}
    if not declared:
        return
    if len(declared) > 1:
        shown = ", ".join(sorted(repr(v[:30]) for v in declared)[:4])
        raise ImageError(f"{_short(url)} sent conflicting Content-Length headers ({shown})")
    (length,) = declared
    if not re.fullmatch(r"[0-9]{1,30}", length):
        raise ImageError(f"{_short(url)} sent an invalid Content-Length ({length[:40]!r})")
    if int(length) > policy.max_bytes:
        raise ImageError(f"{_short(url)} is {int(length)} bytes; the limit is {policy.max_bytes}")


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
