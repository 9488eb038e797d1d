"""Image preprocessing: token counts and HD sizes (SPEC section 4), pixels, colour modes, EXIF, errors, golden cases."""

from __future__ import annotations

import ast
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from phi3v_tools.errors import ImageError, Phi3VToolsError
from phi3v_tools.model.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_SIZE,
    Phi3VImageProcessor,
    hd_image_size,
    hd_resized_size,
    hd_scale,
    num_image_tokens,
)
from tests.conftest import REFERENCE

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image: no pixel of it normalises to exactly zero."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _pixels(image: Image.Image, num_crops: int = 4, **kwargs: Any) -> torch.Tensor:
    return Phi3VImageProcessor(num_crops, **kwargs)([image])["pixel_values"]


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """The normalised value of an 8-bit RGB colour, per channel, shape [3]."""
    value = torch.tensor(rgb, dtype=torch.float32) / 255
    return (value - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def _golden_cases() -> list[dict[str, Any]]:
    path = REFERENCE / "golden" / "expected.json"
    if not path.is_file():
        return []
    return [case for case in json.loads(path.read_text())["cases"] if case["images"]]


def _literal(value: Any) -> Any:
    return ast.literal_eval(value) if isinstance(value, str) else value


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Sizes and token counts (SPEC section 4 test vectors)

SPEC_VECTORS = [
    # (width, height, num_crops, (padded height, padded width), tokens)
    (336, 336, 16, (1344, 1344), 2509),
    (1000, 1000, 16, (1344, 1344), 2509),
    (640, 480, 16, (1008, 1344), 1921),
    (1024, 768, 16, (1008, 1344), 1921),
    (1344, 1008, 16, (1008, 1344), 1921),
    (1280, 720, 16, (1008, 1680), 2353),
    (1920, 1080, 16, (1008, 1680), 2353),
    (720, 1280, 16, (1680, 1008), 2377),
    (8000, 50, 16, (336, 5376), 2473),
    (50, 8000, 16, (5376, 336), 2653),
    (336, 336, 4, (672, 672), 757),
    (1000, 1000, 4, (672, 672), 757),
    (640, 480, 4, (672, 672), 757),
    (1024, 768, 4, (672, 672), 757),
    (1344, 1008, 4, (672, 672), 757),
    (1280, 720, 4, (672, 672), 757),
    (1920, 1080, 4, (672, 672), 757),
    (720, 1280, 4, (672, 672), 757),
    (8000, 50, 4, (336, 1344), 745),
    (50, 8000, 4, (1344, 336), 781),
]


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "padded", "tokens"),
    SPEC_VECTORS,
    ids=[f"{w}x{h}-crops{n}" for w, h, n, _, _ in SPEC_VECTORS],
)
def test_spec_test_vectors_give_the_documented_padded_size_and_token_count(
    width: int, height: int, num_crops: int, padded: tuple[int, int], tokens: int
) -> None:
    assert hd_image_size(width, height, num_crops) == padded
    assert num_image_tokens(width, height, num_crops) == tokens
    assert Phi3VImageProcessor(num_crops).num_image_tokens(width, height) == tokens


@pytest.mark.parametrize(("width", "height"), [(336, 336), (1, 1), (640, 480), (720, 1280), (8000, 50), (50, 300)])
def test_one_crop_gives_313_tokens_and_a_single_tile_for_any_ordinary_size(width: int, height: int) -> None:
    assert hd_image_size(width, height, 1) == (336, 336)
    assert num_image_tokens(width, height, 1) == 313


