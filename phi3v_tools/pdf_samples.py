"""Small PDFs written here, byte by byte: the demo document and the test suite's documents (hostile ones included).

A PDF is numbered objects, a cross-reference table giving each one's byte offset, and a trailer naming the
catalog. Writing them by hand takes ~60 lines and lets the tests make exactly the malformed or hostile files they
need (a lying page count, a page box of a million points, a launch action), which a PDF library would refuse to
write. :func:`demo_document` is the 3-page document of ``phi3v-tools demo`` and the README: a text page (an
invoice), a table page, and a scanned page (a picture of text with an invisible OCR layer over it, as scanners
write them).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

from PIL import Image, ImageDraw

from phi3v_tools.demo import SALES_TABLE, TEXT_PAGE

LETTER = (612, 792)  # points


def pdf_string(text: str) -> bytes:
    """A PDF literal string: ``(text)`` with backslashes and parentheses escaped (Latin-1 text)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("latin-1") + b")"


def stream(data: bytes, entries: bytes = b"", *, compress: bool = True) -> bytes:
    """A stream object's body: its dictionary (``entries`` plus /Length, /Filter) and its data."""
    if compress:
        data, entries = zlib.compress(data), entries + b" /Filter /FlateDecode"
    return b"<< " + entries + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def write_pdf(objects: Sequence[bytes], *, root: int = 1, trailer: bytes = b"") -> bytes:
    """A whole file: ``objects[i]`` is object ``i + 1``'s body; ``root`` the catalog's number."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root %d 0 R " % (len(objects) + 1, root) + trailer + b" >>\n")
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def text_content(lines: Sequence[tuple[float, float, float, str]], *, mode: int = 0) -> bytes:
    """A content stream writing each ``(x, y, size, text)`` in Helvetica (font resource /F1), render mode ``mode``."""
    parts = [b"BT %d Tr" % mode]
    for x, y, size, text in lines:
        parts.append(b"/F1 %g Tf 1 0 0 1 %g %g Tm " % (size, x, y) + pdf_string(text) + b" Tj")
    parts.append(b"ET")
    return b"\n".join(parts)


HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def document(contents: Sequence[bytes], *, size: tuple[float, float] = LETTER, images: Sequence[bytes] = ()) -> bytes:
    """A PDF with one page per content stream, Helvetica as /F1 and ``images`` (image XObject bodies) as /Im1...,
    shared by every page."""
    objects: list[bytes] = [b"", b"", HELVETICA]  # 1 catalog, 2 page tree, 3 font
    image_refs = b""
    for k, body in enumerate(images, start=1):
        objects.append(body)
        image_refs += b"/Im%d %d 0 R " % (k, len(objects))
    resources = b"<< /Font << /F1 3 0 R >> /XObject << " + image_refs + b">> >>"
    kids = []
    for content in contents:
        objects.append(stream(content))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %g %g] /Resources " % size
            + resources
            + b" /Contents %d 0 R >>" % len(objects)
        )
        kids.append(b"%d 0 R" % len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % len(kids)
    return write_pdf(objects)


def jpeg_image(image: Image.Image, quality: int = 70) -> bytes:
    """An image XObject body holding ``image`` as a JPEG (DCTDecode), RGB or grey."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    space = b"/DeviceGray" if image.mode == "L" else b"/DeviceRGB"
    entries = b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace " % image.size + space
    return stream(out.getvalue(), entries + b" /BitsPerComponent 8 /Filter /DCTDecode", compress=False)


INVOICE = (
    (72, 712, 22, "Invoice INV-2041"),
    (72, 680, 11, "Date: 2026-11-30"),
    (72, 664, 11, "Bill to: Acme Robotics Ltd, 4 Quay Street, Bristol"),
    (72, 620, 11, "1 x Vision module, rev. C                    840.00 EUR"),
    (72, 604, 11, "2 x Mounting bracket                          222.00 EUR"),
    (72, 588, 11, "Shipping                                      222.00 EUR"),
    (72, 556, 13, "Total: 1284.00 EUR"),
    (72, 520, 10, "Payment within 30 days to IBAN DE02 1203 0000 0000 2020 51."),
)


def _table_page() -> bytes:
    """``SALES_TABLE`` as a ruled table with a text layer."""
    table = SALES_TABLE
    rows = [table["columns"], *([str(v) for v in row] for row in table["rows"])]
    lines: list[tuple[float, float, float, str]] = [(72, 712, 18, table["title"]), (72, 692, 11, table["units"])]
    edges, top, height = [72, 252, 352, 452, 552], 670, 30
    for r, row in enumerate(rows):
        lines += [(edges[c] + 10, top - (r + 1) * height + 10, 12, str(text)) for c, text in enumerate(row)]
    rules = [b"%d %d m %d %d l S" % (edges[0], top - r * height, edges[-1], top - r * height) for r in range(7)]
    rules += [b"%d %d m %d %d l S" % (x, top, x, top - 6 * height) for x in edges]
    return text_content(lines) + b"\n1 w " + b"\n".join(rules)


def scanned_page() -> Image.Image:
    """A picture of printed text as a scanner makes it (grey, noisy, tilted), US Letter at 100 dpi."""
    page = Image.new("L", (850, 1100), 240)
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(TEXT_PAGE):
        draw.text((90, 120 + i * 34), line, fill=25, font_size=22)
    noise = Image.effect_noise(page.size, 14)
    return Image.blend(page, noise, 0.1).rotate(0.7, resample=Image.Resampling.BICUBIC, fillcolor=240)


def demo_document() -> bytes:
    """Three pages: an invoice (text layer), a sales table (text layer, ruled), a scan with an invisible OCR layer."""
    ocr_layer = [(65, 705 - i * 24.5, 15.8, line) for i, line in enumerate(TEXT_PAGE) if line]
    scan = b"q 612 0 0 792 0 0 cm /Im1 Do Q\n" + text_content(ocr_layer, mode=3)
    return document([text_content(INVOICE), _table_page(), scan], images=[jpeg_image(scanned_page())])
