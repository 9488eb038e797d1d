"""Hostile PDF documents made on the fly, shared by the renderer's tests and the reliability corpus.

Each builder returns the file's bytes, written by :mod:`phi3v_tools.pdf_samples` (no binary blobs).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from phi3v_tools.pdf_samples import HELVETICA, demo_document, document, stream, text_content, write_pdf

DEMO = demo_document()
HELLO = text_content([(72, 700, 14, "Hello from a hostile file's neighbour, with enough words to count.")])
PAGE_PIXELS = 16 * 336 * 336  # the default pixel limit of a drawn page


def garbage(size: int = 20_000, seed: int = 0) -> bytes:
    """A PDF header, then noise."""
    return b"%PDF-1.7\n" + random.Random(seed).randbytes(size)


def truncated() -> bytes:
    """The demo document cut in half (PDFium may repair it)."""
    return DEMO[: len(DEMO) // 2]


def giant_page() -> bytes:
    """A page of 200 x 200 inches: 60,000 x 60,000 pixels at 300 dpi, if it were drawn as it says."""
    return document([HELLO], size=(14_400, 14_400))


def gigapixel_page() -> bytes:
    """The giant page with a UserUnit of 75,000: a page of kilometres, if honoured."""
    return giant_page().replace(b"/Type /Page ", b"/Type /Page /UserUnit 75000 ")


def sliver_page() -> bytes:
    """A page a million points wide and one high."""
    return document([HELLO], size=(1_000_000, 1))


def many_pages(n: int = 100_000) -> bytes:
    """A page tree of ``n`` empty pages."""
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""] + [page] * n
    objects[1] = b"<< /Type /Pages /Count %d /Kids [" % n + b" ".join(b"%d 0 R" % (k + 3) for k in range(n)) + b"] >>"
    return write_pdf(objects)


def deeply_nested(depth: int = 200_000) -> bytes:
    """A page whose dictionary holds an array nested ``depth`` deep."""
    nested = b"[" * depth + b"]" * depth
    return write_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 300] /Deep " + nested + b" >>",
        ]
    )


def cyclic_tree() -> bytes:
    """A page tree whose only kid is itself."""
    return write_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [2 0 R] /Count 5 >>"])


def with_actions(script: Path, marker: Path) -> bytes:
    """A page of text with an open action that launches ``script`` (which would create ``marker``), JavaScript
    that opens a URL and launches an attachment, and an embedded shell script: none may ever run."""
    return write_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R /OpenAction 5 0 R /Names << /JavaScript << /Names [(a) 6 0 R] >> "
            b"/EmbeddedFiles << /Names [(x.sh) 7 0 R] >> >> /AA << /WC 5 0 R >> >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
            b"/Contents 8 0 R /AA << /O 5 0 R >> >>",
            HELVETICA,
            b"<< /S /Launch /F (" + str(script).encode() + b") /Win << /F (cmd.exe) >> /Next 6 0 R >>",
            b"<< /S /JavaScript /JS (app.launchURL\\('http://127.0.0.1:9/'\\); this.exportDataObject\\({cName: 'x.sh', "
            b"nLaunch: 2}\\);) >>",
            b"<< /Type /Filespec /F (x.sh) /EF << /F 9 0 R >> >>",
            stream(HELLO),
            stream(b"#!/bin/sh\ntouch " + str(marker).encode() + b"\n", b"/Type /EmbeddedFile"),
        ]
    )


def launch_script(folder: Path) -> tuple[Path, Path]:
    """A script that would create a marker file if anything ran it: (script, marker)."""
    marker = folder / "launched"
    script = folder / "launch.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return script, marker


def encrypted(user_password: str) -> bytes:
    """The demo document encrypted (RC4-128; an owner password, and ``user_password``, which may be empty)."""
    import pypdf  # the dev extra: it writes the encryption

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(DEMO)))
    writer.encrypt(user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
