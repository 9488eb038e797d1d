"""Decode bombs, built in code: small files whose headers make a decoder allocate or loop far beyond the picture.

Shared by ``tests/test_image_bombs.py`` and ``benchmarks/decode_bombs.py``: the benchmark builds them at full
size and decodes them with plain Pillow to show the cost; the tests build smaller ones (the pre-checks refuse
them from their structure) and, for the huge tile, skip the payload (``real=False``).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

from PIL import Image

BYTE, ASCII, SHORT, LONG, UNDEFINED, LONG8 = 1, 2, 3, 4, 7, 16
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, UNDEFINED: 1, LONG8: 8}
_CODES = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", UNDEFINED: "B", LONG8: "Q"}

Entry = tuple[int, int, Sequence[int] | bytes]  # (tag, type, values)

# TIFF tags used here
WIDTH, LENGTH, BITS, COMPRESSION, PHOTOMETRIC = 256, 257, 258, 259, 262
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTE_COUNTS, PLANAR = 273, 277, 278, 279, 284
TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTE_COUNTS = 322, 323, 324, 325
EXIF_IFD = 34665
DEFLATE = 8


def tiff(entries: Sequence[Entry], pixels: bytes = b"", *, next_ifd: int = 0, bigtiff: bool = False) -> bytes:
    """A little-endian (Big)TIFF: header, ``pixels`` at offset 8 (16 for BigTIFF), then one IFD and its values.

    Offsets into the pixel data are written by the caller as ``data_offset(bigtiff) + n``.
    """
    head = b"II*\0" + struct.pack("<I", 0) if not bigtiff else b"II+\0" + struct.pack("<HHQ", 8, 0, 0)
    start = len(head) + len(pixels)
    start += start % 2
    count_size, entry_size, pointer = (8, 20, "Q") if bigtiff else (2, 12, "I")
    inline = 8 if bigtiff else 4
    table_end = start + count_size + entry_size * len(entries) + (8 if bigtiff else 4)
    table, extra = [], bytearray()
    for tag, kind, values in sorted(entries, key=lambda e: e[0]):
        raw = bytes(values) if isinstance(values, bytes) else struct.pack(f"<{len(values)}{_CODES[kind]}", *values)
        count = len(raw) // _SIZES[kind]
        if len(raw) <= inline:
            field = raw.ljust(inline, b"\0")
        else:
            field = struct.pack(f"<{pointer}", table_end + len(extra))
            extra += raw + b"\0" * (len(raw) % 2)
        table.append(struct.pack("<HHQ" if bigtiff else "<HHI", tag, kind, count) + field)
    ifd = struct.pack("<Q" if bigtiff else "<H", len(entries)) + b"".join(table) + struct.pack(f"<{pointer}", next_ifd)
    head = head[:-8] + struct.pack("<Q", start) if bigtiff else head[:4] + struct.pack("<I", start)
    return head + pixels + b"\0" * (start - len(head) - len(pixels)) + ifd + bytes(extra)


def data_offset(bigtiff: bool = False) -> int:
    return 16 if bigtiff else 8


def _grey(width: int, height: int, more: Sequence[Entry]) -> list[Entry]:
    base: list[Entry] = [
        (WIDTH, LONG, [width]),
        (LENGTH, LONG, [height]),
        (BITS, SHORT, [8]),
        (PHOTOMETRIC, SHORT, [1]),
        (SAMPLES, SHORT, [1]),
    ]
    return base + list(more)


def _zeros_deflated(size: int) -> bytes:
    """zlib data that inflates to ``size`` zero bytes (about 1 byte per 1000), built without holding them."""
    packer = zlib.compressobj(9)
    block = b"\0" * min(size, 2**24)
    out, left = [], size
    while left > 0:
        out.append(packer.compress(block[: min(left, len(block))]))
        left -= len(block)
    out.append(packer.flush())
    return b"".join(out)


def tiff_huge_tile(side: int = 32768, *, real: bool = True) -> bytes:
    """A 1x1 deflate TIFF with one ``side`` x ``side`` tile: libtiff allocates and inflates the whole tile."""
    payload = _zeros_deflated(side * side) if real else zlib.compress(b"\0")
    entries = _grey(
        1,
        1,
        [
            (COMPRESSION, SHORT, [DEFLATE]),
            (TILE_WIDTH, LONG, [side]),
            (TILE_LENGTH, LONG, [side]),
            (TILE_OFFSETS, LONG, [data_offset()]),
            (TILE_BYTE_COUNTS, LONG, [len(payload)]),
        ],
    )
    return tiff(entries, payload)


def tiff_huge_strip(width: int = 4096, rows_per_strip: int = 2**16) -> bytes:
    """A one-row YCbCr deflate TIFF whose RowsPerStrip is huge: Pillow sizes its RGBA buffer by RowsPerStrip."""
    payload = zlib.compress(b"\x80" * (width * 3))
    entries: list[Entry] = [
        (WIDTH, LONG, [width]),
        (LENGTH, LONG, [1]),
        (BITS, SHORT, [8, 8, 8]),
        (COMPRESSION, SHORT, [DEFLATE]),
        (PHOTOMETRIC, SHORT, [6]),  # YCbCr: libtiff's RGBA interface decodes it
        (SAMPLES, SHORT, [3]),
        (ROWS_PER_STRIP, LONG, [rows_per_strip]),
        (STRIP_OFFSETS, LONG, [data_offset()]),
        (STRIP_BYTE_COUNTS, LONG, [len(payload)]),
        (530, SHORT, [1, 1]),  # YCbCrSubSampling 1x1
    ]
    return tiff(entries, payload)


def tiff_huge_byte_count() -> bytes:
    """A 1x1 deflate TIFF whose one strip claims 4 GiB of compressed data."""
    payload = zlib.compress(b"\0")
    entries = _grey(
        1,
        1,
        [
            (COMPRESSION, SHORT, [DEFLATE]),
            (ROWS_PER_STRIP, LONG, [1]),
            (STRIP_OFFSETS, LONG, [data_offset()]),
            (STRIP_BYTE_COUNTS, LONG, [2**32 - 1]),
        ],
    )
    return tiff(entries, payload)


def tiff_many_strips(count: int = 3_000_000) -> bytes:
    """A 1x2 uncompressed TIFF listing ``count`` strips (Pillow makes and decodes one tile per offset)."""
    entries = _grey(
        1,
        2,
        [
            (ROWS_PER_STRIP, LONG, [1]),
            (STRIP_OFFSETS, LONG, [data_offset()] * count),
            (STRIP_BYTE_COUNTS, SHORT, [1] * count),
        ],
    )
    return tiff(entries, b"\x7f\x7f")


def tiff_many_entries(count: int = 1_000_000) -> bytes:
    """A BigTIFF whose first IFD has ``count`` entries (each one a Python loop turn in Pillow, twice over)."""
    pixel = data_offset(bigtiff=True)
    entries: list[Entry] = _grey(1, 1, [(STRIP_OFFSETS, LONG8, [pixel]), (STRIP_BYTE_COUNTS, LONG8, [1])])
    entries += [(60000 + i % 5000, SHORT, [i % 65536]) for i in range(count - len(entries))]
    return tiff(entries, b"\x7f", bigtiff=True)


def tiff_long_chain(count: int = 1_000_000) -> bytes:
    """A 1x1 TIFF followed by a chain of ``count`` empty IFDs (6 bytes each)."""

    def build(next_ifd: int) -> bytes:
        more: list[Entry] = [(STRIP_OFFSETS, LONG, [data_offset()]), (STRIP_BYTE_COUNTS, LONG, [1])]
        return tiff(_grey(1, 1, more), b"\x7f", next_ifd=next_ifd)

    start = len(build(0))
    chain = b"".join(struct.pack("<HI", 0, start + 6 * (i + 1) if i + 1 < count else 0) for i in range(count))
    return build(start) + chain


def tiff_huge_subifd(count: int = 65535, value_bytes: int = 240) -> bytes:
    """A 1x1 TIFF whose EXIF sub-IFD has ``count`` entries (Pillow reads it with the image)."""
    pixels = b"\x7f"

    def build(at: int) -> bytes:
        more: list[Entry] = [(STRIP_OFFSETS, LONG, [8]), (STRIP_BYTE_COUNTS, LONG, [1]), (EXIF_IFD, LONG, [at])]
        return tiff(_grey(1, 1, more), pixels)

    at = len(build(0)) + len(build(0)) % 2
    head = build(at)
    return head + b"\0" * (at - len(head)) + exif_ifd_at(at, count, value_bytes, distinct=False)


def exif_ifd_at(at: int, count: int, value_bytes: int, *, distinct: bool = True, orientation: int = 0) -> bytes:
    """An IFD placed at file offset ``at``: ``count`` UNDEFINED entries of ``value_bytes`` each (out of line).

    ``distinct``: each entry has its own value (the block grows by ``value_bytes`` per entry); else they share one.
    ``orientation``: an EXIF Orientation entry first (so a reader also rotates and re-serialises the block).
    """
    entries = []
    if orientation:
        entries.append(struct.pack("<HHIHH", 0x0112, SHORT, 1, orientation, 0))
    count -= len(entries)
    value_at = at + 2 + 12 * (count + len(entries)) + 4
    for i in range(count):
        where = value_at + (i * value_bytes if distinct else 0)
        tag = 1 + i % 65534  # distinct tags (Pillow reads only the first of each), never the Orientation
        entries.append(struct.pack("<HHII", tag + (tag >= 0x0112), UNDEFINED, value_bytes, where))
    values = b"\xab" * (value_bytes * (count if distinct else 1))
    return struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0) + values


def exif_block(count: int = 65535, value_bytes: int = 240, *, orientation: int = 6) -> bytes:
    """A TIFF-structured EXIF block (as in a PNG eXIf or WebP EXIF chunk): ``count`` entries, ~16 MB by default."""
    return b"II*\0" + struct.pack("<I", 8) + exif_ifd_at(8, count, value_bytes, orientation=orientation)


def png_with_exif(exif: bytes, size: tuple[int, int] = (8, 8)) -> bytes:
    from tests.hostile import encode, noise

    return encode(noise(*size), "PNG", exif=exif)


def webp_with_exif(exif: bytes, size: tuple[int, int] = (8, 8)) -> bytes:
    from tests.hostile import encode, noise

    return encode(noise(*size), "WEBP", exif=exif, lossless=True)


# ---------------------------------------------------------------------------------------------------------------------
# JPEG


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes of the whole segment incl. any entropy-coded data after an SOS) for a simple JPEG."""
    segments, at = [(0xD8, data[:2])], 2
    while at < len(data):
        marker = data[at + 1]
        if marker == 0xD9:
            segments.append((marker, data[at : at + 2]))
            break
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        end = at + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed 0xFF or RST
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7:
                    break
                end += 2
        segments.append((marker, data[at:end]))
        at = end
    return segments