def test_the_crop_grid_never_exceeds_num_crops() -> None:
    for num_crops in (1, 2, 3, 4, 9, 16):
        for width, height in [(1, 1), (640, 480), (1920, 1080), (100, 900), (8000, 50), (333, 777)]:
            hd_h, hd_w = hd_image_size(width, height, num_crops)
            assert hd_h % CROP_SIZE == 0 and hd_w % CROP_SIZE == 0
            assert (hd_h // CROP_SIZE) * (hd_w // CROP_SIZE) <= num_crops, (width, height, num_crops)


def test_scale_keeps_the_originals_float_arithmetic_at_exact_boundaries() -> None:
    # 4 / (640 / 480) == 3.0 exactly: ceil(3.0) == 3, so scale 3 fits 16 crops as 3 x 4 = 12 tiles, not 4 x 4.
    assert hd_scale(640, 480, 16) == 4
    assert hd_resized_size(640, 480, 16) == (1344, 1008)


@pytest.mark.parametrize(("width", "height", "num_crops"), [(1, 2000, 4), (2000, 1, 1), (1, 6000, 16)])
def test_extreme_aspect_ratio_keeps_a_one_pixel_short_side_and_a_usable_size(
    width: int, height: int, num_crops: int
) -> None:
    """Thinner than long side / 336: the original resized to 0 pixels and crashed; we keep 1 pixel."""
    padded = hd_image_size(width, height, num_crops)
    assert all(side > 0 and side % CROP_SIZE == 0 for side in padded), padded
    out = Phi3VImageProcessor(num_crops)([Image.new("RGB", (width, height), (10, 200, 30))])
    assert tuple(out["image_sizes"][0].tolist()) == padded
    grid_h, grid_w = padded[0] // CROP_SIZE, padded[1] // CROP_SIZE
    assert num_image_tokens(width, height, num_crops) == (grid_h * grid_w + 1) * 144 + 1 + (grid_h + 1) * 12


# ---------------------------------------------------------------------------------------------------------------------
# The pure size functions agree with real preprocessing


@pytest.mark.parametrize(
    ("width", "height", "num_crops"),
    [
        (640, 480, 4),
        (480, 640, 4),
        (720, 1280, 16),
        (1, 300, 4),
        (300, 1, 4),
        (1, 300, 16),
        (1, 1, 4),
        (1, 1, 16),
        (333, 777, 4),
        (333, 777, 16),
        (777, 333, 9),
        (50, 50, 1),
    ],
)
def test_preprocessing_matches_the_pure_size_functions(width: int, height: int, num_crops: int) -> None:
    out = Phi3VImageProcessor(num_crops)([_noise(width, height)])
    pixel_values, image_sizes = out["pixel_values"], out["image_sizes"]
    hd_h, hd_w = hd_image_size(width, height, num_crops)
    assert image_sizes.dtype == torch.long
    assert image_sizes.tolist() == [[hd_h, hd_w]]
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == (1, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    real = 1 + (hd_h // CROP_SIZE) * (hd_w // CROP_SIZE)
    for i in range(real):
        assert pixel_values[0, i].abs().sum() > 0, f"real crop {i} is all zero"
    assert torch.count_nonzero(pixel_values[0, real:]) == 0, "padding crops must be zero"


def test_a_batch_stacks_images_in_order_and_matches_one_by_one_processing() -> None:
    images = [_noise(640, 480, seed=1), _noise(200, 500, seed=2), _noise(10, 10, seed=3)]
    processor = Phi3VImageProcessor(4)
    batch = processor(images)
    assert batch["pixel_values"].shape == (3, 5, 3, CROP_SIZE, CROP_SIZE)
    for i, image in enumerate(images):
        alone = processor([image])
        assert torch.equal(batch["pixel_values"][i], alone["pixel_values"][0])
        assert batch["image_sizes"][i].tolist() == alone["image_sizes"][0].tolist()


def test_no_images_give_empty_tensors_of_the_right_shape() -> None:
    out = Phi3VImageProcessor(4)([])
    assert out["pixel_values"].shape == (0, 5, 3, CROP_SIZE, CROP_SIZE)
    assert out["image_sizes"].shape == (0, 2)


def test_per_call_num_crops_overrides_the_processors_default() -> None:
    out = Phi3VImageProcessor(4)([_noise(640, 480)], num_crops=16)
    assert out["pixel_values"].shape[1] == 17
    assert out["image_sizes"].tolist() == [list(hd_image_size(640, 480, 16))]


# ---------------------------------------------------------------------------------------------------------------------
# Padding


def test_wide_image_is_padded_with_white_centred_above_and_below() -> None:
    # 672x201 at num_crops 4: resized to 1008x301, padded to 1008x336: 35 rows of white, 17 on top, 18 below.
    width, height, num_crops = 672, 201, 4
    new_w, new_h = hd_resized_size(width, height, num_crops)
    assert (new_w, new_h) == (1008, 301)
    pad = CROP_SIZE - new_h
    top = pad // 2
    assert pad % 2 == 1, "an odd pad makes the floor on top observable"

    pixel_values = _pixels(Image.new("RGB", (width, height), (0, 0, 0)), num_crops)
    tiles = pixel_values[0, 1:4]  # the 1 x 3 grid, each tile is rows 0..335 of the HD image
    white = _normalised((255, 255, 255))[None, :, None, None]
    black = _normalised((0, 0, 0))[None, :, None, None]
    torch.testing.assert_close(tiles[:, :, :top], white.expand(3, 3, top, CROP_SIZE), rtol=0, atol=1e-6)
    torch.testing.assert_close(tiles[:, :, top : top + new_h], black.expand(3, 3, new_h, CROP_SIZE), rtol=0, atol=1e-6)
    bottom = pad - top
    torch.testing.assert_close(tiles[:, :, top + new_h :], white.expand(3, 3, bottom, CROP_SIZE), rtol=0, atol=1e-6)
    assert torch.count_nonzero(pixel_values[0, 4:]) == 0


def test_white_padding_equals_one_minus_mean_over_std() -> None:
    pixel_values = _pixels(Image.new("RGB", (672, 201), (0, 0, 0)), 4)
    expected = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert pixel_values[0, 1, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_portrait_image_is_padded_left_and_right() -> None:
    # 201x672 is the transpose of the wide case: columns 0..16 and 318..335 white, rows untouched.
    colour = (200, 30, 60)
    width, height, num_crops = 201, 672, 4
    new_w, new_h = hd_resized_size(width, height, num_crops)
    assert (new_w, new_h) == (301, 1008)
    assert hd_image_size(width, height, num_crops) == (1008, 336)
    left = (CROP_SIZE - new_w) // 2

    pixel_values = _pixels(Image.new("RGB", (width, height), colour), num_crops)
    tiles = pixel_values[0, 1:4]  # the 3 x 1 grid, stacked top to bottom
    white = _normalised((255, 255, 255))[None, :, None, None]
    inside = _normalised(colour)[None, :, None, None]
    torch.testing.assert_close(tiles[..., :left], white.expand(3, 3, CROP_SIZE, left), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        tiles[..., left : left + new_w], inside.expand(3, 3, CROP_SIZE, new_w), rtol=0, atol=1e-5
    )
    right = CROP_SIZE - left - new_w
    torch.testing.assert_close(tiles[..., left + new_w :], white.expand(3, 3, CROP_SIZE, right), rtol=0, atol=1e-6)


def test_tiles_are_cut_in_row_major_order() -> None:
    # A 2x2 grid whose quadrants have four colours: tiles 1..4 must be TL, TR, BL, BR.
    quadrants = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (672, 672))
    for (x, y), colour in zip([(0, 0), (336, 0), (0, 336), (336, 336)], quadrants, strict=True):
        image.paste(colour, (x, y, x + 336, y + 336))
    pixel_values = _pixels(image, 4)
    for tile, colour in enumerate(quadrants, start=1):
        centre = pixel_values[0, tile, :, 168, 168]
        torch.testing.assert_close(centre, _normalised(colour), rtol=0, atol=1e-5)


def test_small_images_are_upscaled_so_the_size_depends_only_on_the_aspect_ratio() -> None:
    small = Phi3VImageProcessor(16)([_noise(40, 30)])["image_sizes"]
    large = Phi3VImageProcessor(16)([_noise(1024, 768)])["image_sizes"]
    assert small.tolist() == large.tolist() == [[1008, 1344]]


# ---------------------------------------------------------------------------------------------------------------------
# Colour modes


def test_rgba_drops_alpha_without_compositing() -> None:
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, size=(120, 90, 4), dtype=np.uint8), mode="RGBA")
    assert torch.equal(_pixels(rgba), _pixels(rgba.convert("RGB")))
    # Compositing on white would differ wherever alpha < 255.
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert not torch.equal(_pixels(rgba), _pixels(on_white))


@pytest.mark.parametrize("mode", ["L", "LA", "1", "CMYK"])
def test_plain_modes_equal_pils_rgb_conversion(mode: str) -> None:
    image = _noise(90, 120).convert(mode)
    assert image.mode == mode
    pixel_values = _pixels(image)
    assert pixel_values.shape == (1, 5, 3, CROP_SIZE, CROP_SIZE)
    assert torch.isfinite(pixel_values).all()
    assert torch.equal(pixel_values, _pixels(image.convert("RGB")))


def _palette_image(transparency: bytes | int | None) -> tuple[Image.Image, Image.Image]:
    """A P image with palette red/green/blue (saved and reopened as PNG) and the RGB image it shows."""
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rng = np.random.default_rng(7)
    indices = rng.integers(0, 3, size=(60, 80), dtype=np.uint8)
    image = Image.fromarray(indices, mode="L").convert("P")
    image.putpalette([c for rgb in palette for c in rgb] + [0] * (768 - 9))
    buffer = io.BytesIO()
    if transparency is None:
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "PNG", transparency=transparency)
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    reopened.load()
    expected = Image.fromarray(np.asarray(palette, dtype=np.uint8)[indices], mode="RGB")
    return reopened, expected


