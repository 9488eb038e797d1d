"""Fuzzing the image decoder path: whatever bytes arrive, the result is a checked RGB image or an ImageError.

Hypothesis mutates real PNG, JPEG, GIF, WebP, BMP and TIFF files: bit flips, cut tails, spliced chunks,
forged sizes. Any other exception, or an image that breaks the pixel limit, is a bug. The budget is small
for CI; raise it with ``PHI3V_FUZZ_EXAMPLES`` (for example 20000) for a longer run.
"""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi3v_tools.errors import ImageError
from phi3v_tools.images import ImagePolicy, decode_bytes
from tests.hostile import png_header_claiming

EXAMPLES = int(os.environ.get("PHI3V_FUZZ_EXAMPLES", "300"))
POLICY = ImagePolicy(allowed_dirs=(), max_bytes=2 * 2**20, max_pixels=4_000_000)


def _seed(fmt: str, mode: str = "RGB", size: tuple[int, int] = (24, 16)) -> bytes:
    image = Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 128)
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (x * 9 % 256, 40, 90) if mode == "RGB" else x * 9 % 256)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


SEEDS = [_seed(f) for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")] + [_seed("PNG", "L"), _seed("TIFF", "L")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "insert", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other) - 1))
            data[at:at] = other[start : start + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[at : at + draw(st.integers(1, 16))] = b"\x00" * 4
    return bytes(data)


def _check(data: bytes) -> None:
    try:
        loaded = decode_bytes(data, "fuzzed bytes", POLICY)
    except ImageError as exc:
        assert str(exc), "an ImageError must say what was wrong"
        return
    assert loaded.image.mode == "RGB"
    assert 1 <= loaded.width * loaded.height <= POLICY.max_pixels
    assert len(loaded.digest) == 64


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_fail_with_an_image_error(data: bytes) -> None:
    _check(data)


@pytest.mark.heavy
@settings(max_examples=20 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_heavy_many_more_mutated_images_decode_or_fail_with_an_image_error(data: bytes) -> None:
    _check(data)


@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_fail_with_an_image_error(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize(
    ("width", "height"), [(100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (0, 10), (70_000, 70_000)]
)
def test_forged_png_sizes_are_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageError):
        decode_bytes(png_header_claiming(width, height), "a forged PNG", POLICY)
