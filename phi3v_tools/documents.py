"""PDF documents -> pages: each a checked RGB image with its own handle, and its text layer when it has a real one.

PDFium (pypdfium2, the ``pdf`` extra: the renderer Chrome uses, maintained, and a wheel with no other dependency)
parses hostile input, so it never runs in this process. Each document gets a fresh worker process
(:mod:`phi3v_tools.pdf_worker`, ~0.15 s to start, parse and draw a page on a 2-core CPU) that

- runs with an empty environment (no API keys or tokens reach it) under ``python -I``,
- limits its own address space (``PHI3V_PDF_MEMORY_MB``), CPU seconds and the bytes it may write, before it reads
  the document, and is killed at the document's wall-clock deadline (``PHI3V_PDF_TIMEOUT_S``);
- draws only pages: no forms, so no JavaScript; no action, link, attachment or embedded file is acted on or read.

A crash, a hang or a limit reached fails that call with a :class:`~phi3v_tools.errors.DocumentError` saying which,
and nothing else: the next call gets a new worker. At most ``PHI3V_PDF_WORKERS`` run at once; a call waits for a
slot within its own deadline. A fresh process per document, rather than a pool, means no document can leave a
worker in a state that the next one meets (the cost, measured above, is small against a page's OCR).

Checked before anything is drawn: the file's bytes (``PHI3V_PDF_MAX_MB``), the pages asked for (``pages`` such as
"1-3,7", at most ``PHI3V_PDF_MAX_PAGES``, the default being the first that many), and each page's pixels: a page is
drawn at the resolution that fits ``PHI3V_PDF_MAX_PAGE_PIXELS`` (default 16 x 336 x 336, what the model's HD
transform takes at 16 crops; more pixels would only be scaled away) and at most ``PHI3V_PDF_MAX_DPI``, so a page
box of a million points is drawn small, not as a gigapixel image. Encrypted documents are refused, with or without
a user password (their permissions are not evaluated here): save an unencrypted copy.

A real text layer vs an OCR'd scan's (:func:`has_text_layer`): scanners and OCR tools put the recognised words over
the picture as invisible text (render mode 3, or a transparent fill), so that the page can be searched. That text
is another program's OCR, often wrong, and it is not what the page shows: such pages go to the model. A page's
text is used as it is only when it is painted (visible characters are at least 90 % of those written), there is
some of it (20 characters or more), and either no picture covers most of the page or the visible text is long
(500 characters or more: a page of text with a photo, not a scan with a caption).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from PIL import Image

from phi3v_tools.digests import image_digest
from phi3v_tools.errors import DocumentError, OptionalDependencyError
from phi3v_tools.images import LoadedImage
from phi3v_tools.pdf_worker import MAX_TEXT_CHARS

__all__ = ["Document", "DocumentPolicy", "Page", "PageRanges", "Renderer", "has_text_layer", "parse_pages"]

WORKER = Path(__file__).with_name("pdf_worker.py")
MAX_PAGES_SPEC = 200  # characters in a ``pages`` argument
_RANGE = re.compile(r"^\s*(\d{1,9})?\s*(-\s*(\d{1,9})?)?\s*$")
PageRanges = list[tuple[int, int | None]]  # 1-based, inclusive; None: to the last page


@dataclass(frozen=True)
class DocumentPolicy:
    """What a PDF may cost. Built from Settings at the edges (``PHI3V_PDF_*``)."""

    max_pages: int = 10  # pages one call reads; also the default selection (the first this many)
    max_bytes: int = 50 * 2**20  # the file
    max_page_pixels: int = 16 * 336 * 336  # a drawn page
    max_dpi: float = 300.0  # a small page is drawn at most this sharp
    timeout_s: float = 30.0  # one document, wall clock: start, parse, draw, text
    memory_mb: int = 1024  # the worker's address space
    text_layer: bool = True  # read_text returns a page's real text layer as it is (source "text")
    workers: int = 2  # documents rendered at once
    # The worker's command line; () runs this interpreter on pdf_worker.py. A sandbox wrapper (bwrap, firejail,
    # nsjail) can be put in front of it here; the tests put a hanging or crashing program here.
    renderer: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextLayer:
    """What a page's text layer holds (from the worker)."""

    text: str
    visible: int  # non-space characters painted
    invisible: int  # non-space characters written invisibly (render mode 3 or 7, or a transparent fill)
    image_cover: float  # share of the page covered by pictures (their boxes, summed, at most 1)
    crowded: bool = False  # too many objects to inspect: treated as a scan


@dataclass(frozen=True)
class Page:
    number: int  # 1-based
    image: LoadedImage
    layer: TextLayer | None  # None: not read (text layers off)

    @property
    def text(self) -> str | None:
        """The page's text when it has a real text layer (see :func:`has_text_layer`), else None (OCR it)."""
        return _tidy(self.layer.text) if self.layer is not None and has_text_layer(self.layer) else None