def test_palette_image_gives_its_palette_colours() -> None:
    image, expected = _palette_image(None)
    assert image.mode == "P"
    assert torch.equal(_pixels(image), _pixels(expected))


@pytest.mark.parametrize("transparency", [b"\x00\x80\xff", 1], ids=["bytes", "index"])
def test_palette_transparency_is_dropped_quietly(transparency: bytes | int) -> None:
    image, expected = _palette_image(transparency)
    assert image.mode == "P" and "transparency" in image.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency expressed in bytes" must not fire
        pixel_values = _pixels(image)
    assert torch.equal(pixel_values, _pixels(expected))


def test_16_bit_grey_uses_its_top_8_bits_instead_of_clipping_to_white() -> None:
    gradient = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (100, 1))
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    pixel_values = _pixels(image)
    assert torch.isfinite(pixel_values).all()
    white = _normalised((255, 255, 255))
    assert not torch.allclose(pixel_values[0, 0], white[:, None, None].expand(3, CROP_SIZE, CROP_SIZE))
    eight_bit = Image.fromarray((gradient >> 8).astype(np.uint8), mode="L")
    assert torch.equal(pixel_values, _pixels(eight_bit))


@pytest.mark.parametrize(
    "array",
    [
        np.tile(np.linspace(0, 100_000, 200).astype(np.int32), (100, 1)),
        np.tile(np.linspace(0, 200, 200).astype(np.int32), (100, 1)),
        np.tile(np.linspace(0.0, 1000.0, 200).astype(np.float32), (100, 1)),
    ],
    ids=["I-wide-range", "I-8-bit-range", "F"],
)
def test_32_bit_modes_give_finite_tensors_that_keep_the_gradient(array: np.ndarray) -> None:
    image = Image.fromarray(array)
    assert image.mode in ("I", "F")
    pixel_values = _pixels(image)
    assert pixel_values.shape == (1, 5, 3, CROP_SIZE, CROP_SIZE)
    assert torch.isfinite(pixel_values).all()
    global_view = pixel_values[0, 0, 0]
    assert global_view[:, :20].mean() < global_view[:, -20:].mean(), "dark left, bright right"


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation


