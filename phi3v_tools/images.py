"""Image references -> validated RGB images. The only code in phi3v-tools that reads files or URLs, with the two
modules beside it that do the reading (:mod:`phi3v_tools.image_files`, :mod:`phi3v_tools.image_urls`). The on-disk
handle store (:mod:`phi3v_tools.image_store`) reads only its own directory, by digest.

A reference is one of: a PIL image or raw bytes (Python callers), an ``image://sha256/<hex>`` handle
returned by an earlier call, a ``data:image/...;base64,`` URI, bare base64, an ``http(s)://`` URL, a
``file://`` URL or a local path. This module tells them apart and decodes; every way in is bounded:

- paths (and ``file://``) only under the allowed directories, checked lexically before the file system is
  asked anything, and opened without following symbolic links (:mod:`phi3v_tools.image_files`);
- URLs (if enabled) only to hosts whose every address is public (every IANA special-purpose range refused),
  pinned to the checked address, every redirect checked again, the body under a byte cap and a deadline
  (:mod:`phi3v_tools.image_urls`);
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
import io
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from phi3v_tools.digests import image_digest
from phi3v_tools.errors import ImageError
from phi3v_tools.image_checks import check_structure
from phi3v_tools.image_files import _NotThere, read_path
from phi3v_tools.image_urls import MAX_URL_CHARS, Resolver, _short, _system_resolver, check_address, fetch_bytes
from phi3v_tools.model.pil import to_rgb

__all__ = [
    "ALLOWED_FORMATS",
    "HANDLE_PREFIX",
    "MAX_URL_CHARS",
    "ImagePolicy",
    "PdfData",
    "ImageRef",
    "ImageStore",
    "LoadedImage",
    "Resolver",
    "check_address",
    "decode_bytes",
    "fetch_url",
    "load_image",
    "load_images",
    "load_source",
]

HANDLE_PREFIX = "image://sha256/"
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})
_HANDLE = re.compile(r"^image://sha256/([0-9a-f]{64})$")
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+|application/pdf)?(;[^,]*)?,(.*)$", re.IGNORECASE | re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\s-]+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


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


@dataclass(frozen=True)
class PdfData:
    """A reference that held a PDF document (read under the byte limit for PDFs), for phi3v_tools.documents."""

    data: bytes
    source: str


def load_image(ref: ImageRef, policy: ImagePolicy, store: ImageStore | None = None) -> LoadedImage:
    """Resolve one reference to a checked RGB image (and remember it in ``store`` for its handle)."""
    loaded = load_source(ref, policy, store)
    assert isinstance(loaded, LoadedImage)  # no PDF is accepted without a byte limit for PDFs
    return loaded


def load_source(
    ref: ImageRef, policy: ImagePolicy, store: ImageStore | None = None, *, pdf_max_bytes: int = 0
) -> LoadedImage | PdfData:
    """:func:`load_image`, and with ``pdf_max_bytes`` a PDF document too (any of the same ways in: path, URL,
    ``data:application/pdf;base64,``, base64, bytes), returned unparsed as :class:`PdfData`."""
    loaded: LoadedImage | PdfData
    if isinstance(ref, Image.Image):
        loaded = _finish(ref, "a PIL image", policy)
    elif isinstance(ref, bytes | bytearray):
        loaded = _decode(bytes(ref), "the given bytes", policy, pdf_max_bytes)
    elif isinstance(ref, os.PathLike):
        loaded = _from_path(os.fspath(ref), policy, pdf=pdf_max_bytes)
    elif isinstance(ref, str):
        loaded = _from_string(ref, policy, store, pdf_max_bytes)
    else:
        raise ImageError(
            f"an image must be a path, URL, data: URI, base64 string or image handle, not {type(ref).__name__}"
        )
    if store is not None and isinstance(loaded, LoadedImage):
        store.add(loaded)
    return loaded


def load_images(refs: Iterable[ImageRef], policy: ImagePolicy, store: ImageStore | None = None) -> list[LoadedImage]:
    return [load_image(ref, policy, store) for ref in refs]


def _from_string(ref: str, policy: ImagePolicy, store: ImageStore | None, pdf: int = 0) -> LoadedImage | PdfData:
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
                f"unknown image handle {text}: it is not among the images seen recently (by this server, or in the "
                "image store); send the image itself again"
            )
        return loaded
    if text[:5].lower() == "data:":
        return _from_data_uri(text, policy, pdf)
    scheme_match = _SCHEME.match(text)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("http", "https"):
        return _fetch(text, policy, pdf)
    if scheme == "file":
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise ImageError(f"{_short(text)} is not a valid file:// URL ({exc})") from exc
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file:// URLs must name a local file (file:///path), not host {parts.netloc!r}")
        return _from_path(unquote(parts.path), policy, pdf=pdf, named=parts.path)
    if scheme:
        raise ImageError(f"URL scheme {scheme!r} is not supported; use http(s)://, file://, data: or a path")
    # Long strings of base64 characters are data ('.' is never base64), unless they name a file inside an
    # allowed directory: the file system is only asked about paths that passed the directory check.
    if len(text) > 256 and "." not in text and _BASE64.match(text[:1024]):
        try:
            return _from_path(ref, policy, missing_ok=True, pdf=pdf)
        except _NotThere:
            return _from_base64(text, "base64 data", policy, pdf)
    return _from_path(ref, policy, pdf=pdf)


def _from_data_uri(ref: str, policy: ImagePolicy, pdf: int = 0) -> LoadedImage | PdfData:
    match = _DATA_URI.match(ref)
    declared_pdf = match is not None and (match.group(1) or "").lower() == "application/pdf"
    if declared_pdf and not pdf:
        match = None
    if match is None or not (match.group(2) or "").lower().endswith(";base64"):
        media = ref[5:].split(",", 1)[0].split(";", 1)[0].strip()[:60]
        if media and not media.lower().startswith("image/"):
            raise ImageError(
                f"a data: URI of type {media!r} is not an image; send data:image/png;base64,<data> (or JPEG, GIF, "
                "WebP, BMP, TIFF)"
            )
        raise ImageError("a data: URI must look like data:image/png;base64,<data>")
    return _from_base64(match.group(3), "a data: URI", policy, pdf, declared_pdf=declared_pdf)


def _from_base64(
    text: str, source: str, policy: ImagePolicy, pdf: int = 0, *, declared_pdf: bool = False
) -> LoadedImage | PdfData:
    wide = _pdf_limit(pdf, declared_pdf or text.lstrip()[:6] == _PDF_BASE64)
    if len(text) > max(policy.max_bytes, wide) * 4 // 3 + 4096:
        limit = f"{_mib(policy.max_bytes)} image limit" + (f" and the {_mib(pdf)} PDF limit" if wide else "")
        raise ImageError(f"{source} is larger than the {limit}")
    compact = re.sub(r"\s+", "", text)
    try:
        urlsafe = "-" in compact or "_" in compact
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{source} is not valid base64 ({exc})") from exc
    return _decode(data, source, policy, pdf)


def _from_path(
    path: str, policy: ImagePolicy, *, missing_ok: bool = False, pdf: int = 0, named: str | None = None
) -> LoadedImage | PdfData:
    wide = _pdf_limit(pdf, _named_pdf(named if named is not None else path))
    data, shown = read_path(path, _reading(policy, wide), missing_ok=missing_ok)
    return _decode(data, f"file {shown}", policy, pdf)


def fetch_url(url: str, policy: ImagePolicy) -> LoadedImage:
    """GET an image over http(s) under the policy (address checks on every hop, byte cap, hard deadline)."""
    return decode_bytes(fetch_bytes(url, policy), f"URL {_short(url)}", policy)


def _fetch(url: str, policy: ImagePolicy, pdf: int) -> LoadedImage | PdfData:
    try:
        path = urlsplit(url).path
    except ValueError:
        path = ""
    wide = _pdf_limit(pdf, _named_pdf(path))
    return _decode(fetch_bytes(url, _reading(policy, wide)), f"URL {_short(url)}", policy, pdf)


_PDF_BASE64 = "JVBERi"  # "%PDF" in base64


def _named_pdf(name: str) -> bool:
    return name.lower().endswith(".pdf")


def _pdf_limit(pdf: int, looks_like_pdf: bool) -> int:
    """The PDF byte limit to read a reference under: only for one that says it is a PDF (a name ending in .pdf,
    ``data:application/pdf``, base64 that starts with ``%PDF``). Any other reference is read under the image limit
    exactly as before (a PDF within that limit is still recognised by its bytes), so that a large PDF limit never
    widens what an image may cost, nor changes how an oversized image is refused."""
    return pdf if looks_like_pdf else 0


def _reading(policy: ImagePolicy, pdf: int) -> ImagePolicy:
    """The policy to read bytes under: the larger of the image and the PDF byte limits (each checked after)."""
    return replace(policy, max_bytes=pdf) if pdf > policy.max_bytes else policy


def is_pdf(data: bytes) -> bool:
    """PDF files start with ``%PDF-`` (readers accept it within the first 1024 bytes)."""
    return b"%PDF-" in data[:1024]


def decode_bytes(data: bytes, source: str, policy: ImagePolicy) -> LoadedImage:
    """Decode image bytes under the policy's byte, pixel and format limits and the structural checks."""
    loaded = _decode(data, source, policy, 0)
    assert isinstance(loaded, LoadedImage)
    return loaded