@dataclass(frozen=True)
class Document:
    source: str  # for messages
    digest: str  # sha256 of the file
    page_count: int  # pages in the document (not only those read)
    pages: tuple[Page, ...]
    render_s: float  # the worker's time, start to exit


def has_text_layer(layer: TextLayer) -> bool:
    """Whether a page's text is a real, painted text layer (use it as it is) rather than a scan's hidden OCR."""
    written = layer.visible + layer.invisible
    if layer.crowded or layer.visible < 20 or layer.visible < 0.9 * written:
        return False
    return layer.image_cover < 0.5 or layer.visible >= 500


def parse_pages(spec: str | None, most: int) -> PageRanges | None:
    """``"1-3,7"`` as ``[(1, 3), (7, 7)]``; ``"5-"`` runs to the last page; None or "" for the default selection.

    Checked here, before any worker starts: the syntax, the order of each range, and that the closed ranges hold
    at most ``most`` pages (open ones are checked against the document's length by the worker).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise DocumentError(f"pages must be text such as '1-3,7', not {type(spec).__name__}")
    if len(spec) > MAX_PAGES_SPEC:
        raise DocumentError(f"pages has {len(spec)} characters; give at most {MAX_PAGES_SPEC}, e.g. '1-3,7'")
    if not spec.strip():
        return None
    if spec.strip().lower() == "all":
        spec = "1-"
    ranges: PageRanges = []
    total = 0
    for part in spec.split(","):
        match = _RANGE.match(part)
        if match is None or not part.strip() or (match.group(1) is None and match.group(3) is None):
            raise DocumentError(f"pages {spec!r} is not a page list: use numbers and ranges such as '1-3,7' or '5-'")
        low = int(match.group(1)) if match.group(1) else 1
        high: int | None
        if match.group(2) is None:
            high = low
        else:
            high = int(match.group(3)) if match.group(3) else None
        if low < 1 or (high is not None and high < low):
            raise DocumentError(f"pages {spec!r}: {part.strip()!r} is not a range of pages (they count from 1)")
        if high is not None:
            total += high - low + 1
            if total > most:
                raise DocumentError(
                    f"pages {spec!r} asks for more than {most} pages, the most one call reads (PHI3V_PDF_MAX_PAGES)"
                )
        ranges.append((low, high))
    return ranges


class Renderer:
    """Renders documents in worker processes under a :class:`DocumentPolicy` (thread-safe; one per toolbox)."""

    def __init__(self, policy: DocumentPolicy | None = None) -> None:
        self.policy = policy or DocumentPolicy()
        self._slots = threading.BoundedSemaphore(self.policy.workers)
        self.running: set[int] = set()  # the workers' process ids now (the tests kill one)

    def render(
        self, data: bytes, source: str, pages: str | None = None, *, default_pages: int | None = None
    ) -> Document:
        """The pages of the PDF ``data`` (``pages`` as :func:`parse_pages` reads it; the default: the first
        ``default_pages``, at most the policy's ``max_pages``)."""
        policy = self.policy
        if len(data) > policy.max_bytes:
            raise DocumentError(
                f"{source} has {len(data)} bytes; the limit for a PDF is {policy.max_bytes} (PHI3V_PDF_MAX_MB)"
            )
        if not policy.renderer and find_spec("pypdfium2") is None:
            raise OptionalDependencyError("pypdfium2", "pdf", "Reading PDF documents", alone=True)
        ranges = parse_pages(pages, policy.max_pages)
        default = min(default_pages or policy.max_pages, policy.max_pages)
        deadline = time.monotonic() + policy.timeout_s
        if not self._slots.acquire(timeout=policy.timeout_s):
            raise DocumentError(
                f"{source} was not rendered: {policy.workers} other documents were being rendered for "
                f"{policy.timeout_s:g} s (PHI3V_PDF_WORKERS); try again"
            )
        try:
            started = time.perf_counter()
            output = self._run(data, source, ranges, default, deadline)
            render_s = time.perf_counter() - started
        finally:
            self._slots.release()
        return _read_output(output, source, hashlib.sha256(data).hexdigest(), render_s, policy)

    def _job(self, ranges: PageRanges | None, default: int, seconds: float) -> dict[str, Any]:
        policy = self.policy
        page_bytes = policy.max_page_pixels * 4 + 4 * MAX_TEXT_CHARS + 65_536  # pixels (stride padding), UTF-8 text
        return {
            "ranges": [list(r) for r in ranges] if ranges is not None else None,
            "default_pages": default,
            "max_pages": policy.max_pages,
            "max_page_pixels": policy.max_page_pixels,
            "max_dpi": policy.max_dpi,
            "text_layer": policy.text_layer,
            "memory_bytes": policy.memory_mb * 2**20,
            "cpu_seconds": seconds + 1,
            "output_bytes": policy.max_pages * page_bytes + 65_536,
        }

    def _run(self, data: bytes, source: str, ranges: PageRanges | None, default: int, deadline: float) -> bytes:
        policy = self.policy
        command = list(policy.renderer) or [sys.executable, "-I", str(WORKER)]
        left = deadline - time.monotonic()
        with tempfile.TemporaryFile() as job, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            job.write(json.dumps(self._job(ranges, default, max(left, 1.0))).encode() + b"\n")
            job.write(data)
            job.seek(0)
            try:
                worker = subprocess.Popen(
                    command, stdin=job, stdout=out, stderr=err, env={}, close_fds=True, start_new_session=True
                )
            except OSError as exc:
                raise DocumentError(f"{source} was not rendered: the PDF renderer did not start ({exc})") from None
            self.running.add(worker.pid)
            try:
                status = worker.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                _kill(worker)
                raise DocumentError(
                    f"{source} took longer than {policy.timeout_s:g} s to render (the limit per document, "
                    "PHI3V_PDF_TIMEOUT_S); the renderer was stopped. Ask for fewer pages, or check the file"
                ) from None
            except BaseException:  # Ctrl-C or a cancelled call while it renders: no worker outlives its call
                _kill(worker)
                raise
            finally:
                self.running.discard(worker.pid)
            out.seek(0)
            output = out.read()
            if status != 0:
                err.seek(0)
                _failed(status, output, err.read(8192), source, policy)
            return output


def _kill(worker: subprocess.Popen[bytes]) -> None:
    """The worker and anything it started (it leads its own session)."""
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        worker.kill()
    worker.wait()


def _failed(status: int, output: bytes, stderr: bytes, source: str, policy: DocumentPolicy) -> None:
    """Raise the DocumentError for a worker that exited with ``status``."""
    for line in reversed(output.splitlines()[-2:]):
        try:
            message = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            continue
        if isinstance(message, dict) and "error" in message:
            kind = message.get("kind")
            hint = {
                "password": "; decrypt it first (e.g. qpdf --decrypt --password=... in.pdf out.pdf)",
                "encrypted": "; save an unencrypted copy first (e.g. qpdf --decrypt in.pdf out.pdf)",
                "memory": f" (PHI3V_PDF_MEMORY_MB is {policy.memory_mb})",
            }.get(str(kind), "")
            if kind == "missing":
                raise OptionalDependencyError("pypdfium2", "pdf", "Reading PDF documents", alone=True)
            raise DocumentError(f"{source} is refused: {message['error']}{hint}")
    if b"MemoryError" in stderr:
        raise DocumentError(
            f"{source} is refused: rendering it needed more than {policy.memory_mb} MiB (PHI3V_PDF_MEMORY_MB)"
        )
    if status < 0 and -status in {getattr(signal, "SIGXCPU", signal.SIGKILL), signal.SIGKILL}:
        raise DocumentError(
            f"{source} is refused: rendering it used more CPU time than its {policy.timeout_s:g} s limit "
            "(PHI3V_PDF_TIMEOUT_S), or the renderer was killed"
        )
    how = f"signal {-status}" if status < 0 else f"exit status {status}"
    raise DocumentError(
        f"{source} could not be rendered: the PDF renderer crashed on it ({how}); the file is malformed or hostile"
    )


def _read_output(output: bytes, source: str, digest: str, render_s: float, policy: DocumentPolicy) -> Document:
    """The pages from the worker's output: a header line, then a line and the pixels for each page."""
    at = 0

    def line() -> dict[str, Any]:
        nonlocal at
        end = output.find(b"\n", at, at + 1_000_000)
        if end < 0:
            raise DocumentError(f"{source} could not be rendered: the PDF renderer's output was cut short")
        value = json.loads(output[at:end])
        at = end + 1
        return value

    head = line()
    count, numbers = int(head["count"]), list(head["pages"])
    pages = []
    for _ in numbers:
        info = line()
        width, height, stride = int(info["width"]), int(info["height"]), int(info["stride"])
        if width * height > policy.max_page_pixels or info.get("channels") != 3 or stride < width * 3:
            raise DocumentError(f"{source} could not be rendered: the renderer returned a page outside its limits")
        pixels = output[at : at + stride * height]
        at += stride * height
        if len(pixels) < stride * height:
            raise DocumentError(f"{source} could not be rendered: the PDF renderer's output was cut short")
        image = Image.frombytes("RGB", (width, height), pixels, "raw", "RGB", stride, 1)
        number = int(info["page"])
        loaded = LoadedImage(image, image_digest(image), f"page {number} of {source}")
        layer = None
        if "text" in info:
            layer = TextLayer(
                str(info["text"]), int(info["visible"]), int(info["invisible"]), float(info["image_cover"]),
                bool(info.get("crowded")),
            )  # fmt: skip
        pages.append(Page(number, loaded, layer))
    if line().get("done") is not True:
        raise DocumentError(f"{source} could not be rendered: the PDF renderer's output was cut short")
    return Document(source, digest, count, tuple(pages), render_s)


def _tidy(text: str) -> str:
    """PDFium's text with ``\\n`` line ends, no trailing spaces, no runs of blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