def _sos_fields(segment: bytes) -> tuple[int, int, int, int]:
    """(Ss, Se, Ah, Al) of an SOS segment."""
    at = 5 + 2 * segment[4]
    return segment[at], segment[at + 1], segment[at + 2] >> 4, segment[at + 2] & 15


def jpeg_repeated_scans(size: int = 2048, scans: int = 20000, *, fill_to: int | None = None) -> bytes:
    """A progressive JPEG of a flat ``size`` x ``size`` grey picture with its AC refinement scan repeated.

    Each copy is a few dozen bytes (12 at 256x256, 33 at 4096x4096: the whole scan is EOB runs) but makes
    libjpeg visit every coefficient of every block again, so the decode time grows with scans x pixels.
    ``fill_to``: as many copies as fit in that many bytes instead of ``scans``.
    """
    flat = Image.new("L", (size, size), 128)
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", progressive=True, quality=90)
    segments = jpeg_segments(buffer.getvalue())
    refine = [seg for marker, seg in segments if marker == 0xDA and _sos_fields(seg)[0] > 0 and _sos_fields(seg)[2]]
    head = b"".join(seg for _, seg in segments[:-1])
    copies = scans - 6 if fill_to is None else (fill_to - len(head) - 2) // len(refine[-1])
    return head + refine[-1] * copies + b"\xff\xd9"  # Pillow writes 6 scans for a grey picture


