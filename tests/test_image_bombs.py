"""Decode bombs the pixel cap does not see (phi3v_tools.image_checks): each is refused from its structure, with a
message that says what is wrong, quickly and before any large allocation, while a good picture decodes beside it.
Valid files of the same formats (striped, tiled, compressed, 16-bit TIFFs; progressive JPEGs; MPO; RLE BMP;
APNG) still decode. The bombs are built in code (tests/bombs.py); their cost with plain Pillow is measured by
benchmarks/decode_bombs.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from phi3v_tools import image_checks
from phi3v_tools.errors import ImageError
from phi3v_tools.feature_cache import image_digest
from phi3v_tools.image_checks import check_structure
from phi3v_tools.images import ImagePolicy, decode_bytes
from phi3v_tools.model.image_processing import to_rgb
from tests import bombs
from tests.hostile import PNG, encode, noise

REPO = Path(__file__).resolve().parent.parent
POLICY = ImagePolicy(allowed_dirs=())


def _stuffed_jpeg(filler: bytes) -> bytes:
    """A tiny JPEG with ``filler`` after its first segment (Pillow walks such bytes one at a time)."""
    data = encode(noise(8, 8), "JPEG")
    end = 4 + int.from_bytes(data[4:6], "big")
    return data[:end] + filler + data[end:]


BOMBS: list[Any] = [
    pytest.param(lambda: bombs.tiff_huge_tile(65536, real=False), "TIFF tile of 65536x65536 pixels for a 1x1 image"),
    pytest.param(
        lambda: bombs.tiff_huge_strip(4096, 65536),
        "TIFF strip of 4096x65536 pixels (RowsPerStrip 65536) for a 4096x1 image",
        id="tiff-rows-per-strip",
    ),
    pytest.param(bombs.tiff_huge_byte_count, "TIFF strip 0 claims 4294967295 bytes in a 132-byte file"),
    pytest.param(
        lambda: bombs.tiff_many_strips(1_000_000),
        "TIFF lists 1000000 strip offsets for a 1x2 image in 2 strips",
        id="tiff-many-strips",
    ),
    pytest.param(
        lambda: bombs.tiff_many_entries(100_000),
        "TIFF image directory with 100000 entries; at most 65535 are read",
        id="tiff-many-entries",
    ),
    pytest.param(lambda: bombs.tiff_long_chain(5000), "TIFF with more than 4096 pages", id="tiff-long-chain"),
    pytest.param(
        lambda: bombs.jpeg_repeated_scans(256, 2000), "JPEG with about 2000 scans; at most 100 are decoded", id="scans"
    ),
    pytest.param(lambda: bombs.mpo_repeated_scans(2000), "JPEG with about", id="mpo-scans"),
    pytest.param(
        lambda: bombs.jpeg_many_markers(10_000), "JPEG with more than 4096 marker segments", id="jpeg-markers"
    ),
    pytest.param(lambda: _stuffed_jpeg(b"\x00" * 10_000), "JPEG with more than 4096 stray bytes", id="jpeg-stray"),
    pytest.param(lambda: _stuffed_jpeg(b"\xff" * 10_000), "JPEG with more than 4096 stray bytes", id="jpeg-fill"),
    pytest.param(lambda: _stuffed_jpeg(b"\xff\xd0" * 5000), "JPEG with more than 4096 marker segments", id="jpeg-rst"),
    pytest.param(lambda: bombs.png_many_chunks(60_000), "PNG with more than 50000 chunks", id="png-chunks"),
    pytest.param(
        lambda: bombs.gif_many_extensions(200_000),
        "GIF with more than 100000 extension blocks before its first frame",
        id="gif-extensions",
    ),
    pytest.param(lambda: bombs.bmp_rle8(4096, 600), "of pixel data; at most 4194304 are decoded", id="bmp-rle"),
]


@pytest.mark.parametrize(("build", "fragment"), BOMBS)
def test_each_bomb_is_refused_from_its_structure_quickly_and_before_any_large_allocation(
    build: Callable[[], bytes], fragment: str
) -> None:
    data = build()
    assert len(data) <= POLICY.max_bytes
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError) as info:
            decode_bytes(data, "the upload", POLICY)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert fragment in message, message
    assert message.startswith("the upload is refused before decoding: ") and "(a decode bomb?)" in message
    # A loose bound (tracemalloc slows the structural walk several-fold, and CI machines are shared): the figures
    # without it are in benchmarks/results/decode_bombs.json (milliseconds); decoding the bombs takes minutes.
    assert seconds < 15.0, f"{seconds:.2f} s"
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB traced"  # the file itself is not copied


def test_a_good_picture_decodes_beside_the_bombs() -> None:
    """One thread decodes bombs while another decodes a good picture again and again: every good one succeeds."""
    good = encode(noise(64, 48, seed=3), "PNG")
    expected = image_digest(noise(64, 48, seed=3))
    hostile = [param.values[0]() for param in BOMBS[:8]]
    done, results = threading.Event(), []

    def innocent() -> None:
        while not done.is_set():
            results.append(decode_bytes(good, "the good picture", POLICY).digest)

    thread = threading.Thread(target=innocent)
    thread.start()
    try:
        for _ in range(3):
            for data in hostile:
                with pytest.raises(ImageError, match="refused before decoding"):
                    decode_bytes(data, "a bomb", POLICY)
    finally:
        done.set()
        thread.join(timeout=10)
    assert results and set(results) == {expected}


MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from phi3v_tools.errors import ImageError
from phi3v_tools.images import ImagePolicy, decode_bytes
from tests import bombs

def rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, _, v in (l.partition(":") for l in f) if k in ("VmRSS", "VmHWM")}

builds = {
    "tile": lambda: bombs.tiff_huge_tile(32768),
    "strips": lambda: bombs.tiff_many_strips(3_000_000),
    "scans": lambda: bombs.jpeg_repeated_scans(4096, fill_to=20 * 2**20),
}
out = {}
for name, build in builds.items():
    data = build()
    before = rss()["VmRSS"]
    start = time.perf_counter()
    try:
        decode_bytes(data, name, ImagePolicy(allowed_dirs=()))
        outcome = "decoded"
    except ImageError as exc:
        outcome = str(exc)
    out[name] = {"seconds": time.perf_counter() - start, "mib": rss()["VmHWM"] - before, "outcome": outcome}
    del data
print(json.dumps(out))
"""