def _decode(data: bytes, source: str, policy: ImagePolicy, pdf_max_bytes: int) -> LoadedImage | PdfData:
    """:func:`decode_bytes`; a PDF, when ``pdf_max_bytes`` allows one, comes back as :class:`PdfData`."""
    if not data:
        raise ImageError(f"{source} is empty")
    if pdf_max_bytes and is_pdf(data):
        if len(data) > pdf_max_bytes:
            raise ImageError(f"{source} is a PDF of {len(data)} bytes; the limit for a PDF is {pdf_max_bytes}")
        return PdfData(data, source)
    if len(data) > policy.max_bytes:
        raise ImageError(f"{source} has {len(data)} bytes; the limit is {policy.max_bytes}")
    problem = check_structure(data)
    if problem is not None:
        raise ImageError(f"{source} is refused before decoding: {problem} (a decode bomb?)")
    try:
        with warnings.catch_warnings():
            # A crafted file can make Pillow warn once per broken tag (65,535 lines for one TIFF): not a log to keep.
            warnings.simplefilter("ignore")
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
    with warnings.catch_warnings():  # reading a crafted EXIF block warns per broken tag, too
        warnings.simplefilter("ignore")
        rgb = to_rgb(image)  # EXIF orientation applied, any mode -> 8-bit RGB; raises ImageError on bad data
    if rgb is image:  # our own copy: not the caller's image, nor the decoded file with its buffers and metadata
        rgb = rgb.copy()
    rgb.info = {}
    return LoadedImage(rgb, image_digest(rgb), source)


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"