def _jpeg_with_orientation(orientation: int) -> Image.Image:
    """A 400x200 JPEG, red left half and white right half, stored with the given EXIF Orientation."""
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_exif_orientation_is_applied_by_default() -> None:
    photo = _jpeg_with_orientation(6)
    assert photo.size == (400, 200) and photo.getexif()[0x0112] == 6
    upright = ImageOps.exif_transpose(photo)
    assert upright.size == (200, 400)
    processed = Phi3VImageProcessor(4)([photo])
    expected = Phi3VImageProcessor(4, exif_transpose=False)([upright])
    assert processed["image_sizes"].tolist() == [[672, 336]]
    assert torch.equal(processed["pixel_values"], expected["pixel_values"])


def test_exif_transpose_false_keeps_the_stored_orientation() -> None:
    photo = _jpeg_with_orientation(6)
    stored = Phi3VImageProcessor(4, exif_transpose=False)([photo])
    rotated = Phi3VImageProcessor(4)([photo])
    assert stored["image_sizes"].tolist() == [[336, 672]]
    assert stored["image_sizes"].tolist() != rotated["image_sizes"].tolist()
    without_exif = Image.fromarray(np.asarray(photo))  # the stored pixels, no metadata
    assert torch.equal(stored["pixel_values"], Phi3VImageProcessor(4)([without_exif])["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(b"\x89PNG not an image", "bytes"), (np.zeros((8, 8, 3), dtype=np.uint8), "ndarray"), ("cat.png", "str")],
)
def test_non_pil_input_raises_image_error_naming_the_type(value: object, type_name: str) -> None:
    with pytest.raises(ImageError, match=type_name) as excinfo:
        Phi3VImageProcessor(4)([value])  # type: ignore[list-item]
    assert isinstance(excinfo.value, Phi3VToolsError)
    assert "PIL" in str(excinfo.value)


def _truncated_png() -> Image.Image:
    """A lazily opened PNG whose data is cut in half: decoding fails on first pixel access."""
    buffer = io.BytesIO()
    _noise(64, 64).save(buffer, "PNG")
    data = buffer.getvalue()
    return Image.open(io.BytesIO(data[: len(data) // 2]))


def test_truncated_png_raises_image_error() -> None:
    with pytest.raises(ImageError, match=r"could not decode the image.*truncated") as excinfo:
        Phi3VImageProcessor(4)([_truncated_png()])
    assert isinstance(excinfo.value, Phi3VToolsError)


def test_truncated_png_raises_image_error_without_exif_transpose() -> None:
    with pytest.raises(ImageError, match="truncated"):
        Phi3VImageProcessor(4, exif_transpose=False)([_truncated_png()])


def test_zero_num_crops_is_refused() -> None:
    with pytest.raises(ValueError, match="num_crops must be >= 1, got 0"):
        Phi3VImageProcessor(0)
    with pytest.raises(ValueError, match="num_crops"):
        num_image_tokens(640, 480, 0)
    with pytest.raises(ValueError, match="num_crops"):
        hd_image_size(640, 480, -1)


def test_zero_num_crops_per_call_is_refused() -> None:
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(4)([_noise(10, 10)], num_crops=0)


def test_unsupported_num_img_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="144"):
        Phi3VImageProcessor(4, num_img_tokens=256)


def test_hd_scale_refuses_a_zero_sized_image_with_image_error() -> None:
    with pytest.raises(ImageError, match=r"no pixels \(0x10\)"):
        hd_scale(0, 10, 4)


def test_zero_sized_image_raises_image_error() -> None:
    with pytest.raises(ImageError, match="no pixels"):
        num_image_tokens(0, 10, 4)
    with pytest.raises(ImageError, match="no pixels"):
        Phi3VImageProcessor(4)([Image.new("RGB", (0, 10))])


# ---------------------------------------------------------------------------------------------------------------------
# Golden cases of the original implementation (shared reference)


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda case: case["name"])
def test_golden_case_pixels_match_the_original(case: dict[str, Any], reference_dir: Path) -> None:
    images = [_open_rgb(reference_dir / "golden" / "images" / name) for name in case["images"]]
    out = Phi3VImageProcessor(case["num_crops"])(images)
    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == torch.float32
    assert list(pixel_values.shape) == case["pixel_values_shape"]
    assert out["image_sizes"].tolist() == case["image_sizes"]
    sums = [[pixel_values[i, j].sum().item() for j in range(pixel_values.shape[1])] for i in range(len(images))]
    for i, (got, want) in enumerate(zip(sums, case["pixel_values_crop_sums"], strict=True)):
        assert got == pytest.approx(want, abs=1e-2), f"image {i}"
    samples = _literal(case["pixel_values_samples"])
    assert len(samples) == 16
    for sample in samples:
        assert pixel_values[tuple(sample["index"])].item() == pytest.approx(sample["value"], abs=1e-4), sample


def test_golden_cases_are_present(reference_dir: Path) -> None:
    names = {case["name"] for case in _golden_cases()}
    assert {"one_wide", "one_tall_16", "two_images", "tiny_icon"} <= names
