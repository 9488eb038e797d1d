"""Structural checks of untrusted image bytes, run before Pillow sees them (decode bombs the pixel cap misses).

The pixel cap reads the width and height from the header, but some files cost far more than their pixels:

- a TIFF tile or strip can be declared much larger than the image (libtiff allocates and inflates the whole
  tile: a 1 MB 1x1 TIFF made it allocate 1 GiB); a TIFF can list millions of strips (Pillow builds and decodes
  one tile per offset, in Python) or an IFD with millions of entries (BigTIFF);
- a progressive JPEG can repeat a 12-byte scan a million times, and libjpeg revisits every block each time
  (hours of CPU at the 20 MiB byte cap); Pillow walks JPEG segments before the first scan one byte at a time;
- PNG chunks, GIF extension blocks and BMP RLE pairs are each one turn of a Python loop in Pillow.

Pillow has no API to see these numbers before it allocates or loops (``Image.open`` already parses the whole
first IFD or every JPEG segment up to the first scan), so each check here is a small hand-written header walk:
it reads only the bytes it is given, caps every count before iterating, and returns a sentence saying what is
wrong (``None`` when the structure is fine; malformed data is left to the decoder to reject). The limits are
far above what real files use; the figures behind them are in ``benchmarks/decode_bombs.py``.
"""

from __future__ import annotations

import re
import struct

__all__ = ["check_structure"]

# TIFF
MAX_TIFF_ENTRIES = 65535  # entries in one IFD: the most a classic TIFF can hold (BigTIFF counts are 64-bit)
MAX_TIFF_PAGES = 4096  # image directories in the chain (only the first is decoded)
MAX_TIFF_BLOCKS = 131072  # strips or tiles of the first image (~7 us each in Pillow's uncompressed path)
BLOCK_SLACK_PIXELS = 2**20  # a tile or strip may cover its image plus this (a 256x256 tile on a 10x10 image)
# JPEG (MPO frames are JPEGs: the first frame is checked)
MAX_JPEG_SCANS = 100  # as libtiff's and GDAL's default scan limits
JPEG_SCAN_PIXEL_BUDGET = 2 * 10**9  # scans x pixels: about 1 ns each in libjpeg-turbo, so ~2 s at worst
MAX_JPEG_SEGMENTS = 4096  # marker segments of the first frame (ICC profiles use at most 255, XMP a few)
MAX_JPEG_STRAY_BYTES = 4096  # fill and stray bytes between segments (Pillow skips them one by one)
# Others
MAX_PNG_CHUNKS = 50_000  # ~4 us each in Pillow; an 8 KiB-IDAT PNG at 20 MiB has 2560
MAX_GIF_BLOCKS = 100_000  # extension sub-blocks before the first frame
MAX_BMP_RLE_BYTES = 4 * 2**20  # RLE pixel data: Pillow decodes it in Python, ~0.4 us per 2-byte pair