def test_the_full_size_bombs_stay_bounded_in_time_and_memory_in_a_fresh_process() -> None:
    """The 1 GiB tile, 3 million strips and 630,000 scans of 16 Mpx (each under 20 MiB) measured in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(REPO)], capture_output=True, text=True, timeout=300, check=True
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for name, figure in figures.items():
        assert "refused before decoding" in figure["outcome"], (name, figure)
        assert figure["seconds"] < 1.0, (name, figure)
        assert figure["mib"] < 64, (name, figure)  # beyond building the bomb itself (plain Pillow: 1 GiB, 814 MiB)


def test_the_scan_limit_shrinks_with_the_picture_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scans x pixels is bounded too: a large picture gets fewer scans than the flat limit of 100."""
    data = bombs.jpeg_repeated_scans(512, 40)  # 262144 pixels
    assert check_structure(data) is None
    monkeypatch.setattr(image_checks, "JPEG_SCAN_PIXEL_BUDGET", 262144 * 30)
    problem = check_structure(data)
    assert problem is not None and "at most 30 are decoded at 262144 pixels" in problem, problem


# ---------------------------------------------------------------------------------------------------------------------
# EXIF blocks


def test_a_huge_exif_block_is_ignored_quickly_in_png_and_webp() -> None:
    block = bombs.exif_block(65534, 240, orientation=6)  # ~16 MB; orientation 6 would rotate
    makers = [bombs.png_with_exif] + ([bombs.webp_with_exif] if features.check("webp") else [])
    for make in makers:
        data = make(block, (40, 20))
        start = time.perf_counter()
        loaded = decode_bytes(data, "a picture with a huge EXIF block", POLICY)
        assert time.perf_counter() - start < 1.0
        assert (loaded.width, loaded.height) == (40, 20)  # the block (and its orientation) is ignored


def test_a_normal_exif_block_still_rotates_in_png_and_webp() -> None:
    block = bombs.exif_block(10, 16, orientation=6)
    assert len(block) < 65536
    makers = [bombs.png_with_exif] + ([bombs.webp_with_exif] if features.check("webp") else [])
    for make in makers:
        loaded = decode_bytes(make(block, (40, 20)), "a rotated picture", POLICY)
        assert (loaded.width, loaded.height) == (20, 40)


def test_the_mode_conversions_give_the_same_pixels_as_before() -> None:
    """to_rgb converts 32-bit and 16-bit grey in place now (less memory); the values are the same."""
    rng = np.random.default_rng(5)
    floats = rng.uniform(-50, 4000, size=(30, 40)).astype(np.float32)
    ints = rng.integers(-100, 70000, size=(30, 40)).astype(np.int32)
    sixteen = rng.integers(0, 65536, size=(30, 40)).astype(np.uint16)
    for array in (floats, ints):
        arr = array.astype(np.float64)
        scale = 255.0 / arr.max() if arr.max() > 255 else 1.0
        old = np.clip(arr * scale, 0, 255).astype(np.uint8)
        new = np.asarray(to_rgb(Image.fromarray(array)))[..., 0]
        assert np.array_equal(old, new)
    old16 = (sixteen.astype(np.uint32) >> 8).astype(np.uint8)
    assert np.array_equal(old16, np.asarray(to_rgb(Image.fromarray(sixteen)))[..., 0])


# ---------------------------------------------------------------------------------------------------------------------
# Valid files of the same formats still decode


def _photo(width: int = 96, height: int = 64, mode: str = "RGB") -> Image.Image:
    image = noise(width, height, seed=11)
    return image if mode == "RGB" else image.convert(mode)


