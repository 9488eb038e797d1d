"""The PDF renderer's worker: PDFium (through pypdfium2) parses and draws one document here, never in the server.

:mod:`phi3v_tools.documents` runs this file as ``python -I pdf_worker.py`` with an empty environment, the job on
stdin (one JSON line, then the PDF's bytes) and stdout going to a file. Before it reads the document it limits
itself: address space, CPU seconds, the bytes it may write, no core file. It then writes, for each chosen page, one
JSON line followed by the page's RGB pixels, and a last ``{"done": true}`` line; or one ``{"error": ...}`` line and
exit status 2. The parent kills it at its wall-clock deadline, so a hang or a crash costs that one document.

Nothing in a document is acted on. No form environment is made, so no JavaScript runs (the PDFium that pypdfium2
ships is built without V8 in any case); links, launch and other actions, attachments and embedded files are never
read. Only pages are drawn (annotation appearances included, as a viewer shows them) and their text read.

It imports the standard library and pypdfium2 only (not phi3v_tools, whose imports would cost each document
startup time), so the page selection below repeats, in a few lines, what :func:`phi3v_tools.documents.parse_pages`
checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import sys
from typing import Any, BinaryIO

INVISIBLE_MODES = (3, 7)  # text render modes that paint nothing: 3 invisible, 7 clip only (PDF 32000-1, 9.3.6)
MAX_OBJECTS = 20_000  # page objects inspected for the text-layer statistics; beyond that the page is OCR'd
MAX_TEXT_CHARS = 200_000  # characters of a page's text layer sent back
MIN_SIDE_PX = 16  # a page thinner than this at the pixel limit is refused, not drawn as a line


class Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def main() -> int:
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    job = json.loads(stdin.readline(65536))
    _limit(job)
    data = stdin.read()
    try:
        _render(job, data, out)
    except Refused as exc:
        _line(out, {"error": str(exc), "kind": exc.kind})
        return 2
    except MemoryError:
        _line(out, {"error": "the renderer ran out of memory", "kind": "memory"})
        return 2
    _line(out, {"done": True})
    return 0


def _limit(job: dict[str, Any]) -> None:
    try:
        import resource
    except ImportError:  # Windows: only the parent's deadline holds
        return
    cpu = max(int(math.ceil(job["cpu_seconds"])), 1)
    limits = [
        (resource.RLIMIT_AS, job["memory_bytes"], job["memory_bytes"]),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, job["output_bytes"], job["output_bytes"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for what, soft, hard in limits:
        # e.g. macOS refuses RLIMIT_AS; the deadline and the other limits still hold
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(what, (soft, hard))


def _render(job: dict[str, Any], data: bytes, out: BinaryIO) -> None:
    try:
        import pypdfium2 as pdfium
        import pypdfium2.raw as raw
    except ImportError as exc:
        raise Refused("missing", f"pypdfium2 is not installed ({exc})") from None
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == raw.FPDF_ERR_PASSWORD:
            raise Refused("password", "it is encrypted and needs a password") from None
        if getattr(exc, "err_code", None) == raw.FPDF_ERR_SECURITY:
            raise Refused("password", "it uses an unsupported security handler (encryption)") from None
        raise Refused("format", f"PDFium cannot open it: {exc}") from None
    if raw.FPDF_GetSecurityHandlerRevision(pdf.raw) != -1:
        raise Refused("encrypted", "it is encrypted (it opens without a password, but restricts its use)")
    count = len(pdf)
    if count < 1:
        raise Refused("format", "it has no pages")
    chosen = _select(job["ranges"], count, job["default_pages"], job["max_pages"])
    _line(out, {"count": count, "pages": chosen})
    for number in chosen:
        page = pdf[number - 1]
        try:
            _page(job, pdfium, raw, page, number, out)
        finally:
            page.close()


def _select(ranges: list[list[int | None]] | None, count: int, default: int, most: int) -> list[int]:
    if ranges is None:
        return list(range(1, min(count, default) + 1))
    total = 0
    for low, high in ranges:
        top = count if high is None else high
        if low is not None and low > count or top > count:
            raise Refused("pages", f"page {max(low or 0, top)} is not in it (it has {count} page{'s' * (count != 1)})")
        total += top - (low or 1) + 1
        if total > most:
            raise Refused(
                "pages",
                f"it has {count} page{'s' * (count != 1)} and the pages asked for are more than {most} pages, "
                f"the most one call reads (PHI3V_PDF_MAX_PAGES): choose fewer, e.g. pages='1-{most}'",
            )
    chosen: list[int] = []
    for low, high in ranges:
        for number in range(low or 1, (count if high is None else high) + 1):
            if number not in chosen:
                chosen.append(number)
    return chosen


def _page(job: dict[str, Any], pdfium: Any, raw: Any, page: Any, number: int, out: BinaryIO) -> None:
    width, height = page.get_size()  # in PDF units (1/72 inch), as displayed (the page's rotation applied)
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise Refused("page", f"page {number} has no usable size ({width} x {height})")
    pixels = job["max_page_pixels"]
    scale = min(job["max_dpi"] / 72.0, math.sqrt(pixels / (width * height)))
    while math.ceil(width * scale) * math.ceil(height * scale) > pixels:
        scale *= 0.995
    if min(width, height) * scale < MIN_SIDE_PX:
        raise Refused(
            "page",
            f"page {number} is {width:g} x {height:g} points: too thin to draw within {pixels} pixels "
            f"(its short side would be under {MIN_SIDE_PX} pixels)",
        )
    bitmap = page.render(
        scale=scale, rev_byteorder=True, may_draw_forms=False, fill_color=(255, 255, 255, 255), draw_annots=True
    )
    header: dict[str, Any] = {
        "page": number,
        "width": bitmap.width,
        "height": bitmap.height,
        "stride": bitmap.stride,
        "channels": bitmap.n_channels,
        "points": [round(width, 2), round(height, 2)],
    }
    if job["text_layer"]:
        header.update(_text_layer(pdfium, raw, page, width * height))
    _line(out, header)
    out.write(memoryview(bitmap.buffer).cast("B"))
    bitmap.close()


def _text_layer(pdfium: Any, raw: Any, page: Any, area: float) -> dict[str, Any]:
    """The page's text, and what tells a real text layer from an OCR'd scan's (see documents.has_text_layer)."""
    textpage = page.get_textpage()
    try:
        chars = textpage.count_chars()
        text = textpage.get_text_range(0, min(chars, MAX_TEXT_CHARS)) if chars > 0 else ""
        visible = invisible = objects = 0
        covered = 0.0
        kinds = [raw.FPDF_PAGEOBJ_TEXT, raw.FPDF_PAGEOBJ_IMAGE]
        for obj in page.get_objects(filter=kinds, max_depth=4, textpage=textpage):
            objects += 1
            if objects > MAX_OBJECTS:
                return {"text": text, "chars": chars, "visible": 0, "invisible": 0, "image_cover": 1.0, "crowded": True}
            if obj.type == raw.FPDF_PAGEOBJ_IMAGE:
                left, bottom, right, top = obj.get_bounds()
                covered += max(right - left, 0.0) * max(top - bottom, 0.0)
                continue
            written = sum(1 for c in obj.extract() if not c.isspace())
            if _paints_nothing(raw, obj):
                invisible += written
            else:
                visible += written
        return {
            "text": text,
            "chars": chars,
            "visible": visible,
            "invisible": invisible,
            "image_cover": round(min(covered / area, 1.0), 4),
            "crowded": False,
        }
    finally:
        textpage.close()


def _paints_nothing(raw: Any, obj: Any) -> bool:
    """Invisible text: render mode 3 or 7, or a fill that is fully transparent (for the modes that only fill)."""
    mode = raw.FPDFTextObj_GetTextRenderMode(obj.raw)
    if mode in INVISIBLE_MODES:
        return True
    if mode == 0:  # fill only: a zero fill alpha paints nothing
        r, g, b, a = (ctypes.c_uint() for _ in range(4))
        if raw.FPDFPageObj_GetFillColor(obj.raw, *(ctypes.byref(c) for c in (r, g, b, a))) and a.value == 0:
            return True
    return False


def _line(out: BinaryIO, value: dict[str, Any]) -> None:
    out.write(json.dumps(value).encode() + b"\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