_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TIFF_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_WIDTH, _LENGTH, _PHOTOMETRIC, _STRIP_OFFSETS, _SAMPLES = 256, 257, 262, 273, 277
_ROWS_PER_STRIP, _STRIP_BYTE_COUNTS, _PLANAR = 278, 279, 284
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_BYTE_COUNTS = 322, 323, 324, 325
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 34665, 34853, 40965
_YCBCR = 6
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # a marker (not a stuffed 0xFF00 or a restart)
_NOT_FILL = re.compile(rb"[^\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_structure(data: bytes) -> str | None:
    """What makes ``data`` too costly to decode (by its first bytes: TIFF, JPEG/MPO, PNG, GIF, BMP), or None."""
    head = data[:4]
    if head in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return check_tiff(data)
    if head[:3] == b"\xff\xd8\xff":
        return check_jpeg(data)
    if data[:8] == _PNG_SIGNATURE:
        return check_png(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return check_gif(data)
    if data[:2] == b"BM":
        return check_bmp(data)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# TIFF


class _Tiff:
    """Reads entries of one (Big)TIFF file, never beyond its bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.order = "<" if data[:2] == b"II" else ">"
        self.big = data[2:4] in (b"+\0", b"\0+")
        self.count_size, self.entry_size, self.pointer = (8, 20, "Q") if self.big else (2, 12, "I")

    def first_ifd(self) -> int | None:
        at = 8 if self.big else 4
        if len(self.data) < at + (8 if self.big else 4):
            return None
        return int(struct.unpack_from(self.order + self.pointer, self.data, at)[0])

    def entry_count(self, at: int) -> int | None:
        if at <= 0 or at + self.count_size > len(self.data):
            return None
        return int(struct.unpack_from(self.order + ("Q" if self.big else "H"), self.data, at)[0])

    def next_ifd(self, at: int, count: int) -> int | None:
        where = at + self.count_size + count * self.entry_size
        if where + struct.calcsize(self.pointer) > len(self.data):
            return None
        return int(struct.unpack_from(self.order + self.pointer, self.data, where)[0])

    def entries(self, at: int, count: int) -> dict[int, tuple[int, int, int]]:
        """{tag: (type, count, offset of its values)} of the IFD at ``at`` (``count`` already capped)."""
        start = at + self.count_size
        fits = max(0, min(count, (len(self.data) - start) // self.entry_size))
        layout = self.order + ("HHQ8s" if self.big else "HHI4s")
        inline, value_field = (8, 12) if self.big else (4, 8)
        found: dict[int, tuple[int, int, int]] = {}
        table = self.data[start : start + fits * self.entry_size]
        for i, (tag, kind, n, raw) in enumerate(struct.iter_unpack(layout, table)):
            if tag in found:
                continue
            value_at = start + i * self.entry_size + value_field
            if n * _TIFF_SIZES.get(kind, 1) > inline:
                value_at = int(struct.unpack(self.order + self.pointer, raw)[0])
            found[tag] = (kind, n, value_at)
        return found

    def values(self, entry: tuple[int, int, int] | None, limit: int) -> list[int] | None:
        """Up to ``limit`` integer values of an entry, or None when it is absent, not an integer or out of the file."""
        if entry is None:
            return None
        kind, n, at = entry
        code = _TIFF_CODES.get(kind)
        if code is None or n < 1:
            return None
        n = min(n, limit)
        if at + n * _TIFF_SIZES[kind] > len(self.data):
            return None
        return [int(v) for v in struct.unpack_from(f"{self.order}{n}{code}", self.data, at)]

    def value(self, entry: tuple[int, int, int] | None) -> int | None:
        values = self.values(entry, 1)
        return values[0] if values else None


def check_tiff(data: bytes) -> str | None:
    """Entry counts, the page chain, and the strips or tiles of the first image against its size."""
    tiff = _Tiff(data)
    first = tiff.first_ifd()
    if first is None:
        return None
    pages, at = 0, first
    seen: set[int] = set()
    while at and at not in seen:  # the page chain: counts only, no entry is read
        count = tiff.entry_count(at)
        if count is None:
            break
        if count > MAX_TIFF_ENTRIES:
            return f"TIFF image directory with {count} entries; at most {MAX_TIFF_ENTRIES} are read"
        pages += 1
        if pages > MAX_TIFF_PAGES:
            return f"TIFF with more than {MAX_TIFF_PAGES} pages (image directories); only the first is read"
        seen.add(at)
        at = tiff.next_ifd(at, count) or 0
    count = tiff.entry_count(first)
    if count is None:
        return None
    entries = tiff.entries(first, count)
    problem = _check_sub_ifds(tiff, entries)
    return problem or _check_tiff_blocks(tiff, entries, len(data))


def _check_sub_ifds(tiff: _Tiff, entries: dict[int, tuple[int, int, int]]) -> str | None:
    """The EXIF and GPS directories (and EXIF's interoperability one), which Pillow reads with the image."""
    for tag in (_EXIF_IFD, _GPS_IFD):
        at = tiff.value(entries.get(tag))
        count = tiff.entry_count(at) if at else None
        if count is None:
            continue
        if count > MAX_TIFF_ENTRIES:
            return f"TIFF EXIF directory with {count} entries; at most {MAX_TIFF_ENTRIES} are read"
        if tag == _EXIF_IFD and at is not None:
            inner = tiff.value(tiff.entries(at, count).get(_INTEROP_IFD))
            inner_count = tiff.entry_count(inner) if inner else None
            if inner_count is not None and inner_count > MAX_TIFF_ENTRIES:
                return f"TIFF EXIF directory with {inner_count} entries; at most {MAX_TIFF_ENTRIES} are read"
    return None


def _check_tiff_blocks(tiff: _Tiff, entries: dict[int, tuple[int, int, int]], size: int) -> str | None:
    width, height = tiff.value(entries.get(_WIDTH)), tiff.value(entries.get(_LENGTH))
    if not width or not height:
        return None  # the decoder says what is missing
    planes = (tiff.value(entries.get(_SAMPLES)) or 1) if tiff.value(entries.get(_PLANAR)) == 2 else 1
    slack = width * height + BLOCK_SLACK_PIXELS
    tiled = _TILE_OFFSETS in entries or (_STRIP_OFFSETS not in entries and _TILE_WIDTH in entries)
    if tiled:
        kind, offsets, counts = "tile", entries.get(_TILE_OFFSETS), entries.get(_TILE_BYTE_COUNTS)
        block_w, block_h = tiff.value(entries.get(_TILE_WIDTH)), tiff.value(entries.get(_TILE_LENGTH))
        if not block_w or not block_h:
            return None
        expected = -(-width // block_w) * -(-height // block_h) * planes
        shown = f"{block_w}x{block_h} pixels"
        area = block_w * block_h  # libtiff allocates (and inflates into) a whole tile
    else:
        kind, offsets, counts = "strip", entries.get(_STRIP_OFFSETS), entries.get(_STRIP_BYTE_COUNTS)
        rows = tiff.value(entries.get(_ROWS_PER_STRIP))
        block_w, block_h = width, height if rows is None or rows == 2**32 - 1 else max(rows, 1)
        expected = -(-height // min(block_h, height)) * planes
        shown = f"{block_w}x{block_h} pixels (RowsPerStrip {block_h})"
        area = width * min(block_h, height)  # libtiff cuts a strip at the image's last row
    # Pillow's YCbCr path (libtiff's RGBA interface) allocates a full-width band of the declared rows
    band = width * block_h if tiff.value(entries.get(_PHOTOMETRIC)) == _YCBCR else 0
    if area > slack or band > slack:
        return (
            f"TIFF {kind} of {shown} for a {width}x{height} image (a {kind} may cover at most the image plus "
            f"{BLOCK_SLACK_PIXELS} pixels)"
        )
    if expected > MAX_TIFF_BLOCKS:
        return f"TIFF image in {expected} {kind}s; at most {MAX_TIFF_BLOCKS} are decoded"
    for entry, what in ((offsets, "offsets"), (counts, "byte counts")):
        if entry is not None and entry[1] > expected:
            return f"TIFF lists {entry[1]} {kind} {what} for a {width}x{height} image in {expected} {kind}s"
    for i, count in enumerate(tiff.values(counts, expected) or ()):
        if count > size:
            return f"TIFF {kind} {i} claims {count} bytes in a {size}-byte file"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# JPEG


def check_jpeg(data: bytes) -> str | None:
    """Segments, stray bytes and scans of the first frame (up to its EOI; an MPO's other frames are never read)."""
    size, at, segments, scans, stray = len(data), 2, 0, 0, 0
    pixels = 0
    while at < size:
        if data[at] != 0xFF:  # stray bytes: libjpeg warns and skips them
            following = data.find(b"\xff", at)
            stray += (following if following >= 0 else size) - at
            if following < 0:
                break
            at = following
        code = _NOT_FILL.search(data, at + 1)  # fill bytes (0xFF) may precede a marker code
        marker_at = code.start() if code else size
        stray += marker_at - at - 1
        if stray > MAX_JPEG_STRAY_BYTES:
            return f"JPEG with more than {MAX_JPEG_STRAY_BYTES} stray bytes between its segments"
        if marker_at >= size:
            break
        marker, at = data[marker_at], marker_at + 1
        if marker == 0xD9:
            break  # end of the first frame
        segments += 1  # standalone markers too: each one is a loop turn in Pillow
        if segments > MAX_JPEG_SEGMENTS:
            return f"JPEG with more than {MAX_JPEG_SEGMENTS} marker segments"
        if marker == 0x00 or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            continue  # no length follows
        if at + 2 > size:
            break
        length = int.from_bytes(data[at : at + 2], "big")
        if marker in _JPEG_SOF and at + 7 <= size and not pixels:
            pixels = int.from_bytes(data[at + 3 : at + 5], "big") * int.from_bytes(data[at + 5 : at + 7], "big")
        at += length
        if marker == 0xDA:
            scans += 1
            limit = min(MAX_JPEG_SCANS, max(1, JPEG_SCAN_PIXEL_BUDGET // max(pixels, 1)))
            if scans > limit:
                return _too_many_scans(data, at, scans, limit, pixels)
            found = _JPEG_ENTROPY_END.search(data, at)
            at = found.start() if found else size
    return None


def _too_many_scans(data: bytes, at: int, scans: int, limit: int, pixels: int) -> str:
    total = scans + data.count(b"\xff\xda", at)  # an estimate, for the message only
    per = "" if limit == MAX_JPEG_SCANS else f" at {pixels} pixels"
    return f"JPEG with {'about ' if total > scans else ''}{total} scans; at most {limit} are decoded{per}"


# ---------------------------------------------------------------------------------------------------------------------
# PNG, GIF, BMP


def check_png(data: bytes) -> str | None:
    at, chunks = 8, 0
    while at + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            return f"PNG with more than {MAX_PNG_CHUNKS} chunks"
        if data[at + 4 : at + 8] == b"IEND":
            break
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return None


def check_gif(data: bytes) -> str | None:
    if len(data) < 13:
        return None
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while at + 2 <= len(data) and data[at] == 0x21:  # extensions until the first image descriptor
        at += 2
        while at < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                return f"GIF with more than {MAX_GIF_BLOCKS} extension blocks before its first frame"
            length = data[at]
            at += 1 + length
            if length == 0:
                break
    return None


def check_bmp(data: bytes) -> str | None:
    if len(data) < 34 or int.from_bytes(data[14:18], "little") < 40:
        return None  # no compression field (OS/2 headers)
    compression = int.from_bytes(data[30:34], "little")
    offset = int.from_bytes(data[10:14], "little")
    pixels = len(data) - offset
    if compression in (1, 2) and pixels > MAX_BMP_RLE_BYTES:
        return f"RLE-compressed BMP with {pixels} bytes of pixel data; at most {MAX_BMP_RLE_BYTES} are decoded"
    return None