def _valid() -> list[Any]:
    sixteen = Image.fromarray(np.linspace(0, 65535, 96 * 64, dtype=np.uint16).reshape(64, 96))
    cases = [
        pytest.param(encode(_photo(), "TIFF"), id="tiff-striped-raw"),
        pytest.param(encode(_photo(), "TIFF", compression="tiff_lzw"), id="tiff-lzw"),
        pytest.param(encode(_photo(), "TIFF", compression="tiff_adobe_deflate"), id="tiff-deflate"),
        pytest.param(encode(_photo(), "TIFF", compression="packbits"), id="tiff-packbits"),
        pytest.param(encode(sixteen, "TIFF"), id="tiff-16-bit"),
        pytest.param(encode(sixteen, "TIFF", compression="tiff_adobe_deflate"), id="tiff-16-bit-deflate"),
        pytest.param(_multi_strip_tiff(), id="tiff-multi-strip"),
        pytest.param(encode(_photo(), "TIFF", compression="tiff_adobe_deflate", tile=(32, 32)), id="tiff-tiled"),
        pytest.param(encode(_photo(10, 10), "TIFF", compression="tiff_lzw", tile=(256, 256)), id="tiff-big-tile"),
        pytest.param(encode(_photo(), "TIFF", save_all=True, append_images=[_photo()] * 20), id="tiff-21-pages"),
        pytest.param(encode(_photo(), "JPEG", progressive=True), id="jpeg-progressive"),
        pytest.param(encode(_photo(), "JPEG", progressive=True, optimize=True), id="jpeg-progressive-optimized"),
        pytest.param(encode(_photo(), "JPEG", optimize=True), id="jpeg-optimized"),
        pytest.param(encode(_photo(mode="L"), "JPEG", progressive=True), id="jpeg-progressive-grey"),
        pytest.param(bombs.jpeg_repeated_scans(64, 100), id="jpeg-100-scans"),
        pytest.param(encode(_photo(), "MPO", save_all=True, append_images=[_photo(mode="L")]), id="mpo"),
        pytest.param(bombs.bmp_rle8(64, 32), id="bmp-rle8"),
        pytest.param(encode(_photo(), "PNG", save_all=True, append_images=[_photo()] * 5), id="apng"),
        pytest.param(encode(_photo(), "GIF", comment=b"x" * 3000), id="gif-with-comment"),
    ]
    if features.check("libtiff") and features.check("jpg"):
        cases.append(pytest.param(encode(_photo(), "TIFF", compression="jpeg"), id="tiff-jpeg"))
    return cases


def _multi_strip_tiff() -> bytes:
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[278] = 5  # RowsPerStrip: 13 strips for 64 rows
    data = encode(_photo(), "TIFF", tiffinfo=info, compression="tiff_lzw")
    assert len(Image.open(io.BytesIO(data)).tag_v2[273]) == 13
    return data


@pytest.mark.parametrize("data", _valid())
def test_valid_files_still_decode(data: bytes) -> None:
    assert check_structure(data) is None
    loaded = decode_bytes(data, "a valid picture", POLICY)
    assert loaded.image.mode == "RGB" and loaded.width * loaded.height > 0


def test_a_large_valid_tiff_with_many_strips_decodes() -> None:
    """Every row its own strip (RowsPerStrip 1): 3000 strips, well within the limit."""
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[278] = 1
    data = encode(_photo(400, 3000, "L"), "TIFF", tiffinfo=info)
    assert check_structure(data) is None
    assert decode_bytes(data, "a tall TIFF", POLICY).height == 3000


# ---------------------------------------------------------------------------------------------------------------------
# The checkers themselves: any bytes, never an exception


SEEDS = [
    bombs.tiff_huge_tile(64, real=False),
    bombs.tiff_many_strips(40),
    bombs.tiff_many_entries(40),
    bombs.tiff_huge_subifd(40),
    bombs.tiff_long_chain(10),
    bombs.jpeg_repeated_scans(16, 12),
    bombs.gif_many_extensions(5),
    bombs.png_many_chunks(5),
    bombs.bmp_rle8(8, 4),
    encode(_photo(16, 16), "TIFF", compression="tiff_lzw", tile=(16, 16)),
    encode(_photo(16, 16), "JPEG", progressive=True),
    PNG,
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "ones"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


@settings(
    max_examples=int(os.environ.get("PHI3V_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated())
def test_the_checks_never_raise_and_stay_fast_on_mutated_files(data: bytes) -> None:
    start = time.perf_counter()
    problem = check_structure(data)
    assert problem is None or isinstance(problem, str)
    assert time.perf_counter() - start < 0.5
    try:
        decode_bytes(data, "fuzzed bytes", POLICY)
    except ImageError as exc:
        assert str(exc)


def test_a_file_full_of_broken_tags_decodes_without_a_warning_per_tag(recwarn: pytest.WarningsRecorder) -> None:
    """Pillow warns once per tag whose data lies beyond the file: 65,535 log lines from one upload otherwise."""
    from tests import bombs

    for data in (bombs.tiff_huge_subifd(count=20_000), bombs.png_with_exif(bombs.exif_block(count=8000))):
        with contextlib.suppress(ImageError):
            decode_bytes(data, "x", ImagePolicy())
    assert len(recwarn) == 0, [str(w.message) for w in list(recwarn)[:3]]