def jpeg_many_markers(count: int = 2_000_000) -> bytes:
    """A tiny JPEG with ``count`` empty COM segments before its frame (a Python loop turn each in Pillow)."""
    from tests.hostile import encode, noise

    data = encode(noise(8, 8), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def mpo_repeated_scans(scans: int = 20000, *, fill_to: int | None = None) -> bytes:
    """An MPO (two 256x256 frames) whose first frame has its AC refinement scan repeated (12 bytes a copy)."""
    first = Image.new("L", (256, 256), 128)
    second = Image.new("L", (256, 256), 30)
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], progressive=True)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    unit = [seg for marker, seg in segments if marker == 0xDA][-1]
    first_end = sum(len(seg) for marker, seg in segments if marker != 0xD9)
    copies = scans - 6 if fill_to is None else (fill_to - len(data)) // len(unit)
    return data[:first_end] + unit * copies + data[first_end:]


# ---------------------------------------------------------------------------------------------------------------------
# PNG, GIF, BMP: structures parsed by Python loops in Pillow


def png_many_chunks(count: int = 1_500_000) -> bytes:
    """A tiny PNG with ``count`` empty ancillary chunks before its image data."""
    from tests.hostile import PNG, png_chunk

    chunk = png_chunk(b"blOb", b"")
    return PNG[:33] + chunk * count + PNG[33:]


def gif_many_extensions(count: int = 2_000_000) -> bytes:
    """A tiny GIF with ``count`` empty application extensions before its first frame."""
    from tests.hostile import encode, noise

    data = encode(noise(8, 8), "GIF")
    # header (6) + logical screen descriptor (7) + global colour table (3 * 2^(n+1))
    packed = data[10]
    table = 3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0
    at = 13 + table
    return data[:at] + b"!\xfe\x00" * count + data[at:]


def bmp_rle8(width: int = 4096, height: int = 2048) -> bytes:
    """An RLE8 BMP of single-pixel runs: 2 bytes per pixel, each pair one turn of Pillow's Python decoder."""
    row = b"\x01\x05" * width + b"\x00\x00"  # runs of one pixel, then end-of-line
    pixels = row * height + b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def float_tiff(width: int = 6000, height: int = 6000) -> bytes:
    """A flat 32-bit float deflate TIFF at the pixel limit (a valid image: memory of the mode conversion)."""
    image = Image.new("F", (width, height), 1000.0)
    buffer = io.BytesIO()
    image.save(buffer, "TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()
